"""Per-mask, per-sample and per-(sample, mask) gradients, and raveling helpers.

Gradients are taken of the losses of `sme.losses` (means over examples, MSE with
the ½), and raveled to flat rows with `jax.flatten_util.ravel_pytree` order:

* mask gradients: g(eta_k) = grad_theta R^drop_S(theta; eta_k), k = 1..K, one
  row per mask (shared masks (K, *site) or per-sample masks (K, n, *site));
  their mean estimates grad L_S and their covariance is the dropout noise Sigma
  (arXiv 2305.15850 §3; docs/theory.md, "Σ and the diffusion samplers");
* per-sample gradients: g_i = grad_theta l(f_theta(x_i; eta_i), y_i), NOT divided
  by n (so grad R_S = mean_i g_i): the SGD noise;
* per-(sample, mask) gradients: G[k, i] = grad_theta l(f_theta(x_i; eta_k), y_i),
  the table from which minibatch dropout SGD's noise is built.

K-row outputs are streamed with ``lax.map(..., batch_size=chunk_size)``: chunks
of masks are vmapped, chunks are scanned, so the K x P output is the only
K-sized buffer (intermediates are chunk-sized).

Per-sample Gram matrices of MLPs never form per-sample gradients: a dense
layer's per-sample gradient is the outer product a_i delta_i^T (layer input a,
backpropagated error delta = dl/dz), so <g_i, g_j> = sum_layers (a_i.a_j + 1)
(delta_i.delta_j), the +1 from the bias (Goodfellow, arXiv 1510.01799).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sme.dropout import ones_masks, sample_masks
from sme.losses import dropout_risk, loss_fn
from sme.models import MLPSpec, Model, mlp_forward_with_taps
from sme.problem import Problem, accepts_problem, draw_masks, mask_axis, mask_shape, takes_problem

__all__ = ["check_masks", "draw_masks", "mask_gradients", "mask_losses", "per_example_mask_gram",
           "per_sample_gradients", "per_sample_gram", "ravel", "ravel_rows", "sample_losses",
           "sample_mask_gradients", "sampled_mask_gradients", "unraveler"]


def ravel(tree) -> jax.Array:
    """A pytree as one flat vector (``ravel_pytree`` order)."""
    return ravel_pytree(tree)[0]


def unraveler(params):
    """The inverse of `ravel` for pytrees shaped like ``params``."""
    return ravel_pytree(params)[1]


def ravel_rows(tree) -> jax.Array:
    """A pytree whose leaves share a leading axis K as a (K, P) matrix (`ravel` order per row)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("ravel_rows: empty pytree")
    k = leaves[0].shape[0]
    if any(leaf.shape[:1] != (k,) for leaf in leaves):
        raise ValueError(f"ravel_rows: leaves disagree on the leading axis: {[l.shape for l in leaves]}")
    return jnp.concatenate([leaf.reshape(k, -1) for leaf in leaves], axis=1)


def check_masks(model: Model, masks, lead: tuple, what: str) -> None:
    """Raise unless ``masks`` has one array per site shaped ``(*lead, *site.shape)`` (None: any size)."""
    if len(masks) != len(model.sites):
        raise ValueError(f"{what}: {len(masks)} mask arrays for {len(model.sites)} dropout sites")
    for site, m in zip(model.sites, masks):
        want = (*lead, *site.shape)
        if m.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, m.shape)):
            raise ValueError(f"{what}: masks of site {site.name} have shape {m.shape}; expected "
                             f"{tuple('K' if w is None else w for w in want)}")


@takes_problem
def mask_gradients(problem: Problem, params, masks, *, chunk_size=None):
    """Raveled gradients of R^drop_S(theta; eta_k), one row per mask.

    Also callable as ``mask_gradients(model, loss, params, x, y, masks, mode=..., chunk_size=...)``
    (`sme.problem.takes_problem`).

    Args:
      masks: leading axis K; each entry is a mask set for `dropout_risk` in the problem's mode.
      chunk_size: masks vmapped at once (None: all K).

    Returns:
      (K, P) array. Cost: K full-batch gradients.
    """
    model, loss, mode, x, y = problem.model, problem.loss, problem.mode, problem.x, problem.y
    check_masks(model, masks, mask_shape(mode, x.shape[0], None), f"mask_gradients ({mode})")
    grad = jax.grad(dropout_risk, argnums=2)
    return jax.lax.map(lambda m: ravel(grad(model, loss, params, x, y, m, mode=mode)), masks,
                       batch_size=chunk_size)


@takes_problem
def sampled_mask_gradients(problem: Problem, params, *, key, num_masks: int, chunk_size=None):
    """`mask_gradients` with masks drawn inside each chunk (never K x n masks in memory).

    Row k uses the masks of ``draw_masks(..., key=key)[k]`` (`sme.problem.draw_masks`), whatever the
    chunk size. Also callable in the loose form ``(model, loss, params, x, y, *, key, num_masks,
    mode, chunk_size)`` (`sme.problem.takes_problem`).

    Returns:
      (K, P) array. Cost: K full-batch gradients.
    """
    model, loss, mode, x, y = problem.model, problem.loss, problem.mode, problem.x, problem.y
    batch_shape = mask_shape(mode, x.shape[0])
    grad = jax.grad(dropout_risk, argnums=2)

    def one(k):
        m = sample_masks(model.sites, key=k, batch_shape=batch_shape, dtype=x.dtype)
        return ravel(grad(model, loss, params, x, y, m, mode=mode))

    return jax.lax.map(one, jax.random.split(key, num_masks), batch_size=chunk_size)


@accepts_problem
def mask_losses(model: Model, loss: str, params, x, y, masks, *, mode: str) -> jax.Array:
    """R^drop_S(theta; eta_k) for every mask: (K,). Its VJP with weights w is sum_k w_k g(eta_k)."""
    return jax.vmap(lambda m: dropout_risk(model, loss, params, x, y, m, mode=mode))(masks)


def _example_masks(model: Model, x, masks):
    """Per-example masks (n, *site): ones when ``masks`` is None."""
    if masks is None:
        return ones_masks(model.sites, batch_shape=(x.shape[0],), dtype=x.dtype)
    return masks


@accepts_problem
def sample_losses(model: Model, loss: str, params, x, y, masks=None) -> jax.Array:
    """l(f(x_i; eta_i), y_i) for every example: (n,). ``masks`` None: the deterministic net."""
    masks = _example_masks(model, x, masks)
    per_example = lambda xi, yi, mi: loss_fn(loss)(model.apply(params, xi, mi), yi)
    return jax.vmap(per_example)(x, y, masks)


@accepts_problem
def per_sample_gradients(model: Model, loss: str, params, x, y, masks=None, *, chunk_size=None):
    """Raveled g_i = grad l(f(x_i; eta_i), y_i) (not divided by n).

    Args:
      masks: per-example masks with leading axis n, or None for the deterministic net.
      chunk_size: examples vmapped at once (None: all n).

    Returns:
      (n, P) array. Cost: about one batched gradient plus writing n x P numbers.
    """
    masks = _example_masks(model, x, masks)
    check_masks(model, masks, (x.shape[0],), "per_sample_gradients")
    lfn = loss_fn(loss)

    def one(args):
        xi, yi, mi = args
        return ravel(jax.grad(lambda p: lfn(model.apply(p, xi, mi), yi))(params))

    return jax.lax.map(one, (x, y, masks), batch_size=chunk_size)


@takes_problem
def sample_mask_gradients(problem: Problem, params, masks, *, chunk_size=None):
    """Per-(mask, sample) gradients G[k, i] = grad l(f(x_i; eta_ki), y_i) of minibatch dropout SGD.

    Also callable in the loose form ``(model, loss, params, x, y, masks, *, mode, chunk_size)``
    (`sme.problem.takes_problem`).

    Args:
      masks: leading K; ``shared`` masks (K, *site) apply to every example,
        ``per_sample`` masks (K, n, *site) one per example.
      chunk_size: masks handled at once (None: all K).

    Returns:
      (K, n, P) array. Cost: K x n per-example gradients; memory K n P.
    """
    model, loss, mode, x, y = problem.model, problem.loss, problem.mode, problem.x, problem.y
    n = x.shape[0]
    check_masks(model, masks, mask_shape(mode, n, None), f"sample_mask_gradients ({mode})")
    shared = mask_axis(mode) is None

    def one(m):
        if shared:
            m = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), m)
        return per_sample_gradients(model, loss, params, x, y, m)

    return jax.lax.map(one, masks, batch_size=chunk_size)


def _mlp_taps(model: Model, loss: str, params, xi, yi, mi):
    """One example's per-layer errors dl/dz_l (o_l,) and layer inputs a_l (d_l,) of an MLP."""
    spec, lfn = model.spec, loss_fn(loss)
    taps = tuple(jnp.zeros((w,), xi.dtype) for w in (*spec.hidden, spec.out_dim))

    def tapped(t):
        out, inputs = mlp_forward_with_taps(spec, params, xi, mi, t)
        return lfn(out, yi), inputs

    return jax.grad(tapped, has_aux=True)(taps)


def _layer_gram(params, deltas, inputs) -> jax.Array:
    """sum_l (A_l A_l^T + [bias]) * (D_l D_l^T) for row-stacked inputs A_l and errors D_l."""
    layers = (*params["hidden"], params["out"])
    rows = inputs[0].shape[0]
    gram = jnp.zeros((rows, rows), inputs[0].dtype)
    for layer, a, d in zip(layers, inputs, deltas):
        gram = gram + (a @ a.T + (1.0 if "b" in layer else 0.0)) * (d @ d.T)
    return gram


@accepts_problem
def per_sample_gram(model: Model, loss: str, params, x, y, masks=None, *, chunk_size=None) -> jax.Array:
    """Gram matrix <g_i, g_j> of the per-sample gradients, (n, n).

    For MLPs (`MLPSpec`) it is assembled layer by layer from inputs and
    backpropagated errors without forming any per-sample gradient:
    sum_l (A_l A_l^T + [bias]) * (D_l D_l^T). Other models materialise the
    (n, P) gradients in chunks.

    Cost (MLP): one batched forward/backward plus n² sum_l (d_l + o_l) flops.
    """
    masks = _example_masks(model, x, masks)
    check_masks(model, masks, (x.shape[0],), "per_sample_gram")
    if not isinstance(model.spec, MLPSpec):
        g = per_sample_gradients(model, loss, params, x, y, masks, chunk_size=chunk_size)
        return g @ g.T
    deltas, inputs = jax.vmap(lambda xi, yi, mi: _mlp_taps(model, loss, params, xi, yi, mi))(x, y, masks)
    return _layer_gram(params, deltas, inputs)


@accepts_problem
def per_example_mask_gram(model: Model, loss: str, params, x, y, masks, *, chunk_size=None) -> jax.Array:
    """Per example i, the K x K Gram <grad l_i(eta_k), grad l_i(eta_l)> over K shared masks.

    The inner products that minibatch-dropout noise decompositions need
    (`sme.covariance.component_traces`), without the K x n x P table: for MLPs
    from each example's layer inputs and errors under the K masks.

    Args:
      masks: K shared masks, leading axis K.
      chunk_size: examples handled at once (None: all n).

    Returns:
      (n, K, K) array. Cost (MLP): K x n per-example forward/backward passes
      plus n K² sum_l (d_l + o_l) flops; other models form K x P per example.
    """
    check_masks(model, masks, (None,), "per_example_mask_gram")

    def one(args):
        xi, yi = args
        if isinstance(model.spec, MLPSpec):
            deltas, inputs = jax.vmap(lambda m: _mlp_taps(model, loss, params, xi, yi, m))(masks)
            return _layer_gram(params, deltas, inputs)
        lfn = loss_fn(loss)
        g = jax.vmap(lambda m: ravel(jax.grad(lambda p: lfn(model.apply(p, xi, m), yi))(params)))(masks)
        return g @ g.T

    return jax.lax.map(one, (x, y), batch_size=chunk_size)

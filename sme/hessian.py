"""Hessian-vector products and curvature matvecs, matrix-free.

H v = d/dt grad f(theta + t v) |_{t=0}: a jvp of the gradient, never an explicit
P x P matrix. `make_hvp` linearises the gradient once and applies the stored linear
map per product (forward-over-reverse from scratch when the residuals would not fit,
see its size rule); benchmarks/hessian.py measures both against a gradient. Losses
are means over examples and MSE carries the 1/2 (`sme.losses`), so every operator
here is an average over examples.

Which Hessian (docs/theory.md, "L_S and R_1"; arXiv 2305.15850, 2207.05952): the loss is one of
`LOSS_KINDS`, and every output records its kind:

* ``modified``: L_S = R_S + R_1 in closed form (MSE, dropout only on the readout
  input; `sme.losses.check_closed_form`), the mask-averaged loss the SME sees;
* ``modified_exact``: L_S = sum_eta P(eta) R^drop_S(theta; eta) over all 2**m
  shared masks (tiny nets; equal to L_S under both mask modes);
* ``modified_mc``: (1/K) sum_k R^drop_S(theta; eta_k) over K frozen masks
  (shared: (K, ...) masks; per_sample: (K, n, ...));
* ``risk``: R_S, the deterministic network;
* ``fixed_mask``: R^drop_S(theta; eta) for one mask (shared, or per_sample with a
  leading n axis).

Every loss is a mean over examples of a per-example term, so the operators sum
over chunks of examples (`lax.scan`) when ``chunk_size`` > 0: the HVP is over the
whole dataset with memory bounded by one chunk. The last chunk is padded with
zero-weight copies of the first example.

Gauss-Newton and Fisher (for the network of a ``risk`` or ``fixed_mask`` loss,
f_i = f(x_i; eta_i), J_i = df_i/dtheta, Kimura & Hino arXiv 2206.10936):

* ``ggn``: (1/n) sum_i J_i^T (d^2 l / df^2)(f_i, y_i) J_i, the output Hessian by autodiff;
* ``true``: the true Fisher of the model's predictive distribution, (1/n) sum_i
  J_i^T (diag pi_i - pi_i pi_i^T) J_i for softmax cross-entropy, (1/n) sum_i J_i^T J_i
  for MSE (Gaussian, unit variance). For these canonical-link losses it equals
  the GGN when targets are one-hot (cross-entropy's output Hessian is
  (sum_k y_k)(diag pi - pi pi^T)); it is computed from its own formula (a check,
  not a copy);
* ``empirical``: (1/n) sum_i g_i g_i^T with g_i = grad l_i (uncentred, not a covariance).

Flat operators act on (P,) vectors (the Lanczos boundary): parameters are
raveled with `jax.flatten_util.ravel_pytree` only there.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sme import losses
from sme.dropout import check_mode, enumerate_masks, mask_axis, num_droppable_units, ones_masks
from sme.models import Model
from sme.problem import MAX_EXACT_UNITS, Problem, accepts_problem, draw_masks, resolve_method

LOSS_KINDS = {
    "modified": "L_S = R_S + R_1 (closed form)",
    "modified_exact": "L_S (exact, all masks enumerated)",
    "modified_mc": "L_S (Monte Carlo over K frozen masks)",
    "risk": "R_S (no dropout)",
    "fixed_mask": "R^drop_S (one fixed mask)",
}
FISHER_KINDS = ("empirical", "true", "ggn")
MAX_DENSE_PARAMS = 5000  # dense P x P matrices beyond this are a mistake


def hvp(fn, params, v):
    """Hessian of scalar ``fn(params)`` times the pytree ``v`` (same structure). Cost: ~1 HVP."""
    return jax.jvp(jax.grad(fn), (params,), (v,))[1]


def make_flat_hvp(fn: Callable, params):
    """H v on flat vectors for the scalar ``fn(params)``: ``(hvp_flat, dim)``. Cost per call: 1 HVP."""
    flat, unravel = ravel_pytree(params)

    def hvp_flat(v):
        return ravel_pytree(hvp(fn, params, unravel(v.astype(flat.dtype))))[0]

    return hvp_flat, flat.shape[0]


class HessianLoss(NamedTuple):
    """A mean-over-examples loss whose curvature is wanted, and its recorded kind.

    ``term(params, x_i, y_i, masks_i)`` is example i's term; ``masks`` are shared
    by all examples (``mask_axis`` None) or indexed by example (``mask_axis`` 0).
    ``output(params, x_i, masks_i) -> f_i`` is the network (None for mask
    averages, which have no single network).
    """

    kind: str
    label: str
    loss: str
    term: Callable
    output: Callable | None
    masks: Any
    mask_axis: int | None


def resolve_loss_kind(kind: str, model: Model | Problem, loss: str | None = None, *,
                      max_units: int = MAX_EXACT_UNITS) -> str:
    """The concrete loss kind (a key of `LOSS_KINDS`) for ``auto``; other kinds pass through.

    ``auto``: ``risk`` (R_S) without dropout, else L_S by `sme.problem.resolve_method`: ``modified``
    (closed form), ``modified_exact`` (up to ``max_units`` droppable units) or ``modified_mc``.
    """
    if kind != "auto":
        return kind
    if isinstance(model, Problem):
        model, loss = model.model, model.loss
    if num_droppable_units(model.sites) == 0:
        return "risk"
    method = resolve_method(model, loss, max_units=max_units)
    return {"closed_form": "modified", "exact": "modified_exact", "masks": "modified_mc"}[method]


def make_hessian_loss(kind: str, model: Model | Problem, loss: str | None = None, *, masks=None, weights=None,
                      mode: str | None = None) -> HessianLoss:
    """The loss of `kind` (see `LOSS_KINDS`) as a `HessianLoss`.

    Args:
      kind: one of `LOSS_KINDS`.
      model, loss: the network and per-example loss name, or a `Problem` in place of both (its
        mode is then the default ``mode``; its data are passed to `make_hvp` separately).
      masks: ``fixed_mask``: one mask set (shared) or per-example masks (leading
        n); ``modified_mc``: K mask sets, leading (K,) (shared) or (K, n)
        (per_sample). Ignored otherwise.
      weights: ``modified_mc`` only: (K,) weights summing to 1 (default 1/K).
      mode: mask mode of ``masks``: 'shared' (default) or 'per_sample'.
    """
    if isinstance(model, Problem):
        model, loss, mode = model.model, model.loss, model.mode if mode is None else mode
    mode = "shared" if mode is None else mode
    if loss is None:
        raise ValueError("make_hessian_loss needs the loss name (or a Problem)")
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {tuple(LOSS_KINDS)}")
    loss_of = losses.loss_fn(loss)
    check_mode(mode)
    apply = model.apply
    make = lambda term, output, m, axis: HessianLoss(kind, LOSS_KINDS[kind], loss, term, output, m, axis)
    if kind == "risk":
        deterministic = lambda p, x, m: apply(p, x, ones_masks(model.sites, dtype=x.dtype))
        return make(lambda p, x, y, m: loss_of(deterministic(p, x, m), y), deterministic, None, None)
    if kind == "fixed_mask":
        _need(masks, kind)
        axis = mask_axis(mode)
        return make(lambda p, x, y, m: loss_of(apply(p, x, m), y), apply, masks, axis)
    if kind == "modified":
        losses.check_closed_form(model, loss)
        c = (1.0 - model.sites[-1].keep_prob) / (2.0 * model.sites[-1].keep_prob)

        def closed(p, x, y, m):
            ones = ones_masks(model.sites, dtype=x.dtype)
            h = model.penultimate(p, x, ones)
            return loss_of(apply(p, x, ones), y) + c * jnp.dot(h**2, jnp.sum(model.readout(p) ** 2, axis=1))

        return make(closed, None, None, None)
    if kind == "modified_exact":
        masks, weights = enumerate_masks(model.sites)
        axis = None
    else:
        _need(masks, kind)
        num = jax.tree_util.tree_leaves(masks)[0].shape[0]
        weights = np.full((num,), 1.0 / num) if weights is None else np.asarray(weights)
        if weights.shape != (num,):
            raise ValueError(f"modified_mc: weights of shape {weights.shape} for {num} masks")
        axis = mask_axis(mode)
        if axis == 0:  # (K, n, ...) -> (n, K, ...): the example axis leads
            masks = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), masks)

    def averaged(p, x, y, m):
        m = jax.tree_util.tree_map(lambda a: jnp.asarray(a, x.dtype), m)  # enumerated masks are float64 NumPy
        per_mask = jax.vmap(lambda mk: loss_of(apply(p, x, mk), y))(m)
        return jnp.dot(jnp.asarray(weights, per_mask.dtype), per_mask)

    return make(averaged, None, masks, axis)


def _need(masks, kind):
    if masks is None:
        raise ValueError(f"loss kind {kind!r} needs masks")


class _Chunks(NamedTuple):
    x: jax.Array  # (num_chunks, chunk, ...)
    y: jax.Array
    masks: Any  # chunked like x when per example, else shared
    w: jax.Array  # (num_chunks, chunk): 1/n for real examples, 0 for padding


def _chunks(hloss: HessianLoss, x, y, chunk_size: int) -> _Chunks:
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} examples but y has {y.shape[0]}")
    if hloss.mask_axis == 0:
        for leaf in jax.tree_util.tree_leaves(hloss.masks):
            if leaf.shape[0] != n:
                raise ValueError(f"per-example masks have {leaf.shape[0]} rows for {n} examples")
    size = n if chunk_size <= 0 or chunk_size >= n else chunk_size
    num = math.ceil(n / size)
    pad = num * size - n
    dtype = jnp.result_type(x.dtype, jnp.float32)

    def split(a):
        if pad:
            a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
        return a.reshape(num, size, *a.shape[1:])

    masks = hloss.masks
    if hloss.mask_axis == 0:
        masks = jax.tree_util.tree_map(split, masks)
    w = jnp.concatenate([jnp.full((n,), 1.0 / n, dtype), jnp.zeros((pad,), dtype)]).reshape(num, size)
    return _Chunks(split(x), split(y), masks, w)


def _chunk_sum(chunks: _Chunks, mask_axis, fn, init):
    """sum over chunks of ``fn(x_c, y_c, masks_c, w_c)`` (a pytree like ``init``)."""
    def take(c):
        return jax.tree_util.tree_map(lambda a: a[c], chunks.masks) if mask_axis == 0 else chunks.masks

    if chunks.x.shape[0] == 1:
        return fn(chunks.x[0], chunks.y[0], take(0), chunks.w[0])
    per_example = chunks.masks if mask_axis == 0 else None

    def body(acc, chunk):
        xc, yc, mc, wc = chunk
        mc = mc if mask_axis == 0 else chunks.masks
        return jax.tree_util.tree_map(jnp.add, acc, fn(xc, yc, mc, wc)), None

    acc, _ = jax.lax.scan(body, init, (chunks.x, chunks.y, per_example, chunks.w))
    return acc


def _weighted_terms(hloss: HessianLoss, params, x, y, masks, w):
    vals = jax.vmap(hloss.term, in_axes=(None, 0, 0, hloss.mask_axis))(params, x, y, masks)
    return w.astype(vals.dtype) @ vals


def loss_value(hloss: HessianLoss, params, x, y, *, chunk_size: int = 0) -> jax.Array:
    """The loss (mean over the n examples of x, y). Cost: one forward pass (x K masks)."""
    chunks = _chunks(hloss, x, y, chunk_size)
    zero = jnp.zeros((), chunks.w.dtype)
    return _chunk_sum(chunks, hloss.mask_axis,
                      lambda xc, yc, mc, wc: _weighted_terms(hloss, params, xc, yc, mc, wc), zero)


# Linearising the gradient once (`make_hvp`) keeps its residuals: for an MLP the activations,
# backpropagated errors and activation derivatives, a few n x (sum of widths) numbers (2,000
# examples of 784-256-256-10: ~20 MB). Above this many bytes the HVP recomputes them per call.
LINEARIZE_MAX_BYTES = 1 << 30


def linearization_bytes(fn, params) -> int:
    """Bytes of the residuals `jax.linearize` keeps for the gradient of ``fn`` (traced, not run)."""
    lin = jax.eval_shape(lambda p: jax.linearize(jax.grad(fn), p)[1], params)
    return sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(lin))


def make_hvp(hloss: HessianLoss, params, x, y, *, chunk_size: int = 0, linearize: bool | None = None):
    """Flat Hessian-vector product of the loss over all n examples.

    Two evaluations of the same operator:

    * linearised: ``jax.linearize`` of the gradient at ``params`` runs the forward and
      backward pass ONCE per call of `make_hvp` (per Lanczos, SLQ or Hutchinson run when
      built inside it) and keeps their residuals; every matvec is then one JVP of the
      stored linear map (a tangent forward and backward pass, no primal recomputation);
    * forward-over-reverse: every matvec is ``jvp(grad)`` from scratch (primal and tangent),
      over chunks of examples when ``chunk_size`` > 0: memory of one chunk.

    Size rule (``linearize=None``): linearise when the examples are not chunked and the
    residuals (`linearization_bytes`) fit in `LINEARIZE_MAX_BYTES`; otherwise
    forward-over-reverse. ``True``/``False`` force either (``True`` needs no chunking).
    The default is the size rule. The two evaluations agree to rounding, not bit for bit, and
    vmapped and one-at-a-time linearised products round differently: results are compared
    across them with rounding tolerances (statistics that are discontinuous in their inputs,
    such as a bootstrap bound over a few eigenpairs, with a tolerance on their own scale).

    Args:
      hloss: from `make_hessian_loss`.
      params: linearisation point (pytree).
      x, y: (n, ...) examples; chunk_size: examples per chunk (0: all at once).
      linearize: None (default: the size rule), False or True.

    Returns:
      ``(matvec, dim)``: ``matvec(v (P,)) -> H v (P,)``. Cost per call: linearised, about one
      gradient's worth of tangent passes plus one gradient at construction; forward-over-reverse
      1 HVP over n examples.
    """
    flat, unravel = ravel_pytree(params)
    chunks = _chunks(hloss, x, y, chunk_size)
    whole = chunks.x.shape[0] == 1
    if linearize and not whole:
        raise ValueError(f"make_hvp: linearize=True needs the examples unchunked (chunk_size={chunk_size} < n)")
    if whole:
        masks = jax.tree_util.tree_map(lambda a: a[0], chunks.masks) if hloss.mask_axis == 0 else chunks.masks
        fn = lambda p: _weighted_terms(hloss, p, chunks.x[0], chunks.y[0], masks, chunks.w[0])
        if linearize is None:
            linearize = linearization_bytes(fn, params) <= LINEARIZE_MAX_BYTES
        if linearize:
            _, lin = jax.linearize(jax.grad(fn), params)
            return (lambda v: ravel_pytree(lin(unravel(v.astype(flat.dtype))))[0]), flat.shape[0]

    def matvec(v):
        tangent = unravel(v.astype(flat.dtype))

        def one(xc, yc, mc, wc):
            fn = lambda p: _weighted_terms(hloss, p, xc, yc, mc, wc)
            return ravel_pytree(hvp(fn, params, tangent))[0]

        return _chunk_sum(chunks, hloss.mask_axis, one, jnp.zeros_like(flat))

    return matvec, flat.shape[0]


def problem_hvp(problem: Problem, params, *, kind: str = "auto", masks=None, key=None, num_masks: int = 64,
                max_units: int = MAX_EXACT_UNITS, **hvp_kwargs):
    """Flat Hessian-vector product of the problem's loss `kind` over all its examples.

    ``kind='auto'`` is `resolve_loss_kind` (R_S without dropout, else L_S in closed form, exactly or
    over ``num_masks`` frozen masks drawn from ``key``); ``fixed_mask`` and ``modified_mc`` take
    ``masks`` (or draw them from ``key``). ``hvp_kwargs`` (``chunk_size``, ``linearize``) go to
    `make_hvp`.

    Returns:
      ``(matvec, dim)`` as `make_hvp`. Cost: as `make_hvp` for the resolved kind.
    """
    kind = resolve_loss_kind(kind, problem, max_units=max_units)
    if kind in ("fixed_mask", "modified_mc") and masks is None:
        if key is None:
            raise ValueError(f"problem_hvp: loss kind {kind!r} needs masks or a key to draw them")
        many = draw_masks(problem, key=key, num_masks=num_masks if kind == "modified_mc" else 1)
        masks = many if kind == "modified_mc" else jax.tree_util.tree_map(lambda a: a[0], many)
    hloss = make_hessian_loss(kind, problem, masks=masks)
    return make_hvp(hloss, params, problem.x, problem.y, **hvp_kwargs)


def _network(hloss: HessianLoss):
    if hloss.output is None:
        raise ValueError(f"Gauss-Newton and Fisher need one network per example (loss kinds 'risk' or "
                         f"'fixed_mask'), not {hloss.kind!r}")
    return hloss.output


def _output_weights(kind: str, loss: str, out, y, u):
    """The output-space matrix M_i (GGN: Hessian of l in f; true Fisher: its formula) times u."""
    if kind == "ggn":
        loss_of = losses.loss_fn(loss)
        return jax.jvp(jax.grad(lambda o: loss_of(o, y)), (out,), (u,))[1]
    if loss == "cross_entropy":
        pi = jax.nn.softmax(out)
        return pi * u - pi * jnp.dot(pi, u)
    return u  # Gaussian regression with unit variance: the Fisher of the mean is the identity


def make_fisher(kind: str, hloss: HessianLoss, params, x, y, *, chunk_size: int = 0):
    """Flat Gauss-Newton / Fisher matvec of the network of ``hloss`` (see module docstring).

    Args:
      kind: 'ggn', 'true' or 'empirical'.
      hloss: a ``risk`` or ``fixed_mask`` `HessianLoss` (it fixes network and loss).
      params, x, y, chunk_size: as in `make_hvp`.

    Returns:
      ``(matvec, dim)``. Cost per call: one jvp and one vjp of the network linearised over n
      examples, ~1 HVP; unchunked, the network is linearised once per `make_fisher` call (the
      residuals are the network's activations), chunked once per chunk and product.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    output = _network(hloss)
    flat, unravel = ravel_pytree(params)
    chunks = _chunks(hloss, x, y, chunk_size)
    loss_of = losses.loss_fn(hloss.loss)
    axis = hloss.mask_axis

    def linearise(xc, yc, mc):
        if kind == "empirical":  # per-example losses: J_l v = (g_i . v), then J_l^T (w * J_l v)
            f = lambda p: jax.vmap(lambda xi, yi, mi: loss_of(output(p, xi, mi), yi), in_axes=(0, 0, axis))(xc, yc, mc)
        else:
            f = lambda p: jax.vmap(output, in_axes=(None, 0, axis))(p, xc, mc)
        return jax.linearize(f, params)

    def product(out, f_jvp, yc, wc, tangent):
        if kind == "empirical":
            u = wc.astype(flat.dtype) * f_jvp(tangent)
        else:
            u = jax.vmap(lambda o, yi, ui: _output_weights(kind, hloss.loss, o, yi, ui))(out, yc, f_jvp(tangent))
            u = wc.astype(u.dtype)[:, None] * u
        return ravel_pytree(jax.linear_transpose(f_jvp, params)(u)[0])[0]

    if chunks.x.shape[0] == 1:
        masks = jax.tree_util.tree_map(lambda a: a[0], chunks.masks) if axis == 0 else chunks.masks
        out, f_jvp = linearise(chunks.x[0], chunks.y[0], masks)
        return (lambda v: product(out, f_jvp, chunks.y[0], chunks.w[0], unravel(v.astype(flat.dtype)))), flat.shape[0]

    def matvec(v):
        tangent = unravel(v.astype(flat.dtype))

        def one(xc, yc, mc, wc):
            return product(*linearise(xc, yc, mc), yc, wc, tangent)

        return _chunk_sum(chunks, axis, one, jnp.zeros_like(flat))

    return matvec, flat.shape[0]


def fisher_trace(kind: str, hloss: HessianLoss, params, x, y, *, chunk_size: int = 0) -> jax.Array:
    """Exact trace of a Gauss-Newton / Fisher matrix (see `make_fisher`).

    empirical: (1/n) sum_i ||g_i||^2 (per-example gradients, cost n gradients,
    memory chunk x P); ggn/true: (1/n) sum_i Tr(M_i J_i J_i^T) from per-example
    Jacobians (cost n x out_dim vjps, memory chunk x out_dim x P).
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    output = _network(hloss)
    loss_of = losses.loss_fn(hloss.loss)
    chunks = _chunks(hloss, x, y, chunk_size)
    flat_dtype = ravel_pytree(params)[0].dtype
    sq = lambda tree: sum(jnp.sum(leaf**2, axis=tuple(range(1, leaf.ndim))) for leaf in jax.tree_util.tree_leaves(tree))

    def one(xc, yc, mc, wc):
        if kind == "empirical":
            g = jax.vmap(jax.grad(lambda p, xi, yi, mi: loss_of(output(p, xi, mi), yi)),
                         in_axes=(None, 0, 0, hloss.mask_axis))(params, xc, yc, mc)
            return wc.astype(flat_dtype) @ sq(g)

        def example(xi, yi, mi):
            out = output(params, xi, mi)
            jac = jax.jacrev(output)(params, xi, mi)  # leaves (out_dim, *leaf shape)
            gram = sum(jnp.tensordot(j, j, axes=(tuple(range(1, j.ndim)),) * 2)
                       for j in jax.tree_util.tree_leaves(jac))  # J J^T, (out_dim, out_dim)
            m = jax.vmap(lambda e: _output_weights(kind, hloss.loss, out, yi, e))(jnp.eye(out.shape[0], dtype=out.dtype))
            return jnp.sum(m * gram)

        return wc.astype(flat_dtype) @ jax.vmap(example, in_axes=(0, 0, hloss.mask_axis))(xc, yc, mc)

    return _chunk_sum(chunks, hloss.mask_axis, one, jnp.zeros((), flat_dtype))


@accepts_problem
def dropout_penalty_quadratic(model: Model, loss: str, params, x, y) -> jax.Array:
    """Second-order dropout penalty of last-layer dropout, weighted by the output Fisher.

    For f = (eta * h) W + b and independent eta_j with Var eta_j = (1 - p)/p,
    E_eta l(f_eta) - l(f) = ((1 - p)/(2p)) sum_j h_j^2 W_j^T M W_j + O(third
    moments), M = d^2 l / df^2 (softmax: diag pi - pi pi^T; MSE: I). For MSE it is
    exactly R_1 (arXiv 2207.05952 Lemma 1); for cross-entropy it is the
    quadratic (Wager, Wang & Liang 2013) form. Mean over examples.

    Cost: one forward pass over x. Needs dropout on the readout input only.
    """
    if not model.only_last_layer_dropout:
        raise ValueError("dropout_penalty_quadratic needs dropout on the last hidden layer only")
    p = model.sites[-1].keep_prob
    loss_of = losses.loss_fn(loss)
    ones = ones_masks(model.sites, dtype=x.dtype)
    w = model.readout(params)

    def example(xi, yi):
        h = model.penultimate(params, xi, ones)
        m = jax.hessian(lambda o: loss_of(o, yi))(model.apply(params, xi, ones))
        return jnp.dot(h**2, jnp.sum((w @ m) * w, axis=1))

    per_example = jax.vmap(example)(x, y)
    return (1.0 - p) / (2.0 * p) * (jnp.full((x.shape[0],), 1.0 / x.shape[0], per_example.dtype) @ per_example)


# ----------------------------------------------------------------------------- blocks and dense


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def param_blocks(params, *, by: str = "layer") -> dict[str, np.ndarray]:
    """Flat index sets of parameter blocks, in `ravel_pytree` order.

    Args:
      by: 'leaf' (one block per array, named by its pytree path, e.g.
        'hidden/0/w') or 'layer' (arrays grouped by their parent path, e.g.
        'hidden/0' holding w and b).

    Returns:
      ``{name: int indices into the flat (P,) vector}`` (NumPy, static).
    """
    if by not in ("leaf", "layer"):
        raise ValueError(f"by={by!r}; expected 'leaf' or 'layer'")
    blocks: dict[str, list] = {}
    offset = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_name(path if by == "leaf" else path[:-1]) or "params"
        blocks.setdefault(name, []).append(np.arange(offset, offset + leaf.size))
        offset += leaf.size
    return {name: np.concatenate(parts) for name, parts in blocks.items()}


def restrict(matvec: Callable, indices, dim: int):
    """The diagonal block A[idx, idx] of a flat operator on R^dim, as a matvec on R^len(idx).

    Returns:
      ``(block_matvec, block_dim)``. Cost per call: one matvec of the full operator.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= dim:
        raise ValueError(f"restrict: indices must be a non-empty 1-D set within [0, {dim})")

    def block_matvec(v):
        if v.shape != (idx.size,):
            raise ValueError(f"block matvec expects shape ({idx.size},), got {v.shape}")
        return matvec(jnp.zeros((dim,), v.dtype).at[idx].set(v))[idx]

    return block_matvec, idx.size


def to_dense(matvec: Callable, dim: int, *, dtype=jnp.float32) -> jax.Array:
    """The (dim, dim) matrix of a flat operator, column by column (tiny models only). Cost: dim matvecs."""
    if dim > MAX_DENSE_PARAMS:
        raise ValueError(f"to_dense: P={dim} > {MAX_DENSE_PARAMS}; use Lanczos (sme.lanczos) instead")
    return jax.lax.map(matvec, jnp.eye(dim, dtype=dtype)).T

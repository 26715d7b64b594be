"""Samples of the dropout SME's diffusion Sigma(theta)^{1/2} xi, never forming Sigma.

Sigma(theta) = E_eta[(g_eta - grad L_S)(g_eta - grad L_S)^T], g_eta = grad R^drop_S(theta; eta)
(arXiv 2305.15850 §3; docs/theory.md, "Σ and the diffusion samplers"). Every sampler returns s = sum_j w_j grad l_j(theta), a
weighted gradient of mask losses l_j computed in ONE backward pass, with weights linear in a
standard Gaussian noise xi, so that Cov_xi(s) is the target covariance:

* ``masks`` (any model and loss): K masks eta_k drawn at the current theta and z ~ N(0, I_K);
  s = sum_k (z_k - z_bar) g_k / sqrt(K - 1) = grad sum_k (z_k - z_bar) R^drop(theta; eta_k) / sqrt(K - 1).
  Given the masks Cov(s) = Sigma_K = G_c^T G_c / (K - 1) exactly; over the masks E Sigma_K = Sigma.
  Cost: K forward passes, one backward pass.
* ``exact`` (tiny nets, m <= ~12 droppable units): all E = 2**m masks with probabilities P_e and
  standardised unit noise u_e = (eta_e - 1) / sqrt((1 - p)/p) (m-vector). Split g into its linear
  regression on u, B u with B = Cov(g, u) = sum_e P_e g_e u_e^T, and the residual r_e. Then
  s = B zeta + sum_e sqrt(P_e) z_e r_e,  zeta ~ N(0, I_m), z ~ N(0, I_E),
  has Cov(s) = B B^T + Cov(r) = Sigma exactly, and equals grad sum_e w_e R^drop(theta; eta_e) with
  w_e = P_e (u_e.(zeta - v) - c) + sqrt(P_e) z_e, c = sum_e sqrt(P_e) z_e, v = sum_e sqrt(P_e) z_e u_e.
  Cost: E forward passes, one backward pass.
* ``closed_form`` (MSE with dropout only on the readout input, arXiv 2207.05952 Lemma 1: the same
  condition as L_S = R_S + R_1): f(x; eta) = eta . phi(x) + b is linear in the mask, so g_eta is a
  quadratic polynomial in delta = eta - 1, g - grad L_S = sum_k delta_k M_k + sum_{k<l} delta_k
  delta_l S_kl, whose two parts are uncorrelated (delta_k^2 = v + beta delta_k for a two-point law,
  v = (1 - p)/p, beta = (1 - 2p)/p). Hence s = sqrt(v) sum_k zeta_k M_k + v sum_{k<l} z_kl S_kl has
  covariance exactly Sigma, and it is the gradient of a potential built from the Gram matrices
  H^T H and W W^T of the readout input and weight (`closed_form_potential`). Cost: one gradient
  over the n examples plus 2 n m^2 (shared masks), noise dimension m + m(m - 1)/2, for any width m.

Both exact forms put the unit noise zeta first: coupling zeta_k to the discrete step's mask
(`coupled_normals`) couples the SDE's linear noise to the discrete noise without changing either law.

``per_sample`` masks (one mask per example): Sigma = (1/n^2) sum_i Cov_eta(grad l_i), and every
sampler above is applied per example with its own noise (a leading noise axis G = n instead of 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

from sme.dropout import Site, check_mode, enumerate_masks, num_droppable_units, ones_masks
from sme.losses import loss_fn
from sme.models import MLPSpec, Model, mlp_mask_outputs
from sme.problem import MAX_EXACT_UNITS, METHODS, Problem, check_closed_form, tree_sq_norm
from sme.problem import draw_masks as _draw_masks

DIFFUSIONS = METHODS
# The name sde, lockstep and sweep import: the per-step enumeration default `sme.problem.MAX_EXACT_UNITS`
# (12), not the hard limit of `sme.dropout.enumerate_masks` (`sme.dropout.MAX_ENUMERATED_UNITS`, 20).
MAX_ENUMERATED_UNITS = MAX_EXACT_UNITS


def droppable_sites(sites: tuple[Site, ...]) -> list[int]:
    return [i for i, s in enumerate(sites) if s.droppable]


def num_units(sites) -> int:
    """m: droppable units (the length of the unit noise zeta)."""
    return num_droppable_units(sites)


def unit_scales(sites) -> np.ndarray:
    """sqrt((1 - p_j)/p_j) for every droppable unit j: the standard deviation of eta_j - 1. (m,)."""
    return np.concatenate([np.full(sites[i].size, np.sqrt((1 - sites[i].keep_prob) / sites[i].keep_prob))
                           for i in droppable_sites(sites)] or [np.zeros(0)])


def check_diffusion(problem_or_model, loss: str, name: str, *, max_units: int = MAX_EXACT_UNITS) -> None:
    """Raise ValueError (saying why) unless diffusion `name` applies to this model and loss."""
    model = problem_or_model.model if isinstance(problem_or_model, Problem) else problem_or_model
    if name not in DIFFUSIONS:
        raise ValueError(f"unknown diffusion {name!r}; expected one of {DIFFUSIONS}")
    if name == "exact" and num_units(model.sites) > max_units:
        raise ValueError(f"exact diffusion enumerates 2**m masks; m = {num_units(model.sites)} droppable units "
                         f"exceeds the limit {max_units}")
    if name == "closed_form":
        check_closed_form(model, loss)


# --- Mask uniforms and the quantile coupling ---------------------------------------------------


def unit_uniforms(sites, *, key, batch_shape=(), dtype=None) -> jax.Array:
    """The uniforms U behind `sample_masks(sites, key=key)`: a unit is kept iff U < p.

    `jax.random.bernoulli(k, p, shape)` is ``uniform(k, shape, dtype(p)) < p``; site s uses
    ``fold_in(key, s)``. The test suite checks mask equality, so a change in JAX is caught.

    Returns:
      (*batch_shape, m): droppable units of every site, flattened in site order.
    """
    parts = []
    for index in droppable_sites(sites):
        site = sites[index]
        u_dtype = dtype or jnp.asarray(site.keep_prob).dtype
        u = jax.random.uniform(jax.random.fold_in(key, index), (*batch_shape, *site.shape), u_dtype)
        parts.append(u.reshape(*batch_shape, site.size))
    return jnp.concatenate(parts, axis=-1)


def masks_from_uniforms(sites, u: jax.Array, *, dtype=jnp.float32):
    """Masks (U < p)/p for droppable units and ones elsewhere; equals `sample_masks` on the same key."""
    batch_shape, masks, offset = u.shape[:-1], [], 0
    for site in sites:
        shape = (*batch_shape, *site.shape)
        if not site.droppable:
            masks.append(jnp.ones(shape, dtype))
            continue
        keep = u[..., offset:offset + site.size] < jnp.asarray(site.keep_prob, u.dtype)
        offset += site.size
        masks.append((keep.astype(dtype) / jnp.asarray(site.keep_prob, dtype)).reshape(shape))
    return tuple(masks)


def coupled_normals(u: jax.Array) -> jax.Array:
    """zeta = Phi^{-1}(U) on the grid midpoints: N(0, 1), countermonotone with eta = 1[U < p]/p.

    Counter- rather than comonotone because the discrete noise enters its update as
    -eps (g_eta - grad L_S) while the SDE's enters as +sqrt(eps h) sigma xi, and sigma zeta ~ B zeta
    with B = Cov(g, u): a kept unit (small U) must give a negative zeta for the two increments to
    move together. `uniform` returns multiples of 2**-nmant in [0, 1); shifting by half a grid step
    keeps the argument inside (0, 1), so zeta is always finite. |Corr(zeta_j, eta_j)| =
    phi(Phi^{-1}(p)) / sqrt(p(1 - p)): 0.80 at p = 0.5, 0.70 at p = 0.8, 0.58 at p = 0.1 (the
    largest any coupling of a Bernoulli and a Gaussian reaches).
    """
    half = 2.0 ** -(jnp.finfo(u.dtype).nmant + 1)
    return ndtri(u + half)


# --- Noise --------------------------------------------------------------------------------------


def noise_shapes(problem: Problem, name: str, *, num_masks: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the standard Gaussian parts of diffusion `name`'s noise."""
    g, m = problem.num_groups, num_units(problem.model.sites)
    if name == "masks":
        return {"z": (num_masks,)}
    if name == "exact":
        return {"zeta": (g, m), "z": (g, 2**m)}
    return {"zeta": (g, m), "z": (g, m * (m - 1) // 2)}


def draw_masks(problem: Problem, *, key, num_masks: int):
    """K mask sets from one `sample_masks` call: leading axis K ((K, n) for per_sample); the
    ``split_keys=False`` stream of `sme.problem.draw_masks`."""
    return _draw_masks(problem, key=key, num_masks=num_masks, split_keys=False)


def sample_noise(problem: Problem, name: str, *, key, num_masks: int, with_masks: bool = False) -> dict:
    """Noise for one Euler-Maruyama substep: the standard Gaussians of `noise_shapes` (one normal
    draw from ``key``, split by part name in sorted order) and, for the ``masks`` diffusion or when
    ``with_masks``, K masks from ``fold_in(key, 1)``."""
    shapes = sorted(noise_shapes(problem, name, num_masks=num_masks).items())
    sizes = [int(np.prod(shape)) for _, shape in shapes]
    flat = jax.random.normal(key, (sum(sizes),), problem.x.dtype)
    out, offset = {}, 0
    for (part, shape), size in zip(shapes, sizes):
        out[part] = flat[offset:offset + size].reshape(shape)
        offset += size
    if name == "masks" or with_masks:
        out["masks"] = draw_masks(problem, key=jax.random.fold_in(key, 1), num_masks=num_masks)
    return out


# --- Samplers -----------------------------------------------------------------------------------


def enumerated_law(sites, dtype):
    """All shared masks, their probabilities (E,) and standardised unit noise u (E, m), as constants."""
    masks, probs = enumerate_masks(sites, dtype=np.dtype(dtype))
    idx = droppable_sites(sites)
    delta = np.concatenate([masks[i].reshape(len(probs), -1) - 1.0 for i in idx], axis=1)
    u = delta / unit_scales(sites)
    return tuple(jnp.asarray(m) for m in masks), jnp.asarray(probs, dtype), jnp.asarray(u, dtype)


def loss_table(problem: Problem, params, masks) -> jax.Array:
    """l(f(x_i; eta_e), y_i) for shared masks with leading axis E: (E, n). Cost: E x n forwards
    (MLPs: the layers before the first dropout site once, `sme.models.mlp_mask_outputs`).

    Other models: examples are the outer vmap and masks the inner one: on CPU, XLA turns the other
    order's backward pass into an (E, n, width) broadcast inside a fused dot, about 3x slower.
    """
    lf, model = loss_fn(problem.loss), problem.model
    if isinstance(model.spec, MLPSpec):
        outs = mlp_mask_outputs(model.spec, params, problem.x, masks, shared=True)
        return jax.vmap(jax.vmap(lf), in_axes=(0, None))(outs, problem.y)

    def per_example(x, y):
        outs = jax.vmap(lambda m: model.apply(params, x, m))(masks)
        return jax.vmap(lf, in_axes=(0, None))(outs, y)

    return jax.vmap(per_example)(problem.x, problem.y).T


def exact_weights(probs: jax.Array, u: jax.Array, zeta: jax.Array, z: jax.Array) -> jax.Array:
    """w_ge = P_e (u_e.(zeta_g - v_g) - c_g) + sqrt(P_e) z_ge for G noise groups. (G, E)."""
    root = jnp.sqrt(probs)
    c = z @ root
    v = (z * root) @ u
    return probs * ((zeta - v) @ u.T - c[:, None]) + root * z


def mask_risks(problem: Problem, params, masks) -> jax.Array:
    """R^drop_S(theta; eta_k) for K mask sets (leading axis K; (K, n) for per_sample): (K,).
    Cost: K forward passes (MLPs share the layers before the first dropout site; vmap order
    otherwise as in `loss_table`)."""
    if problem.mode == "shared":
        return jnp.mean(loss_table(problem, params, masks), axis=1)
    lf, model = loss_fn(problem.loss), problem.model
    if isinstance(model.spec, MLPSpec):
        outs = mlp_mask_outputs(model.spec, params, problem.x, masks, shared=False)
        return jnp.mean(jax.vmap(jax.vmap(lf), in_axes=(0, None))(outs, problem.y), axis=1)

    def per_example(x, y, example_masks):  # example_masks: (K, ...)
        outs = jax.vmap(lambda m: model.apply(params, x, m))(example_masks)
        return jax.vmap(lf, in_axes=(0, None))(outs, y)

    return jnp.mean(jax.vmap(per_example, in_axes=(0, 0, 1))(problem.x, problem.y, masks), axis=0)


def closed_form_features(model: Model, params, x, y):
    """h (n, m), the readout input with every mask one; W (m, out), the readout weight; and
    psi = y - f(x; eta = 0) = y - b (n, out). Then f(x_i; eta) = (eta * h_i) W + b."""
    ones = ones_masks(model.sites, dtype=x.dtype)
    drop_all = (*ones[:-1], jnp.zeros_like(ones[-1]))
    h = jax.vmap(model.penultimate, in_axes=(None, 0, None))(params, x, ones)
    psi = y - jax.vmap(model.apply, in_axes=(None, 0, None))(params, x, drop_all)
    return h, model.readout(params), psi


def pair_matrices(z: jax.Array, m: int) -> jax.Array:
    """Symmetric (G, m, m) matrices with zero diagonal whose upper triangles (row-major) are z (G, m(m-1)/2)."""
    rows, cols = np.triu_indices(m, 1)
    pairs = jnp.zeros((z.shape[0], m, m), z.dtype).at[:, rows, cols].set(z)
    return pairs + jnp.swapaxes(pairs, 1, 2)


@jax.custom_vjp
def _gram(h: jax.Array) -> jax.Array:
    """H^T H (m, m). Its VJP is H (G + G^T): one GEMM, where autodiff of h.T @ h would do two."""
    return h.T @ h


_gram.defvjp(lambda h: (h.T @ h, h), lambda h, g: (h @ (g + g.T),))


def closed_form_potential(problem: Problem, params, noise) -> jax.Array:
    """Q(theta) whose gradient is the closed-form diffusion sample s (module docstring).

    With phi_ik = h_ik W_k, s = grad_theta (1/n) sum_i [1/2 sum_kl A_kl <phi_ik, phi_il>
    - sum_k alpha_ik <phi_ik, psi_i>] for the constant noise matrix A = sqrt(v)(zeta 1^T + 1 zeta^T
    + beta diag zeta) + v Z and alpha = sqrt(v) zeta. Since <phi_ik, phi_il> = h_ik h_il (W W^T)_kl,
    the linear part is sqrt(v) sum_i [<(zeta * h_i) W, h_i W - psi_i> + beta/2 sum_k zeta_k h_ik^2
    ||W_k||^2] and the pair part (v/2) sum_kl Z_kl (W W^T)_kl (H^T H)_kl: Gram matrices, never the
    (n, m, out) features. Q is a true function of theta (the noise is constant), so its Hessian
    is the derivative of s.

    Args:
      noise: ``zeta`` (G, m) and ``z`` (G, m(m - 1)/2), G = 1 (shared) or n (per_sample).

    Returns:
      A scalar. Cost: one forward pass plus n m^2 (shared: H^T H; its gradient one more n m^2)
      or G n m^2 elementwise (per_sample).
    """
    model, n = problem.model, problem.num_examples
    keep_prob = model.sites[-1].keep_prob
    v, beta = (1.0 - keep_prob) / keep_prob, (1.0 - 2.0 * keep_prob) / keep_prob
    h, w, psi = closed_form_features(model, params, problem.x, problem.y)
    zeta = noise["zeta"]
    zh = zeta * h  # (G, m) * (n, m): G is 1 or n
    gram = w @ w.T
    linear = jnp.sum((zh @ w) * (h @ w - psi)) + 0.5 * beta * jnp.sum(zh * h * jnp.diagonal(gram))
    pairs = pair_matrices(noise["z"], h.shape[1])
    if pairs.shape[0] == 1:
        pair = 0.5 * jnp.sum(pairs[0] * gram * _gram(h))
    else:
        pair = 0.5 * jnp.einsum("ikl,kl,ik,il->", pairs, gram, h, h)
    return (np.sqrt(v) * linear + v * pair) / n


def _closed_form_sample(problem: Problem, params, noise):
    return jax.grad(lambda p: closed_form_potential(problem, p, noise))(params)


def closed_form_trace(problem: Problem, params) -> jax.Array:
    """Tr Sigma(theta) = sum_j ||s(e_j)||^2 over the closed-form noise basis (s linear in the noise).

    Exact under the ``closed_form`` condition. Cost: G m(m + 1)/2 VJPs (G = 1 shared, n per_sample),
    against 2**m gradients by enumeration.
    """
    shapes = noise_shapes(problem, "closed_form", num_masks=0)
    sizes = {k: int(np.prod(v)) for k, v in shapes.items()}
    total = sum(sizes.values())
    basis = jnp.eye(total, dtype=problem.x.dtype)

    def sq_norm(e):
        noise, offset = {}, 0
        for k in sorted(shapes):
            noise[k] = e[offset:offset + sizes[k]].reshape(shapes[k])
            offset += sizes[k]
        s = _closed_form_sample(problem, params, noise)
        return tree_sq_norm(s)

    return jnp.sum(jax.vmap(sq_norm)(basis))


def mask_weights(z: jax.Array) -> jax.Array:
    """(z_k - z_bar) / sqrt(K - 1): the ``masks`` sample is sum_k w_k g(eta_k). (K,) -> (K,)."""
    return (z - jnp.mean(z)) / jnp.sqrt(jnp.asarray(z.shape[0] - 1, z.dtype))


def noise_potential(problem: Problem, name: str, params, noise: dict) -> jax.Array:
    """A scalar Phi(theta) whose gradient at theta is `diffusion_sample`.

    So a whole Euler-Maruyama increment, h b + sqrt(eps h) sigma xi with b = -grad U, is ONE
    gradient, grad [-h U + sqrt(eps h) Phi], sharing the forward passes of U and Phi. The noise's
    weights are constants, so Phi is a function of theta and its Hessian is the derivative of
    sigma xi as well.
    Cost: as `diffusion_sample`.
    """
    check_mode(problem.mode)
    if name == "masks":
        return jnp.dot(mask_weights(noise["z"]), mask_risks(problem, params, noise["masks"]))
    if name == "exact":
        masks, probs, u = enumerated_law(problem.model.sites, problem.x.dtype)
        w = exact_weights(probs, u, noise["zeta"], noise["z"])
        n = problem.num_examples
        return jnp.sum(jnp.broadcast_to(w.T, (w.shape[1], n)) / n * loss_table(problem, params, masks))
    if name == "closed_form":
        return closed_form_potential(problem, params, noise)
    raise ValueError(f"unknown diffusion {name!r}; expected one of {DIFFUSIONS}")


def diffusion_sample(problem: Problem, name: str, params, noise: dict):
    """Sigma(theta)^{1/2} xi for the noise of `sample_noise`: a pytree like params, differentiable
    in theta (the r2 drift differentiates ||sigma xi||^2).

    ``masks``: covariance Sigma_K of the noise's masks (E over masks: Sigma); ``exact`` and
    ``closed_form``: covariance exactly Sigma(theta). Cost: one backward pass (see module docstring).
    """
    check_mode(problem.mode)
    if name == "closed_form":
        return _closed_form_sample(problem, params, noise)
    if name in DIFFUSIONS:  # masks, exact: the weights do not depend on theta
        return jax.grad(lambda p: noise_potential(problem, name, p, noise))(params)
    raise ValueError(f"unknown diffusion {name!r}; expected one of {DIFFUSIONS}")

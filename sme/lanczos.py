"""Lanczos tridiagonalisation, extreme eigenpairs, spectral densities and traces.

For a symmetric operator A on R^P given only as ``matvec(v) -> A v`` (flat
vectors: the linear-algebra boundary of `sme`), m Lanczos steps build an
orthonormal Krylov basis Q = [q_0 .. q_{m-1}] (rows here, shape (m, P)) of
span{v0, A v0, ..., A^{m-1} v0} and the tridiagonal T = Q A Q^T with diagonal
``alphas`` (m,) and off-diagonal ``betas`` (m - 1,). Then

* Ritz pairs: T = S diag(theta) S^T gives eigenvalue estimates theta_i and
  vectors v_i = S[:, i]^T Q; the extreme ones converge first (Kaniel-Paige).
  Every reported pair carries its true residual ||A v_i - theta_i v_i||.
* Stochastic Lanczos quadrature (Golub-Meurant; Ubaru, Chen & Saad 2017; used
  for network Hessians by Ghorbani, Krishnan & Xiao, arXiv 1901.10159): for a
  random unit v0, nodes theta_i with weights S[0, i]^2 are the m-point Gauss
  quadrature of the spectral measure sum_j (u_j . v0)^2 delta(lambda - lambda_j),
  exact for polynomials of degree <= 2m - 1; averaging over probes estimates the
  density (1/P) sum_j delta(lambda - lambda_j).
* Traces: Hutchinson, E[z^T A z] = Tr A for Rademacher z; Hutch++ (Meyer, Musco,
  Musco & Woodruff, arXiv 2010.09649) removes a sketched top subspace exactly
  first, so its variance is that of the remainder.

Numerics. Full reorthogonalisation is classical Gram-Schmidt with matmuls
against the whole (zero-padded) basis, repeated once when the first pass
cancelled most of the vector (the DGKS "twice is enough" test), which keeps Q
orthonormal to working precision at half the basis reads of always twice. A breakdown (beta_j ~ 0: an invariant subspace was found,
e.g. order >= the operator's rank or a multiple eigenvalue) is detected
relative to a running estimate of ||A||; beta_j is then set to exactly 0 and the
iteration restarts from a fixed pseudo-random vector orthogonalised against Q
(the basis is read before it is written in every step, so it is updated in place),
so T splits into blocks and every later Ritz value is still a Ritz value of A.
The tridiagonal eigenproblem is solved in float64 on the host (see
`tridiagonal_eigh`). Everything is jit-friendly with static ``order``/``k``; the
callers jit once and reuse the compilation across checkpoints.

Cost: one matvec per Lanczos step plus 4 (order x P) matrix-vector products
for the reorthogonalisation. Memory: the basis is order x P numbers.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WHICH = ("largest", "smallest")
# A fixed key for breakdown restarts: deterministic, not a source of randomness of
# the results (it only chooses which part of the orthogonal complement comes next).
_RESTART_SEED = 0x5EED
# beta_j <= _BREAKDOWN * eps * ||A|| counts as a breakdown.
_BREAKDOWN = 100.0


class Eigenpairs(NamedTuple):
    values: jax.Array  # (k,) Ritz values, ordered from the requested end inwards
    vectors: jax.Array  # (k, dim) unit Ritz vectors (rows)
    residuals: jax.Array  # (k,) ||A v - lambda v|| from real matvecs


def _work_dtype(matvec: Callable, dim: int, dtype):
    """The dtype the iteration runs in: `dtype` promoted with the matvec's output dtype."""
    out = jax.eval_shape(matvec, jax.ShapeDtypeStruct((dim,), dtype))
    if out.shape != (dim,):
        raise ValueError(f"matvec maps ({dim},) vectors to shape {out.shape}; expected ({dim},)")
    return jnp.result_type(dtype, out.dtype)


def _check_order(order: int, dim: int, what: str = "order"):
    if not 1 <= order <= dim:
        raise ValueError(f"{what}={order} must be in [1, P={dim}] (a Krylov space has at most P dimensions)")


def _unit(w, norm):
    safe = jnp.where(norm > 0, norm, 1.0)
    return jnp.where(norm > 0, w / safe, jnp.zeros_like(w))


# "Twice is enough" (Kahan-Parlett; Daniel, Gragg, Kaufman & Stewart 1976): a second Gram-Schmidt pass
# is needed only when the first one cancelled most of w, i.e. ||w'|| < _DGKS ||w||; ARPACK uses 0.717.
_DGKS = 0.717


def _orthogonalise(w, basis):
    """w minus its projection on the rows of `basis`: one classical Gram-Schmidt pass, and a second
    one only when the first cancelled most of w (the DGKS criterion, `_DGKS`). In Lanczos the
    candidate is already orthogonal to all but the newest vectors up to rounding, so the second pass
    is rare. Cost: 2 reads of the basis, 4 when the second pass runs."""
    once = w - (basis @ w) @ basis
    again = jnp.linalg.norm(once) < _DGKS * jnp.linalg.norm(w)
    return jax.lax.cond(again, lambda v: v - (basis @ v) @ basis, lambda v: v, once)


def tridiagonalize(matvec: Callable, v0: jax.Array, *, order: int, keep_basis: bool = True):
    """Lanczos tridiagonalisation of a symmetric operator started at v0.

    Args:
      matvec: ``v (P,) -> A v (P,)``, A symmetric.
      v0: start vector (P,), any nonzero scale (it is normalised).
      order: number of Lanczos steps m, 1 <= m <= P (static).
      keep_basis: True (default) keeps the (m, P) basis, reorthogonalises every
        new vector against all previous ones (once, twice when the first pass
        cancelled most of it: DGKS) and returns it: memory
        m x P numbers. False keeps only two vectors (memory O(P)) and runs the
        plain three-term recurrence: without the basis there is no full
        reorthogonalisation, so once a Ritz value converges orthogonality is
        lost and spurious copies of converged extreme eigenvalues appear. The
        quadrature (SLQ densities, traces of smooth functions) stays accurate
        (Paige; Knizhnerman), eigenvectors do not exist: use it for densities
        of very large models only.

    Returns:
      ``(alphas (m,), betas (m - 1,), basis (m, P) or None)``. A beta of exactly
      0 marks a breakdown (an invariant subspace was found and the iteration
      restarted orthogonally).

    Cost: m matvecs (+ 2 m x P matrix-vector products when keeping the basis; 4 when DGKS asks for a second pass).
    """
    if v0.ndim != 1:
        raise ValueError(f"tridiagonalize: v0 must be a flat (P,) vector, got shape {v0.shape}")
    dim = v0.shape[0]
    _check_order(order, dim)
    dtype = _work_dtype(matvec, dim, v0.dtype)
    eps = jnp.finfo(dtype).eps
    # Restart candidates: rolls of one fixed Gaussian vector (distinct, and generically
    # independent of the basis).
    restart = jax.random.normal(jax.random.key(_RESTART_SEED), (dim,), dtype)
    shift = max(1, dim // (order + 1))
    zero = jnp.zeros((), dtype)

    def next_vector(j, u, scale, orthogonalise):
        """The unit vector q_j from the orthogonalised candidate u, and beta_{j-1} = ||u|| (0 on breakdown)."""
        beta = jnp.linalg.norm(u)
        broke = (j > 0) & (beta <= _BREAKDOWN * eps * scale)
        def restart_vector(_):
            r = orthogonalise(jnp.roll(restart, j * shift))
            return _unit(r, jnp.linalg.norm(r))

        q = jax.lax.cond(broke, restart_vector, lambda _: _unit(u, beta), None)
        return q, jnp.where(broke, zero, beta)

    alphas0 = jnp.zeros((order,), dtype)
    betas0 = jnp.zeros((order,), dtype)  # betas[j] couples q_{j-1} and q_j; betas[0] is unused

    if keep_basis:
        # The incoming candidate is orthogonalised at the START of a step, so every read
        # of the basis comes before this step's write: XLA then updates it in place (a
        # read after the write inside the breakdown branch would copy order x P numbers).
        def body(j, carry):
            basis, alphas, betas, u, q_prev, scale = carry
            q, beta = next_vector(j, _orthogonalise(u, basis), scale, lambda r: _orthogonalise(r, basis))
            basis = basis.at[j].set(q)
            w = matvec(q).astype(dtype)
            scale = jnp.maximum(scale, jnp.linalg.norm(w))
            alpha = jnp.dot(q, w)
            u = w - alpha * q - beta * q_prev  # the three-term recurrence, then full reorthogonalisation next step
            return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), u, q, scale

        init = (jnp.zeros((order, dim), dtype), alphas0, betas0, v0.astype(dtype), jnp.zeros((dim,), dtype), zero)
        basis, alphas, betas, *_ = jax.lax.fori_loop(0, order, body, init)
        return alphas, betas[1:], basis

    def body3(j, carry):
        alphas, betas, u, q_prev, scale = carry
        local = lambda r: r - jnp.dot(q_prev, r) * q_prev  # only the newest vector is kept
        q, beta = next_vector(j, local(u), scale, local)
        w = matvec(q).astype(dtype)
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        alpha = jnp.dot(q, w)
        u = w - alpha * q - beta * q_prev
        u = u - jnp.dot(q, u) * q  # local reorthogonalisation against the newest vector
        return alphas.at[j].set(alpha), betas.at[j].set(beta), u, q, scale

    init = (alphas0, betas0, v0.astype(dtype), jnp.zeros((dim,), dtype), zero)
    alphas, betas, *_ = jax.lax.fori_loop(0, order, body3, init)
    return alphas, betas[1:], None


# Arrays cross the host boundary as raw uint32 words: JAX canonicalises callback
# arguments and results in the callback's thread, which does not see a
# thread-local `jax.enable_x64` context (float64 would silently become float32).


def _to_words(x: jax.Array) -> jax.Array:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # float64 (..., 2) words; float32 (...)
    return u if x.dtype.itemsize > 4 else u[..., None]


def _from_words(u: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(u if np.dtype(dtype).itemsize > 4 else u[..., 0], dtype)


def _host_eigh(alpha_words: np.ndarray, beta_words: np.ndarray, *, dtype):
    from scipy.linalg import eigh_tridiagonal

    unpack = lambda w: np.ascontiguousarray(w, np.uint32).view(dtype).reshape(w.shape[:-1]).astype(np.float64)
    a, b = unpack(alpha_words), unpack(beta_words)
    if np.all(np.isfinite(a)) and np.all(np.isfinite(b)):
        values, vectors = eigh_tridiagonal(a, b)
    else:  # LAPACK must never see NaN
        values, vectors = np.full(a.shape, np.nan), np.full(a.shape * 2, np.nan)
    pack = lambda v: np.ascontiguousarray(v.astype(dtype)).view(np.uint32).reshape(*v.shape, -1)
    return pack(values), pack(vectors)


def tridiagonal_eigh(alphas: jax.Array, betas: jax.Array):
    """Eigen-decomposition of the symmetric tridiagonal (alphas, betas), in float64 on the host.

    Why the host and float64: T is only order x order, so LAPACK's tridiagonal
    solver (scipy ``eigh_tridiagonal``) costs microseconds, while in float32 the
    small first components of the eigenvectors (the SLQ weights) and the
    separation of nearly equal Ritz values lose digits that a float64 solve
    keeps; it also works when JAX's x64 mode is off. Under jit this is a
    `jax.pure_callback` (the device waits for the host once per call); under
    vmap it runs sequentially.

    Returns:
      ``(values (m,) ascending, vectors (m, m))`` with T = V diag(values) V^T,
      in the dtype of ``alphas``.
    """
    m = alphas.shape[-1]
    if betas.shape[-1] != m - 1:
        raise ValueError(f"tridiagonal_eigh: betas must have {m - 1} entries for {m} alphas, got {betas.shape}")
    dtype = np.dtype(alphas.dtype)
    words = dtype.itemsize // 4
    shapes = (jax.ShapeDtypeStruct((*alphas.shape, words), jnp.uint32),
              jax.ShapeDtypeStruct((*alphas.shape, m, words), jnp.uint32))
    host = functools.partial(_host_eigh, dtype=dtype)
    values, vectors = jax.pure_callback(host, shapes, _to_words(alphas), _to_words(betas.astype(dtype)),
                                        vmap_method="sequential")
    return _from_words(values, dtype), _from_words(vectors, dtype)


def ritz_pairs(matvec: Callable, alphas, betas, basis, *, k: int, which: str = "largest") -> Eigenpairs:
    """The k extreme Ritz pairs of a Lanczos run, with true residuals.

    Args:
      matvec: the operator the run used (for the residuals).
      alphas, betas, basis: `tridiagonalize` output (basis kept).
      k: number of pairs (static), <= order.
      which: "largest" (values largest-first) or "smallest" (smallest-first).

    Returns:
      `Eigenpairs`. Cost: k matvecs.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r}; expected one of {WHICH}")
    if basis is None:
        raise ValueError("ritz_pairs needs the Lanczos basis: call tridiagonalize with keep_basis=True")
    order = alphas.shape[0]
    if not 1 <= k <= order:
        raise ValueError(f"k={k} must be in [1, order={order}]: a run of order m has only m Ritz pairs")
    theta, s = tridiagonal_eigh(alphas, betas)
    idx = jnp.arange(order - 1, order - 1 - k, -1) if which == "largest" else jnp.arange(k)
    values = theta[idx]
    vectors = s[:, idx].T @ basis
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    av = jax.lax.map(lambda v: matvec(v).astype(vectors.dtype), vectors)
    residuals = jnp.linalg.norm(av - values[:, None] * vectors, axis=1)
    return Eigenpairs(values, vectors, residuals)


def top_eigenpairs(matvec: Callable, dim: int, *, key, k: int, order: int, which: str = "largest",
                   dtype=jnp.float32) -> Eigenpairs:
    """k extreme eigenpairs of a symmetric operator by fully reorthogonalised Lanczos.

    Args:
      matvec: ``v (dim,) -> A v (dim,)``.
      dim: P, the operator's size.
      key: PRNG key of the Gaussian start vector.
      k: number of pairs, 1 <= k <= order (static).
      order: Lanczos steps, k <= order <= dim (static). Extreme eigenvalues
        with a relative gap g converge like exp(-2 order sqrt(g)).
      which: "largest" (values sorted largest-first) or "smallest" (smallest-first).
      dtype: dtype of the start vector; the iteration runs in its promotion
        with the matvec's output dtype.

    Returns:
      `Eigenpairs` (values (k,), vectors (k, dim), residuals (k,)). The basis
      (order x dim numbers) lives only inside the call.

    Cost: order + k matvecs.
    """
    _check_order(order, dim)
    if not 1 <= k <= order:
        raise ValueError(f"k={k} must be in [1, order={order}]")
    if which not in WHICH:
        raise ValueError(f"which={which!r}; expected one of {WHICH}")
    v0 = jax.random.normal(key, (dim,), _work_dtype(matvec, dim, dtype))
    alphas, betas, basis = tridiagonalize(matvec, v0, order=order)
    return ritz_pairs(matvec, alphas, betas, basis, k=k, which=which)


def slq_density(matvec: Callable, dim: int, *, key, num_probes: int, order: int, keep_basis: bool = True,
                dtype=jnp.float32):
    """Stochastic Lanczos quadrature nodes and weights of the spectral density.

    Each probe starts from a normalised Rademacher vector; its nodes are the
    Ritz values and its weights the squared first components of T's
    eigenvectors (they sum to 1). The density estimate is
    (1/num_probes) sum_probes sum_i w_i delta(lambda - theta_i): see
    `smooth_density`. Probes run one after another (lax.map), so memory is one
    basis (order x dim numbers), or O(dim) with ``keep_basis=False``
    (see `tridiagonalize`).

    Returns:
      ``(nodes (num_probes, order), weights (num_probes, order))``.

    Cost: num_probes x order matvecs.
    """
    _check_order(order, dim)
    if num_probes < 1:
        raise ValueError(f"num_probes={num_probes} must be >= 1")
    work = _work_dtype(matvec, dim, dtype)

    def one(probe_key):
        v0 = jax.random.rademacher(probe_key, (dim,), work)
        alphas, betas, _ = tridiagonalize(matvec, v0, order=order, keep_basis=keep_basis)
        theta, s = tridiagonal_eigh(alphas, betas)
        return theta, s[0] ** 2

    return jax.lax.map(one, jax.random.split(key, num_probes))


def smooth_density(nodes, weights, grid, sigma):
    """Gaussian-smoothed SLQ density on a grid.

    rho(t) = (1/num_probes) sum_{probe, i} w_i N(t; theta_i, sigma^2); it
    integrates to 1 (for grids covering the nodes), estimating
    (1/P) sum_j N(t; lambda_j, sigma^2).

    Args:
      nodes, weights: (num_probes, order) from `slq_density` (or (order,)).
      grid: (G,) points.
      sigma: kernel width > 0.

    Returns:
      (G,) density values.
    """
    nodes, weights = jnp.atleast_2d(nodes), jnp.atleast_2d(weights)
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes {nodes.shape} and weights {weights.shape} must have equal shapes")
    grid = jnp.asarray(grid)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    return jnp.sum(kernel * weights[None], axis=(1, 2)) / nodes.shape[0]


def _mean_and_stderr(samples):
    m = samples.shape[0]
    mean = jnp.full((m,), 1.0 / m, samples.dtype) @ samples
    return mean, jnp.sqrt(jnp.sum((samples - mean) ** 2) / (m - 1) / m)


def hutchinson_trace(matvec: Callable, dim: int, *, key, num_probes: int, dtype=jnp.float32):
    """Tr A by Hutchinson's estimator with Rademacher probes.

    Returns:
      ``(estimate, stderr)``: the probe mean of z^T A z and its standard error
      (sample std / sqrt(num_probes)); the variance of one probe is
      2 (||A||_F^2 - sum_i A_ii^2).

    Cost: num_probes matvecs.
    """
    if num_probes < 2:
        raise ValueError(f"num_probes={num_probes} must be >= 2 for a standard error")
    work = _work_dtype(matvec, dim, dtype)
    z = jax.random.rademacher(key, (num_probes, dim), work)
    samples = jax.lax.map(lambda v: jnp.dot(v, matvec(v).astype(work)), z)
    return _mean_and_stderr(samples)


def hutchpp_trace(matvec: Callable, dim: int, *, key, sketch_size: int, num_probes: int, dtype=jnp.float32):
    """Tr A by Hutch++: exact trace on a sketched subspace plus Hutchinson on the rest.

    Q = orth(A S) for a Rademacher sketch S (dim, sketch_size); then
    Tr A = Tr(Q^T A Q) + Tr((I - QQ^T) A (I - QQ^T)), the second term by
    Hutchinson. Unbiased for any Q; the standard error is that of the second
    term (the first is exact given Q). When sketch_size >= rank A the estimate
    is exact.

    Returns:
      ``(estimate, stderr)``. Cost: 2 sketch_size + num_probes matvecs.
    """
    if num_probes < 2:
        raise ValueError(f"num_probes={num_probes} must be >= 2 for a standard error")
    if not 1 <= sketch_size <= dim:
        raise ValueError(f"sketch_size={sketch_size} must be in [1, P={dim}]")
    work = _work_dtype(matvec, dim, dtype)
    k_sketch, k_probe = jax.random.split(key)
    mv = lambda v: matvec(v).astype(work)
    sketch = jax.random.rademacher(k_sketch, (sketch_size, dim), work)
    q = jnp.linalg.qr(jax.lax.map(mv, sketch).T)[0].T  # (s, dim) orthonormal rows
    exact = jnp.sum(q * jax.lax.map(mv, q))
    z = jax.random.rademacher(k_probe, (num_probes, dim), work)
    z = z - (z @ q.T) @ q  # v = (I - QQ^T) z, so v^T A v = z^T (I - QQ^T) A (I - QQ^T) z
    estimate, stderr = _mean_and_stderr(jax.lax.map(lambda v: jnp.dot(v, mv(v)), z))
    return exact + estimate, stderr

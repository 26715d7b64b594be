"""Hessian-noise relations: alignment, its null models, projected variance (docs/theory.md, "α and its nulls").

Alignment (arXiv 2305.15850 Fig. 1; the standard normalised inner product):

    alpha(H, Sigma) = Tr(H Sigma) / (||H||_F ||Sigma||_F),

computed without P x P matrices from a factored Sigma = R^T R (`sme.covariance`):
Tr(H Sigma) = sum_k r_k^T H r_k (one HVP per root row; for K mask gradients
r_k = g_ck / sqrt(K - 1)), ||Sigma||_F from the Gram matrix, and Tr H, ||H||_F
by Hutchinson on the complement of a basis V (typically the top Hessian
eigenvectors, as in Hutch++): with P = I - V^T V,

    Tr H = Tr(V H V^T) + E z^T PHP z,
    ||H||_F² = ||V H V^T||_F² + 2 ||P H V^T||_F² + E ||PHP z||²,

exact in the V part and unbiased in the rest (z Rademacher).

Null models, reported beside alpha:

* ``haar``: Sigma rotated by a Haar-random orthogonal Q (same spectra, random
  eigenvectors). Closed form: E alpha = Tr H Tr Sigma / (P ||H||_F ||Sigma||_F) and,
  with A~ = A - (Tr A / P) I, Var Tr(H Q Sigma Q^T) = 2 ||H~||_F² ||Sigma~||_F² /
  ((P - 1)(P + 2)) (fourth moments of the Haar measure). `haar_null_samples`
  samples it in the rank-r space of Sigma (r HVPs per sample) as a check.
* ``wishart``: Sigma replaced by Z^T Z with Z a K x P standard Gaussian matrix
  (the shape of the mask-gradient factor). Numerator mean K Tr H; denominator
  ||Z Z^T||_F ~ sqrt(K P (P + K + 1)). The isotropic part (Tr H / P) sum_k ||z_k||²
  of the numerator moves with the denominator, so the spread comes from H~:
  variance 2 K ||H~||_F² (leading order; relative corrections O((K P)^-1/2)).

Variance principle: for Hessian eigenpairs (lambda_i, u_i), u_i^T Sigma u_i =
||R u_i||²; the log-log slope against lambda_i (with a bootstrap interval,
`sme.stats.fit_loglog`) is the exponent. The same functions take the SGD noise
(per-sample gradients) so dropout and SGD can be compared.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sme import stats
from sme.covariance import Factored, frobenius
from sme.hessian import hvp, make_flat_hvp  # noqa: F401  (they live in sme.hessian; re-exported here)


def trace_h_sigma(hvp_flat: Callable, cov: Factored, *, chunk_size=None) -> jax.Array:
    """Tr(H Sigma) = sum_k r_k^T H r_k. Cost: one HVP per root row (vmapped in chunks)."""
    return jnp.sum(jax.lax.map(lambda r: jnp.dot(r, hvp_flat(r)), cov.root, batch_size=chunk_size))


class HessianNorms(NamedTuple):
    trace: jax.Array
    trace_se: jax.Array  # Monte Carlo standard error (0 when exact)
    frobenius: jax.Array
    frobenius_se: jax.Array


def hessian_norms(hvp_flat: Callable, dim: int, *, key, num_probes: int, basis=None) -> HessianNorms:
    """Tr H and ||H||_F by Hutchinson on the complement of an orthonormal basis.

    Args:
      basis: (k, dim) orthonormal rows (e.g. top eigenvectors) handled exactly; None: plain Hutchinson.
      num_probes: Rademacher probes for the complement (>= 2).

    Returns:
      `HessianNorms`; the standard errors come from the spread of the probes
      (the Frobenius one by the delta method). Cost: k + num_probes HVPs.
    """
    if num_probes < 2:
        raise ValueError(f"hessian_norms: num_probes={num_probes} must be >= 2 for a standard error")
    if basis is None:
        basis = jnp.zeros((0, dim))
    hv = jax.lax.map(hvp_flat, basis) if basis.shape[0] else jnp.zeros((0, dim))
    t = hv @ basis.T  # V H V^T
    phv = hv - t @ basis  # rows (P H v_j)^T
    project = lambda v: v - basis.T @ (basis @ v)
    z = jax.random.rademacher(key, (num_probes, dim), dtype=jnp.result_type(float))

    def probe(zi):
        w = project(zi)
        y = project(hvp_flat(w))
        return jnp.dot(w, y), jnp.dot(y, y)

    tr_probe, fro_probe = jax.lax.map(probe, z)
    exact_tr, exact_fro2 = jnp.trace(t), jnp.sum(t**2) + 2.0 * jnp.sum(phv**2)
    se = lambda a: jnp.std(a, ddof=1) / jnp.sqrt(num_probes)
    fro2 = exact_fro2 + jnp.mean(fro_probe)
    fro = jnp.sqrt(jnp.maximum(fro2, 0.0))
    return HessianNorms(exact_tr + jnp.mean(tr_probe), se(tr_probe), fro,
                        se(fro_probe) / (2.0 * jnp.maximum(fro, 1e-30)))


def alignment(tr_h_sigma, fro_h, fro_sigma) -> jax.Array:
    """alpha = Tr(H Sigma) / (||H||_F ||Sigma||_F), in [-1, 1] for PSD Sigma."""
    return tr_h_sigma / (fro_h * fro_sigma)


def alignment_factored(hvp_flat: Callable, cov: Factored, fro_h, *, chunk_size=None) -> jax.Array:
    """alpha(H, Sigma) for a factored Sigma. Cost: one HVP per root row."""
    return alignment(trace_h_sigma(hvp_flat, cov, chunk_size=chunk_size), fro_h, frobenius(cov))


class Null(NamedTuple):
    mean: float
    std: float


def haar_null(tr_h, fro_h, tr_sigma, fro_sigma, dim: int) -> Null:
    """Exact mean and std of alpha(H, Q Sigma Q^T) for Haar-random orthogonal Q (dim >= 2); NaN if H or Sigma is 0."""
    if dim < 2:
        raise ValueError(f"haar_null: dim={dim} must be >= 2")
    tr_h, fro_h, tr_s, fro_s = (float(v) for v in (tr_h, fro_h, tr_sigma, fro_sigma))
    if fro_h == 0.0 or fro_s == 0.0:  # alpha is undefined (e.g. no dropout: Sigma = 0)
        return Null(math.nan, math.nan)
    mean = tr_h * tr_s / (dim * fro_h * fro_s)
    dev_h = max(fro_h**2 - tr_h**2 / dim, 0.0)
    dev_s = max(fro_s**2 - tr_s**2 / dim, 0.0)
    var = 2.0 * dev_h * dev_s / ((dim - 1) * (dim + 2))
    return Null(mean, float(np.sqrt(var)) / (fro_h * fro_s))


def wishart_null(tr_h, fro_h, dim: int, rank: int) -> Null:
    """Mean and std of alpha(H, Z^T Z), Z a rank x dim standard Gaussian (leading order)."""
    tr_h, fro_h = float(tr_h), float(fro_h)
    if fro_h == 0.0 or rank < 1:
        return Null(math.nan, math.nan)
    denominator = np.sqrt(rank * dim * (dim + rank + 1.0))
    dev_h = max(fro_h**2 - tr_h**2 / dim, 0.0)  # the isotropic part moves with the denominator
    return Null(rank * tr_h / (fro_h * denominator), float(np.sqrt(2.0 * rank * dev_h)) / (fro_h * denominator))


def haar_null_samples(hvp_flat: Callable, sigma_eigenvalues, dim: int, fro_h, *, key, num_samples: int):
    """alpha(H, Q Sigma Q^T) for Haar Q, sampled in Sigma's rank-r eigenspace.

    Q maps Sigma's eigenvectors to a Haar-random orthonormal r-frame Phi, so
    Tr(H Q Sigma Q^T) = sum_j s_j phi_j^T H phi_j. Cost: r HVPs per sample.

    Returns:
      (num_samples,) samples of alpha.
    """
    s = jnp.asarray(sigma_eigenvalues)
    fro_s = jnp.linalg.norm(s)

    def one(k):
        q, r = jnp.linalg.qr(jax.random.normal(k, (dim, s.shape[0]), s.dtype))
        frame = (q * jnp.sign(jnp.diag(r))).T
        quad = jax.lax.map(lambda phi: jnp.dot(phi, hvp_flat(phi)), frame)
        return jnp.dot(s, quad) / (fro_h * fro_s)

    return jax.lax.map(one, jax.random.split(key, num_samples))


def projected_variance(cov: Factored, vectors: jax.Array) -> jax.Array:
    """u_i^T Sigma u_i = ||R u_i||² for the rows u_i of ``vectors`` (k, P). Cost: k rows P flops."""
    return jnp.sum((cov.root @ vectors.T) ** 2, axis=0)


def variance_relation(eigenvalues, projected, *, num_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> stats.SlopeFit:
    """Log-log slope of u_i^T Sigma u_i against lambda_i with a bootstrap CI (lambda_i <= 0 dropped)."""
    return stats.fit_loglog(np.asarray(eigenvalues), np.asarray(projected), num_boot=num_boot, level=level,
                            seed=seed)

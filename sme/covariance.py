"""The dropout noise covariance Sigma, kept factored (arXiv 2305.15850 §3; docs/theory.md, "Σ and the diffusion samplers").

Sigma(theta) = E_eta[(g(eta) - grad L_S)(g(eta) - grad L_S)^T], g(eta) =
grad R^drop_S(theta; eta), is never formed as a P x P matrix (except by `dense`,
for tiny models). A covariance is a `Factored` root R (rows x P) with

    Sigma = R^T R,

so sums of covariances stack roots, the nonzero spectrum is that of the Gram
matrix R R^T, Sigma v = R^T (R v), and R^T z (z ~ N(0, I)) is a Gaussian sample
with covariance exactly Sigma. Conventions for the roots:

* K sampled gradients g_k (masks or examples drawn at random): centred rows over
  sqrt(K - 1), i.e. Sigma_K = G_c^T G_c / (K - 1), the unbiased estimate;
* an exact law (enumerated masks with probabilities pi_e, or the n examples as
  the whole population): rows sqrt(pi_e) (g_e - mean), no (K - 1);
* ``per_sample`` masks: the examples' masks are independent, so the cross terms
  vanish and Sigma = (1/n²) sum_i Cov_eta(grad l_i(theta; eta)).

The weighted-loss VJP trick gives R^T z without any per-row gradient:
sum_k z_k (g_k - g_bar) = grad_theta sum_k (z_k - z_bar) l_k(theta), one backward
pass through the K losses l_k; likewise Sigma v costs one JVP and one VJP.

Minibatch dropout SGD (docs/theory.md) draws an example I and a mask eta; the
two-way ANOVA of G(eta, I) = grad l_I(theta; eta) splits its covariance into
data, mask and interaction parts that add up exactly (`Components`), and the
law of total covariance scales them for a batch of B (`minibatch_factors`).
Their traces are estimated without bias from K masks by inner products only
(`component_traces`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sme.dropout import check_mode, enumerate_masks
from sme.grads import mask_gradients, per_example_mask_gram, sample_mask_gradients
from sme.lanczos import top_eigenpairs as lanczos_top
from sme.models import Model
from sme.problem import Problem, accepts_problem


class Factored(NamedTuple):
    """Sigma = root.T @ root; root has shape (rows, P)."""

    root: jax.Array


def weighted_mean(g: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_k w_k g_k as a matrix-vector product (far faster than ``mean(0)`` on CPU). (K, P) -> (P,)."""
    return weights @ g


def from_samples(g: jax.Array, *, ddof: int = 1) -> Factored:
    """Sample covariance of the K rows of g: centred rows / sqrt(K - ddof). (K, P) -> root (K, P)."""
    k = g.shape[0]
    if k <= ddof:
        raise ValueError(f"from_samples: need more than ddof={ddof} rows, got {k}")
    centred = g - weighted_mean(g, jnp.full((k,), 1.0 / k, g.dtype))
    return Factored(centred / jnp.sqrt(jnp.asarray(k - ddof, g.dtype)))


def from_weighted(g: jax.Array, probs: jax.Array) -> Factored:
    """Exact covariance of a discrete law: rows g_e with probabilities probs_e (summing to 1)."""
    probs = jnp.asarray(probs, g.dtype)
    centred = g - weighted_mean(g, probs)
    return Factored(jnp.sqrt(probs)[:, None] * centred)


def scale(cov: Factored, factor) -> Factored:
    """factor * Sigma (factor >= 0)."""
    return Factored(cov.root * jnp.sqrt(jnp.asarray(factor, cov.root.dtype)))


def add(*covs: Factored) -> Factored:
    """Sum of covariances: the roots stacked."""
    return Factored(jnp.concatenate([c.root for c in covs], axis=0))


def dense(cov: Factored) -> jax.Array:
    """The P x P matrix (tiny models and tests only). Cost: rows P² flops."""
    return cov.root.T @ cov.root


def matvec(cov: Factored, v: jax.Array) -> jax.Array:
    """Sigma v = R^T (R v). (P,) -> (P,). Cost: 2 rows P flops."""
    return cov.root.T @ (cov.root @ v)


def gram(cov: Factored) -> jax.Array:
    """R R^T (rows x rows): same nonzero spectrum as Sigma."""
    return cov.root @ cov.root.T


def trace(cov: Factored) -> jax.Array:
    """Tr Sigma = ||R||_F²."""
    return jnp.sum(cov.root**2)


def frobenius(cov: Factored) -> jax.Array:
    """||Sigma||_F = ||R R^T||_F."""
    return jnp.linalg.norm(gram(cov))


def frobenius_sq_unbiased(centred: jax.Array) -> jax.Array:
    """Unbiased estimate of ||Sigma||_F² = Tr(Sigma²) from K >= 4 iid samples.

    The plug-in ||Sigma_K||_F² is biased upward: E ||Sigma_K||_F² = ||Sigma||_F² +
    ((Tr Sigma)² + ...)/K, which for a low-rank-dominated Sigma and K = 64 inflates
    ||Sigma||_F by 10-20 % and biases alpha down. This is the U-statistic
    (1/4) mean over distinct (i, j, k, l) of ((x_i - x_j)^T (x_k - x_l))², in the closed form
    of Himeno & Yamada (J. Multivariate Anal. 2014):

        T = (K-1) / (K (K-2) (K-3)) [(K-1)(K-2) Tr(S²) + (Tr S)² - K Q],

    with S = C / (K - 1) the sample covariance and Q = sum_i C_ii² / (K - 1).

    Args:
      centred: (K, K) centred Gram matrix C_ij = (x_i - x_bar)^T (x_j - x_bar) of the raw
        samples, without any divisor (``(K - 1) * gram(mask_covariance(g))``).

    Returns:
      Scalar estimate (may be negative when ||Sigma||_F² is small against its noise). Cost: K².
    """
    k = centred.shape[0]
    if k < 4:
        raise ValueError(f"frobenius_sq_unbiased: needs K >= 4 samples, got {k}")
    tr_s = jnp.trace(centred) / (k - 1)
    tr_s2 = jnp.sum(centred**2) / (k - 1) ** 2
    q = jnp.sum(jnp.diagonal(centred) ** 2) / (k - 1)
    return (k - 1) / (k * (k - 2) * (k - 3)) * ((k - 1) * (k - 2) * tr_s2 + tr_s**2 - k * q)


def top_eigenpairs(cov: Factored, k: int):
    """Top-k eigenpairs of Sigma from the Gram matrix.

    Returns:
      ``(values (k,), vectors (k, P))`` in decreasing order; vector j is
      R^T u_j / sqrt(lambda_j) (zero where lambda_j = 0). Cost: rows² P + rows³.
    """
    rows = cov.root.shape[0]
    if not 1 <= k <= rows:
        raise ValueError(f"top_eigenpairs: k={k} must be in [1, {rows}] (the root's rows)")
    values, u = jnp.linalg.eigh(gram(cov))
    values, u = values[::-1][:k], u[:, ::-1][:, :k]
    values = jnp.maximum(values, 0.0)
    norms = jnp.sqrt(values)
    vectors = (cov.root.T @ u).T / jnp.where(norms > 0, norms, 1.0)[:, None]
    return values, vectors


def centred_gram(raw_gram: jax.Array, *, ddof: int = 1) -> jax.Array:
    """Gram matrix of the centred rows over (n - ddof), from the raw Gram <g_i, g_j>.

    Its eigenvalues, trace and Frobenius norm are Sigma's, for
    Sigma = G_c^T G_c / (n - ddof), so per-sample covariances never need G.
    """
    n = raw_gram.shape[0]
    centre = jnp.eye(n, dtype=raw_gram.dtype) - 1.0 / n
    return centre @ raw_gram @ centre / (n - ddof)


def gram_eigenvalues(g: jax.Array, k: int) -> jax.Array:
    """Top-k eigenvalues of a symmetric PSD Gram-like matrix, decreasing, clipped at 0."""
    return jnp.maximum(jnp.linalg.eigvalsh(g)[::-1][:k], 0.0)


def lanczos_eigenpairs(matvec_fn: Callable, dim: int, *, key, k: int, order: int):
    """Top-k eigenpairs of a matrix-free Sigma by Lanczos (`sme.lanczos.top_eigenpairs`).

    ``matvec_fn`` acts on flat (dim,) vectors, e.g. ``partial(matvec, cov)`` or
    `implicit_matvec`. Cost: ``order`` matvecs.
    """
    return lanczos_top(matvec_fn, dim, key=key, k=k, order=order, which="largest")


def implicit_matvec(loss_vector_fn: Callable, params, *, ddof: int = 1) -> Callable:
    """Sigma v for the gradients of the K losses ``loss_vector_fn(params) -> (K,)``, matrix-free.

    With J the K x P Jacobian (rows g_k), Sigma v = J^T (J v - mean(J v)) / (K - ddof):
    one JVP and one VJP through the K losses, no gradient rows.

    Returns:
      ``matvec(v)`` on flat (P,) vectors. Cost per call: ~1 JVP + 1 VJP.
    """
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    lossvec = lambda f: loss_vector_fn(unravel(f))
    out, jvp_fn = jax.linearize(lossvec, flat)
    vjp_fn = jax.linear_transpose(jvp_fn, flat)
    k = out.shape[0]

    def mv(v):
        u = jvp_fn(v)
        return vjp_fn((u - jnp.mean(u)) / (k - ddof))[0]

    return mv


def weighted_loss_sample(loss_vector_fn: Callable, params, z: jax.Array, *, ddof: int = 1):
    """sum_k z_k (g_k - g_bar) / sqrt(K - ddof) = grad sum_k (z_k - z_bar) l_k / sqrt(K - ddof).

    With z ~ N(0, I_K) this is a Gaussian with covariance exactly Sigma_K. Returns
    a pytree like params. Cost: one backward pass through the K losses.
    """
    k = z.shape[0]
    weights = (z - jnp.mean(z)) / jnp.sqrt(jnp.asarray(k - ddof, z.dtype))
    return jax.grad(lambda p: jnp.dot(weights, loss_vector_fn(p)))(params)


def sample(cov: Factored, *, key, num_samples: int | None = None) -> jax.Array:
    """R^T z, z ~ N(0, I_rows): exactly Sigma-covariant. (P,) or (num_samples, P)."""
    shape = (cov.root.shape[0],) if num_samples is None else (num_samples, cov.root.shape[0])
    z = jax.random.normal(key, shape, cov.root.dtype)
    return z @ cov.root


@accepts_problem
def enumerate_gradient_table(model: Model, loss: str, params, x, y):
    """G[e, i] = grad l(f(x_i; eta_e), y_i) over all 2**m shared masks (tiny nets).

    Returns:
      ``(table (E, n, P), probs (E,))``. Cost: E x n per-example gradients.
    """
    masks, probs = enumerate_masks(model.sites, dtype=np.dtype(x.dtype))
    masks = tuple(jnp.asarray(m) for m in masks)
    table = sample_mask_gradients(Problem(model, loss, "shared", x, y), params, masks)
    return table, jnp.asarray(probs, x.dtype)


def exact_covariance(table: jax.Array, probs: jax.Array, *, mode: str) -> Factored:
    """Exact Sigma from an enumerated table (`enumerate_gradient_table`).

    ``shared``: rows sqrt(pi_e)(mean_i G[e, i] - grad L_S); ``per_sample``: rows
    sqrt(pi_e)(G[e, i] - mean_e G[., i]) / n, since independent masks per
    example make Sigma = (1/n²) sum_i Cov_eta(g_i).
    """
    num_masks, n, _ = table.shape
    if check_mode(mode) == "shared":
        return from_weighted(jnp.mean(table, axis=1), probs)
    centred = table - jnp.einsum("e,eip->ip", probs, table)
    root = (jnp.sqrt(probs)[:, None, None] * centred / n).reshape(num_masks * n, -1)
    return Factored(root)


@accepts_problem
def exact_mask_covariance(model: Model, loss: str, params, x, y, *, mode: str) -> Factored:
    """Exact Sigma by enumerating all masks (tiny nets). Cost: 2**m x n per-example gradients."""
    table, probs = enumerate_gradient_table(model, loss, params, x, y)
    return exact_covariance(table, probs, mode=mode)


def mask_covariance(mask_grads: jax.Array) -> Factored:
    """Sigma_K = G_c^T G_c / (K - 1) from K mask gradients (`sme.grads.mask_gradients`)."""
    return from_samples(mask_grads, ddof=1)


def per_sample_covariance(sample_grads: jax.Array, *, ddof: int = 0) -> Factored:
    """SGD noise of one example drawn uniformly: (1/(n - ddof)) sum_i (g_i - g_bar)(g_i - g_bar)^T.

    ddof = 0 treats the n examples as the whole population (the exact B = 1
    SGD noise); ddof = 1 estimates it from a random subset.
    """
    return from_samples(sample_grads, ddof=ddof)


# --- Minibatch dropout SGD: data / mask / interaction (law of total covariance) ---------------


class Components(NamedTuple):
    """Two-way ANOVA of one draw G(eta, I): I uniform over the n examples, eta one mask.

    With m = E G, a_i = E_eta G(eta, i) - m, b_eta = E_I G(eta, I) - m and
    c = G - m - a - b (the three are uncorrelated, so the parts add up exactly):

    * data = Cov_I(a_I): spread of the mask-averaged per-example gradients;
    * mask = Cov_eta(b_eta): the full-batch dropout noise Sigma (shared masks);
    * interaction = Cov(c): how a mask's effect differs between examples.
    """

    data: Factored
    mask: Factored
    interaction: Factored


def noise_components(table: jax.Array, probs: jax.Array) -> Components:
    """Exact `Components` from an enumerated table G[e, i] (E, n, P) with mask probabilities (E,)."""
    num_masks, n, _ = table.shape
    column = jnp.mean(table, axis=1)  # E_I G(eta_e, I)
    row = jnp.einsum("e,eip->ip", probs, table)  # E_eta G(eta, i)
    m = weighted_mean(column, probs)
    c = table - row[None] - column[:, None] + m
    weights = jnp.sqrt(probs / n)[:, None, None]
    return Components(
        data=Factored((row - m) / jnp.sqrt(jnp.asarray(n, table.dtype))),
        mask=Factored(jnp.sqrt(probs)[:, None] * (column - m)),
        interaction=Factored((weights * c).reshape(num_masks * n, -1)),
    )


def minibatch_factors(*, batch_size: int, num_examples: int, mode: str, replacement: bool = False):
    """Multipliers of (data, mask, interaction) in the covariance of a size-B minibatch gradient.

    g = (1/B) sum_{i in S} grad l_i(theta; eta_i); f = (n - B)/(n - 1) without
    replacement (1 with). Law of total covariance: data = Cov_S(E_eta[g | S]) =
    f A / B; the rest is E_S Cov_eta(g | S), split into the mask main effect
    Cov_eta(E_S[g | eta]) (masks attached to batch slots) and the interaction:

    * ``shared`` (one mask per batch): data f/B, mask 1, interaction f/B;
    * ``per_sample``: data f/B, mask 1/B, interaction 1/B.

    At B = n (full batch, shared) only the mask part, Sigma, is left.
    """
    n, b = num_examples, batch_size
    if not 1 <= b <= n:
        raise ValueError(f"minibatch_factors: batch_size={b} must be in [1, num_examples={n}]")
    f = 1.0 if (replacement or n == 1) else (n - b) / (n - 1)
    if check_mode(mode) == "shared":
        return f / b, 1.0, f / b
    return f / b, 1.0 / b, 1.0 / b


def minibatch_noise(components: Components, *, batch_size: int, num_examples: int, mode: str,
                    replacement: bool = False) -> dict:
    """Factored data, mask, interaction and total covariances of the minibatch gradient."""
    factors = minibatch_factors(batch_size=batch_size, num_examples=num_examples, mode=mode,
                                replacement=replacement)
    parts = {name: scale(cov, factor) for name, cov, factor in zip(Components._fields, components, factors)}
    parts["total"] = add(*parts.values())
    return parts


class ComponentTraces(NamedTuple):
    data: jax.Array
    mask: jax.Array
    interaction: jax.Array


def _traces_from_ss(column, grand, ss_rows, within, num_masks: int, n: int) -> ComponentTraces:
    """Unbiased ANOVA traces of a crossed K-masks x n-examples design (rows = the population)."""
    mask = jnp.sum((column - grand) ** 2) / (num_masks - 1)
    interaction = (within - ss_rows) / (n * (num_masks - 1))
    data = ss_rows / (n * num_masks) - interaction / num_masks
    return ComponentTraces(data, mask, interaction)


def component_traces_from_table(table: jax.Array) -> ComponentTraces:
    """Unbiased estimates of Tr A, Tr M, Tr C from G[k, i] with K >= 2 iid shared masks.

    E ||row mean_i - grand||² carries Tr C / K; the within-mask spread
    sum_{k,i} ||G_ki - G_k.||² minus the row sum of squares is (K - 1) n Tr C in
    expectation; the column means are K full-batch mask gradients.
    """
    num_masks, n, _ = table.shape
    if num_masks < 2:
        raise ValueError(f"component traces need at least 2 masks, got {num_masks}")
    column = jnp.mean(table, axis=1)
    grand = jnp.mean(column, axis=0)
    within = jnp.sum((table - column[:, None]) ** 2)
    ss_rows = num_masks * jnp.sum((jnp.mean(table, axis=0) - grand) ** 2)
    return _traces_from_ss(column, grand, ss_rows, within, num_masks, n)


@accepts_problem
def component_traces(model: Model, loss: str, params, x, y, masks, *, chunk_size=None):
    """`component_traces_from_table` from inner products, never the K x n x P table.

    The estimator needs only the column means (K full-batch mask gradients),
    sum_i ||mean_k G_ki||² = sum_i 1^T Gram_i 1 / K² and sum_{k,i} ||G_ki||² =
    sum_i Tr Gram_i, with Gram_i the K x K per-example mask Gram matrix
    (`sme.grads.per_example_mask_gram`).

    Args:
      masks: K >= 2 shared masks, leading axis K.
      chunk_size: examples (and masks, for the column means) handled at once.

    Returns:
      ``(ComponentTraces, column (K, P))``, column k being grad R^drop_S(theta; eta_k).
      Cost: K full-batch gradients plus K x n per-example backward passes.
    """
    num_masks, n = jax.tree_util.tree_leaves(masks)[0].shape[0], x.shape[0]
    if num_masks < 2:
        raise ValueError(f"component traces need at least 2 masks, got {num_masks}")
    column = mask_gradients(Problem(model, loss, "shared", x, y), params, masks, chunk_size=chunk_size)
    grams = per_example_mask_gram(model, loss, params, x, y, masks, chunk_size=chunk_size)
    grand = weighted_mean(column, jnp.full((num_masks,), 1.0 / num_masks, column.dtype))
    within = jnp.sum(jnp.trace(grams, axis1=1, axis2=2)) - n * jnp.sum(column**2)
    ss_rows = num_masks * (jnp.sum(grams) / num_masks**2 - n * jnp.sum(grand**2))
    return _traces_from_ss(column, grand, ss_rows, within, num_masks, n), column


def subset_corrected(traces: ComponentTraces, *, subset_size: int, population: int) -> ComponentTraces:
    """Population traces from traces estimated on a uniform random subset of the examples.

    On a subset of n' of the n examples (kappa = (n' - 1) n / (n' (n - 1)),
    f' = (n - n') / (n - 1)): E A' = kappa A, E C' = kappa C, and the subset's
    column means carry part of the interaction, E M' = M + f' C / n'.
    """
    n_sub, n = subset_size, population
    if not 2 <= n_sub <= n:
        raise ValueError(f"subset_corrected: subset_size={n_sub} must be in [2, population={n}]")
    if n_sub == n:
        return traces
    kappa = (n_sub - 1) * n / (n_sub * (n - 1))
    interaction = traces.interaction / kappa
    mask = traces.mask - (n - n_sub) / (n - 1) * interaction / n_sub
    return ComponentTraces(traces.data / kappa, mask, interaction)

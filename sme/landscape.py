"""Loss-landscape geometry: PCA of weight or gradient clouds, interval flatness,
the inverse variance-flatness fit, and filter-normalised loss profiles.

Mathematics and conventions
---------------------------

* **PCA** (Feng & Tu, PNAS 2021). Rows of ``data`` (S x P) are samples: weights
  theta_s over a late-training window ("random trajectory data"), or mask /
  minibatch gradients at a frozen theta ("random gradient data", arXiv
  2305.15850 §5). With the centred matrix X_c = X - mean, the covariance is
  C = X_c^T X_c / (S - 1) (divided by S - 1, like every covariance in `sme`);
  sigma_i^2 are its eigenvalues in descending order and u_i the unit principal
  directions. When S <= P they come from the S x S Gram matrix
  X_c X_c^T / (S - 1) (same nonzero spectrum, u_i proportional to X_c^T v_i); the
  P x P matrix is formed only when P < S. Centring leaves rank <= S - 1, so at
  most min(S - 1, P) components are returned. Each u_i's sign is fixed so that
  its largest-magnitude entry is positive.
  Snapshot buffers are the caller's: pass the S x P stack (float32 suffices;
  the Gram eigenvalues are accurate to ~1e-7 of sigma_1^2 in float32).
* **Drift modes of trajectory data** (`trend_fraction`): a PC whose coordinate
  c_i(t) = u_i . (theta_t - mean) moves smoothly across the window is drift (the
  path still converging or curving), not stationary fluctuation, and its window
  variance does not estimate the noise's variance along u_i. Its trend fraction
  is the share of sum_t c_i(t)^2 captured by Legendre polynomials of degree
  1..``degree`` in t (least squares, t spread uniformly over [-1, 1]): 1 for an
  exact polynomial drift, about degree / (S - 1) for white noise, and large also
  for a stationary mode whose correlation time is not short against the window
  (it is not sampled either). Feng & Tu exclude PC 1 as the drift mode; the
  trajectory analysis also leaves out every PC whose trend fraction is above a
  threshold.
* **Interval flatness** F_i along a direction u at theta* (Feng & Tu; arXiv
  2305.15850 uses c = 2, Feng & Tu c = e, both are reported): the width
  F = s_+ + s_- of the interval (-s_-, s_+) around s = 0 on which
  L(theta* + s u) <= c L(theta*). Each side is found by bracketing (s doubles from
  ``init_step`` until the loss exceeds the threshold or ``max_distance`` is
  reached) and bisecting the last bracket ``num_bisect`` times; the returned
  crossing is the bracket midpoint, within (bracket width) / 2^(num_bisect + 1).
  The bracket is the first doubling grid point above the threshold, so a loss
  that rises above c L and falls back between two grid points can be missed:
  choose ``init_step`` below the expected widths (it costs only extra doublings).
  A side that never exceeds the threshold within ``max_distance`` returns
  ``max_distance`` and sets ``capped`` (the width is then a lower bound).
  A NaN loss counts as above the threshold. s is in units of ||u|| (Euclidean
  distance for unit u).
* **Variance-flatness fit**: sigma_i^2 proportional to F_i^(-psi), the
  least-squares slope of log sigma^2 on log F with a pairs-bootstrap interval
  (`sme.stats.fit_loglog`) and the Spearman rank correlation. The leading
  ``num_excluded`` components (the drift mode PC 1 by default) and capped widths
  are left out. Feng & Tu report psi ~ 4 for SGD on MNIST.
* **Filter normalisation** (Li, Xu, Taylor, Studer & Goldstein, "Visualizing
  the loss landscape of neural nets", NeurIPS 2018): a direction d with the
  structure of the parameters is rescaled filter by filter,
  d_f <- d_f ||theta_f|| / ||d_f||. A filter is a slice along a leaf's LAST axis:
  for a dense weight w of shape (fan_in, fan_out) it is one output unit, the
  column w[:, j]; for a conv kernel (kh, kw, c_in, c_out) one output channel,
  w[..., j]. 1-D leaves (biases) are zeroed by default (Li et al.'s choice of not
  perturbing biases); with ``zero_bias=False`` each is rescaled as one filter.
  A zero-norm filter of d stays zero.
* **Profiles**: L(theta + a d) on a grid of a (1-D), L(theta + a d_1 + b d_2)
  (2-D), and L((1 - t) theta_A + t theta_B) (linear interpolation, t may leave
  [0, 1]).

Functions are pure and jittable (callers jit). ``loss_fn`` takes the same
structure as ``params``: a flat (P,) vector for PCA directions (use
`jax.flatten_util.ravel_pytree` to wrap a pytree loss, or `problem_loss` with
``like``) or the model's pytree for filter-normalised directions. Where the
parameters are the model's pytree, a `sme.problem.Problem` may stand in for
``loss_fn``: it means its R_S (`problem_loss`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.flatten_util import ravel_pytree

from sme import losses, stats
from sme.problem import Problem

FACTORS = (2.0, math.e)  # c of arXiv 2305.15850 and of Feng & Tu

LossFn = Callable[[Any], jax.Array]


OBJECTIVES = ("risk", "modified", "modified_mc")


def problem_loss(problem: Problem, *, objective: str = "risk", masks=None, like=None) -> LossFn:
    """The problem's landscape as a `LossFn`: ``risk`` R_S, ``modified`` the closed-form L_S = R_S + R_1,
    or ``modified_mc`` the mean of R^drop_S over ``masks`` (leading K, in the problem's mode).

    ``like``: a parameter pytree; the loss then takes flat (P,) vectors in its `ravel_pytree` order
    (PCA directions). Cost per call: one forward pass over the n examples (x K for modified_mc).
    """
    if objective == "risk":
        fn = lambda p: losses.risk(problem, p)
    elif objective == "modified":
        losses.check_closed_form(problem.model, problem.loss)
        fn = lambda p: losses.modified_loss(problem, p)
    elif objective == "modified_mc":
        if masks is None:
            raise ValueError("problem_loss: objective 'modified_mc' needs masks")
        fn = lambda p: losses.modified_loss_mc(problem, p, masks)
    else:
        raise ValueError(f"unknown landscape objective {objective!r}; expected one of {OBJECTIVES}")
    if like is None:
        return fn
    unravel = ravel_pytree(like)[1]
    return lambda flat: fn(unravel(flat))


def _loss_of(loss_fn) -> LossFn:
    return problem_loss(loss_fn) if isinstance(loss_fn, Problem) else loss_fn


class PCA(NamedTuple):
    variances: jax.Array  # (k,) sigma_i^2, descending, covariance divided by S - 1
    directions: jax.Array  # (k, P) unit principal directions u_i as rows
    mean: jax.Array  # (P,) the sample mean that was subtracted


class Flatness(NamedTuple):
    width: jax.Array  # F = left + right
    left: jax.Array  # s_- > 0: crossing at theta* - s_- u
    right: jax.Array  # s_+ > 0: crossing at theta* + s_+ u
    capped: jax.Array  # bool: a side reached max_distance below the threshold
    loss: jax.Array  # L(theta*)


@dataclasses.dataclass(frozen=True)
class BracketSearch:
    """Settings of the bracketing-and-bisection search for a crossing.

    Cost per side: at most ceil(log2(max_distance / init_step)) + 1 + num_bisect losses.
    """

    init_step: float = 1e-3
    max_distance: float = 1e3
    num_bisect: int = 30

    def __post_init__(self):
        if not self.init_step > 0:
            raise ValueError(f"BracketSearch.init_step must be > 0, got {self.init_step}")
        if not self.max_distance >= self.init_step:
            raise ValueError(f"BracketSearch.max_distance ({self.max_distance}) must be >= "
                             f"init_step ({self.init_step})")
        if int(self.num_bisect) != self.num_bisect or self.num_bisect < 0:
            raise ValueError(f"BracketSearch.num_bisect must be an integer >= 0, got {self.num_bisect}")


class PsiFit(NamedTuple):
    psi: float  # sigma^2 ~ F^(-psi)
    psi_low: float  # bootstrap percentile interval of psi
    psi_high: float
    intercept: float  # log sigma^2 = intercept - psi log F
    spearman: float  # rank correlation of (F, sigma^2); negative for an inverse relation
    num_points: int


def pca(data: jax.Array, *, num_components: int | None = None) -> PCA:
    """Principal components of the rows of ``data``.

    Args:
      data: (S, P) samples as rows, S >= 2.
      num_components: k <= min(S - 1, P) leading components (None: all of them).

    Returns:
      `PCA` with variances (k,), directions (k, P), mean (P,).

    Cost: O(S^2 P) for the Gram matrix and directions plus an S x S eigh (P x P when P < S).
    """
    if data.ndim != 2:
        raise ValueError(f"pca: data must be (num_samples, dim), got shape {data.shape}")
    num_samples, dim = data.shape
    if num_samples < 2:
        raise ValueError(f"pca: need at least 2 samples to centre, got {num_samples}")
    max_k = min(num_samples - 1, dim)
    k = max_k if num_components is None else int(num_components)
    if not 1 <= k <= max_k:
        raise ValueError(f"pca: num_components={num_components} must be in [1, {max_k}] "
                         f"for {num_samples} samples of dimension {dim}")
    mean = jnp.mean(data, axis=0)
    centred = data - mean
    if num_samples <= dim:
        gram = centred @ centred.T / (num_samples - 1)
        evals, evecs = jnp.linalg.eigh(gram)  # ascending
        evals, evecs = evals[::-1][:k], evecs[:, ::-1][:, :k]
        # Normalising X_c^T v by its own norm is more accurate than dividing by
        # sqrt((S - 1) lambda) when lambda is small.
        directions = (centred.T @ evecs).T
        norms = jnp.linalg.norm(directions, axis=1, keepdims=True)
        directions = directions / jnp.where(norms > 0, norms, 1.0)
    else:
        evals, evecs = jnp.linalg.eigh(centred.T @ centred / (num_samples - 1))
        evals, directions = evals[::-1][:k], evecs[:, ::-1][:, :k].T
    peak = jnp.take_along_axis(directions, jnp.argmax(jnp.abs(directions), axis=1)[:, None], axis=1)
    directions = directions * jnp.where(peak < 0, -1.0, 1.0).astype(directions.dtype)
    return PCA(jnp.maximum(evals, 0.0), directions, mean)


def trend_fraction(data: jax.Array, directions: jax.Array, *, degree: int = 4) -> jax.Array:
    """Share of each PC coordinate's variance that is a smooth trend in time.

    Args:
      data: (S, P) samples in time order (a trajectory window).
      directions: (k, P) unit directions (e.g. `pca(data).directions`).
      degree: Legendre degrees 1..degree span the trend (static; 1 <= degree <= S - 2).

    Returns:
      (k,) fractions in [0, 1]: ||Q^T c_i||^2 / ||c_i||^2 with c_i = (data - mean) u_i and
      Q an orthonormal basis of the degree-1..degree Legendre polynomials at the S
      times (c_i is centred, so the constant is left out). 0 where c_i = 0.

    Cost: O(S P k) for the coordinates plus an S x degree QR.
    """
    if data.ndim != 2 or directions.ndim != 2 or directions.shape[1] != data.shape[1]:
        raise ValueError(f"trend_fraction: data (S, P) and directions (k, P) expected, got "
                         f"{data.shape} and {directions.shape}")
    num_samples = data.shape[0]
    if int(degree) != degree or not 1 <= degree <= num_samples - 2:
        raise ValueError(f"trend_fraction: degree={degree} must be an integer in [1, {num_samples - 2}] "
                         f"for {num_samples} samples")
    t = np.linspace(-1.0, 1.0, num_samples)
    basis = np.polynomial.legendre.legvander(t, int(degree))[:, 1:]
    basis = basis - basis.mean(axis=0)  # orthogonal to the constant on the discrete grid too
    q = jnp.asarray(np.linalg.qr(basis)[0], data.dtype)  # (S, degree)
    coords = (data - jnp.mean(data, axis=0)) @ directions.T.astype(data.dtype)  # (S, k)
    total = jnp.sum(coords**2, axis=0)
    trend = jnp.sum((q.T @ coords) ** 2, axis=0)
    return jnp.where(total > 0, trend / jnp.where(total > 0, total, 1.0), 0.0)


def _axpy(params, s, direction):
    return jax.tree.map(lambda p, d: p + jnp.asarray(s, p.dtype) * d, params, direction)


def _check_like(params, other, what: str):
    if jax.tree.structure(params) != jax.tree.structure(other):
        raise ValueError(f"{what} must have the structure of params: "
                         f"{jax.tree.structure(other)} vs {jax.tree.structure(params)}")
    for p, o in zip(jax.tree.leaves(params), jax.tree.leaves(other)):
        if p.shape != o.shape:
            raise ValueError(f"{what}: leaf shape {o.shape} does not match params leaf {p.shape}")


def _float_dtype(params):
    return jnp.result_type(*jax.tree.leaves(params))


def _crossing(along: Callable, threshold, search: BracketSearch, dtype):
    """Distance s > 0 where along(s) first exceeds threshold, and whether it was capped."""
    cap = jnp.asarray(search.max_distance, dtype)
    below = lambda s: along(s) <= threshold

    def grow(state):
        _, hi, _ = state
        new_hi = jnp.minimum(2 * hi, cap)
        return hi, new_hi, below(new_hi)

    init = jnp.asarray(search.init_step, dtype)
    lo, hi, capped = jax.lax.while_loop(
        lambda state: state[2] & (state[1] < cap), grow, (jnp.zeros((), dtype), init, below(init)))

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        ok = below(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    # On exit either below(hi) fails (a crossing lies in (lo, hi]) or hi == cap is still below.
    lo, hi = jax.lax.cond(capped, lambda b: (cap, cap),
                          lambda b: jax.lax.fori_loop(0, search.num_bisect, bisect, b), (lo, hi))
    return 0.5 * (lo + hi), capped


def interval_flatness(loss_fn: LossFn, params, direction, *, factor,
                      search: BracketSearch = BracketSearch()) -> Flatness:
    """Width of the interval around s = 0 where loss_fn(params + s direction) <= factor * loss_fn(params).

    Args:
      loss_fn: scalar loss of a parameter structure like ``params`` (or a Problem: its R_S).
      params: theta* (a flat vector or a pytree).
      direction: u, same structure (unit norm for Euclidean widths).
      factor: c > 1 (may be traced, e.g. vmapped over (2, e)).
      search: bracketing and bisection settings.

    Returns:
      `Flatness` of scalars. Vmappable over ``direction`` and ``factor``.

    Cost: 1 + 2 (ceil(log2(max_distance / init_step)) + 1 + num_bisect) losses at most.
    """
    _check_like(params, direction, "interval_flatness: direction")
    loss_fn = _loss_of(loss_fn)
    dtype = _float_dtype(params)
    loss0 = loss_fn(params)
    threshold = factor * loss0
    right, right_capped = _crossing(lambda s: loss_fn(_axpy(params, s, direction)), threshold, search, dtype)
    left, left_capped = _crossing(lambda s: loss_fn(_axpy(params, -s, direction)), threshold, search, dtype)
    return Flatness(left + right, left, right, left_capped | right_capped, loss0)


def _check_factors(factors) -> jax.Array:
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 1 or factors.size == 0 or not np.all(factors > 1):
        raise ValueError(f"factors must be a non-empty 1-D sequence of values > 1, got {factors.tolist()}")
    return factors


def flatness_along(loss_fn: LossFn, params, directions, *, factors=FACTORS,
                   search: BracketSearch = BracketSearch()) -> Flatness:
    """`interval_flatness` for every direction (leading axis k of each leaf) and factor.

    Returns:
      `Flatness` with fields of shape (num_factors, k) (``loss`` is a scalar).

    Cost: num_factors * k times that of `interval_flatness` (vmapped).
    """
    factors = jnp.asarray(_check_factors(factors), _float_dtype(params))
    one = lambda d, c: interval_flatness(loss_fn, params, d, factor=c, search=search)
    over_dirs = jax.vmap(one, in_axes=(0, None))
    result = jax.vmap(over_dirs, in_axes=(None, 0))(directions, factors)
    return result._replace(loss=result.loss.reshape(-1)[0])


def pca_flatness(data, loss_fn: LossFn, reference, *, num_components: int, factors=FACTORS,
                 search: BracketSearch = BracketSearch()) -> tuple[PCA, Flatness]:
    """PCA of ``data`` (S, P) and interval flatness at ``reference`` (P,) along its top PCs.

    ``loss_fn`` takes a flat (P,) vector. The returned `PCA` keeps all min(S - 1, P)
    variances; flatness is measured along the first ``num_components`` directions.

    Returns:
      (PCA, Flatness with fields (num_factors, num_components)).

    Cost: O(S^2 P) for the PCA plus num_factors * num_components flatness searches.
    """
    if reference.shape != data.shape[1:]:
        raise ValueError(f"pca_flatness: reference shape {reference.shape} must be ({data.shape[1]},)")
    components = pca(data)
    if not 1 <= num_components <= components.variances.shape[0]:
        raise ValueError(f"pca_flatness: num_components={num_components} must be in "
                         f"[1, {components.variances.shape[0]}] for data of shape {data.shape}")
    directions = components.directions[:num_components].astype(reference.dtype)
    return components, flatness_along(loss_fn, reference, directions, factors=factors, search=search)


def trajectory_flatness(snapshots, loss_fn: LossFn, *, reference=None, num_components: int,
                        factors=FACTORS, search: BracketSearch = BracketSearch()) -> tuple[PCA, Flatness]:
    """Random trajectory data: PCA of weight snapshots (S, P) and flatness along the top PCs.

    Args:
      snapshots: (S, P) flat weights over a late-training window (float32 is fine).
      loss_fn: the loss of a flat (P,) parameter vector.
      reference: theta* (P,) at which flatness is measured; None: the last snapshot
        (the sources leave theta* open; the window mean is another choice).
      num_components, factors, search: as in `pca_flatness`.

    Cost: as `pca_flatness`.
    """
    reference = snapshots[-1] if reference is None else reference
    return pca_flatness(snapshots, loss_fn, reference, num_components=num_components,
                        factors=factors, search=search)


def variance_flatness_fit(variances, widths, *, num_excluded: int = 1, valid=None,
                          num_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PsiFit:
    """Fit sigma_i^2 ~ F_i^(-psi) (host NumPy; not jittable).

    Args:
      variances: (k,) sigma_i^2 in PCA order (descending).
      widths: (k,) interval flatness F_i along the same components.
      num_excluded: leading components left out (1: the drift mode PC 1).
      valid: optional (k,) bool, False for points to leave out (e.g. capped widths).
      num_boot, level, seed: pairs bootstrap of the slope (`sme.stats.fit_slope`).

    Returns:
      `PsiFit`; psi = -slope of log sigma^2 on log F. Non-positive values are dropped.
    """
    variances, widths = np.asarray(variances, np.float64), np.asarray(widths, np.float64)
    if variances.shape != widths.shape or variances.ndim != 1:
        raise ValueError(f"variance_flatness_fit: variances {variances.shape} and widths "
                         f"{widths.shape} must be 1-D of equal length")
    if not 0 <= num_excluded < len(variances):
        raise ValueError(f"variance_flatness_fit: num_excluded={num_excluded} must be in "
                         f"[0, {len(variances)})")
    keep = np.arange(len(variances)) >= num_excluded
    if valid is not None:
        keep &= np.asarray(valid, bool).reshape(variances.shape)
    keep &= (variances > 0) & (widths > 0) & np.isfinite(variances) & np.isfinite(widths)
    if keep.sum() < 3:
        raise ValueError(f"variance_flatness_fit: only {int(keep.sum())} usable points "
                         "(after exclusions, capped and non-positive values); need 3")
    fit = stats.fit_loglog(widths[keep], variances[keep], num_boot=num_boot, level=level, seed=seed)
    rho = stats.spearman(widths[keep], variances[keep])
    return PsiFit(-fit.slope, -fit.ci_high, -fit.ci_low, fit.intercept, rho, fit.num_points)


def random_direction(params, *, key: jax.Array):
    """A standard Gaussian pytree with the structure, shapes and dtypes of ``params``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def filter_normalize(direction, params, *, zero_bias: bool = True):
    """Li et al. (2018) filter normalisation of ``direction`` against ``params`` (module docstring).

    Every filter (slice along a leaf's last axis) of the result has the norm of
    the matching filter of ``params``; 1-D leaves are zeroed (``zero_bias``) or
    rescaled as one filter. Scalars (0-d leaves) are zeroed.
    """
    _check_like(params, direction, "filter_normalize: direction")

    def normalize(d, p):
        if p.ndim == 0 or (p.ndim == 1 and zero_bias):
            return jnp.zeros_like(d)
        axes = tuple(range(p.ndim - 1)) if p.ndim > 1 else (0,)
        d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
        p_norm = jnp.sqrt(jnp.sum(p**2, axis=axes, keepdims=True))
        return d * jnp.where(d_norm > 0, p_norm / jnp.where(d_norm > 0, d_norm, 1.0), 0.0)

    return jax.tree.map(normalize, direction, params)


def profile_1d(loss_fn: LossFn, params, direction, alphas) -> jax.Array:
    """L(params + a direction) for each a in ``alphas`` (A,). Cost: A losses (vmapped)."""
    _check_like(params, direction, "profile_1d: direction")
    loss_fn = _loss_of(loss_fn)
    return jax.vmap(lambda a: loss_fn(_axpy(params, a, direction)))(alphas)


def profile_2d(loss_fn: LossFn, params, direction_x, direction_y, alphas, betas) -> jax.Array:
    """L(params + a d_x + b d_y) on the grid (A, B) of ``alphas`` x ``betas``. Cost: A B losses."""
    _check_like(params, direction_x, "profile_2d: direction_x")
    _check_like(params, direction_y, "profile_2d: direction_y")
    # One row of B losses at a time (lax.map) bounds memory at that of a 1-D profile.
    return jax.lax.map(lambda a: profile_1d(loss_fn, _axpy(params, a, direction_x), direction_y, betas),
                       alphas)


def interpolate(loss_fn: LossFn, params_a, params_b, ts) -> jax.Array:
    """L((1 - t) params_a + t params_b) for each t in ``ts`` (T,). Cost: T losses (vmapped)."""
    _check_like(params_a, params_b, "interpolate: params_b")
    loss_fn = _loss_of(loss_fn)

    def mix(t):
        return jax.tree.map(lambda a, b: (1 - jnp.asarray(t, a.dtype)) * a + jnp.asarray(t, a.dtype) * b,
                            params_a, params_b)

    return jax.vmap(lambda t: loss_fn(mix(t)))(ts)

"""Small statistics shared by the analyses: log-log slope fits with bootstrap
confidence intervals, rank correlation, and bootstrap intervals of a mean.

All functions are NumPy (host) code: they run on the few hundred numbers an
analysis produces, never inside jit. Randomness comes from an explicit
``np.random.Generator`` or integer seed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class SlopeFit(NamedTuple):
    slope: float
    intercept: float
    ci_low: float  # bootstrap percentile interval of the slope
    ci_high: float
    num_points: int


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    if np.all(x == x[0]):  # one distinct x (e.g. a resample of one point): no slope; x - mean(x) is
        return float("nan"), float("nan")  # rounding noise there, so 0/0 would decide by the last bit
    xc = x - x.mean()
    denom = float(xc @ xc)
    if denom == 0.0:
        return float("nan"), float("nan")
    slope = float(xc @ (y - y.mean())) / denom
    return slope, float(y.mean() - slope * x.mean())


def fit_slope(x, y, *, num_boot: int = 2000, level: float = 0.95, seed: int = 0) -> SlopeFit:
    """Least-squares slope of y on x with a pairs-bootstrap percentile interval."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit_slope: x {x.shape} and y {y.shape} must be 1-D of equal length")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise ValueError(f"fit_slope: need at least 3 finite points, got {len(x)}")
    slope, intercept = _ols(x, y)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(num_boot, len(x)))
    boots = np.array([_ols(x[i], y[i])[0] for i in idx])
    boots = boots[np.isfinite(boots)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [alpha, 1.0 - alpha])
    return SlopeFit(slope, intercept, float(low), float(high), len(x))


def fit_loglog(x, y, **kwargs) -> SlopeFit:
    """Power-law exponent: slope of log y against log x (non-positive values dropped)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = (x > 0) & (y > 0)
    return fit_slope(np.log(x[keep]), np.log(y[keep]), **kwargs)


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x), np.asarray(y)).statistic)


def bootstrap_mean_ci(samples, *, num_boot: int = 2000, level: float = 0.95, seed: int = 0, axis: int = 0):
    """Mean of `samples` along `axis` with a bootstrap percentile interval.

    Returns:
      (mean, low, high), each with `axis` removed.
    """
    samples = np.moveaxis(np.asarray(samples, np.float64), axis, 0)
    n = samples.shape[0]
    rng = np.random.default_rng(seed)
    means = np.stack([samples[rng.integers(0, n, n)].mean(0) for _ in range(num_boot)])
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha], axis=0)
    return samples.mean(0), low, high


def t_halfwidth(std, n: int, level: float = 0.95) -> float:
    """Half-width t_{(1+level)/2, n-1} std / sqrt(n) of the Student-t interval of a mean of n values
    with sample standard deviation ``std`` (ddof 1)."""
    from scipy.stats import t

    if n < 2:
        raise ValueError(f"t_halfwidth: need n >= 2 values, got {n}")
    return float(t.ppf(0.5 + level / 2, n - 1) * std / np.sqrt(n))

"""Weak error of the SME against discrete dropout GD, with bootstrap intervals and fitted orders.

For a test function g, a horizon T and a learning rate eps (Li, Tai & E, JMLR 2019; SCIENCE.md §4):

    e(eps) = max_{N <= T/eps} |E g(theta_N) - E g(Theta_{N eps})|,

estimated from R replicas of both processes (`sme.lockstep`) over the logged steps N. The replicas
arrive as B batch means (consecutive groups of R/B replicas, `lockstep.batch_means`), which are
i.i.d. and carry everything the mean needs, so:

* the estimate is max_N |mean_b (d_bN)| with d_bN = gbar^disc_bN - gbar^sde_bN;
* its interval is the percentile bootstrap over batches (the same resampled batches for both
  processes, so any coupling between them is kept, and for every variant of a cell, so that
  variants are compared pairwise);
  Near the floor the bootstrap distribution of a max of |noisy curve| lies above the estimate
  (resampling adds noise, and the max picks it up), so there the interval can exclude the
  estimate: read such errors as "at most a few floors", not as measured values;
* the Monte Carlo floor is the largest standard error of the difference over the logged steps,
  max_N sd_b(d_bN) / sqrt(B). Under no bias, the max over N of |noise| is typically 1-3 floors, so
  an error counts as ``resolved`` when it is at least RESOLVED_FACTOR floors.

The order is the least-squares slope of log e against log eps over the resolved cells, with an
interval from the replica bootstrap (the slope refitted on each bootstrap draw of the errors) and
the pairs-bootstrap interval of `sme.stats.fit_loglog` beside it.
All functions are NumPy (host) code.
"""

from __future__ import annotations

import numpy as np

from sme import stats

RESOLVED_FACTOR = 3.0
# A process whose replica mean leaves |g| <= DIVERGENCE_FACTOR (1 + |g(theta_0)|) has diverged (some
# replicas blew up): its error is NaN rather than a meaningless 1e30.
DIVERGENCE_FACTOR = 1e3


def replica_moments(mean_bm: np.ndarray, sq_bm: np.ndarray, num_replicas: int):
    """Mean and unbiased variance over the R replicas from batch means of g and g^2 (batch axis -2)."""
    with np.errstate(invalid="ignore", over="ignore"):  # diverged processes give inf/NaN, reported as such
        mean = mean_bm.mean(axis=-2)
        second = sq_bm.mean(axis=-2)
        return mean, np.maximum(second - mean**2, 0.0) * num_replicas / max(num_replicas - 1, 1)


def bootstrap_indices(num_batches: int, *, num_boot: int, seed: int = 0) -> np.ndarray:
    """(num_boot, B) batch indices drawn with replacement (shared by every comparison of a cell)."""
    return np.random.default_rng(seed).integers(0, num_batches, size=(num_boot, num_batches))


def weak_error(ref_bm: np.ndarray, approx_bm: np.ndarray, boot_idx: np.ndarray, *, level: float = 0.95) -> dict:
    """Weak error of ``approx`` against ``ref`` from batch means (T, B, G) at the T logged steps.

    Returns:
      dict of (G,) arrays: ``error``, ``ci_low``, ``ci_high`` (percentile bootstrap), ``floor`` (MC
      standard error, see module docstring), ``resolved`` (bool), ``argmax`` (index of the logged
      step attaining the max), ``boot`` (num_boot, G) bootstrap errors and ``diverged`` (bool): a
      non-finite batch mean, or a replica mean beyond DIVERGENCE_FACTOR (1 + |g at the first logged
      step|), the first logged step being N = 0 where both processes start at theta_0. The error
      fields are NaN where diverged.
    """
    diff = np.asarray(ref_bm, np.float64) - np.asarray(approx_bm, np.float64)
    num_batches = diff.shape[1]
    gap = diff.mean(axis=1)  # (T, G)
    with np.errstate(invalid="ignore"):
        se = diff.std(axis=1, ddof=1) / np.sqrt(num_batches)
        error = np.abs(gap).max(axis=0)
        boot = np.abs(diff[:, boot_idx].mean(axis=2)).max(axis=0)  # (num_boot, G)
    with np.errstate(invalid="ignore", over="ignore"):
        limit = DIVERGENCE_FACTOR * (1.0 + np.abs(np.asarray(ref_bm, np.float64)[0].mean(axis=0)))
        peak = np.maximum(np.abs(np.asarray(ref_bm, np.float64).mean(axis=1)).max(axis=0),
                          np.abs(np.asarray(approx_bm, np.float64).mean(axis=1)).max(axis=0))
    finite = np.all(np.isfinite(diff), axis=(0, 1)) & (peak <= limit)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha], axis=0)
    floor = se.max(axis=0)
    out = dict(error=error, ci_low=low, ci_high=high, floor=floor, resolved=error >= RESOLVED_FACTOR * floor,
               argmax=np.abs(np.nan_to_num(gap)).argmax(axis=0), boot=boot)
    for key in ("error", "ci_low", "ci_high", "floor"):
        out[key] = np.where(finite, out[key], np.nan)
    out["resolved"] = out["resolved"] & finite
    out["boot"] = np.where(finite[None], boot, np.nan)
    out["diverged"] = ~finite
    return out


def fit_order(lrs, errors, boots, resolved, *, level: float = 0.95, seed: int = 0) -> dict:
    """Slope of log error against log eps over the resolved cells.

    Args:
      lrs, errors, resolved: (C,) over the cells of one keep_prob.
      boots: (C, num_boot) bootstrap errors of each cell.

    Returns:
      dict with ``order``, ``ci_low``/``ci_high`` (replica bootstrap), ``pairs_low``/``pairs_high``
      (`stats.fit_loglog`, needs >= 3 points), ``intercept`` and ``num_points``; NaN when fewer
      than 2 cells are resolved.
    """
    lrs, errors = np.asarray(lrs, np.float64), np.asarray(errors, np.float64)
    keep = np.asarray(resolved, bool) & np.isfinite(errors) & (errors > 0)
    nan = float("nan")
    out = dict(order=nan, ci_low=nan, ci_high=nan, pairs_low=nan, pairs_high=nan, intercept=nan,
               num_points=int(keep.sum()))
    if keep.sum() < 2:
        return out
    x = np.log(lrs[keep])
    slope, intercept = np.polyfit(x, np.log(errors[keep]), 1)
    logs = np.log(np.maximum(np.asarray(boots, np.float64)[keep], 1e-300))  # (C', num_boot)
    xc = x - x.mean()
    slopes = xc @ (logs - logs.mean(axis=0)) / (xc @ xc)
    alpha = (1.0 - level) / 2.0
    out.update(order=float(slope), intercept=float(intercept),
               ci_low=float(np.quantile(slopes, alpha)), ci_high=float(np.quantile(slopes, 1 - alpha)))
    if keep.sum() >= 3:
        fit = stats.fit_loglog(lrs[keep], errors[keep], level=level, seed=seed)
        out.update(pairs_low=fit.ci_low, pairs_high=fit.ci_high)
    return out


def cell_table(cells: list[dict], variants, *, num_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Weak errors of every variant in every cell, stacked over cells.

    Args:
      cells: loaded cell artifacts (`sme.sweep`), each with ``lr``, ``keep_prob``, ``g_names`` and
        ``mean/<series>`` (T, B, G).
      variants: series to compare with ``discrete``.

    Returns:
      ``lr``, ``keep_prob`` (C,); per variant v and field f in (error, ci_low, ci_high, floor,
      resolved, diverged): ``<v>/<f>`` (C, G); ``<v>/boot`` (C, num_boot, G); and ``<v>/beats/<w>`` (C, G),
      the bootstrap fraction of draws in which v's error is below w's (paired).
    """
    table = {"lr": np.array([float(c["lr"]) for c in cells]),
             "keep_prob": np.array([float(c["keep_prob"]) for c in cells])}
    per = {v: [] for v in variants}
    for i, cell in enumerate(cells):
        idx = bootstrap_indices(cell["mean/discrete"].shape[1], num_boot=num_boot, seed=seed + i)
        for v in variants:
            per[v].append(weak_error(cell["mean/discrete"], cell[f"mean/{v}"], idx, level=level))
    for v in variants:
        for field in ("error", "ci_low", "ci_high", "floor", "resolved", "boot", "diverged"):
            table[f"{v}/{field}"] = np.stack([r[field] for r in per[v]])
    for v in variants:
        for w in variants:
            if v != w:
                with np.errstate(invalid="ignore"):
                    frac = np.mean(table[f"{v}/boot"] < table[f"{w}/boot"], axis=1)
                table[f"{v}/beats/{w}"] = np.where(table[f"{v}/diverged"] | table[f"{w}/diverged"], np.nan, frac)
    return table


def order_table(table: dict, variants, g_names, *, level: float = 0.95, max_lr: float = 0.0) -> dict:
    """Fitted orders per (keep_prob, variant, g) from a `cell_table`: ``<v>/<field>`` of shape
    (num_keep_probs, G) plus ``keep_probs``. ``max_lr`` > 0 fits only the cells with eps <= max_lr
    (the asymptotic range)."""
    keep_probs = np.unique(table["keep_prob"])
    in_range = table["lr"] <= max_lr if max_lr > 0 else np.ones(len(table["lr"]), bool)
    out = {"keep_probs": keep_probs}
    fields = ("order", "ci_low", "ci_high", "pairs_low", "pairs_high", "intercept", "num_points")
    for v in variants:
        rows = {f: np.full((len(keep_probs), len(g_names)), np.nan) for f in fields}
        for a, p in enumerate(keep_probs):
            sel = (table["keep_prob"] == p) & in_range
            for j in range(len(g_names)):
                fit = fit_order(table["lr"][sel], table[f"{v}/error"][sel, j], table[f"{v}/boot"][sel, :, j],
                                table[f"{v}/resolved"][sel, j], level=level)
                for f in fields:
                    rows[f][a, j] = fit[f]
        out.update({f"{v}/{f}": rows[f] for f in fields})
    return out

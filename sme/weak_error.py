"""Weak error of the SME against discrete dropout GD at fixed times, with joint-bootstrap intervals.

For a test function g, a time t and a learning rate eps (Li, Tai & E, JMLR 2019; docs/theory.md,
"The weak-error estimator"):

    e_t(eps) = |E g(theta_N) - E g(Theta_t)|,   N = t / eps,

read at a few fixed times declared before the run (the final T and one mid time), never as a max
over noisy means. The R replicas arrive as B batch means (consecutive groups of R/B replicas,
`lockstep.batch_means`), which are i.i.d. within a cell; with d_b = gbar^disc_b - gbar^sde_b:

* the raw estimate |mean_b d_b| is biased upward by the noise (E dbar^2 = gap^2 + se^2), so the
  point estimate is the bias-corrected sqrt(max(dbar^2 - se^2, 0)), se^2 = var_b(d_b)/B;
* the Monte Carlo floor of each variant is its own se (the standard error of its difference);
* the interval of |gap| is the |.|-image of the percentile-bootstrap interval of the signed gap
  (it contains 0 when that one does);
* replica r uses the keys (seed, stream, step, r) in EVERY cell, so cells are correlated; the
  bootstrap therefore resamples the same batch indices jointly across all cells (and variants), and a
  fitted order's interval is the spread of slopes refitted on those joint draws.

Orders are least-squares slopes of log e against log eps over the eps range declared in the config
(every cell in it, no selection on the outcome); a cell whose corrected error is 0 makes the slope
undefined (NaN), and an interval is given only when at least a fraction ``level`` of the draws has
every error positive. All functions are NumPy (host) code.
"""

from __future__ import annotations

import numpy as np

# A process whose replica mean leaves |g| <= DIVERGENCE_FACTOR (1 + |E g(dropout GD)|) at the same time
# has diverged (some replicas blew up): its error is NaN rather than a meaningless 1e30.
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


def time_indices(times: np.ndarray, wanted, *, missing_ok: bool = False) -> list[int]:
    """Indices of the logged times equal (to 1e-6 t) to each wanted t. A time that is not logged
    raises, or with ``missing_ok`` gives -1 (a coarse eps whose steps N = t/eps miss t)."""
    times = np.asarray(times, np.float64)
    out = []
    for t in wanted:
        i = int(np.argmin(np.abs(times - t)))
        if abs(times[i] - t) > 1e-6 * max(abs(t), 1.0):
            if not missing_ok:
                raise ValueError(f"time {t:g} is not a logged time (logged: {', '.join(f'{x:g}' for x in times)})")
            i = -1
        out.append(i)
    return out


def _corrected(gap: np.ndarray, se: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(gap**2 - se**2, 0.0))


def weak_error(ref_bm: np.ndarray, approx_bm: np.ndarray, boot_idx: np.ndarray, *, level: float = 0.95) -> dict:
    """Weak error of ``approx`` against ``ref`` from batch means (B, G) at one logged time.

    Args:
      ref_bm, approx_bm: (B, G) batch means; a leading axis of logged times (T, B, G) is allowed
        (then every field gets it too).
      boot_idx: (num_boot, B) batch indices (shared by every variant and cell: `bootstrap_indices`).

    Returns:
      dict of (..., G) arrays: ``gap`` (signed, approx - ref), ``raw`` |gap|, ``error`` (bias-corrected),
      ``floor`` (se), ``ci_low``/``ci_high`` (|.| of the signed percentile interval), ``diverged``
      (non-finite, or beyond DIVERGENCE_FACTOR (1 + |g| of the reference)), and ``boot``
      (num_boot, ..., G) bias-corrected bootstrap errors. Error fields are NaN where diverged.
    """
    ref, approx = np.asarray(ref_bm, np.float64), np.asarray(approx_bm, np.float64)
    diff = approx - ref
    num_batches = diff.shape[-2]
    with np.errstate(invalid="ignore", over="ignore"):
        gap = diff.mean(axis=-2)
        se = diff.std(axis=-2, ddof=1) / np.sqrt(num_batches)
        draws = np.take(diff, boot_idx, axis=-2)  # (..., num_boot, B, G)
        boot_gap = draws.mean(axis=-2)
        boot_se = draws.std(axis=-2, ddof=1) / np.sqrt(num_batches)
        limit = DIVERGENCE_FACTOR * (1.0 + np.abs(ref.mean(axis=-2)))
        finite = np.all(np.isfinite(diff), axis=-2) & (np.abs(approx.mean(axis=-2)) <= limit)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot_gap, [alpha, 1.0 - alpha], axis=-2)
    straddles = (lo <= 0.0) & (hi >= 0.0)
    ci_low = np.where(straddles, 0.0, np.minimum(np.abs(lo), np.abs(hi)))
    ci_high = np.maximum(np.abs(lo), np.abs(hi))
    boot = np.moveaxis(_corrected(boot_gap, boot_se), -2, 0)
    out = dict(gap=gap, raw=np.abs(gap), error=_corrected(gap, se), floor=se, ci_low=ci_low, ci_high=ci_high)
    out = {k: np.where(finite, v, np.nan) for k, v in out.items()}
    out["boot"] = np.where(finite[None], boot, np.nan)
    out["diverged"] = ~finite
    return out


def fit_order(lrs, errors, boots, *, level: float = 0.95) -> dict:
    """Slope of log error against log eps over ALL the given cells (the declared range).

    Args:
      lrs, errors: (C,); boots: (C, num_boot) joint bootstrap errors of the same cells.

    Returns:
      dict with ``order``, ``intercept``, ``ci_low``/``ci_high`` (percentiles of the slopes refitted
      on the joint draws), ``num_points``; ``order`` NaN unless >= 2 cells all have finite errors > 0;
      the interval NaN unless a fraction >= ``level`` of the draws are all positive.
    """
    lrs, errors = np.asarray(lrs, np.float64), np.asarray(errors, np.float64)
    nan = float("nan")
    out = dict(order=nan, ci_low=nan, ci_high=nan, intercept=nan, num_points=len(lrs))
    if len(lrs) < 2 or not np.all(np.isfinite(errors) & (errors > 0)):
        return out
    x = np.log(lrs)
    slope, intercept = np.polyfit(x, np.log(errors), 1)
    out.update(order=float(slope), intercept=float(intercept))
    boots = np.asarray(boots, np.float64)
    ok = np.all(np.isfinite(boots) & (boots > 0), axis=0)
    if ok.mean() < level:
        return out
    logs = np.log(boots[:, ok])
    xc = x - x.mean()
    slopes = xc @ (logs - logs.mean(axis=0)) / (xc @ xc)
    # Undefined draws (some error corrected to 0) are left out: ok.mean() >= level bounds their weight.
    alpha = (1.0 - level) / 2.0
    out.update(ci_low=float(np.quantile(slopes, alpha)), ci_high=float(np.quantile(slopes, 1 - alpha)))
    return out


def cell_table(cells: list[dict], variants, *, times, num_boot: int = 1000, level: float = 0.95,
               seed: int = 0) -> dict:
    """Weak errors of every variant in every cell at the fixed ``times``, stacked over cells.

    Args:
      cells: loaded cell artifacts (`sme.sweep`), each with ``lr``, ``keep_prob``, ``times`` and
        ``mean/<series>`` (T, B, G); all with the same B (one joint bootstrap over batches).
      variants: series to compare with ``discrete``.
      times: SME times t at which to read the error; a cell that did not log one of them (t/eps not
        a logged step) has NaN there, and at least one cell must log each time.

    Returns:
      ``lr``, ``keep_prob`` (C,), ``times`` (K,); per variant v and field f of `weak_error`:
      ``<v>/<f>`` (C, K, G), ``<v>/boot`` (C, K, num_boot, G); ``<v>/beats/<w>`` (C, K, G): the
      fraction of joint draws in which v's error is below w's.
    """
    sizes = {c["mean/discrete"].shape[1] for c in cells}
    if len(sizes) != 1:
        raise ValueError(f"cells have different numbers of replica batches {sorted(sizes)}: no joint bootstrap")
    idx = bootstrap_indices(sizes.pop(), num_boot=num_boot, seed=seed)
    table = {"lr": np.array([float(c["lr"]) for c in cells]),
             "keep_prob": np.array([float(c["keep_prob"]) for c in cells]), "times": np.asarray(times, np.float64)}
    per = {v: [] for v in variants}
    rows_of = [time_indices(cell["times"], times, missing_ok=True) for cell in cells]
    for k, t in enumerate(times):
        if all(rows[k] < 0 for rows in rows_of):
            raise ValueError(f"time {t:g} is not a logged time of any cell")
    for cell, rows in zip(cells, rows_of):
        absent = np.array([r < 0 for r in rows])
        for v in variants:
            res = weak_error(cell["mean/discrete"][rows], cell[f"mean/{v}"][rows], idx, level=level)
            res["boot"] = np.moveaxis(res["boot"], 0, 1)  # (K, num_boot, G)
            for key in res:
                if key != "diverged":
                    mask = absent.reshape(-1, *([1] * (res[key].ndim - 1)))
                    res[key] = np.where(mask, np.nan, res[key])
            per[v].append(res)
    for v in variants:
        for field in per[v][0]:
            table[f"{v}/{field}"] = np.stack([r[field] for r in per[v]])
    for v in variants:
        for w in variants:
            if v != w:
                with np.errstate(invalid="ignore"):
                    frac = np.mean(table[f"{v}/boot"] < table[f"{w}/boot"], axis=2)
                table[f"{v}/beats/{w}"] = np.where(table[f"{v}/diverged"] | table[f"{w}/diverged"], np.nan, frac)
    return table


def order_table(table: dict, variants, *, lr_min: float = 0.0, lr_max: float = np.inf, level: float = 0.95) -> dict:
    """Fitted orders per (keep_prob, time, g) over the cells with lr_min <= eps <= lr_max:
    ``<v>/<field>`` (P, K, G) for the fields of `fit_order`, plus ``keep_probs`` (P,)."""
    keep_probs = np.unique(table["keep_prob"])
    in_range = (table["lr"] >= lr_min * (1 - 1e-9)) & (table["lr"] <= lr_max * (1 + 1e-9))
    out = {"keep_probs": keep_probs}
    fields = ("order", "ci_low", "ci_high", "intercept", "num_points")
    shape = table[f"{variants[0]}/error"].shape[1:]
    for v in variants:
        rows = {f: np.full((len(keep_probs), *shape), np.nan) for f in fields}
        for a, p in enumerate(keep_probs):
            sel = (table["keep_prob"] == p) & in_range
            for k in range(shape[0]):
                for j in range(shape[1]):
                    fit = fit_order(table["lr"][sel], table[f"{v}/error"][sel, k, j],
                                    table[f"{v}/boot"][sel, k, :, j], level=level)
                    for f in fields:
                        rows[f][a, k, j] = fit[f]
        out.update({f"{v}/{f}": rows[f] for f in fields})
    return out

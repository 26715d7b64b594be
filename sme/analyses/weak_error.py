"""The ``weak_error`` analysis: tables, fitted orders and figures from an SME sweep's cell files.

Reads ``<workdir>/sme/cell_*.npz`` written by `sme.sweep` (verified by their SHA-256; run with
``config.sde.enabled``), never re-simulates, and returns (artifact keys):

* ``lr``, ``keep_prob`` (C,) of the cells; ``g_names`` (G,); ``variants`` (V,);
* per variant v: ``<v>/error``, ``<v>/ci_low``, ``<v>/ci_high``, ``<v>/floor`` (C, G) and
  ``<v>/resolved`` (C, G) from `sme.weak_error.weak_error` (max over the logged steps of
  |E g(discrete) - E g(v)|, bootstrap over replica batches, MC floor = largest standard error of
  the difference); ``<v>/beats/<w>`` (C, G) the paired-bootstrap fraction of draws where v's
  error is below w's;
* ``keep_probs`` (P,) and per variant ``<v>/order``, ``<v>/order_low``, ``<v>/order_high``
  (replica bootstrap), ``<v>/order_pairs_low``/``high`` (`stats.fit_loglog`), ``<v>/intercept``,
  ``<v>/num_points`` (P, G): log-log slope of the error against eps over resolved cells;
* ``traj/times`` (C, T), ``traj/<series>/mean`` and ``traj/<series>/std`` (C, T, G): replica mean
  and standard deviation of every test function (NaN-padded to the longest cell); for each variant
  ``traj/<v>/gap`` and ``traj/<v>/gap_se`` (C, T, G): E g(v) - E g(discrete) and its standard error;
* scalars ``order/<v>/<g>/p<p>`` (and ``_low``/``_high``) for summary.json.

Settings: ``num_boot`` (default: the run's sde.num_boot), ``level`` (0.95), ``plot_functions``
("R_S,L_S,sq_norm"), ``max_lr`` (0: fit orders over every eps; > 0: only eps <= max_lr, the
asymptotic range). The analysis does not depend on the checkpoint: request ``--steps=last``.
Figures: ``trajectories.png`` (per keep_prob, at the middle eps whose processes all stayed finite:
mean +- 1 sd band vs t = N eps, and the gap E g(v) - E g(discrete) with a +-2 SE band),
``weak_error_vs_lr.png`` (log-log, bootstrap bars, MC floor, fitted slopes over the resolved cells;
hollow markers: not resolved) and ``weak_error_vs_keep_prob.png``. Diverged processes are left out.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from sme import weak_error
from sme.analyses import Context, register
from sme.analyses.common import fill_settings, pyplot, save_figure
from sme.sweep import SME_DIR, load_cell

DEFAULTS = dict(num_boot=0, level=0.95, plot_functions="R_S,L_S,sq_norm", max_lr=0.0)
COLORS = {"discrete": "k", "order1": "C0", "order2": "C1", "r2": "C2", "svag": "C3"}


def load_cells(workdir: str) -> list[dict]:
    """Every cell file that verifies, sorted by (keep_prob, lr)."""
    cells = [c for c in (load_cell(p) for p in glob.glob(os.path.join(workdir, SME_DIR, "cell_*.npz"))) if c]
    return sorted(cells, key=lambda c: (float(c["keep_prob"]), float(c["lr"])))


def _trajectories(cells, series) -> dict:
    with np.errstate(invalid="ignore", over="ignore"):  # diverged processes: NaN/inf, reported as such
        return _trajectories_unguarded(cells, series)


def _trajectories_unguarded(cells, series) -> dict:
    longest = max(len(c["times"]) for c in cells)
    out = {"traj/times": np.full((len(cells), longest), np.nan)}
    for i, c in enumerate(cells):
        out["traj/times"][i, :len(c["times"])] = c["times"]
    num_g = len(cells[0]["g_names"])
    for s in series:
        mean, std = np.full((len(cells), longest, num_g), np.nan), np.full((len(cells), longest, num_g), np.nan)
        for i, c in enumerate(cells):
            m, v = weak_error.replica_moments(c[f"mean/{s}"].astype(np.float64), c[f"sq/{s}"].astype(np.float64),
                                              int(c["num_replicas"]))
            mean[i, :len(m)], std[i, :len(m)] = m, np.sqrt(v)
        out[f"traj/{s}/mean"], out[f"traj/{s}/std"] = mean, std
        if s != "discrete":
            gap, se = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
            for i, c in enumerate(cells):
                diff = c[f"mean/{s}"].astype(np.float64) - c["mean/discrete"].astype(np.float64)
                gap[i, :len(diff)] = diff.mean(axis=1)
                se[i, :len(diff)] = diff.std(axis=1, ddof=1) / np.sqrt(diff.shape[1])
            out[f"traj/{s}/gap"], out[f"traj/{s}/gap_se"] = gap, se
    return out


def compute(workdir: str, *, num_boot: int, level: float, max_lr: float = 0.0) -> dict:
    cells = load_cells(workdir)
    if not cells:
        raise ValueError(f"{workdir}/{SME_DIR}: no verified cell files; run train.py with config.sde.enabled")
    variants = [str(v) for v in cells[0]["variants"]]
    g_names = [str(g) for g in cells[0]["g_names"]]
    table = weak_error.cell_table(cells, variants, num_boot=num_boot, level=level)
    orders = weak_error.order_table(table, variants, g_names, level=level, max_lr=max_lr)
    out = {k: v for k, v in table.items() if not k.endswith("/boot")}
    out.update(g_names=np.array(g_names), variants=np.array(variants), keep_probs=orders["keep_probs"])
    for v in variants:
        for src, dst in (("order", "order"), ("ci_low", "order_low"), ("ci_high", "order_high"),
                         ("pairs_low", "order_pairs_low"), ("pairs_high", "order_pairs_high"),
                         ("intercept", "intercept"), ("num_points", "num_points")):
            out[f"{v}/{dst}"] = orders[f"{v}/{src}"]
        for a, p in enumerate(orders["keep_probs"]):
            for j, g in enumerate(g_names):
                for suffix, key in (("", "order"), ("_low", "order_low"), ("_high", "order_high")):
                    out[f"order/{v}/{g}/p{p:g}{suffix}"] = np.float64(out[f"{v}/{key}"][a, j])
    out.update(_trajectories(cells, ["discrete", *variants]))
    return out


@register("weak_error", plot_fn=lambda directory, steps: plot(directory, steps))
def weak_error_analysis(ctx: Context, *, key) -> dict:
    """Weak error of the SME variants against dropout GD over an eps x keep_prob sweep, with orders."""
    del key  # deterministic: bootstrap draws are seeded by the cell index
    s = fill_settings("weak_error", ctx.settings, DEFAULTS)
    num_boot = s["num_boot"] or int(ctx.run_config.get("sde", {}).get("num_boot", 1000))
    out = compute(ctx.workdir, num_boot=num_boot, level=s["level"], max_lr=s["max_lr"])
    out["max_lr"] = np.float64(s["max_lr"])
    out["plot_functions"] = np.array(s["plot_functions"])
    return out


# --- Figures (read the artifact only) -------------------------------------------------------------


def plot(directory: str, steps) -> list[str]:
    from sme import io

    art = io.load_arrays(os.path.join(directory, f"step_{steps[-1]:09d}.npz"))
    return [plot_trajectories(art, directory), plot_vs_lr(art, directory), plot_vs_keep_prob(art, directory)]


def _functions(art) -> list[int]:
    names = [str(g) for g in art["g_names"]]
    wanted = [g for g in str(art["plot_functions"]).split(",") if g in names]
    return [names.index(g) for g in wanted] or [0]


def _middle_cell(art, p, j, variants) -> int:
    idx = np.flatnonzero(art["keep_prob"] == p)
    ok = [i for i in idx if not any(art[f"{v}/diverged"][i, j] for v in variants)]
    pool = ok or list(idx)
    return pool[len(pool) // 2]


def _log_axes(ax, lrs=None):
    ax.set_yscale("log")
    if lrs is not None:
        ax.set_xscale("log")
        ax.set_xticks(lrs)
        ax.set_xticklabels([f"{x:g}" for x in lrs])
        ax.minorticks_off()
    ax.tick_params(labelsize=7)


def plot_trajectories(art: dict, directory: str) -> str:
    """Per keep_prob: mean +- 1 sd of each plotted function vs t, and the gap to dropout GD of the first."""
    plt = pyplot()
    gs, names = _functions(art), [str(g) for g in art["g_names"]]
    variants = [str(v) for v in art["variants"]]
    keep_probs = art["keep_probs"]
    cols = len(gs) + 1
    fig, axes = plt.subplots(len(keep_probs), cols, figsize=(2.9 * cols, 2.2 * len(keep_probs)), squeeze=False)
    for a, p in enumerate(keep_probs):
        i = _middle_cell(art, p, gs[0], variants)
        t = art["traj/times"][i]
        for b, j in enumerate(gs):
            ax = axes[a, b]
            for s in ["discrete", *variants]:
                if s != "discrete" and art[f"{s}/diverged"][i, j]:
                    continue
                m, sd = art[f"traj/{s}/mean"][i, :, j], art[f"traj/{s}/std"][i, :, j]
                ax.plot(t, m, color=COLORS.get(s), lw=1.0, label=s)
                ax.fill_between(t, m - sd, m + sd, color=COLORS.get(s), alpha=0.1, lw=0)
            ax.set_title(f"{names[j]}: mean +- sd (p={p:g}, eps={art['lr'][i]:g})", fontsize=7)
            ax.tick_params(labelsize=7)
        ax = axes[a, -1]
        j = gs[0]
        for v in variants:
            if art[f"{v}/diverged"][i, j]:
                continue
            gap, se = art[f"traj/{v}/gap"][i, :, j], art[f"traj/{v}/gap_se"][i, :, j]
            ax.plot(t, gap, color=COLORS.get(v), lw=1.0, label=v)
            ax.fill_between(t, gap - 2 * se, gap + 2 * se, color=COLORS.get(v), alpha=0.2, lw=0)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_title(f"E {names[j]}(SDE) - E {names[j]}(dropout GD), +-2 SE", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("t = N eps", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    axes[0, -1].legend(fontsize=6)
    return save_figure(fig, plt, directory, "trajectories.png", dpi=80)


def _finite_keep_probs(art, j):
    return [p for p in art["keep_probs"]
            if np.sum((art["keep_prob"] == p) & np.isfinite(art[f"{art['variants'][0]}/error"][:, j])) >= 2]


def plot_vs_lr(art: dict, directory: str) -> str:
    """Weak error vs eps (log-log) per keep_prob and test function, with bootstrap bars, the MC floor
    (dotted) and the fitted slopes (over the resolved cells) in the legend. Hollow: not resolved."""
    plt = pyplot()
    gs, names = _functions(art), [str(g) for g in art["g_names"]]
    keep_probs = _finite_keep_probs(art, gs[0])
    variants = [str(v) for v in art["variants"]]
    fig, axes = plt.subplots(len(gs), max(len(keep_probs), 1), figsize=(3.0 * max(len(keep_probs), 1), 2.6 * len(gs)),
                             squeeze=False)
    for b, p in enumerate(keep_probs):
        sel = np.flatnonzero(art["keep_prob"] == p)
        lr = art["lr"][sel]
        a = int(np.flatnonzero(art["keep_probs"] == p)[0])
        for r, j in enumerate(gs):
            ax = axes[r, b]
            for v in variants:
                err, res = art[f"{v}/error"][sel, j], art[f"{v}/resolved"][sel, j].astype(bool)
                lo, hi = art[f"{v}/ci_low"][sel, j], art[f"{v}/ci_high"][sel, j]
                yerr = np.vstack([np.clip(err - lo, 0, None), np.clip(hi - err, 0, None)])
                order = art[f"{v}/order"][a, j]
                label = (f"{v}: {order:.2f} [{art[f'{v}/order_low'][a, j]:.2f}, {art[f'{v}/order_high'][a, j]:.2f}]"
                         if np.isfinite(order) else f"{v}: unresolved")
                color = COLORS.get(v)
                ax.errorbar(lr, err, yerr=yerr, fmt="none", ecolor=color, lw=0.7)
                ax.plot(lr[res], err[res], "o", color=color, ms=3.5, label=label)
                ax.plot(lr[~res], err[~res], "o", mfc="none", color=color, ms=3.5)
                fitted = res & ((lr <= float(art["max_lr"])) if float(art.get("max_lr", 0.0)) > 0 else True)
                if np.isfinite(order) and fitted.any():
                    span = np.geomspace(lr[fitted].min(), lr[fitted].max(), 8)
                    ax.plot(span, np.exp(art[f"{v}/intercept"][a, j]) * span**order, "-", color=color, lw=0.8)
            ax.plot(lr, art[f"{variants[0]}/floor"][sel, j], ":", color="gray", label="MC floor")
            _log_axes(ax, np.sort(lr))
            ax.set_title(f"{names[j]}, p={p:g}", fontsize=8)
            ax.set_xlabel("eps", fontsize=7)
            ax.set_ylabel("weak error", fontsize=7)
            ax.legend(fontsize=5, title="fitted order [95% CI]", title_fontsize=5, loc="lower right")
    return save_figure(fig, plt, directory, "weak_error_vs_lr.png", dpi=80)


def plot_vs_keep_prob(art: dict, directory: str) -> str:
    """Weak error of the first plotted function vs keep_prob at every eps, with the MC floor.
    Hollow: not resolved; diverged processes are left out."""
    plt = pyplot()
    j = _functions(art)[0]
    lrs = np.unique(art["lr"])
    variants = [str(v) for v in art["variants"]]
    fig, axes = plt.subplots(1, len(lrs), figsize=(2.8 * len(lrs), 2.6), squeeze=False)
    for b, lr in enumerate(lrs):
        ax = axes[0, b]
        sel = np.flatnonzero(art["lr"] == lr)
        p = art["keep_prob"][sel]
        for v in variants:
            err, res = art[f"{v}/error"][sel, j], art[f"{v}/resolved"][sel, j].astype(bool)
            yerr = np.vstack([np.clip(err - art[f"{v}/ci_low"][sel, j], 0, None),
                              np.clip(art[f"{v}/ci_high"][sel, j] - err, 0, None)])
            color = COLORS.get(v)
            ax.errorbar(p, err, yerr=yerr, fmt="-", color=color, lw=0.8, label=v)
            ax.plot(p[res], err[res], "o", color=color, ms=3)
            ax.plot(p[~res], err[~res], "o", mfc="none", color=color, ms=3)
        ax.plot(p, art[f"{variants[0]}/floor"][sel, j], ":", color="gray", label="MC floor")
        _log_axes(ax)
        ax.set_xticks(p)
        ax.set_xticklabels([f"{x:g}" for x in p], fontsize=6, rotation=90)
        ax.set_title(f"{art['g_names'][j]}, eps={lr:g}", fontsize=8)
        ax.set_xlabel("keep_prob p", fontsize=7)
    axes[0, 0].set_ylabel("weak error", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    return save_figure(fig, plt, directory, "weak_error_vs_keep_prob.png", dpi=80)

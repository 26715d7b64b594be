"""The ``weak_error`` analysis: tables, fitted orders and figures from an SME sweep's cell files.

Reads ``<workdir>/sme/cell_*.npz`` written by `sme.sweep` (verified by their SHA-256; run with
``config.sde.enabled``), never re-simulates, and returns (artifact keys; K fixed times, G test
functions, estimator of `sme.weak_error`, docs/theory.md "The weak-error estimator"):

* ``lr``, ``keep_prob`` (C,) of the cells; ``times`` (K,); ``g_names`` (G,); ``variants`` (V,);
* per variant v: ``<v>/error`` (bias-corrected |E g(v) - E g(discrete)| at each time),
  ``<v>/raw``, ``<v>/gap`` (signed), ``<v>/ci_low``, ``<v>/ci_high`` (joint bootstrap over replica
  batches), ``<v>/floor`` (that variant's own Monte Carlo standard error), ``<v>/diverged`` (C, K, G);
  ``<v>/beats/<w>`` (C, K, G) the fraction of joint draws where v's error is below w's;
* ``keep_probs`` (P,) and per variant ``<v>/order``, ``<v>/order_low``, ``<v>/order_high``,
  ``<v>/intercept`` (P, K, G): log-log slope over the declared range fit_lr_min <= eps <= fit_lr_max,
  and ``<v>/order_all`` (+ ``_low``/``_high``) over the whole grid;
* ``traj/times`` (C, T), ``traj/<series>/mean`` and ``traj/<series>/std`` (C, T, G): replica mean
  and standard deviation of every test function (NaN-padded to the longest cell); for each variant
  ``traj/<v>/gap`` and ``traj/<v>/gap_se`` (C, T, G): E g(v) - E g(discrete) and its standard error;
* scalars ``order/<v>/<g>/p<p>`` (and ``_low``/``_high``; final time, declared range) for summary.json.

Settings (declare them in the run's config.analysis.weak_error before the run): ``times`` ("" =
the final time only; e.g. "1,2"), ``fit_lr_min``/``fit_lr_max`` (0/0 = the whole grid),
``num_boot`` (0: the run's sde.num_boot), ``level`` (0.95), ``plot_functions``
("R_S,L_S,sq_norm"). The analysis does not depend on the checkpoint: request ``--steps=last``.
Figures: ``trajectories.png``, ``weak_error_vs_lr.png`` (log-log at the final time, bootstrap
bars, each variant's floor dotted, fitted slopes over the declared range; hollow markers: interval
reaches 0) and ``weak_error_vs_keep_prob.png``. Diverged processes are left out.

`exact_e1` / ``python -m sme.analyses.weak_error --exact`` computes the same weak errors with no
Monte Carlo for the E1 net with its hidden layer frozen (`sme.exact`), for docs/figures/e1_exact.png.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from sme import weak_error
from sme.analyses import Context, register
from sme.analyses.common import pyplot, save_figure, settings_class
from sme.sweep import SME_DIR, load_cell

DEFAULTS = dict(num_boot=0, level=0.95, plot_functions="R_S,L_S,sq_norm", times="", fit_lr_min=0.0, fit_lr_max=0.0)
COLORS = {"discrete": "k", "order1": "C0", "order2": "C1", "r2": "C2", "svag": "C3", "ode1": "C0", "ode2": "C1"}
STYLES = {"ode1": "--", "ode2": "--"}


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


def parse_times(text: str, horizon: float) -> list[float]:
    """'1,2' -> [1.0, 2.0]; '' -> [horizon]. Raises naming the setting on anything else."""
    text = str(text).strip()
    if not text:
        return [float(horizon)]
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"analysis weak_error: times={text!r}: use comma-separated SME times like '1,2'") from None


def compute(workdir: str, *, num_boot: int, level: float, times: str = "", fit_lr_min: float = 0.0,
            fit_lr_max: float = 0.0) -> dict:
    cells = load_cells(workdir)
    if not cells:
        raise ValueError(f"{workdir}/{SME_DIR}: no verified cell files; run train.py with config.sde.enabled")
    variants = [str(v) for v in cells[0]["variants"]]
    g_names = [str(g) for g in cells[0]["g_names"]]
    wanted = parse_times(times, float(cells[0]["horizon"]))
    table = weak_error.cell_table(cells, variants, times=wanted, num_boot=num_boot, level=level)
    hi = fit_lr_max if fit_lr_max > 0 else np.inf
    declared = weak_error.order_table(table, variants, lr_min=fit_lr_min, lr_max=hi, level=level)
    whole = weak_error.order_table(table, variants, level=level)
    out = {k: v for k, v in table.items() if not k.endswith("/boot")}
    out.update(g_names=np.array(g_names), variants=np.array(variants), keep_probs=declared["keep_probs"],
               fit_lr_min=np.float64(fit_lr_min), fit_lr_max=np.float64(fit_lr_max))
    for v in variants:
        for src, dst in (("order", "order"), ("ci_low", "order_low"), ("ci_high", "order_high"),
                         ("intercept", "intercept"), ("num_points", "num_points")):
            out[f"{v}/{dst}"] = declared[f"{v}/{src}"]
            out[f"{v}/{dst.replace('order', 'order_all') if 'order' in dst else dst + '_all'}"] = whole[f"{v}/{src}"]
        for a, p in enumerate(declared["keep_probs"]):
            for j, g in enumerate(g_names):
                for suffix, key in (("", "order"), ("_low", "order_low"), ("_high", "order_high")):
                    out[f"order/{v}/{g}/p{p:g}{suffix}"] = np.float64(out[f"{v}/{key}"][a, -1, j])
    out.update(_trajectories(cells, ["discrete", *variants]))
    return out


WeakErrorSettings = settings_class("WeakErrorSettings", DEFAULTS)


@register("weak_error", plot_fn=lambda directory, steps: plot(directory, steps))
def weak_error_analysis(ctx: Context, *, key) -> dict:
    """Weak error of the SME variants and ODE controls against dropout GD at fixed times, with orders."""
    del key  # deterministic: the joint bootstrap draws are seeded
    s = WeakErrorSettings.from_dict("weak_error", ctx.settings)
    num_boot = s["num_boot"] or ctx.run.num_boot
    out = compute(ctx.workdir, num_boot=num_boot, level=s["level"], times=s["times"], fit_lr_min=s["fit_lr_min"],
                  fit_lr_max=s["fit_lr_max"])
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
    ok = [i for i in idx if not any(art[f"{v}/diverged"][i, -1, j] for v in variants)]
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
                if s != "discrete" and art[f"{s}/diverged"][i, -1, j]:
                    continue
                m, sd = art[f"traj/{s}/mean"][i, :, j], art[f"traj/{s}/std"][i, :, j]
                ax.plot(t, m, STYLES.get(s, "-"), color=COLORS.get(s), lw=1.0, label=s)
                ax.fill_between(t, m - sd, m + sd, color=COLORS.get(s), alpha=0.1, lw=0)
            ax.set_title(f"{names[j]}: mean +- sd (p={p:g}, eps={art['lr'][i]:g})", fontsize=7)
            ax.tick_params(labelsize=7)
        ax = axes[a, -1]
        j = gs[0]
        for v in variants:
            if art[f"{v}/diverged"][i, -1, j]:
                continue
            gap, se = art[f"traj/{v}/gap"][i, :, j], art[f"traj/{v}/gap_se"][i, :, j]
            ax.plot(t, gap, STYLES.get(v, "-"), color=COLORS.get(v), lw=1.0, label=v)
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
            if np.sum((art["keep_prob"] == p) & np.isfinite(art[f"{art['variants'][0]}/error"][:, -1, j])) >= 2]


def plot_vs_lr(art: dict, directory: str) -> str:
    """Weak error at the final time vs eps (log-log) per keep_prob and test function, with bootstrap
    bars, each variant's MC floor (dotted) and the slopes fitted over the declared range in the
    legend. ODE controls dashed. Hollow: the interval reaches 0."""
    plt = pyplot()
    gs, names = _functions(art), [str(g) for g in art["g_names"]]
    keep_probs = _finite_keep_probs(art, gs[0])
    variants = [str(v) for v in art["variants"]]
    fig, axes = plt.subplots(len(gs), max(len(keep_probs), 1), figsize=(3.2 * max(len(keep_probs), 1), 2.8 * len(gs)),
                             squeeze=False)
    lo_fit, hi_fit = float(art["fit_lr_min"]), float(art["fit_lr_max"]) or np.inf
    for b, p in enumerate(keep_probs):
        sel = np.flatnonzero(art["keep_prob"] == p)
        lr = art["lr"][sel]
        a = int(np.flatnonzero(art["keep_probs"] == p)[0])
        for r, j in enumerate(gs):
            ax = axes[r, b]
            for v in variants:
                err, lo, hi = (art[f"{v}/{f}"][sel, -1, j] for f in ("error", "ci_low", "ci_high"))
                res = lo > 0
                yerr = np.vstack([np.clip(err - lo, 0, None), np.clip(hi - err, 0, None)])
                order = art[f"{v}/order"][a, -1, j]
                label = (f"{v}: {order:.2f} [{art[f'{v}/order_low'][a, -1, j]:.2f}, "
                         f"{art[f'{v}/order_high'][a, -1, j]:.2f}]" if np.isfinite(order) else f"{v}: -")
                color, style = COLORS.get(v), STYLES.get(v, "-")
                ax.errorbar(lr, err, yerr=yerr, fmt="none", ecolor=color, lw=0.7)
                ax.plot(lr[res], err[res], "o" if style == "-" else "s", color=color, ms=3.5, label=label)
                ax.plot(lr[~res], err[~res], "o" if style == "-" else "s", mfc="none", color=color, ms=3.5)
                fitted = (lr >= lo_fit * (1 - 1e-9)) & (lr <= hi_fit * (1 + 1e-9))
                if np.isfinite(order) and fitted.any():
                    span = np.geomspace(lr[fitted].min(), lr[fitted].max(), 8)
                    ax.plot(span, np.exp(art[f"{v}/intercept"][a, -1, j]) * span**order, style, color=color, lw=0.8)
                ax.plot(lr, art[f"{v}/floor"][sel, -1, j], ":", color=color, lw=0.6)
            _log_axes(ax, np.sort(lr))
            ax.set_title(f"{names[j]}, p={p:g}, t={art['times'][-1]:g} (dotted: MC floors)", fontsize=7)
            ax.set_xlabel("eps", fontsize=7)
            ax.set_ylabel("weak error", fontsize=7)
            ax.legend(fontsize=5, title="order [95% CI], declared eps range", title_fontsize=5, loc="lower right")
    return save_figure(fig, plt, directory, "weak_error_vs_lr.png", dpi=80)


def plot_vs_keep_prob(art: dict, directory: str) -> str:
    """Weak error of the first plotted function at the final time vs keep_prob at every eps, with
    each variant's MC floor. Hollow: the interval reaches 0; diverged processes are left out."""
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
            err, lo, hi = (art[f"{v}/{f}"][sel, -1, j] for f in ("error", "ci_low", "ci_high"))
            res = lo > 0
            yerr = np.vstack([np.clip(err - lo, 0, None), np.clip(hi - err, 0, None)])
            color = COLORS.get(v)
            ax.errorbar(p, err, yerr=yerr, fmt=STYLES.get(v, "-"), color=color, lw=0.8, label=v)
            ax.plot(p[res], err[res], "o", color=color, ms=3)
            ax.plot(p[~res], err[~res], "o", mfc="none", color=color, ms=3)
            ax.plot(p, art[f"{v}/floor"][sel, -1, j], ":", color=color, lw=0.6)
        _log_axes(ax)
        ax.set_xticks(p)
        ax.set_xticklabels([f"{x:g}" for x in p], fontsize=6, rotation=90)
        ax.set_title(f"{art['g_names'][j]}, eps={lr:g}", fontsize=8)
        ax.set_xlabel("keep_prob p", fontsize=7)
    axes[0, 0].set_ylabel("weak error", fontsize=7)
    axes[0, 0].legend(fontsize=6)
    return save_figure(fig, plt, directory, "weak_error_vs_keep_prob.png", dpi=80)


# --- The exactly solvable case: E1's net with its hidden layer frozen (no Monte Carlo) -------------

EXACT_KINDS = ("order1", "order2", "ode1", "ode2")
EXACT_FUNCTIONS = ("R_S", "L_S", "sq_norm", "cov")


def exact_problem(run, keep_prob: float):
    """The readout-only problem of the net of `run` (`sme.config.Run`): features phi_i = h(x_i) of
    replica 0's initial hidden layer (frozen), targets y, the initial readout a_0, dropout at
    `keep_prob`. Returns (`sme.exact.Linear`, a_0)."""
    import jax
    import jax.numpy as jnp

    from sme import exact, rng
    from sme.dropout import ones_masks

    model, ds = run.model, run.dataset
    if ds.out_dim != 1:
        raise ValueError(f"the exact case needs one output, not {ds.out_dim}")
    params = model.init(rng.stream_key(run.seed, rng.INIT, replica=0), dtype=jnp.float32)
    x = jnp.asarray(ds.x_train, jnp.float32)
    phi = jax.vmap(model.penultimate, in_axes=(None, 0, None))(params, x, ones_masks(model.sites, dtype=x.dtype))
    a0 = np.asarray(model.readout(params), np.float64)[:, 0]
    return exact.Linear(np.asarray(phi, np.float64), np.asarray(ds.y_train, np.float64)[:, 0], keep_prob), a0


def exact_e1(cfg, *, keep_probs, lrs, horizon: float, times) -> dict:
    """Exact weak errors ``err`` (P, L, K, V, F) of the SME/ODE kinds against dropout GD at the
    ``times`` (K,) for test functions R_S, L_S, ||a||^2 and ||Cov a||_F (F), by `sme.exact`."""
    from sme import config as config_lib
    from sme import exact

    run = config_lib.build(cfg)  # the data and the initial net: the same at every keep_prob

    err = np.zeros((len(keep_probs), len(lrs), len(times), len(EXACT_KINDS), len(EXACT_FUNCTIONS)))
    for a, p in enumerate(keep_probs):
        problem, a0 = exact_problem(run, p)
        for b, lr in enumerate(lrs):
            res = exact.weak_errors(problem, a0, lr, horizon, kinds=EXACT_KINDS, fractions=[t / horizon for t in times])
            for v, kind in enumerate(EXACT_KINDS):
                for f, g in enumerate(EXACT_FUNCTIONS):
                    err[a, b, :, v, f] = res[kind][g]
    return dict(err=err, keep_probs=np.asarray(keep_probs), lrs=np.asarray(lrs), times=np.asarray(times))


def exact_slopes(res: dict, lr_min: float, lr_max: float) -> np.ndarray:
    """Least-squares log-log slopes (P, K, V, F) over lr_min <= eps <= lr_max."""
    sel = (res["lrs"] >= lr_min * (1 - 1e-9)) & (res["lrs"] <= lr_max * (1 + 1e-9))
    x = np.log(res["lrs"][sel])
    logs = np.log(np.moveaxis(res["err"][:, sel], 1, -1))  # (P, K, V, F, L')
    xc = x - x.mean()
    return (logs - logs.mean(-1, keepdims=True)) @ xc / (xc @ xc)


def plot_exact(res: dict, path: str, *, functions=("R_S", "sq_norm", "cov"), dpi: int = 130) -> str:
    """Exact weak error vs eps at the final time: rows test functions, columns keep_prob."""
    plt = pyplot()
    ps, lrs = res["keep_probs"], res["lrs"]
    fig, axes = plt.subplots(len(functions), len(ps), figsize=(2.7 * len(ps), 2.4 * len(functions)), squeeze=False)
    labels = {"order1": "order-1 SME", "order2": "order-2 SME", "ode1": "ODE, order-1 drift", "ode2": "ODE, order-2 drift"}
    for a, p in enumerate(ps):
        for r, g in enumerate(functions):
            ax = axes[r, a]
            f = EXACT_FUNCTIONS.index(g)
            for v, kind in enumerate(EXACT_KINDS):
                ax.plot(lrs, res["err"][a, :, -1, v, f], STYLES.get(kind, "-"), marker="s" if kind in STYLES else "o",
                        ms=2.5, color=COLORS[kind], lw=1.0, label=labels[kind])
            for order, anchor in ((1, "ode1"), (2, "order2")):
                ref = res["err"][a, -1, -1, EXACT_KINDS.index(anchor), f]
                ax.plot(lrs, ref * (lrs / lrs[-1]) ** order, ":", color="gray", lw=0.7)
            _log_axes(ax, lrs[::2])
            name = "||Cov a||_F" if g == "cov" else ("||a||^2" if g == "sq_norm" else g)
            blown = np.nanmax(res["err"][a, :, -1, :, f]) > 1e2  # second moments of dropout GD diverge
            if blown:
                ax.set_ylim(top=1e2)
            ax.set_title(f"{name}, p={p:g}, t={res['times'][-1]:g}" + (" (diverges at large eps)" if blown else ""),
                         fontsize=7)
            ax.set_xlabel("eps", fontsize=7)
    axes[0, 0].set_ylabel("exact weak error", fontsize=7)
    axes[0, 0].legend(fontsize=5, title="dotted: slopes 1 and 2", title_fontsize=5)
    directory, name = os.path.split(path)
    return save_figure(fig, plt, directory or ".", name, dpi=dpi)


def exact_markdown(res: dict, slopes: dict) -> str:
    """The exact-case tables of docs/results_e1.md: errors at the final time and fitted slopes."""
    lines = ["| p | ε | " + " | ".join(f"{k} R_S" for k in EXACT_KINDS) + " | " +
             " | ".join(f"{k} Cov" for k in ("order1", "order2", "ode1")) + " |",
             "|---|---|" + "---|" * (len(EXACT_KINDS) + 3)]
    f_r, f_c = EXACT_FUNCTIONS.index("R_S"), EXACT_FUNCTIONS.index("cov")
    for a, p in enumerate(res["keep_probs"]):
        for b, lr in enumerate(res["lrs"]):
            e = res["err"][a, b, -1]
            lines.append(f"| {p:g} | {lr:g} | " + " | ".join(f"{e[v, f_r]:.2e}" for v in range(len(EXACT_KINDS)))
                         + " | " + " | ".join(f"{e[EXACT_KINDS.index(k), f_c]:.2e}" for k in ("order1", "order2", "ode1"))
                         + " |")
    lines += ["", "| p | ε range | " + " | ".join(f"{k} R_S / ‖a‖² / Cov" for k in EXACT_KINDS) + " |",
              "|---|---|" + "---|" * len(EXACT_KINDS)]
    for label, slope in slopes.items():
        for a, p in enumerate(res["keep_probs"]):
            cells = [" / ".join(f"{slope[a, -1, v, EXACT_FUNCTIONS.index(g)]:.2f}" for g in ("R_S", "sq_norm", "cov"))
                     for v in range(len(EXACT_KINDS))]
            lines.append(f"| {p:g} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.1e}"


def sweep_markdown(art: dict, g: str = "R_S") -> str:
    """The Monte Carlo E1 tables of docs/results_e1.md from a ``weak_error`` artifact: errors at each
    fixed time with every variant's own floor, orders (declared range and whole grid), and Var g."""
    j = [str(x) for x in art["g_names"]].index(g)
    variants = [str(v) for v in art["variants"]]
    lines = []
    for k, t in enumerate(art["times"]):
        lines += [f"Weak error of {g} at t = {t:g}: bias-corrected estimate [95% joint-bootstrap interval], "
                  "and each variant's Monte Carlo floor (its standard error):", "",
                  "| p | ε | " + " | ".join(f"{v} | floor" for v in variants) + " |",
                  "|---|---|" + "---|---|" * len(variants)]
        for i in np.lexsort((-art["lr"], art["keep_prob"])):
            cells = []
            for v in variants:
                e, lo, hi, fl = (art[f"{v}/{f}"][i, k, j] for f in ("error", "ci_low", "ci_high", "floor"))
                cells.append(f"{_fmt(e)} [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(fl)}")
            lines.append(f"| {art['keep_prob'][i]:g} | {art['lr'][i]:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lo, hi = float(art["fit_lr_min"]), float(art["fit_lr_max"])
    lines += [f"Fitted orders of {g} (declared range {lo:g} ≤ ε ≤ {hi:g}; then the whole grid), 95% joint-bootstrap "
              "interval; – where a corrected error in the range is 0 or a process diverged:", "",
              "| p | t | range | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for a, p in enumerate(art["keep_probs"]):
        for k, t in enumerate(art["times"]):
            for label, key in (("declared", "order"), ("all ε", "order_all")):
                cells = []
                for v in variants:
                    o, l_, h_ = (art[f"{v}/{key}{s}"][a, k, j] for s in ("", "_low", "_high"))
                    cells.append("–" if not np.isfinite(o) else
                                 f"{o:.2f} [{l_:.2f}, {h_:.2f}]" if np.isfinite(l_) else f"{o:.2f} [–]")
                lines.append(f"| {p:g} | {t:g} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Standard deviation of {g} over replicas at the final time (dropout GD and each variant):", "",
              "| p | ε | discrete | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    times = art["traj/times"]
    for i in np.lexsort((-art["lr"], art["keep_prob"])):
        last = int(np.nanargmax(times[i]))
        row = [art[f"traj/{s}/std"][i, last, j] for s in ["discrete", *variants]]
        lines.append(f"| {art['keep_prob'][i]:g} | {art['lr'][i]:g} | " + " | ".join(_fmt(x) for x in row) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """python -m sme.analyses.weak_error --exact [FIGURE]: the exact E1 case (figure + markdown tables);
    --tables ARTIFACT: the Monte Carlo tables from a weak_error artifact (step_*.npz)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--exact", nargs="?", const="docs/figures/e1_exact.png", metavar="FIGURE")
    parser.add_argument("--tables", metavar="ARTIFACT")
    args = parser.parse_args(argv)
    if args.tables:
        from sme import io

        print(sweep_markdown(io.load_arrays(args.tables)))
    if not args.exact:
        return
    from configs import sme_weak_error

    cfg = sme_weak_error.get_config()
    lrs = 0.4 / 2.0 ** np.arange(8)  # 0.4 ... 0.003125
    res = exact_e1(cfg, keep_probs=(0.1, 0.5, 0.8, 0.9, 0.95), lrs=lrs, horizon=2.0, times=(1.0, 2.0))
    s = cfg.analysis.weak_error
    slopes = {f"{s.fit_lr_min:g}–{s.fit_lr_max:g}": exact_slopes(res, s.fit_lr_min, s.fit_lr_max),
              "0.00625–0.003125": exact_slopes(res, 0.003125, 0.00625)}
    print(plot_exact(res, args.exact))
    print(exact_markdown(res, slopes))


if __name__ == "__main__":
    main()

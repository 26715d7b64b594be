"""Reproduce the papers' experiments E2-E6 end to end and write a report folder.

`run_plan(plan, out_dir)` trains every run of a plan (see configs/reproduce.py)
into ``out_dir/runs/<name>`` (resuming finished or interrupted runs), runs the
listed analyses on their checkpoints, then `write_report` reads the artifacts
(never recomputes) and writes

    out_dir/report.json      every headline number, with the paper's claim beside it
    out_dir/report.md        the same as markdown tables
    out_dir/figures/*.png    one figure per experiment
"""

from __future__ import annotations

import glob
import json
import os
import time

import numpy as np
from absl import logging

from sme import io, stats
from sme.analyses import common
from sme.analyses.common import step_axis
from sme.analyses.runner import Request, analyse_run
from sme.train import loop

PAPER = {
    "e2": "alpha(H, Sigma) well above the null alignment along training (2305.15850, Fig. 1)",
    "e3": "psi > 0: sigma_i^2 ~ F_i^-psi (Feng & Tu report psi ~ 4 for SGD); projected variance grows with "
          "the Hessian eigenvalue (positive log-log slope)",
    "e4": "dropout reaches flatter minima (smaller lambda_max, Tr H) and higher test accuracy "
          "(98.7 vs 98.1 % FNN on MNIST, 2207.05952 Table 1)",
    "e5": "R_S + R_1 reaches the accuracy of dropout: > 88 % vs ~79 % for R_S (first 1,000 MNIST images, "
          "2207.05952 Fig. 2)",
    "e6": "R_1 behaves as a Fisher-information penalty ((1-p)/(2p)) sum_j theta_j^2 F_jj (Kimura & Hino)",
}


def run_plan(plan: list[dict], out_dir: str) -> dict:
    """Train and analyse every entry of `plan`; returns the report dict."""
    tic = time.time()
    for entry in plan:
        workdir = os.path.join(out_dir, "runs", entry["name"])
        logging.info("reproduce: training %s", entry["name"])
        loop.run(entry["config"], workdir)
        # (steps, replica) -> analyses; "steps" and "replica" may be one value or one per analysis
        groups: dict[tuple, list[str]] = {}
        per = lambda field, name, default: (entry.get(field, default).get(name, default)
                                            if isinstance(entry.get(field, default), dict) else entry.get(field, default))
        for name in entry["analyses"]:
            groups.setdefault((per("steps", name, "all"), per("replica", name, 0)), []).append(name)
        for (steps, replica), names in groups.items():
            logging.info("reproduce: analysing %s (%s; steps %s, replica %s)", entry["name"], ", ".join(names),
                         steps, replica)
            summary = analyse_run(workdir, Request(tuple(names), steps, replica, entry["settings"]))
            for failure in summary.get("failures", []):
                logging.error("reproduce: %s: %s", entry["name"], failure)
    report = write_report(out_dir)
    report["seconds"] = time.time() - tic
    io.write_json(os.path.join(out_dir, "report.json"), report)
    return report


def _run(out_dir, name):
    return os.path.join(out_dir, "runs", name)


def _artifacts(out_dir, name, analysis) -> list[tuple[int, dict]]:
    paths = sorted(glob.glob(os.path.join(_run(out_dir, name), "analysis", analysis, "step_*.npz")))
    return [(int(os.path.basename(p)[5:-4]), io.load_arrays(p)) for p in paths]


def _last(out_dir, name, analysis) -> dict:
    found = _artifacts(out_dir, name, analysis)
    return found[-1][1] if found else {}


def _replica_last(out_dir, name, analysis) -> list[dict]:
    """The last artifact of every replica (``analysis/<name>/replica_<r>/``), by replica."""
    found = glob.glob(os.path.join(_run(out_dir, name), "analysis", analysis, "replica_*"))
    replicas = sorted(int(os.path.basename(d)[8:]) for d in found)
    return [a for a in (_last(out_dir, name, os.path.join(analysis, f"replica_{r}")) for r in replicas) if a]


def _final_metrics(out_dir, name) -> dict:
    records = io.read_jsonl(os.path.join(_run(out_dir, name), "metrics.jsonl"))
    return records[-1] if records else {}


def _num(arrays: dict, key: str, index=None) -> float:
    if key not in arrays:
        return float("nan")
    value = np.asarray(arrays[key], np.float64)
    return float(value if index is None else value.reshape(-1)[index])


def _figure(rows, cols, size):
    return common.subplots(rows, cols, size)


def _save(plt, fig, out_dir, name) -> str:
    return common.save_report_figure(fig, plt, out_dir, name, dpi=DPI)


DPI = 150


def report_e2(out_dir) -> dict:
    """alpha(H, Sigma) along the dropout run for its dropout noise and for SGD noise at the same theta
    (same H, same K), the SGD run's final alpha, and the Haar null; alpha with the unbiased ||Sigma||_F."""
    series = _artifacts(out_dir, "e2/dropout", "alignment")
    if not series:
        return {}
    steps = [s for s, _ in series]
    col = lambda key: [_num(a, key) for _, a in series]
    out = {"steps": steps, "hessian_of": str(series[0][1].get("hessian_label", "")),
           "num_samples": {"dropout": int(json.loads(str(series[0][1]["settings"]))["num_masks"]),
                           "sgd": int(json.loads(str(series[0][1]["settings"]))["sgd_examples"])},
           "dropout_alpha": col("dropout_alpha_unbiased"), "dropout_alpha_plug_in": col("dropout_alpha"),
           "sgd_noise_alpha": col("sgd_alpha_unbiased"), "sgd_noise_alpha_plug_in": col("sgd_alpha"),
           "null_haar_mean": col("dropout_null_haar_unbiased_mean"),
           "null_haar_std": col("dropout_null_haar_unbiased_std"),
           "sgd_null_haar_mean": col("sgd_null_haar_unbiased_mean"),
           "sgd_null_haar_std": col("sgd_null_haar_unbiased_std")}
    sgd = _last(out_dir, "e2/sgd", "alignment")
    out["sgd_run"] = {k: _num(sgd, key) for k, key in (
        ("alpha", "sgd_alpha_unbiased"), ("alpha_plug_in", "sgd_alpha"), ("null_haar_mean", "sgd_null_haar_unbiased_mean"),
        ("null_haar_std", "sgd_null_haar_unbiased_std"))}
    plt, fig, axes = _figure(1, 2, (5.0, 3.8))
    x = np.asarray(steps, np.float64)
    for ax, log in zip(axes, (False, True)):
        ax.plot(x, out["dropout_alpha"], "o-", color="C0", label="dropout noise (dropout GD run)")
        ax.plot(x, out["sgd_noise_alpha"], "s--", color="C1", label="SGD noise at the same θ, same H")
        if sgd:
            ax.errorbar([x.max() * 1.15], [out["sgd_run"]["alpha"]], fmt="D", color="C3",
                        label="SGD noise, SGD run (final)")
        for name, color, shift in (("null_haar", "C0", 1.0), ("sgd_null_haar", "C1", 1.06)):
            mean, sd = np.asarray(out[f"{name}_mean"]), np.asarray(out[f"{name}_std"])
            ax.errorbar(x * shift, mean, yerr=2 * sd, fmt="_", color=color, alpha=0.8, capsize=2,
                        label=f"Haar null, mean ± 2 sd ({'dropout' if name == 'null_haar' else 'SGD'} Σ)")
        ax.axhline(1.0, color="grey", ls=":", lw=0.9, label="α ≤ 1 for the true Σ (Cauchy-Schwarz)")
        step_axis(ax, list(steps) + [x.max() * 1.15])
        ax.set_ylabel("alignment α(H, Σ)")
        if log:
            ax.set_yscale("log")
            ax.set_title("the same on a log scale (null visible)", fontsize=9)
        else:
            ax.set_ylim(bottom=min(0.0, np.nanmin(out["dropout_alpha"])))
            ax.set_title(f"H = Hessian of {out['hessian_of']}; K = {out['num_samples']['dropout']} samples",
                         fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right", framealpha=0.9)
    out["figure"] = _save(plt, fig, out_dir, "e2_alignment.png")
    out["paper"] = PAPER["e2"]
    return out


def _psi(arrays, suffix) -> dict:
    return {k: _num(arrays, f"{k}_{suffix}") for k in ("psi", "psi_low", "psi_high", "spearman", "num_fit_points")}


def _sensitivity_rows(arrays) -> list[dict]:
    if "sensitivity_psi" not in arrays:
        return []
    rows = []
    for a, comps in enumerate(np.asarray(arrays["sensitivity_components"]).tolist()):
        for b, trend in enumerate(np.asarray(arrays["sensitivity_max_trend"], np.float64).tolist()):
            row = {"components": int(comps), "max_trend": None if np.isnan(trend) else trend}
            for i, tag in enumerate(("c2", "ce")):
                row[tag] = {f: float(np.asarray(arrays[f"sensitivity_{f}"])[i, a, b])
                            for f in ("psi", "psi_low", "psi_high", "spearman", "num_fit_points")}
            rows.append(row)
    return rows


def _fit_band(ax, arrays, used):
    """The fitted line sigma² = exp(b) F^-psi over the fitted points, with lines at the interval's ends
    (pivoting at the points' centroid in log-log)."""
    width, var = arrays["width"][0][used], arrays["variances"][: arrays["width"].shape[1]][used]
    psi, low, high = (_num(arrays, k) for k in ("psi_c2", "psi_low_c2", "psi_high_c2"))
    if not np.isfinite(psi) or used.sum() < 3:
        return
    grid = np.geomspace(width.min(), width.max(), 50)
    ax.loglog(grid, np.exp(_num(arrays, "intercept_c2")) * grid ** -psi, "k-", lw=1.2,
              label=f"fit ψ = {psi:.2f} [{low:.2f}, {high:.2f}]")
    cx, cy = np.mean(np.log(width)), np.mean(np.log(var))
    for end in (low, high):
        if np.isfinite(end):
            ax.loglog(grid, np.exp(cy - end * (np.log(grid) - cx)), "k:", lw=0.9,
                      label="95 % interval of ψ" if end == low else None)


def report_e3(out_dir) -> dict:
    out, panels = {"paper": PAPER["e3"]}, []
    for run in ("dropout", "sgd"):
        name = f"e2/{run}"
        for analysis in ("flatness", "trajectory_flatness"):
            arrays = _last(out_dir, name, analysis)
            if arrays and "variances" in arrays:
                settings = json.loads(str(arrays["settings"]))
                out[f"{run}_{analysis}"] = {
                    "c2": _psi(arrays, "c2"), "ce": _psi(arrays, "ce"),
                    "settings": {k: settings.get(k) for k in ("num_components", "fit_components", "num_excluded",
                                                              "max_trend", "num_masks", "noise")
                                 if k in settings},
                    "excluded_pcs": (np.flatnonzero(np.asarray(arrays["excluded"])) + 1).tolist(),
                    "sensitivity": _sensitivity_rows(arrays)}
                if "trend_fraction" in arrays:
                    out[f"{run}_{analysis}"]["trend_fraction_pc1_6"] = np.round(
                        np.asarray(arrays["trend_fraction"], np.float64)[:6], 3).tolist()
                panels.append((f"{run}: {analysis.replace('_', ' ')}", arrays, settings))
        align = _last(out_dir, name, "alignment")
        noise = "dropout" if run == "dropout" else "sgd"
        if align:
            out[f"{run}_projected_variance_slope"] = {k: _num(align, f"{noise}_slope{s}") for k, s in
                                                      (("slope", ""), ("low", "_low"), ("high", "_high"))}
    if panels:
        from matplotlib import ticker

        plt, fig, axes = _figure(2, 2, (4.6, 3.7)) if len(panels) > 2 else _figure(1, len(panels), (4.6, 3.7))
        for ax, (title, arrays, settings) in zip(axes, panels):
            k = arrays["width"].shape[1]
            var, width = arrays["variances"][:k], arrays["width"][0]
            index = np.arange(k)
            excluded = arrays["excluded"].astype(bool)
            ok = ~arrays["capped"][0].astype(bool) & arrays["resolved"].astype(bool)
            used = ok & ~excluded & (index < (settings.get("fit_components") or k))
            beyond = ok & ~excluded & ~used
            ax.loglog(width[used], var[used], "o", ms=3.5, color="C0", label="PCs in the fit")
            ax.loglog(width[beyond], var[beyond], "o", ms=3.5, mfc="none", color="C0",
                      label=f"PCs beyond {settings.get('fit_components') or k}")
            ax.loglog(width[excluded], var[excluded], "x", color="red", label="drift PCs (excluded)")
            limits = ax.get_xlim(), ax.get_ylim()
            _fit_band(ax, arrays, used)
            ax.set_xlim(limits[0])
            ax.set_ylim(limits[1])  # a wide interval's lines must not squash the points
            ax.set_title(title, fontsize=9)
            # ticks at 1, 2, 5 x 10^k, plain numbers: short decades keep readable labels
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("interval flatness F_i (c = 2)")
            ax.set_ylabel("variance σ_i²")
            ax.legend(fontsize=6, loc="best", framealpha=0.85)
        out["figure"] = _save(plt, fig, out_dir, "e3_variance_flatness.png")
    return out


def t_interval(values, level: float = 0.95) -> dict:
    """Mean and Student-t interval over independent seeds (n >= 2; NaN otherwise)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size < 2:
        return {"mean": float(v.mean()) if v.size else float("nan"), "low": float("nan"), "high": float("nan"),
                "n": int(v.size)}
    half = stats.t_halfwidth(v.std(ddof=1), v.size, level)
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "n": int(v.size)}


def _accuracy_interval(metrics: dict, level: float = 0.95) -> dict:
    """Test accuracy over R replicas from the final metrics line: the mean and the population std
    (ddof 0) that the training loop logs."""
    mean, std, r = metrics.get("test/acc"), metrics.get("test/acc_std"), metrics.get("num_replicas")
    if mean is None:
        return {}
    out = {"mean": mean, "low": float("nan"), "high": float("nan"), "n": r or 1}
    if std is not None and r and r > 1:
        half = stats.t_halfwidth(std * np.sqrt(r / (r - 1)), r, level)
        out.update(low=mean - half, high=mean + half)
    return out


def report_e4(out_dir) -> dict:
    out = {"paper": PAPER["e4"]}
    for run in ("dropout", "plain"):
        name = f"e4/{run}"
        cfg = io.read_json(os.path.join(_run(out_dir, name), "config.json")).get("config", {})
        metrics = _final_metrics(out_dir, name)
        metrics.setdefault("num_replicas", cfg.get("train", {}).get("num_replicas", 1))
        row = {"num_seeds": metrics["num_replicas"], "test_acc": _accuracy_interval(metrics),
               "train_risk": metrics.get("train/risk")}
        for analysis, label in (("hessian", "r_s"), ("hessian_modified", "l_s")):
            found = _replica_last(out_dir, name, analysis)
            if not found:
                continue
            lam = [_num(a, "top_values", 0) for a in found]
            trace = [_num(a, "trace_hutchinson") for a in found]
            row[label] = {"loss": str(found[0].get("loss_label", "")),
                          "lambda_max": t_interval(lam), "trace": t_interval(trace),
                          "lambda_max_per_seed": lam, "trace_per_seed": trace,
                          "trace_se_per_seed": [_num(a, "trace_hutchinson_se") for a in found],
                          "lambda_residual_max": max(_num(a, "top_residuals", 0) for a in found)}
        out[run] = row
    runs = [r for r in ("dropout", "plain") if r in out]
    plt, fig, axes = _figure(1, 3, (3.3, 3.3))
    for i, run in enumerate(runs):
        color = "C0" if run == "dropout" else "C1"
        acc = out[run]["test_acc"]
        if acc:
            axes[0].errorbar([i], [100 * acc["mean"]], yerr=[[100 * (acc["mean"] - acc["low"])],
                                                             [100 * (acc["high"] - acc["mean"])]],
                             fmt="o", color=color, capsize=4)
        for ax, key in ((axes[1], "lambda_max"), (axes[2], "trace")):
            for j, (loss, marker) in enumerate((("r_s", "o"), ("l_s", "s"))):
                if loss not in out[run]:
                    continue
                per_seed, ci = out[run][loss][f"{key}_per_seed"], out[run][loss][key]
                xpos = j * 2.5 + i
                ax.plot(np.full(len(per_seed), xpos) + np.linspace(-0.12, 0.12, len(per_seed)), per_seed, marker,
                        ms=3, mfc="none", color=color, alpha=0.7)
                ax.errorbar([xpos + 0.3], [ci["mean"]], yerr=[[ci["mean"] - ci["low"]], [ci["high"] - ci["mean"]]],
                            fmt=marker, color=color, capsize=4)
    axes[0].set_xticks(range(len(runs)), runs)
    axes[0].set_xlim(-0.7, len(runs) - 0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title(f"mean, 95 % t-interval ({out[runs[0]]['num_seeds']} seeds)", fontsize=9)
    for ax, ylabel in ((axes[1], "λ_max of the Hessian"), (axes[2], "Tr H (Hutchinson)")):
        ax.set_xticks([0, 1, 2.5, 3.5], ["dropout\nR_S", "plain\nR_S", "dropout\nL_S", "plain\nL_S"], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title("seeds (open), mean ± 95 % CI", fontsize=9)
    out["figure"] = _save(plt, fig, out_dir, "e4_flatness.png")
    plt, fig, axes = _figure(1, 1, (5.2, 3.6))
    for run, color in (("dropout", "C0"), ("plain", "C1")):
        prof = _last(out_dir, f"e4/{run}", "profile")
        if prof:
            mean, lo, hi = (f(prof["train_losses"], 0) for f in (np.mean, np.min, np.max))
            axes[0].plot(prof["alphas"], mean, color=color, label=f"{run}: mean over directions")
            axes[0].fill_between(prof["alphas"], lo, hi, color=color, alpha=0.2, label=f"{run}: min-max")
    axes[0].set_xlabel("filter-normalised step α")
    axes[0].set_ylabel("training R_S (seed 0)")
    axes[0].set_yscale("log")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 8)  # room for the legend above the curves
    axes[0].legend(fontsize=7, loc="upper center", ncol=2)
    out["profile_figure"] = _save(plt, fig, out_dir, "e4_profiles.png")
    return out


def report_e5(out_dir) -> dict:
    out = {"paper": PAPER["e5"]}
    plt, fig, axes = _figure(1, 2, (4.6, 3.5))
    styles = {"dropout": ("C0", "-", "o"), "r1": ("C2", "--", "s"), "rs": ("C3", ":", "^")}
    curves = {}
    for run, label in (("dropout", "dropout"), ("r1", "R_S + R_1"), ("rs", "R_S")):
        records = io.read_jsonl(os.path.join(_run(out_dir, f"e5/{run}"), "metrics.jsonl"))
        if records:
            out[run] = {"test_acc": records[-1].get("test/acc"), "train_acc": records[-1].get("train/acc")}
            steps = np.array([r["step"] for r in records], np.float64)
            acc = np.array([r.get("test/acc") for r in records], np.float64)
            curves[run] = (steps, acc)
            color, ls, marker = styles[run]
            axes[0].plot(steps, 100 * acc, ls=ls, color=color, marker=marker, ms=3.5, markevery=max(1, len(steps) // 10),
                         lw=1.6, label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("test accuracy (%)")
    if curves:  # the first tenth of training (a rapid rise) is off scale: the endgame is what differs
        axes[0].set_ylim(max(0.0, min(100 * c[1][len(c[1]) // 10:].min() for c in curves.values()) - 2), 100.0)
    axes[0].legend(fontsize=8, loc="lower right")
    if "dropout" in curves:
        base_steps, base = curves["dropout"]
        for run in ("r1", "rs"):
            if run in curves and np.array_equal(curves[run][0], base_steps):
                color, ls, marker = styles[run]
                axes[1].plot(base_steps, 100 * (curves[run][1] - base), ls=ls, color=color, marker=marker, ms=3.5,
                             markevery=max(1, len(base_steps) // 10), label=f"{'R_S + R_1' if run == 'r1' else 'R_S'}"
                                                                          " − dropout")
        axes[1].axhline(0.0, color="C0", lw=0.8)
        late = [100 * (c[1] - base)[len(base) // 10:] for r, c in curves.items() if r != "dropout"
                and np.array_equal(c[0], base_steps)]
        if late:
            span = max(1.0, max(np.abs(d).max() for d in late))
            axes[1].set_ylim(-1.3 * span, 1.3 * span)  # the first tenth of training is off scale
            axes[1].set_title("scaled to steps >= %d (earlier ones off scale)" % base_steps[len(base_steps) // 10], fontsize=9)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("test accuracy − dropout's (points)")
        axes[1].legend(fontsize=8)
    out["figure"] = _save(plt, fig, out_dir, "e5_accuracy.png")
    return out


def report_e6(out_dir) -> dict:
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "runs", "e6", "p*"))):
        arrays = _last(out_dir, os.path.join("e6", os.path.basename(path)), "fisher")
        if arrays:
            rows.append({k: _num(arrays, k) for k in ("keep_prob", "r1", "r1_quadratic", "risk",
                                                      "empirical_fisher_trace", "true_fisher_trace", "ggn_trace")}
                        | {"empirical_fisher_top": _num(arrays, "empirical_fisher_eigenvalues", 0),
                           "true_fisher_top": _num(arrays, "true_fisher_eigenvalues", 0)})
    if not rows:
        return {}
    rows.sort(key=lambda r: r["keep_prob"])
    p = [r["keep_prob"] for r in rows]
    plt, fig, axes = _figure(1, 2, (4.6, 3.5))
    axes[0].plot(p, [r["empirical_fisher_trace"] for r in rows], "o-", label="empirical Fisher")
    axes[0].plot(p, [r["true_fisher_trace"] for r in rows], "s-", ms=9, mfc="none", lw=2.5, alpha=0.6,
                 label="true Fisher")
    axes[0].plot(p, [r["ggn_trace"] for r in rows], "x--", ms=6, color="k", label="Gauss-Newton (= true Fisher, MSE)")
    axes[0].set_xlabel("keep_prob p")
    axes[0].set_ylabel("trace")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, loc="upper left")
    axes[1].plot(p, [r["r1"] for r in rows], "o-", ms=9, mfc="none", lw=2.5, alpha=0.6, label="R_1 (closed form)")
    axes[1].plot(p, [r["r1_quadratic"] for r in rows], "x--", ms=6, color="k",
                 label="((1 − p)/(2p)) Σ θ_j² F_jj (coincides)")
    axes[1].set_xlabel("keep_prob p")
    axes[1].set_ylabel("penalty value")
    axes[1].legend(fontsize=7, loc="upper right")
    return {"rows": rows, "figure": _save(plt, fig, out_dir, "e6_fisher.png"), "paper": PAPER["e6"]}


def write_report(out_dir: str) -> dict:
    report = {}
    for name, fn in (("e2", report_e2), ("e3", report_e3), ("e4", report_e4), ("e5", report_e5), ("e6", report_e6)):
        try:
            report[name] = fn(out_dir)
        except Exception as err:  # one broken section must not lose the others
            logging.exception("report section %s failed", name)
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    io.write_json(os.path.join(out_dir, "report.json"), report)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


def _fmt(value, digits: int = 3) -> str:
    """Readable precision: 3 significant digits, integers as they are, NaN/None as a dash."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _ci(d: dict, scale: float = 1.0) -> str:
    if not d:
        return "–"
    return f"{_fmt(scale * d['mean'])} [{_fmt(scale * d['low'])}, {_fmt(scale * d['high'])}]"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]


def _md_e2(s: dict) -> list[str]:
    lines = [f"H = Hessian of {s['hessian_of']}, K = {s['num_samples']['dropout']} masks and "
             f"{s['num_samples']['sgd']} examples; α with the unbiased ‖Σ‖_F (plug-in in brackets).", ""]
    rows = [[step, f"{_fmt(a)} ({_fmt(ap)})", f"{_fmt(g)} ({_fmt(gp)})", f"{_fmt(m)} ± {_fmt(sd)}"]
            for step, a, ap, g, gp, m, sd in zip(s["steps"], s["dropout_alpha"], s["dropout_alpha_plug_in"],
                                                 s["sgd_noise_alpha"], s["sgd_noise_alpha_plug_in"],
                                                 s["null_haar_mean"], s["null_haar_std"])]
    lines += _table(["step", "α dropout noise", "α SGD noise (same θ, H)", "Haar null (dropout Σ)"], rows)
    r = s.get("sgd_run", {})
    lines += ["", f"SGD run, final: α = {_fmt(r.get('alpha'))} (plug-in {_fmt(r.get('alpha_plug_in'))}), "
                  f"Haar null {_fmt(r.get('null_haar_mean'))} ± {_fmt(r.get('null_haar_std'))}"]
    return lines


def _psi_cell(d: dict) -> str:
    return f"{_fmt(d['psi'])} [{_fmt(d['psi_low'])}, {_fmt(d['psi_high'])}], ρ = {_fmt(d['spearman'])}"


def _md_e3(s: dict) -> list[str]:
    lines = []
    for key, value in s.items():
        if key.endswith("_projected_variance_slope"):
            lines.append(f"- {key}: {_fmt(value['slope'])} [{_fmt(value['low'])}, {_fmt(value['high'])}]")
    for key, value in s.items():
        if not key.endswith("flatness"):
            continue
        lines += ["", f"### {key}", "", f"settings {value['settings']}; excluded PCs {value['excluded_pcs']}"
                  + (f"; trend fraction of PCs 1-6 {value['trend_fraction_pc1_6']}" if "trend_fraction_pc1_6" in value
                     else ""), "",
                  f"headline: c = 2: {_psi_cell(value['c2'])}; c = e: {_psi_cell(value['ce'])}", ""]
        if value["sensitivity"]:
            lines += _table(["PCs", "max_trend", "ψ (c = 2)", "ψ (c = e)"],
                            [[r["components"], r["max_trend"], _psi_cell(r["c2"]), _psi_cell(r["ce"])]
                             for r in value["sensitivity"]])
    return lines


def _md_e4(s: dict) -> list[str]:
    rows = []
    for run in ("dropout", "plain"):
        if run not in s:
            continue
        r = s[run]
        for loss in ("r_s", "l_s"):
            if loss in r:
                rows.append([run, r[loss]["loss"], r["num_seeds"], _ci(r["test_acc"], 100), _ci(r[loss]["lambda_max"]),
                             _ci(r[loss]["trace"])])
    return ["Mean [95 % t-interval over seeds]." , ""] + _table(
        ["run", "Hessian of", "seeds", "test accuracy (%)", "λ_max", "Tr H"], rows)


def _md_e6(s: dict) -> list[str]:
    keys = ("keep_prob", "r1", "r1_quadratic", "risk", "empirical_fisher_trace", "true_fisher_trace", "ggn_trace",
            "empirical_fisher_top", "true_fisher_top")
    return _table(list(keys), [[r[k] for k in keys] for r in s.get("rows", [])])


def _md_e5(s: dict) -> list[str]:
    return _table(["run", "test accuracy (%)", "train accuracy (%)"],
                  [[run, _fmt(100 * s[run]["test_acc"]), _fmt(100 * s[run]["train_acc"])]
                   for run in ("dropout", "r1", "rs") if run in s])


def markdown(report: dict) -> str:
    lines = ["# Reproduction report", ""]
    writers = {"e2": _md_e2, "e3": _md_e3, "e4": _md_e4, "e5": _md_e5, "e6": _md_e6}
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        lines += [f"## {name.upper()}", "", f"Paper: {section.get('paper', '')}", ""]
        if "error" in section:
            lines.append(f"error: {section['error']}")
        elif name in writers and section:
            try:
                lines += writers[name](section)
            except (KeyError, TypeError) as err:  # a partial section still gets its figure
                lines.append(f"(table unavailable: {type(err).__name__}: {err})")
        for key in ("figure", "profile_figure"):
            if key in section:
                lines += ["", f"![{name}]({section[key]})"]
        lines.append("")
    return "\n".join(lines)

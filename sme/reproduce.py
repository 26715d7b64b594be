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
import os
import time

import numpy as np
from absl import logging

from sme import io
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
        groups: dict[str, list[str]] = {}  # steps -> analyses ("steps" may be one spec or one per analysis)
        for name in entry["analyses"]:
            steps = entry["steps"].get(name, "all") if isinstance(entry["steps"], dict) else entry["steps"]
            groups.setdefault(steps, []).append(name)
        for steps, names in groups.items():
            logging.info("reproduce: analysing %s (%s; steps %s)", entry["name"], ", ".join(names), steps)
            summary = analyse_run(workdir, Request(tuple(names), steps, 0, entry["settings"]))
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


def _final_metrics(out_dir, name) -> dict:
    records = io.read_jsonl(os.path.join(_run(out_dir, name), "metrics.jsonl"))
    return records[-1] if records else {}


def _num(arrays: dict, key: str, index=None) -> float:
    if key not in arrays:
        return float("nan")
    value = np.asarray(arrays[key], np.float64)
    return float(value if index is None else value.reshape(-1)[index])


def _figure(rows=1, cols=2, size=(4.2, 3.2)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return plt, fig, axes.reshape(-1)


def _save(plt, fig, out_dir, name) -> str:
    os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
    path = os.path.join(out_dir, "figures", name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.relpath(path, out_dir)


def report_e2(out_dir) -> dict:
    series = _artifacts(out_dir, "e2/dropout", "alignment")
    if not series:
        return {}
    steps = [s for s, _ in series]
    alpha = [_num(a, "dropout_alpha") for _, a in series]
    haar = [_num(a, "dropout_null_haar_mean") for _, a in series]
    haar_sd = [_num(a, "dropout_null_haar_std") for _, a in series]
    sgd = _last(out_dir, "e2/sgd", "alignment")
    plt, fig, axes = _figure(1, 1, (5.5, 3.6))
    ax = axes[0]
    ax.plot(steps, alpha, "o-", label="dropout alpha(H, Sigma)")
    lo, hi = np.subtract(haar, np.multiply(2, haar_sd)), np.add(haar, np.multiply(2, haar_sd))
    ax.fill_between(steps, lo, hi, alpha=0.3, color="gray", label="Haar null, mean ± 2 sd")
    if sgd:
        ax.axhline(_num(sgd, "sgd_alpha"), ls="--", color="C1", label="SGD noise alpha (final, SGD run)")
    step_axis(ax, steps)
    ax.set_ylabel("alignment")
    ax.legend(fontsize=7)
    return {"figure": _save(plt, fig, out_dir, "e2_alignment.png"), "steps": steps, "dropout_alpha": alpha,
            "null_haar_mean": haar, "null_haar_std": haar_sd, "sgd_alpha_final": _num(sgd, "sgd_alpha"),
            "paper": PAPER["e2"]}


def _psi(arrays, suffix) -> dict:
    return {k: _num(arrays, f"{k}_{suffix}") for k in ("psi", "psi_low", "psi_high", "spearman")}


def report_e3(out_dir) -> dict:
    out, panels = {"paper": PAPER["e3"]}, []
    for run in ("dropout", "sgd"):
        name = f"e2/{run}"
        for analysis in ("flatness", "trajectory_flatness"):
            arrays = _last(out_dir, name, analysis)
            if arrays and "variances" in arrays:
                out[f"{run}_{analysis}"] = {"c2": _psi(arrays, "c2"), "ce": _psi(arrays, "ce")}
                panels.append((f"{run}: {analysis.replace('_', ' ')}", arrays))
        align = _last(out_dir, name, "alignment")
        noise = "dropout" if run == "dropout" else "sgd"
        if align:
            out[f"{run}_projected_variance_slope"] = {k: _num(align, f"{noise}_slope{s}") for k, s in
                                                      (("slope", ""), ("low", "_low"), ("high", "_high"))}
    if panels:
        plt, fig, axes = _figure(1, len(panels), (3.6, 3.2))
        for ax, (title, arrays) in zip(axes, panels):
            k = arrays["width"].shape[1]
            var, width = arrays["variances"][:k], arrays["width"][0]
            excluded = arrays["excluded"].astype(bool) if "excluded" in arrays else np.arange(k) < 1
            used = ~arrays["capped"][0].astype(bool) & ~excluded
            ax.loglog(width[used], var[used], "o", ms=3)
            ax.loglog(width[excluded], var[excluded], "x", color="red", label="drift PCs (excluded)")
            ax.set_title(f"{title}\npsi(c=2) = {_num(arrays, 'psi_c2'):.2f}", fontsize=8)
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on short decades
            ax.set_xlabel("interval flatness F_i (c = 2)")
            ax.set_ylabel("variance sigma_i^2")
            ax.legend(fontsize=6)
        out["figure"] = _save(plt, fig, out_dir, "e3_variance_flatness.png")
    return out


def report_e4(out_dir) -> dict:
    out = {"paper": PAPER["e4"]}
    plt, fig, axes = _figure(1, 1, (5, 3.4))
    for run in ("dropout", "plain"):
        name = f"e4/{run}"
        hess, prof = _last(out_dir, name, "hessian"), _last(out_dir, name, "profile")
        metrics = _final_metrics(out_dir, name)
        out[run] = {"test_acc": metrics.get("test/acc"), "train_risk": metrics.get("train/risk"),
                    "lambda_max": _num(hess, "top_values", 0), "trace_hutchinson": _num(hess, "trace_hutchinson"),
                    "trace_se": _num(hess, "trace_hutchinson_se")}
        if prof:
            axes[0].plot(prof["alphas"], prof["train_losses"].mean(0), label=f"{run} (train)")
    axes[0].set_xlabel("filter-normalised step alpha")
    axes[0].set_ylabel("R_S")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    out["figure"] = _save(plt, fig, out_dir, "e4_profiles.png")
    return out


def report_e5(out_dir) -> dict:
    out = {"paper": PAPER["e5"]}
    plt, fig, axes = _figure(1, 1, (5, 3.4))
    for run, label in (("dropout", "dropout"), ("r1", "R_S + R_1"), ("rs", "R_S")):
        records = io.read_jsonl(os.path.join(_run(out_dir, f"e5/{run}"), "metrics.jsonl"))
        if records:
            out[run] = {"test_acc": records[-1].get("test/acc"), "train_acc": records[-1].get("train/acc")}
            axes[0].plot([r["step"] for r in records], [r.get("test/acc") for r in records], label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
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
    plt, fig, axes = _figure(1, 2)
    for key in ("empirical_fisher_trace", "true_fisher_trace", "ggn_trace"):
        axes[0].plot(p, [r[key] for r in rows], "o-", label=key.replace("_", " "))
    axes[0].set_xlabel("keep_prob p")
    axes[0].set_ylabel("trace")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].plot(p, [r["r1"] for r in rows], "o-", label="R_1 (closed form)")
    axes[1].plot(p, [r["r1_quadratic"] for r in rows], "x--", label="Fisher quadratic form")
    axes[1].set_xlabel("keep_prob p")
    axes[1].legend(fontsize=7)
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


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    lines = ["# Reproduction report", ""]
    for name, section in report.items():
        if not isinstance(section, dict):
            continue
        lines += [f"## {name.upper()}", "", f"Paper: {section.get('paper', '')}", ""]
        for key, value in section.items():
            if key in ("paper", "figure", "rows", "steps"):
                continue
            lines.append(f"- {key}: {_fmt(value) if not isinstance(value, (dict, list)) else value}")
        for row in section.get("rows", []):
            lines.append("- " + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
        if "figure" in section:
            lines += ["", f"![{name}]({section['figure']})"]
        lines.append("")
    return "\n".join(lines)

"""Compare analyses across runs: scalar results vs training step, one line per run.

`analyze.py --workdir=a,b,... --compare=OUT` runs each analysis on every run,
then calls `compare_runs`, which reads each run's ``analysis/summary.json``
(never recomputes) and writes to OUT:

    compare.json             {analysis: {scalar key: {run: {step: value}}}}
    compare_<analysis>.png   one panel per result key, value vs step, one line per run (bars per run
                             when every run has one step); a key's ``<key>_se`` is its error bar;
                             bookkeeping keys (sizes, orders, counts) are not drawn
    compare_profile.png      (profile) the last checkpoint's mean profile per run, band min-max
"""

from __future__ import annotations

import os

import glob

import numpy as np

from sme import io
from sme.analyses.common import step_axis

MAX_PANELS = 8
# sizes and settings echoed into the summary: not results, never a panel
BOOKKEEPING = ("num_params", "num_examples", "order", "num_masks", "batch_size", "num_snapshots", "keep_prob",
               "loss_keep_prob", "num_fit_points_c2", "num_fit_points_ce", "slope_points")


def collect(workdirs: list[str], names: list[str]) -> dict:
    """{analysis: {key: {run label: {step: value}}}} from the runs' summary.json files."""
    table: dict = {}
    labels = run_labels(workdirs)
    for workdir, label in zip(workdirs, labels):
        path = os.path.join(workdir, "analysis", "summary.json")
        summary = io.read_json(path) if os.path.exists(path) else {}
        for name in names:
            for step, scalars in summary.get(name, {}).items():
                for key, value in scalars.items():
                    if isinstance(value, (int, float)):
                        table.setdefault(name, {}).setdefault(key, {}).setdefault(label, {})[int(step)] = value
    return table


def run_labels(workdirs: list[str]) -> list[str]:
    """Shortest distinguishing labels: the last path component, or the last two if those clash."""
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(labels)) < len(labels):
        labels = [os.path.join(*os.path.normpath(w).split(os.sep)[-2:]) for w in workdirs]
    return labels


def _panel_keys(keys: dict) -> list[str]:
    """Result keys to draw: no bookkeeping, no standard errors (drawn as error bars of their key)."""
    drawn = [k for k in sorted(keys) if not k.endswith("_se") and not any(
        k == b or k.endswith("_" + b) for b in BOOKKEEPING)]
    return drawn[:MAX_PANELS]


def _plot_profiles(plt, workdirs, labels, out_dir) -> str | None:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for workdir, label in zip(workdirs, labels):
        paths = sorted(glob.glob(os.path.join(workdir, "analysis", "profile", "step_*.npz")))
        if not paths:
            continue
        a = io.load_arrays(paths[-1])
        train = np.asarray(a["train_losses"], np.float64)
        line = ax.plot(a["alphas"], train.mean(0), label=f"{label} (step {int(os.path.basename(paths[-1])[5:-4])})")[0]
        ax.fill_between(a["alphas"], train.min(0), train.max(0), color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="filter-normalised step α", ylabel="training loss (mean over directions; band min-max)",
           yscale="log", title="profiles at the last checkpoint")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "compare_profile.png")
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def compare_runs(workdirs: list[str], names: list[str], out_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = collect(workdirs, names)
    os.makedirs(out_dir, exist_ok=True)
    io.write_json(os.path.join(out_dir, "compare.json"), table)
    labels = run_labels(workdirs)
    for name, keys in table.items():
        if name == "profile" and _plot_profiles(plt, workdirs, labels, out_dir):
            continue
        shown = _panel_keys(keys)
        if not shown:
            continue
        cols = min(4, len(shown))
        rows = -(-len(shown) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.0 * rows), squeeze=False)
        single = all(len(series) == 1 for key in shown for series in keys[key].values())
        for ax, key in zip(axes.flat, shown):
            errors = keys.get(f"{key}_se", {})
            for i, (label, series) in enumerate(keys[key].items()):
                steps = sorted(series)
                values = [series[s] for s in steps]
                se = [errors.get(label, {}).get(s, np.nan) for s in steps]
                yerr = None if np.all(np.isnan(se)) else 2 * np.nan_to_num(np.asarray(se))
                if single:  # one checkpoint per run: a bar per run
                    ax.bar([i], values, yerr=yerr, capsize=4, color=f"C{i}", label=f"{label} (step {steps[0]})")
                else:
                    ax.errorbar(steps, values, yerr=yerr, marker="o", ms=3, capsize=2, label=label)
            ax.set_title(key + (" (± 2 se)" if errors else ""), fontsize=9)
            ax.set_ylabel(key, fontsize=8)
            if single:
                ax.set_xticks(range(len(keys[key])), list(keys[key]), fontsize=8)
                ax.set_xlabel("run")
            else:
                step_axis(ax, sorted({s for series in keys[key].values() for s in series}))
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.suptitle(f"{name}: runs compared")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"compare_{name}.png"), dpi=150)
        plt.close(fig)
    return table

"""Compare analyses across runs: scalar results vs training step, one line per run.

`analyze.py --workdir=a,b,... --compare=OUT` runs each analysis on every run,
then calls `compare_runs`, which reads each run's ``analysis/summary.json``
(never recomputes) and writes to OUT:

    compare.json             {analysis: {scalar key: {run: {step: value}}}}
    compare_<analysis>.png   one panel per scalar key, value vs step, one line per run
"""

from __future__ import annotations

import os

from sme import io
from sme.analyses.common import step_axis

MAX_PANELS = 8


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


def compare_runs(workdirs: list[str], names: list[str], out_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = collect(workdirs, names)
    os.makedirs(out_dir, exist_ok=True)
    io.write_json(os.path.join(out_dir, "compare.json"), table)
    for name, keys in table.items():
        shown = sorted(keys)[:MAX_PANELS]
        cols = min(4, len(shown))
        rows = -(-len(shown) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
        for ax, key in zip(axes.flat, shown):
            for label, series in keys[key].items():
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], marker="o", ms=3, label=label)
            ax.set_title(key, fontsize=9)
            step_axis(ax, sorted({s for series in keys[key].values() for s in series}))
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"{name}: runs compared")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"compare_{name}.png"), dpi=110)
        plt.close(fig)
    return table

"""The paper-scale report: report.md, report.json and figures from a `sme.paper` run's artifacts.

Reads metrics.jsonl and analysis artifacts only (never recomputes). Every experiment gets a
table with the columns claim | paper | ours [95 % CI] | verdict | reason. Intervals over seeds are
Student-t intervals of the mean (n seeds, n - 1 degrees of freedom); differences between two
settings use Welch's interval. Verdict rules, fixed before any run:

* an absolute number (accuracy in %): *reproduced* when our interval comes within 1.5 pp of the
  paper's range, *partly* within 4 pp, else *not reproduced*; for the exponent psi the same with
  0.5 and 1.5;
* a difference whose sign is the claim: *reproduced* when the interval excludes 0 on the claimed
  side (and, for a stated size, comes within half of it), *partly* when only the mean has the
  claimed sign, *not reproduced* otherwise;
* fewer than 2 seeds: no interval, verdict "not enough seeds".

Cost: reading a few hundred small files and drawing the figures (seconds).
"""

from __future__ import annotations

import glob
import importlib
import math
import os

import numpy as np
from absl import logging

from sme import io
from sme.analyses import common
from sme.paper_plan import EXPERIMENTS, TIMINGS, experiment_module

DPI = 130
TOL_REPRODUCED, TOL_PARTLY = 1.5, 4.0  # pp, for absolute accuracies


# ----------------------------------------------------------------------------- statistics


def t_interval(values, level: float = 0.95) -> dict:
    """Mean and Student-t interval of the mean of ``values`` (NaNs dropped)."""
    from scipy.stats import t as student

    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    n = len(v)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(student.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def welch_interval(a, b, level: float = 0.95) -> dict:
    """Mean of a - mean of b with Welch's t interval."""
    from scipy.stats import t as student

    a = np.asarray([x for x in a if x is not None and np.isfinite(x)], np.float64)
    b = np.asarray([x for x in b if x is not None and np.isfinite(x)], np.float64)
    if len(a) == 0 or len(b) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"mean": mean, "low": None, "high": None, "n": min(len(a), len(b))}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return {"mean": mean, "low": mean, "high": mean, "n": min(len(a), len(b))}
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(student.ppf(0.5 + level / 2, dof) * se)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": min(len(a), len(b))}


def verdict_absolute(ci: dict, paper_range, tolerances=(TOL_REPRODUCED, TOL_PARTLY), unit="pp") -> tuple[str, str]:
    """Verdict for an absolute number (default: accuracy in pp) against the paper's (low, high) range."""
    if ci["mean"] is None:
        return "not run", "no finished run"
    if ci["low"] is None:
        return "not enough seeds", "one seed: no interval"
    lo, hi = paper_range
    gap = max(lo - ci["high"], ci["low"] - hi, 0.0)  # distance between our interval and the paper's range
    unit = f" {unit}" if unit else ""
    if gap <= tolerances[0]:
        return "reproduced", f"our interval is within {tolerances[0]:g}{unit} of the paper's number"
    side = "below" if ci["high"] < lo else "above"
    if gap <= tolerances[1]:
        return "partly", f"{gap:.1f}{unit} {side} the paper's number"
    return "not reproduced", f"{gap:.1f}{unit} {side} the paper's number"


def verdict_sign(ci: dict, sign: int, size: float | None = None, *, null: str = "0") -> tuple[str, str]:
    """Verdict for a difference claimed to have ``sign`` (+1/-1), optionally of a stated ``size``.

    ``null`` names the no-effect value in the reasons: "1" for a ratio judged on its logarithm."""
    if ci["mean"] is None:
        return "not run", "no finished run"
    if ci["low"] is None:
        return "not enough seeds", "one seed: no interval"
    lo, hi = sorted((sign * ci["low"], sign * ci["high"]))
    if lo > 0 and (size is None or hi >= abs(size) / 2):
        return "reproduced", f"the interval excludes {null} on the claimed side"
    if lo > 0:
        return "partly", f"the claimed sign, but the interval stays below half the paper's {abs(size):g}"
    if sign * ci["mean"] > 0:
        return "partly", f"the mean has the claimed sign but the interval includes {null}"
    return "not reproduced", "the mean has the opposite sign" if sign * ci["mean"] < 0 else "no difference"


def verdict_equal(ci: dict, tolerance: float) -> tuple[str, str]:
    """Verdict for a claimed equality (difference about 0) within ``tolerance``."""
    if ci["mean"] is None:
        return "not run", "no finished run"
    if ci["low"] is None:
        return "not enough seeds", "one seed: no interval"
    if ci["low"] >= -tolerance and ci["high"] <= tolerance:
        return "reproduced", f"the interval lies within +-{tolerance:g}"
    if ci["low"] <= 0 <= ci["high"]:
        return "partly", f"the interval includes 0 but is wider than +-{tolerance:g}"
    return "not reproduced", "the interval excludes 0"


def fmt_ci(ci: dict, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    if ci.get("mean") is None:
        return "not run"
    text = f"{ci['mean'] * scale:.{digits}f}{unit}"
    if ci.get("low") is not None:
        text += f" [{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"
    return text + f" (n={ci['n']})"


def row(claim, paper, ours, verdict_reason) -> dict:
    verdict, reason = verdict_reason
    return {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict, "reason": reason}


# ----------------------------------------------------------------------------- artifacts


def run_dir(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "runs", name)


def metrics(out_dir: str, name: str) -> list[dict]:
    path = os.path.join(run_dir(out_dir, name), "metrics.jsonl")
    return io.read_jsonl(path) if os.path.exists(path) else []


def finished_metrics(out_dir: str, name: str, num_steps: int) -> dict | None:
    """The last metrics record of a run that reached ``num_steps``, else None."""
    records = metrics(out_dir, name)
    return records[-1] if records and records[-1].get("step") == num_steps else None


def last_artifact(out_dir: str, name: str, analysis: str) -> dict:
    paths = glob.glob(os.path.join(run_dir(out_dir, name), "analysis", analysis, "step_*.npz"))
    if not paths:
        return {}
    path = max(paths, key=lambda p: int(os.path.basename(p)[5:-4]))
    return io.load_arrays(path)


def scalar(arrays: dict, key: str, index=None):
    if key not in arrays:
        return None
    value = np.asarray(arrays[key], np.float64).reshape(-1)
    value = float(value[0 if index is None else index])
    return value if np.isfinite(value) else None


def figure(rows=1, cols=1, size=(5.0, 3.4)):
    return common.subplots(rows, cols, size)


def save(plt, fig, out_dir: str, name: str) -> str:
    return common.save_report_figure(fig, plt, out_dir, name, dpi=DPI)


# ----------------------------------------------------------------------------- the report


MERGED_NOTE = ("from an earlier run of this report ({path}); its run directories are not on this machine, "
               "so the section is carried over as it was")


def write_report(out_dir: str, *, tiny: bool = False, keep: str | None = None) -> dict:
    """Write report.json and report.md for every experiment of `sme.paper_plan.EXPERIMENTS`.

    ``keep``: an earlier report.json (e.g. docs/report_paper.json); an experiment with no finished
    run under ``out_dir`` takes its section from there (marked so in its notes), so runs made on
    another machine are not lost when new experiments are added.
    """
    timings_path = os.path.join(out_dir, TIMINGS)
    timings = io.read_json(timings_path) if os.path.exists(timings_path) else {}
    previous = io.read_json(keep)["experiments"] if keep else {}
    report = {"experiments": {}, "tiny": tiny}
    for name in EXPERIMENTS:
        module = experiment_module(name)
        section_fn = getattr(importlib.import_module("sme.paper_sections"), name.lower().replace("-", "_"), None)
        try:
            if module is None or section_fn is None:
                section = {"status": "not run in this budget", "rows": [], "notes": ["no config in this version"]}
            else:
                section = section_fn(out_dir, module, tiny)
        except Exception as err:  # one broken section must not lose the others
            logging.exception("paper report section %s failed", name)
            section = {"status": "error", "rows": [], "notes": [f"{type(err).__name__}: {err}"]}
        section["doc"] = (module.__doc__ or "").strip().splitlines()[0] if module else ""
        if name in timings:
            section["timing"] = {k: v for k, v in timings[name].items() if k != "runs"}
            section["timing"]["kernel"] = getattr(module, "KERNEL", section["timing"].get("kernel"))
        old = previous.get(name)
        if section.get("status") in (None, "not run in this budget", "error") and old and \
                old.get("status") not in (None, "not run in this budget", "error"):
            section = dict(old, notes=list(old.get("notes", [])) + [MERGED_NOTE.format(path=keep)])
        report["experiments"][name] = section
    io.write_json(os.path.join(out_dir, "report.json"), report)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return report


def machine_text(machine: dict | None) -> str:
    """' on 1 core (single-threaded XLA), 1-min load 1.2-3.4' from a timings record's ``machine`` entry."""
    if not machine:
        return ""
    cores = machine.get("cores")
    text = f" on {cores} core{'s' if cores != 1 else ''}"
    if machine.get("single_threaded"):
        text += " (single-threaded XLA)"
    loads = [machine[k] for k in ("load_start", "load_end") if machine.get(k) is not None]
    if loads:
        text += f", 1-min load {min(loads):.1f}-{max(loads):.1f}"
    return text


def markdown(report: dict) -> str:
    lines = ["# Paper-scale reproduction report", "",
             "Intervals: 95 % Student-t over seeds (differences: Welch). Verdict rules: `sme/paper_report.py`.", ""]
    for name, s in report["experiments"].items():
        lines += [f"## {name}: {s.get('doc', '')}", "", f"Status: {s.get('status', '')}", ""]
        if s.get("rows"):
            lines += ["| claim | paper | ours [95% CI] | verdict | reason |", "|---|---|---|---|---|"]
            lines += [f"| {r['claim']} | {r['paper']} | {r['ours']} | {r['verdict']} | {r['reason']} |" for r in s["rows"]]
            lines.append("")
        for table in s.get("tables", []):
            lines += [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in table["rows"]]
            lines.append("")
        for note in s.get("notes", []):
            lines.append(f"- {note}")
        if "timing" in s:
            t = s["timing"]
            lines.append(f"- wall time: {t.get('seconds', 0):.0f} s (training {t.get('train_seconds', 0):.0f} s, "
                         f"analyses {t.get('analysis_seconds', 0):.0f} s){machine_text(t.get('machine'))}; "
                         f"dominant kernel: {t.get('kernel', '')}")
        for fig in s.get("figures", []):
            lines += ["", f"![{name}]({fig})"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m sme.paper_report --report=DIR [--keep=docs/report_paper.json]``: rewrite the report of DIR."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--report", required=True, help="the --reproduce=paper report folder")
    parser.add_argument("--keep", default=None, help="an earlier report.json whose sections fill experiments not run here")
    args = parser.parse_args(argv)
    if args.keep and not os.path.exists(args.keep):
        raise SystemExit(f"--keep={args.keep}: no such file")
    write_report(args.report, keep=args.keep)


if __name__ == "__main__":
    main()

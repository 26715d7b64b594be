"""The paper-scale reproduction: ``python analyze.py --reproduce=paper --report=reports/paper``.

Each experiment (P-E5, P-E4, ..., see `EXPERIMENTS`) is one file in ``configs/paper/`` with
``get_plan(tiny)`` (the runs to train and the analyses to run on them), ``PAPER`` (the claims and
the papers' numbers), ``BUDGET`` (estimated seconds on 2 quiet CPU cores) and ``KERNEL`` (the
computation that dominates it). `run_paper` trains every run into ``out_dir/runs/<name>``
(training resumes, so a finished run is skipped), runs its analyses (results on disk are
reused), prints "experiment k of n" with an ETA, records wall times in ``out_dir/timings.json``,
and `sme.paper_report.write_report` writes report.md / report.json / figures from the
artifacts alone. An experiment that was not run says so in the report.

Cost: the sum of the experiments' training and analyses; the report itself is seconds.
"""

from __future__ import annotations

import os
import time

from sme import io
from sme.paper_report import write_report

from sme.paper_plan import EXPERIMENTS, TIMINGS, PaperError, experiment_module, select  # noqa: F401 (re-exported)


def _finished(workdir: str, num_steps: int, cfg=None) -> bool:
    if cfg is not None and "sde" in cfg and cfg.sde.enabled:  # an SME sweep: every cell on disk
        from sme import config as config_lib, sweep

        lrs, keep_probs, _ = config_lib.sde_grids(cfg)
        return all(os.path.exists(sweep.cell_path(workdir, p, lr)) for p in keep_probs for lr in lrs)
    records = io.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if os.path.isdir(workdir) else []
    return bool(records) and records[-1].get("step") == num_steps


def machine_record(previous: dict | None = None, *, end: bool = False) -> dict:
    """Where an experiment's wall times were measured: the cores this process may use, whether XLA's
    CPU matmuls are single-threaded, and the 1-minute load average at its start (the first call's
    is kept when a run resumes) and at its end."""
    record = dict(previous or {})
    record["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record["single_threaded"] = "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", "")
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if end:
        record["load_end"] = load
    else:
        record.setdefault("load_start", load)
    return record


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_paper(out_dir: str, only: str | None = None, *, tiny: bool = False, log=print) -> dict:
    """Train and analyse the selected experiments, then write the report; returns the report dict.

    Wall times go to ``out_dir/timings.json`` per run (training and analysis separately), only
    for work actually done in this call, so a resumed call keeps the first call's times.
    """
    from sme.analyses.runner import Request, analyse_run
    from sme import driver

    names = select(only)
    modules = {name: experiment_module(name) for name in names}
    plans = {name: (m.get_plan(tiny) if m else []) for name, m in modules.items()}  # builds every config first
    budget = {name: (m.BUDGET if m and not tiny else 1.0) for name, m in modules.items()}
    timings_path = os.path.join(out_dir, TIMINGS)
    os.makedirs(out_dir, exist_ok=True)
    timings = io.read_json(timings_path) if os.path.exists(timings_path) else {}
    tic, spent_budget = time.time(), 0.0
    for k, name in enumerate(names, 1):
        plan = plans[name]
        if not plan:
            log(f"experiment {k} of {len(names)}: {name}: no config in this version (not run)")
            continue
        remaining = sum(budget[n] for n in names[k - 1:])
        speed = (time.time() - tic) / spent_budget if spent_budget else 1.0
        log(f"experiment {k} of {len(names)}: {name} ({len(plan)} runs; elapsed {_hms(time.time() - tic)}, "
            f"ETA {_hms(remaining * speed)})")
        record = timings.setdefault(name, {"runs": {}})
        record["kernel"] = modules[name].KERNEL
        record["machine"] = machine_record(record.get("machine"))
        for i, entry in enumerate(plan, 1):
            workdir = os.path.join(out_dir, "runs", entry["name"])
            cfg = entry["config"]
            done = _finished(workdir, cfg.train.num_steps, cfg)
            log(f"  {name} run {i} of {len(plan)}: {entry['name']}{' (trained already)' if done else ''}")
            t0 = time.time()
            if not done:  # a finished run is not reopened (its config.json may predate new config fields)
                driver.run(cfg, workdir)  # trains, or runs the SME sweep when cfg.sde.enabled
            t_train = time.time() - t0
            groups: dict[str, list[str]] = {}
            for analysis in entry.get("analyses", ()):
                groups.setdefault(entry.get("steps", {}).get(analysis, "last"), []).append(analysis)
            t0 = time.time()
            for steps, analyses in groups.items():
                summary = analyse_run(workdir, Request(tuple(analyses), steps, 0, entry.get("settings", {})))
                for failure in summary.get("failures", []):
                    log(f"  {entry['name']}: analysis failed: {failure}")
            if entry.get("post"):  # an experiment's own analysis (results cached in the run directory)
                groups["post"] = ["post"]
                entry["post"](workdir)
            t_analysis = time.time() - t0
            run_times = record["runs"].setdefault(entry["name"], {})
            if not done:
                run_times["train_seconds"] = round(t_train, 1)
            if groups and (not done or "analysis_seconds" not in run_times or t_analysis > 5.0):
                run_times["analysis_seconds"] = round(t_analysis, 1)
            record["train_seconds"] = round(sum(r.get("train_seconds", 0.0) for r in record["runs"].values()), 1)
            record["analysis_seconds"] = round(sum(r.get("analysis_seconds", 0.0) for r in record["runs"].values()), 1)
            record["seconds"] = round(record["train_seconds"] + record["analysis_seconds"], 1)
            # merge: another --only process may be writing other experiments to the same report
            on_disk = io.read_json(timings_path) if os.path.exists(timings_path) else {}
            io.write_json(timings_path, {**on_disk, name: record})
        record["machine"] = machine_record(record["machine"], end=True)
        on_disk = io.read_json(timings_path) if os.path.exists(timings_path) else {}
        io.write_json(timings_path, {**on_disk, name: record})
        spent_budget += budget[name]
        log(f"experiment {k} of {len(names)}: {name} done: train {record['train_seconds']:.0f} s, "
            f"analysis {record['analysis_seconds']:.0f} s (kernel: {record['kernel']})")
    report = write_report(out_dir, tiny=tiny)
    report["seconds_this_call"] = round(time.time() - tic, 1)
    io.write_json(os.path.join(out_dir, "report.json"), report)
    return report

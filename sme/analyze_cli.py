"""`analyze.py` and the ``sme-analyze`` command: run analyses over the checkpoints of one or several training runs.

    python analyze.py --workdir=runs/default --analyses=hessian,covariance
    python analyze.py --workdir=runs/a,runs/b --analyses=hessian --steps=last --set=hessian.top_k=20 \
        --compare=runs/compare
    python analyze.py --workdir=runs/default --analyses=hessian,fisher --replica=all --batch_size=16
    python analyze.py --list
    python analyze.py --reproduce=cpu --report=reports/cpu     # E2-E6 end to end
    sme-analyze --workdir=runs/default --analyses=hessian      # the same, from any directory

Each run's own config.json fixes the model and data; only analysis settings come
from here (--set NAME.FIELD=VALUE, over the run's config.analysis block).
Artifacts: <workdir>/analysis/<name>/step_<N>.npz, PNG figures beside them, and
<workdir>/analysis/summary.json. With --replica=all every replica of every selected
checkpoint is analysed, into <workdir>/analysis/<name>/replica_<r>/step_<N>.npz (figures
per replica directory; summary entries under "<name>/replica_<r>").

Analyses that support it (hessian, hessian_density, fisher, covariance, alignment) run up to --batch_size
checkpoints/replicas per call, vmapped and, with several devices, sharded over them
(batch padded to a multiple of the device count); the keys are those of the
one-at-a-time path (--batch_size=1), so the results agree up to float rounding. The default
(0) batches one item per device when there are several devices and none on a single one, where
batching compiles longer than it saves.
Multi-process runs (``--coordinator_address``, ``--num_processes``, ``--process_id`` or
``--distributed``, see `sme.distributed`) split the batched items over every process's devices;
process 0 writes the artifacts and prints.
"""

import ast
import sys
import time

from absl import app, flags

from sme import cli, distributed

_WORKDIR = flags.DEFINE_list("workdir", None, "Run directories (comma-separated).")
_ANALYSES = flags.DEFINE_list("analyses", ["hessian"], "Analyses to run (comma-separated).")
_STEPS = flags.DEFINE_string("steps", "all", "Checkpoint steps: all | last | comma-separated steps.")
_REPLICA = flags.DEFINE_string("replica", "0", "Which replica of a multi-replica run to analyse, or 'all'.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Checkpoints/replicas per vmapped call of analyses that batch "
                                   "(sharded over devices when there are several); 1 = one at a time; "
                                   "0 = the device count when there are several, else 1.")
_SET = flags.DEFINE_multi_string("set", [], "Analysis setting NAME.FIELD=VALUE (Python literal).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Recompute results already on disk; needed to change the "
                               "settings of an analysis that has results (its old ones are then deleted).")
_LIST = flags.DEFINE_bool("list", False, "List the analyses, their settings and defaults, and exit.")
_REPRODUCE = flags.DEFINE_enum("reproduce", None, ["cpu", "tiny", "paper", "paper_tiny"],
                               "Train and analyse the papers' experiments (paper: at the papers' scale).")
_ONLY = flags.DEFINE_string("only", None, "--reproduce=paper: comma-separated experiments, e.g. P-E5,P-E4.")
_REPORT = flags.DEFINE_string("report", None, "Report folder for --reproduce (default: reports/<scale>).")
_COMPARE = flags.DEFINE_string("compare", None, "Directory for figures comparing the runs (several --workdir).")


def parse_settings(items):
    settings = {}
    for item in items:
        name_field, sep, value = item.partition("=")
        name, dot, field = name_field.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected NAME.FIELD=VALUE")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare word is a string
        settings.setdefault(name, {})[field] = value
    return settings


HEADLINE_KEYS = 8  # scalars per analysis in the printed table (the largest eigenvalue and its residual first)


def format_headlines(summary: dict, names) -> str:
    """A short table of each analysis's scalars at its last step (4 significant digits): analysis,
    step, then ``key=value`` pairs, ``lambda_max`` and its residual first. Settings and strings are left
    out (they are in ``settings.json``); ``summary.json`` holds every scalar of every step."""
    lines = []
    for label in sorted(summary):
        if label == "failures" or not isinstance(summary[label], dict) or \
                not any(label == n or label.startswith(n + "/") or label.startswith(n + "_") for n in names):
            continue
        steps = [k for k in summary[label] if str(k).lstrip("-").isdigit()]
        if not steps:
            continue
        last = max(steps, key=int)
        values = {k: v for k, v in summary[label][last].items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        order = sorted(values, key=lambda k: (not k.endswith(("_max", "_max_residual")), k))
        cells = [f"{k}={values[k]:.4g}" for k in order[:HEADLINE_KEYS]]
        more = f" (+{len(order) - HEADLINE_KEYS} in summary.json)" if len(order) > HEADLINE_KEYS else ""
        lines.append(f"  {label:<16} step {last:>7}  " + "  ".join(cells) + more)
    return "\n".join(lines) if lines else "  (no scalars)"


def main(argv):
    del argv
    from sme.probe import quiet_tpu_probe

    quiet_tpu_probe()  # no libtpu.so probe line on machines without a TPU
    cli.initialize_distributed()  # before any JAX computation
    from sme import io, runs
    from sme.analyses import load_all
    from sme.analyses.runner import (AnalysisError, Progress, Request, analyse_run, check_request, read_config,
                                     run_settings)
    from sme.config import ConfigError

    if _LIST.value:
        from sme.listing import describe

        print(describe(load_all()))
        return
    if _REPRODUCE.value and distributed.multi_process():
        cli.fail(ValueError("--reproduce runs in one process; drop the multi-process flags"), 2)
    if _REPRODUCE.value in ("paper", "paper_tiny"):
        from sme.paper import PaperError, run_paper

        out_dir = _REPORT.value or f"reports/{_REPRODUCE.value}"
        try:
            run_paper(out_dir, _ONLY.value, tiny=_REPRODUCE.value == "paper_tiny")
        except PaperError as err:
            sys.exit(f"error: {err}")
        print(f"report in {out_dir}/report.md")
        return
    if _REPRODUCE.value:
        from configs import reproduce as plans
        from sme.reproduce import run_plan

        out_dir = _REPORT.value or f"reports/{_REPRODUCE.value}"
        report = run_plan(plans.get_plan(_REPRODUCE.value), out_dir)
        print(f"report in {out_dir}/report.md ({report['seconds']:.0f} s)")
        return
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    try:
        overrides = parse_settings(_SET.value)
        requests = {}
        for workdir in _WORKDIR.value:  # every request checked before any data or checkpoint is loaded
            cfg = read_config(workdir)
            requests[workdir] = (cfg, Request(tuple(_ANALYSES.value), _STEPS.value, _REPLICA.value,
                                              run_settings(cfg, _ANALYSES.value, overrides), _OVERWRITE.value,
                                              _BATCH_SIZE.value))
            check_request(requests[workdir][1])
        failed = False
        progress = Progress("run", len(requests), first="first run with compilation")
        for workdir, (cfg, request) in requests.items():
            if cfg.train.dtype == "float64":
                import jax

                jax.config.update("jax_enable_x64", True)
            tic = time.time()
            summary = analyse_run(workdir, request)
            progress.update(1, time.time() - tic, f" ({workdir})")
            if not distributed.is_writer():  # process 0 writes and reports
                continue
            if "log" in cfg and cfg.log.tensorboard:  # the run logs to TensorBoard: add the analysis scalars
                from sme.tensorboard import write_summary

                write_summary(workdir, summary)
            print(f"{workdir}: wrote {workdir}/analysis ({', '.join(_ANALYSES.value)})")
            print(format_headlines(summary, _ANALYSES.value))
            for failure in summary.get("failures", []):
                print(f"  failed: {failure}", file=sys.stderr)
            failed = failed or bool(summary.get("failures"))
        if _COMPARE.value and distributed.is_writer():
            from sme.analyses.compare import compare_runs

            compare_runs(_WORKDIR.value, _ANALYSES.value, _COMPARE.value)
            print(f"comparison of {len(_WORKDIR.value)} runs in {_COMPARE.value}")
        if failed:
            sys.exit(1)
    except (AnalysisError, ValueError, ConfigError, runs.RunError, io.CorruptArtifact,
            distributed.DistributedError) as err:
        cli.fail(err, 1)
    except OSError as err:  # a full disk, a permission: results written before stay intact
        cli.fail(err, 1)


def run():
    """The ``sme-analyze`` console command (and ``python analyze.py``)."""
    cli.show_in_help(sys.modules[__name__])
    app.run(main, flags_parser=cli.flags_parser)

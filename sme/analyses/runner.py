"""Run registered analyses over one or several training runs' checkpoints.

For each run directory: rebuild the run's model and data from its own
config.json (so an analysis can never use a different model or data by
accident), load each selected checkpoint (verified), slice one replica (or
each, ``replica="all"``), call each analysis with ``key = analysis_key(seed,
name, step, replica)``, and write ``analysis/<name>/step_<N>.npz`` (or
``analysis/<name>/replica_<r>/step_<N>.npz``); then call the analysis' plot
function on the written files (one directory each). Analyses with a
``batch_fn`` take up to ``batch_size`` checkpoints (and replicas) per call,
vmapped and sharded over devices, with the same keys and results as one at a
time. Results already on disk are reused unless ``overwrite``; a
failing analysis is reported and the others go on, so finished work is never lost.

A summary JSON (``analysis/summary.json``) collects every scalar result per
analysis (or ``<name>/replica_<r>``) and step.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from sme import config as config_lib
from sme import io, rng
from sme.analyses import Context, as_numpy, load_all
from sme.train.loop import init_state
from sme.train.state import replica as take_replica


@dataclasses.dataclass(frozen=True)
class Request:
    """What to analyse in a run.

    Attributes:
      names: analyses to run (registry names).
      steps: checkpoints: "all" | "last" | "0,100,1000".
      replica: which replica (an int, or its text), or "all": every replica of every selected checkpoint, each
        written to ``analysis/<name>/replica_<r>/`` and summarised under ``<name>/replica_<r>``.
      settings: name -> {setting: value}.
      overwrite: recompute results already on disk.
      batch_size: analyses with a ``batch_fn`` get up to this many (checkpoint, replica) items per
        vmapped call (split over devices when there are several); 1 = one item at a time; 0 = auto:
        the device count when there are several devices, else 1 (on one CPU device the vmapped
        program compiles ~2 s longer and gains only 20-30 % per item, so one at a time is faster).
    """

    names: tuple[str, ...]
    steps: str = "all"
    replica: int | str = 0
    settings: dict = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    batch_size: int = 0


class AnalysisError(ValueError):
    """Bad analysis request (unknown name, missing run, missing checkpoint)."""


def load_run(workdir: str):
    """The run's config (ConfigDict), setup (data, model, ...) and the state layout."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise AnalysisError(f"{workdir}: no config.json (not a training run directory)")
    cfg = ConfigDict(io.read_json(path)["config"])
    for block in ("model",):  # JSON turns tuples into lists; the config edge wants tuples
        for k, v in cfg[block].items():
            if isinstance(v, list):
                cfg[block][k] = tuple(v)
    setup = config_lib.build(cfg)
    like = jax.eval_shape(lambda: init_state(
        setup.model, setup.optimizer, seed=cfg.seed, num_replicas=cfg.train.num_replicas,
        share_init=cfg.train.share_init, dtype=np.dtype(cfg.train.dtype)))
    return cfg, setup, like


def select_steps(available: list[int], spec: str, workdir: str) -> list[int]:
    if not available:
        raise AnalysisError(f"{workdir}: no checkpoints to analyse")
    spec = str(spec).strip()
    if spec == "all":
        return available
    if spec == "last":
        return available[-1:]
    wanted = [int(s) for s in spec.split(",")]
    missing = [s for s in wanted if s not in available]
    if missing:
        raise AnalysisError(f"{workdir}: no checkpoint for steps {missing}; available: {available}")
    return wanted


def _scalars(result: dict) -> dict:
    out = {}
    for k, v in result.items():
        a = np.asarray(v)
        if a.ndim == 0 and a.dtype.kind in "fiub":
            out[k] = float(a)
        elif a.ndim == 0 and a.dtype.kind == "U":
            out[k] = str(a)
    return out


def _replicas(request: Request, num_replicas: int) -> list[int]:
    if str(request.replica) == "all":
        return list(range(num_replicas))
    try:
        replica = int(request.replica)
    except ValueError:
        raise AnalysisError(f"--replica={request.replica!r}: expected an integer or 'all'") from None
    if not 0 <= replica < num_replicas:
        raise AnalysisError(f"--replica={replica} but the run has {num_replicas} replicas")
    return [replica]


def auto_batch_size() -> int:
    """Items per batched call when not given: one per device when there are several, else 1."""
    count = jax.device_count()
    return count if count > 1 else 1


def analyse_run(workdir: str, request: Request) -> dict:
    """Run the requested analyses on one run; returns the summary written to disk.

    Checkpoints are taken in near-equal chunks of at most ``batch_size`` (checkpoint, replica)
    items, so only a chunk's parameters are in memory; within a chunk each analysis with a
    ``batch_fn`` runs in near-equal groups of at most ``batch_size`` items, every group padded to
    the same size by repeating its last item (so one compilation serves the whole run), the others
    one item at a time. A failing group is retried one item at a time, so only the failing items
    are lost.
    """
    registry = load_all()
    unknown = [n for n in request.names if n not in registry]
    if unknown:
        raise AnalysisError(f"unknown analyses {unknown}; available: {sorted(registry)}")
    if request.batch_size < 0:
        raise AnalysisError(f"--batch_size={request.batch_size} must be >= 0 (0 = auto)")
    batch_size = request.batch_size or auto_batch_size()
    cfg, setup, like = load_run(workdir)
    replicas = _replicas(request, cfg.train.num_replicas)
    per_replica = str(request.replica) == "all"
    checkpoints = dict(io.list_checkpoints(workdir))
    steps = select_steps(sorted(checkpoints), request.steps, workdir)
    summary_path = os.path.join(workdir, "analysis", "summary.json")
    summary = io.read_json(summary_path) if os.path.exists(summary_path) else {}
    summary.pop("failures", None)  # failures are reported per invocation
    failures = []
    # an analysis' directory under analysis/ and its summary key
    where = lambda name, replica: f"{name}/replica_{replica}" if per_replica else name
    chunk = _balanced(len(steps), max(1, batch_size // len(replicas)))  # steps per chunk
    group = _balanced(chunk * len(replicas), batch_size)  # items per batched call
    for start in range(0, len(steps), chunk):
        todo = {name: [(step, r) for step in steps[start:start + chunk] for r in replicas
                       if request.overwrite or not os.path.exists(_artifact(workdir, where(name, r), step))]
                for name in request.names}
        params = {}
        for step in sorted({step for items in todo.values() for step, _ in items}):
            try:
                state = io.load_checkpoint(checkpoints[step], like)
            except io.CorruptCheckpoint as err:
                logging.warning("skipping step %d: %s", step, err)
                failures.append(f"step {step}: {err}")
                continue
            for r in replicas:
                params[step, r] = jax.tree_util.tree_map(jax.numpy.asarray, take_replica(state.params, r))
        for name, items in todo.items():
            ctxs = [Context(model=setup.model, dataset=setup.dataset, loss=cfg.loss, mask_mode=cfg.mask_mode,
                            lr=float(cfg.optim.lr), params=params[step, r], step=step, seed=cfg.seed, replica=r,
                            settings=dict(request.settings.get(name, {})), run_config=cfg.to_dict(),
                            workdir=workdir)
                    for step, r in items if (step, r) in params]
            size = group if registry[name].batch_fn is not None else 1
            for i in range(0, len(ctxs), size):
                for ctx, result in _analyse(registry[name], ctxs[i:i + size], cfg.seed, size):
                    label = where(name, ctx.replica)
                    if isinstance(result, str):
                        failures.append(f"{label} at step {ctx.step}: {result}")
                        continue
                    io.save_arrays(_artifact(workdir, label, ctx.step), result)
                    summary.setdefault(label, {})[str(ctx.step)] = _scalars(result)
        io.write_json(summary_path, summary)
    for name in request.names:
        for r in replicas:
            label = where(name, r)
            plot_fn = registry[name].plot_fn
            done = sorted(s for s in checkpoints if os.path.exists(_artifact(workdir, label, s)))
            if plot_fn is not None and done:
                try:
                    plot_fn(os.path.join(workdir, "analysis", label), done)
                except Exception as err:
                    failures.append(f"plot of {label}: {type(err).__name__}: {err}")
                    logging.error("plot of %s failed:\n%s", label, traceback.format_exc())
    if failures:
        summary["failures"] = failures
    io.write_json(summary_path, summary)
    return summary


def _balanced(n: int, most: int) -> int:
    """The size of the near-equal parts of ``n`` items in as few parts of at most ``most`` as possible."""
    return -(-n // -(-n // most)) if n else 1


def _analyse(analysis, ctxs: list[Context], seed: int, size: int) -> list[tuple[Context, dict | str]]:
    """(ctx, result, or the error as text) for every context: one batched call padded to ``size``
    items when ``size`` > 1, one at a time otherwise or when the batched call fails (so only the
    failing items are lost)."""
    keys = [rng.analysis_key(seed, analysis.name, ctx.step, replica=ctx.replica) for ctx in ctxs]
    if size > 1:
        tic = time.time()
        pad = size - len(ctxs)
        try:
            results = analysis.batch_fn(ctxs + ctxs[-1:] * pad, keys=keys + keys[-1:] * pad)[:len(ctxs)]
            results = [as_numpy(r) for r in results]
            logging.info("%s steps %s (%d items, %d devices): %.1fs", analysis.name, [c.step for c in ctxs],
                         len(ctxs), jax.device_count(), time.time() - tic)
            return list(zip(ctxs, results))
        except Exception:
            logging.warning("batched %s failed at steps %s; one at a time:\n%s", analysis.name,
                            [c.step for c in ctxs], traceback.format_exc())
    done = []
    for ctx, key in zip(ctxs, keys):
        tic = time.time()
        try:
            done.append((ctx, as_numpy(analysis.fn(ctx, key=key))))
            logging.info("%s step %d: %.1fs", analysis.name, ctx.step, time.time() - tic)
        except Exception as err:  # one failing analysis must not lose the others' results
            logging.error("analysis %s failed at step %d:\n%s", analysis.name, ctx.step, traceback.format_exc())
            done.append((ctx, f"{type(err).__name__}: {err}"))
    return done


def _artifact(workdir: str, name: str, step: int) -> str:
    return os.path.join(workdir, "analysis", name, f"step_{step:09d}.npz")

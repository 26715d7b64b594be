"""Run registered analyses over one or several training runs' checkpoints.

For each run directory: rebuild the run's model and data from its own
config.json (so an analysis can never use a different model or data by
accident), load each selected checkpoint (verified), slice one replica, call
each analysis with ``key = analysis_key(seed, name, step, replica)``, and write
``analysis/<name>/step_<N>.npz``; then call the analysis' plot function on the
written files. Results already on disk are reused unless ``overwrite``; a
failing analysis is reported and the others go on, so finished work is never lost.

A summary JSON (``analysis/summary.json``) collects every scalar result per
analysis and step.
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
    names: tuple[str, ...]
    steps: str = "all"  # "all" | "last" | "0,100,1000"
    replica: int = 0
    settings: dict = dataclasses.field(default_factory=dict)  # name -> {setting: value}
    overwrite: bool = False


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


def analyse_run(workdir: str, request: Request) -> dict:
    """Run the requested analyses on one run; returns the summary written to disk."""
    registry = load_all()
    unknown = [n for n in request.names if n not in registry]
    if unknown:
        raise AnalysisError(f"unknown analyses {unknown}; available: {sorted(registry)}")
    cfg, setup, like = load_run(workdir)
    if not 0 <= request.replica < cfg.train.num_replicas:
        raise AnalysisError(f"--replica={request.replica} but the run has {cfg.train.num_replicas} replicas")
    checkpoints = dict(io.list_checkpoints(workdir))
    steps = select_steps(sorted(checkpoints), request.steps, workdir)
    summary_path = os.path.join(workdir, "analysis", "summary.json")
    summary = io.read_json(summary_path) if os.path.exists(summary_path) else {}
    summary.pop("failures", None)  # failures are reported per invocation
    failures = []
    for step in steps:
        todo = [n for n in request.names if request.overwrite or not os.path.exists(_artifact(workdir, n, step))]
        if not todo:
            continue
        try:
            state = io.load_checkpoint(checkpoints[step], like)
        except io.CorruptCheckpoint as err:
            logging.warning("skipping step %d: %s", step, err)
            failures.append(f"step {step}: {err}")
            continue
        params = jax.tree_util.tree_map(jax.numpy.asarray, take_replica(state.params, request.replica))
        for name in todo:
            ctx = Context(model=setup.model, dataset=setup.dataset, loss=cfg.loss, mask_mode=cfg.mask_mode,
                          lr=float(cfg.optim.lr), params=params, step=step, seed=cfg.seed,
                          replica=request.replica, settings=dict(request.settings.get(name, {})),
                          run_config=cfg.to_dict(), workdir=workdir)
            tic = time.time()
            try:
                result = as_numpy(registry[name].fn(ctx, key=rng.analysis_key(cfg.seed, name, step,
                                                                              replica=request.replica)))
            except Exception as err:  # one failing analysis must not lose the others' results
                logging.error("analysis %s failed at step %d:\n%s", name, step, traceback.format_exc())
                failures.append(f"{name} at step {step}: {type(err).__name__}: {err}")
                continue
            io.save_arrays(_artifact(workdir, name, step), result)
            summary.setdefault(name, {})[str(step)] = _scalars(result)
            logging.info("%s step %d: %.1fs", name, step, time.time() - tic)
        io.write_json(summary_path, summary)
    for name in request.names:
        plot_fn = registry[name].plot_fn
        directory = os.path.join(workdir, "analysis", name)
        done = sorted(s for s in checkpoints if os.path.exists(_artifact(workdir, name, s)))
        if plot_fn is not None and done:
            try:
                plot_fn(directory, done)
            except Exception as err:
                failures.append(f"plot of {name}: {type(err).__name__}: {err}")
                logging.error("plot of %s failed:\n%s", name, traceback.format_exc())
    if failures:
        summary["failures"] = failures
    io.write_json(summary_path, summary)
    return summary


def _artifact(workdir: str, name: str, step: int) -> str:
    return os.path.join(workdir, "analysis", name, f"step_{step:09d}.npz")

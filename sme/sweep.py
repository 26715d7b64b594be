"""The SME runs behind `train.py` when ``config.sde.enabled``: discrete dropout GD beside its SDEs.

One *cell* per (keep_prob p, learning rate eps) of ``sde.keep_prob_grid`` x ``sde.lr_grid``: R
replicas of every process (`sme.lockstep`) from replica 0's initial parameters, T/eps discrete steps
(SME time t = N eps up to the horizon T), test functions logged at ``sde.num_evals`` evenly spaced
times. Artifacts (the workdir layout of `sme.io`, plus):

    <workdir>/sme/cell_p<p>_lr<eps>.npz   batch means over replica groups at the logged steps:
        mean/<series>, sq/<series> (T_e, B, G) for series discrete, each variant and, with
        Richardson, <v>/fine and <v>/coarse; dist/<path> (T_e, B); steps, times (T_e,); g_names (G,);
        lr, keep_prob, num_replicas, horizon, seconds, diverged_step (first step with a non-finite
        value, -1: none) and diverged_series (those series, comma-separated; the other processes keep
        going); cell_config (JSON); ``__sha256__`` of the rest (`sme.io.save_arrays`). A cell
        whose file verifies and whose config matches is skipped on re-run, so an interrupted
        sweep resumes where it stopped with the same numbers; an invalid one is reported and redone.
    <workdir>/metrics.jsonl   per logged step: cell, keep_prob, lr, step, t, "<series>/<g>/mean",
        "<series>/<g>/var" (over replicas) and "<path>/dist/mean" (mean ||theta_N - Theta|| to the
        discrete path of the same replica).
    <workdir>/checkpoints/step_000000000.npz   the initial state, so `analyze.py` finds the run.

The sweep holds the workdir lock (`sme.runs.WorkdirLock`) while it runs, writes config.json and
checks it on resume like the training loop (`sme.runs`), and is chosen over training by
`sme.driver.run`. It reads the typed `sme.config.Run` (its `sme.config.SweepSpec`), never the config.

Every number is a function of the config (keys of (seed, stream, step, substep, replica)), so chunking,
interruption and the device count do not change it beyond float re-association.
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sme import config as config_lib
from sme import distributed, io, lockstep, rng, runs, weak_error
from sme.diffusion import MAX_ENUMERATED_UNITS, Problem, draw_masks
from sme.problem import resolve_method
from sme.train.state import init_state
from sme.weak_error import replica_moments

SME_DIR = "sme"


def resolve_methods(model, loss: str, diffusion: str, estimator: str, max_units: int = MAX_ENUMERATED_UNITS):
    """'auto' -> closed_form when it holds (MSE, readout-only dropout), else exact when 2**m is
    small enough, else masks (`sme.problem.resolve_method`). Returns (diffusion, estimator)."""
    auto = lambda: resolve_method(model, loss, max_units=max_units)
    return (auto() if diffusion == "auto" else diffusion), (auto() if estimator == "auto" else estimator)


def make_spec(sweep: config_lib.SweepSpec, model, loss: str, seed: int) -> lockstep.LockstepSpec:
    """The lockstep processes of `sweep` for `model` ('auto' methods resolved for it)."""
    s = sweep
    diffusion, estimator = resolve_methods(model, loss, s.diffusion, s.loss_estimator, s.max_enumerated_units)
    return lockstep.LockstepSpec(
        variants=s.variants, diffusion=diffusion, estimator=estimator, num_masks=s.num_masks, substeps=s.substeps,
        richardson=s.richardson, svag_substeps=s.svag_substeps, coupling=s.coupling, trace=s.r2_trace, seed=seed,
        layout=s.layout, chunk_size=s.chunk_size)


def cell_name(keep_prob: float, lr: float) -> str:
    return f"p{keep_prob:g}_lr{lr:g}"


def cell_path(workdir: str, keep_prob, lr) -> str:
    """The cell file of (keep_prob, lr); strings are used verbatim (a glob pattern: "*", "*")."""
    name = f"p{keep_prob}_lr{lr}" if isinstance(keep_prob, str) else cell_name(keep_prob, lr)
    return os.path.join(workdir, SME_DIR, f"cell_{name}.npz")


def save_cell(path: str, arrays: dict) -> None:
    io.save_arrays(path, arrays)  # with its SHA-256


def load_cell(path: str, expected_config: str | None = None) -> dict | None:
    """The cell's arrays if the file verifies (and its config matches), else None (reported)."""
    if not os.path.exists(path):
        return None
    try:
        arrays, meta = io.load_artifact(path, require_digest=False)
        legacy = arrays.pop("digest", None)  # cells written before io stored __sha256__: same hash rule
        if legacy is None and "sha256" not in meta:
            raise io.CorruptArtifact(f"{path}: no SHA-256 stored")
        if legacy is not None and str(legacy) != io.digest_arrays(arrays):
            raise io.CorruptArtifact(f"{path}: SHA-256 mismatch, the file is corrupt")
    except io.CorruptArtifact as err:
        logging.warning("recomputing %s", err)
        return None
    if expected_config is not None and str(arrays.get("cell_config")) != expected_config:
        logging.warning("recomputing %s: made with a different config", path)
        return None
    return arrays


def eval_steps(num_steps: int, num_evals: int) -> list[int]:
    return sorted({int(round(j * num_steps / num_evals)) for j in range(num_evals + 1)})


class _PerKeepProb:
    """Model, problem, jitted advance/evaluate for one keep_prob (reused across learning rates)."""

    def __init__(self, run: config_lib.Run, keep_prob: float):
        s, ds = run.sweep, run.dataset
        self.model = s.models[s.keep_probs.index(keep_prob)]
        self.spec = make_spec(s, self.model, run.loss, run.seed)
        dtype = jnp.dtype(run.train.dtype)
        self.problem = Problem(self.model, run.loss, run.mask_mode, jnp.asarray(ds.x_train, dtype),
                               jnp.asarray(ds.y_train, dtype))
        try:
            lockstep.check_spec(self.spec, self.problem, max_units=s.max_enumerated_units)
        except ValueError as err:
            raise config_lib.ConfigError(f"config.sde (keep_prob {keep_prob:g}, diffusion {self.spec.diffusion}, "
                                         f"loss_estimator {self.spec.estimator}): {err}") from err
        classification = ds.num_classes > 0
        eval_estimator = self.spec.estimator
        loss_masks = None
        if eval_estimator == "masks":
            loss_masks = draw_masks(self.problem, key=rng.analysis_key(run.seed, "sde_loss_masks", 0),
                                    num_masks=s.eval_num_masks)
        probes = np.linspace(0, len(ds.x_test) - 1, s.num_probes).round().astype(int)
        self.data = lockstep.TestData(jnp.asarray(ds.x_test[probes], dtype), jnp.asarray(ds.x_test, dtype),
                                      jnp.asarray(ds.y_test, dtype), loss_masks)
        self.g_names = lockstep.test_function_names(s.num_probes, classification)
        g_fn = lockstep.make_test_functions(self.problem, eval_estimator, classification=classification)
        self.advance = jax.jit(lockstep.make_advance(self.spec))
        self.evaluate = jax.jit(lockstep.make_evaluate(self.spec, g_fn, num_batches=s.num_batches))
        self.params0 = self.model.init(rng.stream_key(run.seed, rng.INIT, replica=0), dtype=dtype)


def cell_config(run: config_lib.Run, keep_prob: float, lr: float, spec: lockstep.LockstepSpec) -> str:
    """The identity of a cell as JSON text (stored in its file; a cell is reused only when it matches).
    The data and model blocks are the config's as written (``run.config``)."""
    s = run.sweep
    return json.dumps({"seed": run.seed, "data": run.config["data"], "model": {**run.config["model"],
                       "keep_prob": keep_prob}, "loss": run.loss, "mask_mode": run.mask_mode, "lr": lr,
                       "horizon": s.horizon, "spec": repr(spec), "num_replicas": s.num_replicas,
                       "num_batches": s.num_batches, "num_evals": s.num_evals, "num_probes": s.num_probes,
                       "eval_num_masks": s.eval_num_masks, "dtype": run.train.dtype}, sort_keys=True, default=list)


def _record(name, keep_prob, lr, step, values: dict, g_names, num_replicas) -> dict:
    rec = {"cell": name, "keep_prob": keep_prob, "lr": lr, "step": step, "t": step * lr}
    for key, bm in values.items():
        kind, series = key.split("/", 1)
        if kind == "mean":
            mean, var = replica_moments(bm, values[f"sq/{series}"], num_replicas)
            for j, g in enumerate(g_names):
                rec[f"{series}/{g}/mean"], rec[f"{series}/{g}/var"] = float(mean[j]), float(var[j])
        elif kind == "dist":
            rec[f"{series}/dist/mean"] = float(np.mean(bm))
    return rec


def run_cell(sweep: config_lib.SweepSpec, ctx: _PerKeepProb, keep_prob: float, lr: float):
    """Simulate one cell; returns (arrays for the npz, metrics records)."""
    s, horizon = sweep, sweep.horizon
    num_steps = int(round(horizon / lr))
    steps = eval_steps(num_steps, s.num_evals)
    state = runs.shard_leading(lockstep.init_lockstep(ctx.params0, ctx.spec, s.num_replicas))
    name, tic = cell_name(keep_prob, lr), time.time()
    lr_arr = jnp.asarray(lr, ctx.problem.x.dtype)
    results, records, diverged, diverged_series, done = [], [], -1, [], 0
    for target in steps:
        if target > done:
            state = ctx.advance(state, jnp.asarray(target - done, jnp.int32), lr_arr, ctx.problem)
            done = target
        values = {k: np.asarray(v) for k, v in runs.to_host(ctx.evaluate(state, ctx.problem, ctx.data)).items()}
        results.append(values)
        records.append(_record(name, keep_prob, lr, target, values, ctx.g_names, s.num_replicas))
        bad = sorted({k.split("/", 1)[1] for k, v in values.items() if not np.all(np.isfinite(v))})
        new_bad = [b for b in bad if b not in diverged_series]
        if new_bad:  # the others go on: a process that diverges in one replica has no finite mean
            diverged = target if diverged < 0 else diverged
            diverged_series += new_bad
            logging.warning("cell %s: %s non-finite at step %d (their errors are NaN)", name, ", ".join(new_bad),
                            target)
    arrays = {k: np.stack([r[k] for r in results]) for k in results[0]}
    seconds = time.time() - tic
    arrays.update(steps=np.array(steps), times=np.array(steps) * lr, g_names=np.array(ctx.g_names),
                  lr=np.array(lr), keep_prob=np.array(keep_prob), num_replicas=np.array(s.num_replicas),
                  horizon=np.array(horizon), seconds=np.array(seconds), diverged_step=np.array(diverged),
                  diverged_series=np.array(",".join(diverged_series)),
                  variants=np.array(ctx.spec.variants), diffusion=np.array(ctx.spec.diffusion),
                  estimator=np.array(ctx.spec.estimator))
    return arrays, records


TABLE_FUNCTION = "R_S"  # the test function of the per-cell table (the training risk)
TABLE_COLUMNS = ("p", "eps", "variant", f"weak error of {TABLE_FUNCTION} at T", "replicas", "time")


def _sig(x: float) -> str:
    return f"{x:.3g}"


def cell_table_rows(arrays: dict, *, num_boot: int, level: float = 0.95) -> list[tuple[str, ...]]:
    """One row per variant of a finished cell: p, eps, variant, weak error, replicas, seconds (text).

    The weak error of ``TABLE_FUNCTION`` at the cell's final time is `sme.weak_error.weak_error`
    (bias-corrected, with the joint-bootstrap indices of seed 0 that the weak_error analysis uses,
    so the numbers are the analysis's at the final time). Shown as "error [low, high]" when the
    interval excludes 0, else "<= high (floor f)": the error is not resolved above its Monte Carlo
    floor; "diverged" when the process did. Three significant digits.
    """
    names = [str(g) for g in arrays["g_names"]]
    j = names.index(TABLE_FUNCTION)
    ref = np.asarray(arrays["mean/discrete"][-1], np.float64)
    idx = weak_error.bootstrap_indices(ref.shape[0], num_boot=num_boot, seed=0)
    rows = []
    for v in [str(v) for v in np.atleast_1d(arrays["variants"])]:
        res = weak_error.weak_error(ref, arrays[f"mean/{v}"][-1], idx, level=level)
        error, low, high, floor = (float(res[k][j]) for k in ("error", "ci_low", "ci_high", "floor"))
        if bool(res["diverged"][j]):
            text = "diverged"
        elif low > 0:
            text = f"{_sig(error)} [{_sig(low)}, {_sig(high)}]"
        else:
            text = f"<= {_sig(high)} (floor {_sig(floor)})"
        rows.append((f"{float(arrays['keep_prob']):g}", f"{float(arrays['lr']):g}", v, text,
                     str(int(arrays["num_replicas"])), f"{float(arrays['seconds']):.1f}s"))
    return rows


def format_table(rows: list[tuple[str, ...]], columns=TABLE_COLUMNS) -> str:
    """Left-aligned columns separated by two spaces, with a header line."""
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [columns, *rows])


def run_sde(run: config_lib.Run, workdir: str, *, restart: bool = False) -> dict:
    """The sweep of `run` (``run.sweep``), resuming finished cells, under the workdir lock. Returns a
    record with the last cell's final discrete R_S and the number of cells.

    Raises:
      ConfigError: a model-dependent sde check fails, or the workdir holds another config.
      RunError: the workdir is busy, unusable, or holds results but no config.json (unless ``restart``).
    """
    if run.sweep is None:
        raise config_lib.ConfigError("config.sde.enabled=False: this run trains, it is not an SME sweep "
                                     "(sme.driver.run)")
    per_p = {p: _PerKeepProb(run, p) for p in run.sweep.keep_probs}  # model checks before any write
    runs.check_workdir(workdir)
    with runs.WorkdirLock(workdir, "SME sweep"):
        return _sweep(run, workdir, per_p, restart)


def _sweep(run: config_lib.Run, workdir: str, per_p: dict, restart: bool) -> dict:
    runs.clean_temporaries(workdir)
    _start(run, workdir, per_p, restart)
    s = run.sweep
    cells = [(p, lr) for p in s.keep_probs for lr in s.lrs]
    configs = {c: cell_config(run, c[0], c[1], per_p[c[0]].spec) for c in cells}
    done = {c for c in cells if load_cell(cell_path(workdir, *c), configs[c]) is not None}
    runs.agree_on_resume(workdir, [int(c in done) for c in cells])  # every process redoes the same cells
    metrics_path = os.path.join(workdir, runs.METRICS_FILE)
    _keep_finished_records(metrics_path, done)
    start = time.time()
    for i, (p, lr) in enumerate(cells):
        if (p, lr) in done:
            logging.info("cell %s: done, skipped", cell_name(p, lr))
            continue
        arrays, cell_records = run_cell(s, per_p[p], p, lr)
        arrays["cell_config"] = np.array(configs[(p, lr)])
        for rec in cell_records:
            io.append_jsonl(metrics_path, rec)
        save_cell(cell_path(workdir, p, lr), arrays)  # last: the file marks the cell finished
        rate = s.num_replicas * int(round(s.horizon / lr)) / max(float(arrays["seconds"]), 1e-9)
        logging.info("cell %s (%d/%d): %d steps x %d replicas in %.1fs (%.3g replica-steps/s, compile "
                     "included); elapsed %.0fs", cell_name(p, lr), i + 1, len(cells), int(round(s.horizon / lr)),
                     s.num_replicas, float(arrays["seconds"]), rate, time.time() - start)
        logging.info("cell %s (%d/%d):\n%s", cell_name(p, lr), i + 1, len(cells),
                     format_table(cell_table_rows(arrays, num_boot=s.num_boot)))
    final = ([r for r in io.read_jsonl(metrics_path) if r.get("cell") == cell_name(*cells[-1])] or [{}])[-1]
    return {"step": int(final.get("step", 0)), "cells": len(cells),
            "train/risk": float(final.get("discrete/R_S/mean", float("nan")))}


def _start(run: config_lib.Run, workdir: str, per_p: dict, restart: bool) -> None:
    """Check the workdir holds this run (or write its config.json, discarding results only with
    ``restart``), and save the initial state as checkpoint 0 so `analyze.py` finds the run."""
    if not runs.check_same_run(run.config, workdir):
        held = ([p for _, p in io.list_checkpoints(workdir)] + glob.glob(cell_path(workdir, "*", "*"))
                + glob.glob(os.path.join(workdir, runs.METRICS_FILE)))
        if held and not restart:
            raise runs.RunError(f"{workdir} holds results but no {runs.CONFIG_FILE}, so it cannot be checked to be "
                                "this run; nothing was changed. Use another --workdir, or --restart to discard them")
        for path in held:  # --restart: start over
            io.remove(path)
        params0 = per_p[run.sweep.keep_probs[0]].params0
        runs.write_run_config(workdir, run.config, num_train=run.dataset.num_train, num_test=len(run.dataset.x_test),
                              num_params=int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params0))))
    if distributed.is_writer():
        os.makedirs(os.path.join(workdir, SME_DIR), exist_ok=True)
    if not io.list_checkpoints(workdir):
        t = run.train
        state = init_state(run.model, run.optimizer, seed=run.seed, num_replicas=t.num_replicas,
                           share_init=t.share_init, dtype=jnp.dtype(t.dtype))
        io.save_checkpoint(workdir, 0, jax.device_get(state))


def _keep_finished_records(metrics_path: str, done: set) -> None:
    """Drop the metrics lines of unfinished cells (and a line cut by a kill): they are redone."""
    records = io.read_jsonl(metrics_path)
    kept = [r for r in records if (r.get("keep_prob"), r.get("lr")) in done]
    if len(kept) != len(records) or os.path.exists(metrics_path) and len(records) != _num_lines(metrics_path):
        io.write_jsonl(metrics_path, kept)


def _num_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())

"""The training driver: ``run(config, workdir)``.

Order of work, chosen so that bad input never costs compute or finished work:

1. validate the config and load the data (`sme.config.build`), writing nothing;
2. take the workdir lock (`sme.runs.WorkdirLock`: one writer per workdir) and
   remove temporary files a killed writer left;
3. if the workdir holds a run, check its config.json matches and resume from
   the newest checkpoint that verifies (corrupt ones are reported and skipped),
   truncating metrics.jsonl to that step. A workdir with results but no
   config.json, or with metrics but no readable checkpoint, is refused unless
   ``restart`` (nothing is deleted without it). A finished run is a no-op that
   returns its final metrics;
4. train in chunks: each chunk is one call of a jitted `lax.fori_loop` whose
   trip count is traced, so any chunk length reuses one compilation. Chunks end
   at evaluation and checkpoint steps and are sized to print a progress line
   every ``train.log_every_secs`` seconds;
   A checkpoint is written, read back and verified before older rolling ones
   are deleted;
5. a non-finite loss stops the run naming the step and the newest checkpoint
   before it (whose loss was finite); the state that produced it is never written.

Determinism: every key is a function of (seed, replica, stream, step), so the
chunking, an interruption or a resume never changes the numbers.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sme import config as config_lib
from sme import io, losses, runs, tensorboard
from sme.train.evaluate import make_evaluate
from sme.train.snapshots import SnapshotBuffer, snapshot_steps
from sme.train.state import init_state  # noqa: F401  (re-exported: callers build states as the loop does)
from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step, train_keys


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss."""


def _summarise(values: dict, step: int) -> dict:
    record = {"step": step}
    for key, value in values.items():
        value = np.asarray(value, np.float64)
        record[key] = float(value.mean())
        if value.size > 1:
            record[key + "_std"] = float(value.std())
    return record


def _boundaries(num_steps: int, eval_every: int, checkpoint_every: int, extra: list[int]) -> list[int]:
    marks = set(range(0, num_steps + 1, eval_every)) | set(range(0, num_steps + 1, checkpoint_every))
    return sorted(marks | set(extra) | {num_steps})


def run(cfg, workdir: str, *, restart: bool = False) -> dict:
    """Train as `cfg` says, writing config.json, metrics.jsonl and checkpoints to `workdir`.

    Args:
      cfg: a training config (``sde.enabled`` runs go through `sme.driver.run`).
      workdir: the run directory, created if needed; resumed when it holds this run.
      restart: start over in a workdir whose checkpoints are all unreadable (or that has results
        but no config.json), discarding its checkpoints, metrics and snapshots.

    Returns:
      The last metrics record (means over replicas); for a finished run, its final one.

    Raises:
      ConfigError: invalid config, or the workdir holds a different one.
      RunError: the workdir is busy, unusable, or nothing in it can be resumed (see ``restart``).
      NonFiniteLoss: the training loss became non-finite.
    """
    setup = config_lib.build(cfg)  # raises ConfigError before anything is written
    if "sde" in cfg and cfg.sde.enabled:
        raise config_lib.ConfigError("config.sde.enabled=True is an SME sweep, not training: run it with train.py "
                                     "(sme.driver.run)")
    if jnp.dtype(cfg.train.dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise config_lib.ConfigError("config.train.dtype='float64' needs jax_enable_x64 (train.py sets it)")
    runs.check_workdir(workdir)
    with runs.WorkdirLock(workdir, "training"):
        return _train(cfg, setup, workdir, restart)


def _discard(workdir: str, paths: list[str]) -> None:
    for path in paths:
        io.remove(path)
    logging.warning("--restart: discarded %d files of the previous run in %s", len(paths), workdir)


def _resume_point(workdir: str, like, snaps: SnapshotBuffer, has_config: bool, restart: bool):
    """(step, state) to resume from, or None to start at step 0; refuses what would lose work."""
    metrics_path = os.path.join(workdir, runs.METRICS_FILE)
    files = [path for _, path in io.list_checkpoints(workdir)]
    logged = [r["step"] for r in io.read_jsonl(metrics_path) if r.get("step", 0) > 0]
    if not has_config:
        if files and not restart:
            raise runs.RunError(f"{workdir} holds {len(files)} checkpoints but no {runs.CONFIG_FILE}, so it cannot be "
                                "checked to be this run; nothing was changed. Use another --workdir, or --restart "
                                "to discard them")
        if files:
            _discard(workdir, files + [metrics_path, snaps.path])
        return None
    resumed = io.latest_valid_checkpoint(workdir, like, log=logging.warning)
    if resumed is None and (files or logged):
        if not restart:
            what = f"none of its {len(files)} checkpoints can be read" if files else "it holds no checkpoint"
            raise runs.RunError(f"{workdir}: {what}, but metrics.jsonl has {len(logged)} records after step 0; "
                                "refusing to start over. Pass --restart to discard them and train from step 0")
        _discard(workdir, files + [metrics_path, snaps.path])
        return None
    if resumed is None:
        return None
    try:
        snaps.restore(resumed[0])
    except io.CorruptArtifact as err:
        logging.warning("%s", err)
    missing = [s for s in sorted(snaps.steps) if s < resumed[0] and s not in snaps.taken]
    if missing:  # snapshots lost or corrupt: retrain from before the window (the numbers are the same)
        snaps.taken.clear()
        snaps.rows.clear()
        logging.warning("%s lacks the snapshots of steps %s..%s; retraining from before them", snaps.path,
                        missing[0], missing[-1])
        resumed = io.latest_valid_checkpoint(workdir, like, log=logging.warning, max_step=min(snaps.steps))
    return resumed


def _train(cfg, setup, workdir: str, restart: bool) -> dict:
    runs.clean_temporaries(workdir)
    has_config = runs.check_same_run(cfg, workdir)
    t = cfg.train
    dtype = jnp.dtype(t.dtype)
    ds, model = setup.dataset, setup.model
    x_tr, y_tr = jnp.asarray(ds.x_train, dtype), jnp.asarray(ds.y_train, dtype)
    x_te, y_te = jnp.asarray(ds.x_test, dtype), jnp.asarray(ds.y_test, dtype)

    objective = losses.make_objective(cfg.objective, model, cfg.loss, mode=cfg.mask_mode,
                                      lr=losses.penalty_coefficient(cfg))
    replica_step = make_replica_step(model, objective, setup.optimizer, batch_size=setup.batch_size,
                                     mask_mode=cfg.mask_mode)
    advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(setup.batch_size)))
    evaluate = jax.jit(make_evaluate(model, cfg.loss, classification=ds.num_classes > 0))

    state = init_state(model, setup.optimizer, seed=cfg.seed, num_replicas=t.num_replicas,
                       share_init=t.share_init, dtype=dtype)
    metrics_path = os.path.join(workdir, runs.METRICS_FILE)
    kept = set(setup.checkpoint_steps)
    snaps = SnapshotBuffer(workdir, snapshot_steps(t.snapshot_start, t.snapshot_every, t.num_steps))
    resumed = _resume_point(workdir, jax.device_get(state), snaps, has_config, restart)
    # Every process must resume from the same step (and none writes before all have read the workdir).
    runs.agree_on_resume(workdir, -1 if resumed is None else resumed[0])
    if resumed is not None:
        step, state = resumed
        state = jax.tree_util.tree_map(jnp.asarray, state)
        io.truncate_jsonl(metrics_path, step)
        logging.info("resuming %s from step %d", workdir, step)
    else:
        runs.write_run_config(
            workdir, cfg, num_params=int(sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(state.params))),
            num_train=ds.num_train, num_test=len(ds.x_test))
        io.remove(metrics_path)
    runs.barrier("resume point written")  # the other processes read metrics.jsonl as process 0 left it
    state = runs.shard_leading(state)
    keys = runs.shard_leading(train_keys(cfg.seed, t.num_replicas))  # recomputed from the seed on resume
    board = tensorboard.open_writer(workdir, enabled="log" in cfg and bool(cfg.log.tensorboard),
                                    resume_step=None if resumed is None else resumed[0])  # off: does nothing

    marks = _boundaries(t.num_steps, t.eval_every, t.checkpoint_every, sorted(kept | snaps.steps))
    step = int(state.step)
    snaps.maybe_take(step, state.params)  # a resume at a snapshot step whose row was not kept
    records = io.read_jsonl(metrics_path)
    record = records[-1] if records and records[-1]["step"] == step else {}

    last_point = [time.time(), int(state.step)]

    def log_point(step):
        nonlocal record, state
        values = runs.to_host(evaluate(state.params, x_tr, y_tr, x_te, y_te))
        if step > last_record[0]:
            values["train/objective"] = np.asarray(runs.to_host(state.loss_sum), np.float64) / (step - last_record[0])
        state = state._replace(loss_sum=jnp.zeros_like(state.loss_sum))
        record = _summarise(values, step)
        last_record[0] = step
        now = time.time()
        if step > last_point[1]:  # training throughput since the previous record (evaluation excluded)
            record["steps_per_sec"] = (step - last_point[1]) / max(now - last_point[0], 1e-9)
        record["time"] = now
        io.append_jsonl(metrics_path, record)
        board.write(record)
        last_point[:] = [time.time(), step]

    def save(step):
        snaps.save()  # first: a checkpoint never exists without the snapshots before it
        io.save_checkpoint(workdir, step, runs.to_host(state))  # read back and verified
        for old_step, path in io.list_checkpoints(workdir):
            if old_step < step and old_step not in kept:
                io.remove(path)  # rolling resume checkpoint superseded

    last_record = [records[-1]["step"] if records else 0]
    if resumed is None:
        log_point(0)
        snaps.maybe_take(0, state.params)
        if 0 in kept:
            save(0)
    elif step == t.num_steps:
        if not record:  # killed between the final checkpoint and its metrics line
            log_point(step)
        logging.info("%s: the run is finished (step %d); nothing to do", workdir, step)
        board.close()
        return record

    chunk, last_log, start, start_step, compile_secs = 1, time.time(), time.time(), step, None
    while step < t.num_steps:
        target = next(m for m in marks if m > step)
        n = min(target - step, chunk)
        tic = time.time()
        new_state, bad = advance(state, jnp.asarray(n, jnp.int32), x_tr, y_tr, keys)
        bad = int(bad)
        if bad >= 0:
            # The loss at step s is that of the checkpoint of step s: only steps before `bad` are good.
            good = [s for s, _ in io.list_checkpoints(workdir) if s < bad]
            raise NonFiniteLoss(
                f"non-finite training loss at step {bad}; stopped without saving it. "
                f"Last good checkpoint: step {good[-1] if good else 'none'} in {workdir}/checkpoints. "
                "Lower optim.lr or check the data.")
        state, step = new_state, step + n
        snaps.maybe_take(step, state.params)
        elapsed = time.time() - tic
        if compile_secs is None and step < t.num_steps:  # the first chunk compiled: rate from here on
            compile_secs, start, start_step = elapsed, time.time(), step
        # Grow chunks until one takes ~1/4 of the progress interval (first call includes compilation).
        chunk = max(1, min(chunk * 4, int(n / max(elapsed, 1e-6) * t.log_every_secs / 4) or 1))
        if step % t.eval_every == 0 or step == t.num_steps or step in kept:
            log_point(step)
        if step in kept or step % t.checkpoint_every == 0 or step == t.num_steps:
            save(step)
        now = time.time()
        if now - last_log >= t.log_every_secs or step == t.num_steps:
            rate = (step - start_step) / max(now - start, 1e-9)
            eta = (t.num_steps - step) / max(rate, 1e-9)
            extra = " ".join(f"{k}={record[k]:.4g}" for k in ("train/risk", "test/acc", "test/risk") if k in record)
            speed = (f"{rate:.0f} steps/s | ETA {eta:.0f}s" if step > start_step
                     else f"first chunk with compilation {compile_secs:.1f}s")
            logging.info("step %d/%d (%.0f%%) %s | %s", step, t.num_steps, 100.0 * step / t.num_steps, extra, speed)
            last_log = now
    board.close()
    return record

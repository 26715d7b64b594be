"""The training driver: ``run(config, workdir)``.

Order of work, chosen so that bad input never costs compute or finished work:

1. validate the config and load the data (`sme.config.build`), writing nothing;
2. if the workdir holds a run, check its config matches and resume from the
   newest checkpoint that verifies (corrupt ones are reported and skipped);
3. train in chunks: each chunk is one call of a jitted `lax.fori_loop` whose
   trip count is traced, so any chunk length reuses one compilation. Chunks end
   at evaluation and checkpoint steps and are sized to print a progress line
   every ``train.log_every_secs`` seconds;
4. a non-finite loss stops the run naming the step; the state that produced it
   is never written, so the last good checkpoint stays the newest.

Determinism: every key is a function of (seed, replica, stream, step), so the
chunking, an interruption or a resume never changes the numbers.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sme import config as config_lib
from sme import io, losses, rng, tensorboard
from sme.train.evaluate import make_evaluate
from sme.train.snapshots import SnapshotBuffer, snapshot_steps
from sme.train.state import TrainState
from sme.train.step import Sampler, make_advance, make_replica_step, make_train_step

# Config fields that may change when resuming: they do not change the numbers.
RESUMABLE_CHANGES = ("train.log_every_secs", "log.tensorboard")


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss."""


def versions() -> dict:
    import flax
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__
            if hasattr(jax.lib, "__version__") else jax.__version__, "optax": optax.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "sme": __import__("sme").__version__,
            "backend": jax.default_backend(), "devices": jax.device_count()}


def _check_same_run(cfg, workdir: str) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    saved = io.read_json(path)["config"]
    now = config_lib._flatten(cfg.to_dict())
    old = config_lib._flatten(saved)
    diffs = sorted(k for k in set(now) | set(old)
                   if k not in RESUMABLE_CHANGES and _norm(now.get(k)) != _norm(old.get(k)))
    if diffs:
        detail = ", ".join(f"config.{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in diffs[:5])
        raise config_lib.ConfigError(
            f"workdir {workdir} holds a run with a different config ({detail}); "
            "use a new --workdir or the same config to resume")


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def init_state(model, optimizer, *, seed: int, num_replicas: int, share_init: bool, dtype) -> TrainState:
    """Initial state of R replicas; replica r uses key(seed, INIT, r), or replica 0's if shared."""
    replicas = jnp.zeros(num_replicas, jnp.int32) if share_init else jnp.arange(num_replicas)
    params = jax.vmap(lambda r: model.init(rng.stream_key(seed, rng.INIT, replica=r), dtype=dtype))(replicas)
    return TrainState(jnp.asarray(0, jnp.int32), params, jax.vmap(optimizer.init)(params),
                      jnp.zeros((num_replicas,), dtype))


def _shard(state: TrainState, num_replicas: int) -> TrainState:
    """Shard the replica axis over devices when there are several and R divides evenly."""
    devices = jax.devices()
    if len(devices) < 2 or num_replicas % len(devices):
        return state
    mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(jax.device_put(state.step, whole), *jax.device_put(state[1:], split))


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


def run(cfg, workdir: str) -> dict:
    """Train as `cfg` says, writing config.json, metrics.jsonl and checkpoints to `workdir`.

    Returns:
      The last metrics record (means over replicas).
    """
    setup = config_lib.build(cfg)  # raises ConfigError before anything is written
    if "sde" in cfg and cfg.sde.enabled:  # the SME lockstep simulation instead of training
        from sme.sweep import run_sde

        return run_sde(cfg, workdir, setup)
    _check_same_run(cfg, workdir)
    t = cfg.train
    dtype = jnp.dtype(t.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise config_lib.ConfigError("config.train.dtype='float64' needs jax_enable_x64 (train.py sets it)")
    ds, model = setup.dataset, setup.model
    x_tr, y_tr = jnp.asarray(ds.x_train, dtype), jnp.asarray(ds.y_train, dtype)
    x_te, y_te = jnp.asarray(ds.x_test, dtype), jnp.asarray(ds.y_test, dtype)

    objective = losses.make_objective(cfg.objective, model, cfg.loss, mode=cfg.mask_mode, lr=cfg.optim.lr)
    replica_step = make_replica_step(model, objective, setup.optimizer, seed=cfg.seed,
                                     batch_size=setup.batch_size, mask_mode=cfg.mask_mode)
    advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(cfg.seed, setup.batch_size)))
    evaluate = jax.jit(make_evaluate(model, cfg.loss, classification=ds.num_classes > 0))

    state = init_state(model, setup.optimizer, seed=cfg.seed, num_replicas=t.num_replicas,
                       share_init=t.share_init, dtype=dtype)
    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    resumed = io.latest_valid_checkpoint(workdir, jax.device_get(state), log=logging.warning)
    if resumed is not None:
        step, state = resumed
        state = jax.tree_util.tree_map(jnp.asarray, state)
        io.truncate_jsonl(metrics_path, step)
        logging.info("resuming %s from step %d", workdir, step)
    else:
        io.write_json(os.path.join(workdir, "config.json"), {
            "config": cfg.to_dict(), "versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "num_params": int(sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(state.params))),
            "num_train": ds.num_train, "num_test": len(ds.x_test)})
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    state = _shard(state, t.num_replicas)
    board = tensorboard.open_writer(workdir, enabled="log" in cfg and bool(cfg.log.tensorboard),
                                    resume_step=None if resumed is None else resumed[0])  # off: does nothing

    kept = set(setup.checkpoint_steps)
    snaps = SnapshotBuffer(workdir, snapshot_steps(t.snapshot_start, t.snapshot_every, t.num_steps))
    marks = _boundaries(t.num_steps, t.eval_every, t.checkpoint_every, sorted(kept | snaps.steps))
    step = int(state.step)
    snaps.restore(step)
    record = {}

    last_point = [time.time(), int(state.step)]

    def log_point(step):
        nonlocal record, state
        values = jax.device_get(evaluate(state.params, x_tr, y_tr, x_te, y_te))
        if step > last_record[0]:
            values["train/objective"] = np.asarray(state.loss_sum, np.float64) / (step - last_record[0])
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
        io.save_checkpoint(workdir, step, jax.device_get(state))
        for old_step, path in io.list_checkpoints(workdir):
            if old_step < step and old_step not in kept:
                os.remove(path)  # rolling resume checkpoint superseded

    records = io.read_jsonl(metrics_path)
    last_record = [records[-1]["step"] if records else 0]
    if resumed is None:
        log_point(0)
        snaps.maybe_take(0, state.params)
        if 0 in kept:
            save(0)

    chunk, last_log, start, start_step = 1, time.time(), time.time(), step
    while step < t.num_steps:
        target = next(m for m in marks if m > step)
        n = min(target - step, chunk)
        tic = time.time()
        new_state, bad = advance(state, jnp.asarray(n, jnp.int32), x_tr, y_tr)
        bad = int(bad)
        if bad >= 0:
            good = [s for s, _ in io.list_checkpoints(workdir)]
            raise NonFiniteLoss(
                f"non-finite training loss at step {bad}; stopped without saving it. "
                f"Last good checkpoint: step {good[-1] if good else 'none'} in {workdir}/checkpoints. "
                "Lower optim.lr or check the data.")
        state, step = new_state, step + n
        snaps.maybe_take(step, state.params)
        elapsed = time.time() - tic
        if step - n == start_step and step < t.num_steps:  # the first chunk compiled: rate from here on
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

"""The training driver: ``run(config, workdir)``.

Order of work, chosen so that bad input never costs compute or finished work:

1. validate the config, load the data and build the typed `sme.config.Run`
   (`sme.config.build`), writing nothing; the loop reads only the `Run`;
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
from sme import io, runs, tensorboard
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
    """Train as `cfg` says (`sme.config.build`, then `train`), writing config.json, metrics.jsonl and
    checkpoints to `workdir`.

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
    return train(config_lib.build(cfg), workdir, restart=restart)  # raises ConfigError before anything is written


def train(run: config_lib.Run, workdir: str, *, restart: bool = False) -> dict:
    """Train `run` (built by `sme.config.build`) into `workdir`; as `run` for the rest."""
    if run.sweep is not None:
        raise config_lib.ConfigError("config.sde.enabled=True is an SME sweep, not training: run it with train.py "
                                     "(sme.driver.run)")
    if jnp.dtype(run.train.dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise config_lib.ConfigError("config.train.dtype='float64' needs jax_enable_x64 (train.py sets it)")
    runs.check_workdir(workdir)
    with runs.WorkdirLock(workdir, "training"):
        return _train(run, workdir, restart)


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


def _train(run: config_lib.Run, workdir: str, restart: bool) -> dict:
    runs.clean_temporaries(workdir)
    has_config = runs.check_same_run(run.config, workdir)
    session = _Session(run, workdir)
    resumed = session.resume(has_config, restart)
    try:
        if resumed is None:
            session.begin()
        elif session.step == run.train.num_steps:
            return session.finished()
        session.train_to_end()
        return session.record
    finally:
        if session.board is not None:
            session.board.close()


class _Session:
    """One training session over a workdir: the compiled step and evaluation, the train state, and the
    bookkeeping of its metrics records and checkpoints."""

    def __init__(self, run: config_lib.Run, workdir: str):
        self.run, self.workdir, t = run, workdir, run.train
        dtype = jnp.dtype(t.dtype)
        ds = run.dataset
        self.train_data = (jnp.asarray(ds.x_train, dtype), jnp.asarray(ds.y_train, dtype))
        self.test_data = (jnp.asarray(ds.x_test, dtype), jnp.asarray(ds.y_test, dtype))
        replica_step = make_replica_step(run.model, run.objective, run.optimizer, batch_size=t.batch_size,
                                         mask_mode=run.mask_mode)
        self.advance = jax.jit(make_advance(make_train_step(replica_step), Sampler(t.batch_size)))
        self.keys = train_keys(run.seed, t.num_replicas)  # traced into advance; recomputed from the seed on resume
        self.evaluate = jax.jit(make_evaluate(run.model, run.loss, classification=ds.num_classes > 0))
        self.state = init_state(run.model, run.optimizer, seed=run.seed, num_replicas=t.num_replicas,
                                share_init=t.share_init, dtype=dtype)
        self.metrics_path = os.path.join(workdir, runs.METRICS_FILE)
        self.kept = set(t.checkpoint_steps)
        self.snaps = SnapshotBuffer(workdir, snapshot_steps(t.snapshot_start, t.snapshot_every, t.num_steps))
        self.board = None  # the TensorBoard writer, opened by `resume`
        self.record: dict = {}
        self.last_record = 0  # the step of the newest metrics record (train/objective averages since it)
        self.last_point = (time.time(), 0)  # (time, step) after the newest record: the throughput's origin

    @property
    def step(self) -> int:
        return int(self.state.step)

    def resume(self, has_config: bool, restart: bool):
        """Resume from the newest valid checkpoint or start afresh (writing config.json); every process
        agrees on the step. Opens the TensorBoard writer. Returns the resumed (step, state) or None."""
        run, workdir = self.run, self.workdir
        resumed = _resume_point(workdir, jax.device_get(self.state), self.snaps, has_config, restart)
        # Every process must resume from the same step (and none writes before all have read the workdir).
        runs.agree_on_resume(workdir, -1 if resumed is None else resumed[0])
        if resumed is not None:
            step, state = resumed
            self.state = jax.tree_util.tree_map(jnp.asarray, state)
            io.truncate_jsonl(self.metrics_path, step)
            logging.info("resuming %s from step %d", workdir, step)
        else:
            num_params = int(sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(self.state.params)))
            runs.write_run_config(workdir, run.config, num_params=num_params, num_train=run.dataset.num_train,
                                  num_test=len(run.dataset.x_test))
            io.remove(self.metrics_path)
        runs.barrier("resume point written")  # the other processes read metrics.jsonl as process 0 left it
        self.state = runs.shard_leading(self.state)
        self.keys = runs.shard_leading(self.keys)
        self.board = tensorboard.open_writer(workdir, enabled=run.tensorboard,
                                             resume_step=None if resumed is None else resumed[0])  # off: no-op
        step = self.step
        self.snaps.maybe_take(step, self.state.params)  # a resume at a snapshot step whose row was not kept
        records = io.read_jsonl(self.metrics_path)
        self.record = records[-1] if records and records[-1]["step"] == step else {}
        self.last_record = records[-1]["step"] if records else 0
        self.last_point = (time.time(), step)
        return resumed

    def begin(self) -> None:
        """Step 0 of a fresh run: its metrics record, snapshot and (if kept) checkpoint."""
        self.log_point(0)
        self.snaps.maybe_take(0, self.state.params)
        if 0 in self.kept:
            self.save(0)

    def finished(self) -> dict:
        """A resumed run that had already finished: its final record (written if a kill lost it)."""
        if not self.record:  # killed between the final checkpoint and its metrics line
            self.log_point(self.step)
        logging.info("%s: the run is finished (step %d); nothing to do", self.workdir, self.step)
        return self.record

    def log_point(self, step: int) -> None:
        """Evaluate, append the metrics record of `step` and reset the running training objective."""
        state = self.state
        values = runs.to_host(self.evaluate(state.params, *self.train_data, *self.test_data))
        if step > self.last_record:
            values["train/objective"] = (np.asarray(runs.to_host(state.loss_sum), np.float64)
                                         / (step - self.last_record))
        self.state = state._replace(loss_sum=jnp.zeros_like(state.loss_sum))
        record = _summarise(values, step)
        self.last_record = step
        now = time.time()
        if step > self.last_point[1]:  # training throughput since the previous record (evaluation excluded)
            record["steps_per_sec"] = (step - self.last_point[1]) / max(now - self.last_point[0], 1e-9)
        record["time"] = now
        io.append_jsonl(self.metrics_path, record)
        self.board.write(record)
        self.record = record
        self.last_point = (time.time(), step)

    def save(self, step: int) -> None:
        """Write (and verify) the checkpoint of `step`, then delete superseded rolling ones."""
        self.snaps.save()  # first: a checkpoint never exists without the snapshots before it
        io.save_checkpoint(self.workdir, step, runs.to_host(self.state))  # read back and verified
        for old_step, path in io.list_checkpoints(self.workdir):
            if old_step < step and old_step not in self.kept:
                io.remove(path)  # rolling resume checkpoint superseded

    def train_to_end(self) -> None:
        """Advance in chunks that end at every evaluation, checkpoint and snapshot step, to num_steps."""
        t = self.run.train
        marks = _boundaries(t.num_steps, t.eval_every, t.checkpoint_every, sorted(self.kept | self.snaps.steps))
        step = self.step
        pace = _Pace(step, t.num_steps, t.log_every_secs)
        while step < t.num_steps:
            n = min(next(m for m in marks if m > step) - step, pace.chunk)
            tic = time.time()
            new_state, bad = self.advance(self.state, jnp.asarray(n, jnp.int32), *self.train_data, self.keys)
            self._check_finite(int(bad))
            self.state, step = new_state, step + n
            self.snaps.maybe_take(step, self.state.params)
            pace.ran(n, step, time.time() - tic)
            if step % t.eval_every == 0 or step == t.num_steps or step in self.kept:
                self.log_point(step)
            if step in self.kept or step % t.checkpoint_every == 0 or step == t.num_steps:
                self.save(step)
            pace.report(step, self.record)

    def _check_finite(self, bad: int) -> None:
        if bad >= 0:
            # The loss at step s is that of the checkpoint of step s: only steps before `bad` are good.
            good = [s for s, _ in io.list_checkpoints(self.workdir) if s < bad]
            raise NonFiniteLoss(
                f"non-finite training loss at step {bad}; stopped without saving it. "
                f"Last good checkpoint: step {good[-1] if good else 'none'} in {self.workdir}/checkpoints. "
                "Lower optim.lr or check the data.")


class _Pace:
    """Chunk lengths that grow until a chunk takes ~1/4 of the progress interval, and the progress
    lines (rate and ETA from the end of the first chunk, which includes compilation)."""

    def __init__(self, step: int, num_steps: int, every_secs: float):
        self.num_steps, self.every_secs = num_steps, every_secs
        self.chunk, self.last_log, self.start, self.start_step = 1, time.time(), time.time(), step
        self.compile_secs = None

    def ran(self, n: int, step: int, elapsed: float) -> None:
        """A chunk of `n` steps ending at `step` took `elapsed` seconds: size the next one."""
        if self.compile_secs is None and step < self.num_steps:  # the first chunk compiled: rate from here on
            self.compile_secs, self.start, self.start_step = elapsed, time.time(), step
        self.chunk = max(1, min(self.chunk * 4, int(n / max(elapsed, 1e-6) * self.every_secs / 4) or 1))

    def report(self, step: int, record: dict) -> None:
        """A progress line every `every_secs` seconds and at the end."""
        now = time.time()
        if now - self.last_log < self.every_secs and step != self.num_steps:
            return
        rate = (step - self.start_step) / max(now - self.start, 1e-9)
        eta = (self.num_steps - step) / max(rate, 1e-9)
        extra = " ".join(f"{k}={record[k]:.4g}" for k in ("train/risk", "test/acc", "test/risk") if k in record)
        speed = (f"{rate:.0f} steps/s | ETA {eta:.0f}s" if step > self.start_step
                 else f"first chunk with compilation {self.compile_secs:.1f}s")
        logging.info("step %d/%d (%.0f%%) %s | %s", step, self.num_steps, 100.0 * step / self.num_steps, extra, speed)
        self.last_log = now

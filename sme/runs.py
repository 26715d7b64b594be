"""Run bookkeeping shared by the drivers (training loop, SME sweep, analyses).

A workdir is a small database with one writer at a time:

* `WorkdirLock`: an advisory ``fcntl.flock`` on ``<workdir>/.lock``, held by a
  training run, an SME sweep or an analysis while it writes. A second writer is
  refused with one line naming the holder's PID. The lock is re-entrant within
  a process (a driver may call another on the same workdir), and the kernel
  releases it when the holder dies, even by ``kill -9``.
* ``config.json``: the run's config (a JSON object), package versions, start
  time and sizes (`write_run_config`); a resume must find it and match it
  (`check_same_run`).
* `check_workdir` and `clean_temporaries`: one-line errors for a workdir that
  is a file or not writable, and removal of the ``.tmp_*`` files a killed
  writer leaves behind (only under the lock, so never another writer's).
* `shard_leading`: the one sharding rule, a leading replica/batch axis split
  over all devices of all processes (one global mesh); `to_host` brings such
  arrays back to every process.

Multi-process runs (`sme.distributed`): process 0 takes the lock and writes
(`sme.io` writes nothing in the others); the other processes take no lock,
remove nothing and only read the workdir, which must be on a filesystem they
all see when a run is resumed.
* `settings_digest`: SHA-256 of a settings object in canonical JSON, the key of
  analysis results.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import platform
import time

import jax
import numpy as np

from configs import base as base_config
from sme import config as config_lib
from sme import distributed, io
from sme.distributed import barrier, to_host  # noqa: F401  (re-exported for the drivers)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# Config fields that may change when resuming: they do not change the numbers.
RESUMABLE_CHANGES = ("train.log_every_secs", "log.tensorboard")


class RunError(RuntimeError):
    """The workdir cannot be used as asked (busy, not a run, not writable, nothing resumable)."""


def versions() -> dict:
    """Versions of Python, JAX and the libraries a run's numbers depend on, and the devices."""
    import flax
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__
            if hasattr(jax.lib, "__version__") else jax.__version__, "optax": optax.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "sme": __import__("sme").__version__,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "processes": jax.process_count()}


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def _as_dict(config) -> dict:
    """A config as a plain dict: a ConfigDict's ``to_dict()``, or the dict itself (`sme.config.Run.config`)."""
    return config.to_dict() if hasattr(config, "to_dict") else config


def write_run_config(workdir: str, config, **sizes) -> None:
    """Write ``config.json``: the config (a ConfigDict or its dict) as a JSON object, versions, start time
    and ``sizes``."""
    io.write_json(config_path(workdir), {"config": _as_dict(config), "versions": versions(),
                                         "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **sizes}, digest=True)


def read_run_config(workdir: str) -> dict:
    """The verified ``config.json`` of a run. Raises RunError when it is missing or corrupt."""
    path = config_path(workdir)
    if not os.path.exists(path):
        raise RunError(f"{workdir}: no {CONFIG_FILE} (not a run directory)")
    try:
        return io.read_json(path)
    except io.CorruptArtifact as err:
        raise RunError(str(err)) from err


def check_same_run(config, workdir: str) -> bool:
    """True when ``workdir`` holds a run of ``config`` (a ConfigDict or its dict), False when it holds no
    config.json.

    A field the saved config lacks (added to ``configs/base.py`` later) counts as equal when the
    new config holds its base default.

    Raises:
      ConfigError: the saved config differs in a field other than `RESUMABLE_CHANGES`.
      RunError: config.json is unreadable.
    """
    if not os.path.exists(config_path(workdir)):
        return False
    saved = read_run_config(workdir)["config"]
    now = config_lib._flatten(_as_dict(config))
    old = config_lib._flatten(saved)
    # A field added to configs/base.py after the run started is absent from its config.json: at its
    # default it describes the same run (the run was made with the behaviour the default keeps).
    defaults = config_lib._flatten(base_config.get_config().to_dict())
    for k in set(now) - set(old):
        if k in defaults and _norm(now[k]) == _norm(defaults[k]):
            old[k] = now[k]
    diffs = sorted(k for k in set(now) | set(old)
                   if k not in RESUMABLE_CHANGES and _norm(now.get(k)) != _norm(old.get(k)))
    if diffs:
        detail = ", ".join(f"config.{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in diffs[:5])
        raise config_lib.ConfigError(
            f"workdir {workdir} holds a run with a different config ({detail}); "
            "use a new --workdir or the same config to resume")
    return True


def _norm(value):
    if isinstance(value, (tuple, list)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def check_workdir(workdir: str) -> None:
    """One-line RunError for a workdir that is a regular file, or that cannot be created or written."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"workdir {workdir} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise RunError(f"workdir {workdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise RunError(f"workdir {workdir} {what}")


def clean_temporaries(directory: str) -> list[str]:
    """Remove ``.tmp_*`` files (left by a killed atomic write) under ``directory``; returns them.
    Process 0 of a multi-process run only (the others' view may hold its writes in flight)."""
    if not distributed.is_writer():
        return []
    found = glob.glob(os.path.join(glob.escape(directory), "**", ".tmp_*"), recursive=True)
    for path in found:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return found


_HELD: dict[str, list] = {}  # realpath -> [file object, depth]


class WorkdirLock:
    """Exclusive advisory lock on a workdir, as a context manager.

    ``with WorkdirLock(workdir, "training"):`` creates the workdir if needed, takes
    ``flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.lock`` and writes "<pid> <purpose>"
    into it. Raises RunError naming the holder's PID when another process holds it.
    Nested use on the same workdir in one process only counts depth. In a multi-process
    run only process 0 takes it (the others write nothing); in them it does nothing.
    """

    def __init__(self, workdir: str, purpose: str):
        self.workdir, self.purpose = workdir, purpose

    def __enter__(self):
        check_workdir(self.workdir)
        self.held = distributed.is_writer()
        if not self.held:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        key = os.path.realpath(self.workdir)
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        path = os.path.join(self.workdir, LOCK_FILE)
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            pid, _, what = holder.partition(" ")
            raise RunError(f"workdir {self.workdir} is in use by process {pid}"
                           f"{f' ({what})' if what else ''}; wait for it to finish or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {self.purpose}\n")
        f.flush()
        _HELD[key] = [f, 1]
        return self

    def __exit__(self, *exc):
        if not self.held:
            return False
        key = os.path.realpath(self.workdir)
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0].close()  # closing the descriptor releases the flock
        return False


def shard_leading(tree, axis: str = "replica"):
    """Split the leading axis of every array leaf with ndim >= 1 over all devices; 0-d leaves are replicated.

    The devices are those of every process (`jax.devices()`, one global mesh); in a multi-process
    run each process holds the rows of its own devices, built from ``tree``, which must be the same
    in every process (it is: same config, same seed), and results come back with `to_host`.
    Unchanged on one device, or when a leading axis is not a multiple of the device count (callers
    pad when they need the split; every process then computes the whole, the same, locally).
    The numbers do not depend on it beyond float re-association.
    """
    devices = jax.devices()
    leaves = jax.tree_util.tree_leaves(tree)
    if len(devices) < 2 or any(np.ndim(leaf) and np.shape(leaf)[0] % len(devices) for leaf in leaves):
        return tree
    mesh = jax.sharding.Mesh(np.array(devices), (axis,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if not distributed.multi_process():
        return jax.tree_util.tree_map(lambda leaf: jax.device_put(leaf, split if np.ndim(leaf) else whole), tree)

    def place(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys
            return jax.random.wrap_key_data(place(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:  # already global: reshard
            return jax.device_put(leaf, split if leaf.ndim else whole)
        host = np.asarray(jax.device_get(leaf))
        return jax.make_array_from_callback(host.shape, split if host.ndim else whole, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


def settings_digest(settings) -> str:
    """SHA-256 (hex) of ``settings`` as canonical JSON (sorted keys, tuples as lists)."""
    text = json.dumps(_norm(settings), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def agree_on_resume(workdir: str, step) -> None:
    """Check that every process of a multi-process run resumes ``workdir`` from the same ``step`` (an int, -1:
    from scratch, or a list of ints such as the finished cells of a sweep); a barrier as well, so process 0
    writes nothing before every process has read the workdir.

    Raises:
      RunError: the processes see different checkpoints (the workdir is not on a filesystem they share).
    """
    try:
        distributed.agree(step, f"the step to resume {workdir} from (-1: none)")
    except distributed.DistributedError as err:
        raise RunError(str(err)) from None

"""Artifacts on disk: checkpoints, run metadata, metrics and analysis arrays.

Layout of a workdir:

    config.json                 the run's config + versions + start time
    metrics.jsonl               one JSON object per evaluation (see sme/train/loop.py)
    checkpoints/step_<N>.npz    training state at step N (kept steps + rolling latest)
    analysis/<name>/step_<N>.npz, *.png   written by analyze.py

Checkpoints are .npz files (no pickle: loaded with allow_pickle=False). Each
leaf of the state pytree is stored under its path name, with a SHA-256 of all
leaves' bytes in ``__sha256__``. Writes go to a temporary file in the same
directory, are fsynced, then atomically renamed, so a crash leaves either the
old file or the new one, never half of one. Loading recomputes the hash and
raises `CorruptCheckpoint` on any mismatch, missing leaf, shape or dtype change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step_(\d+)\.npz$")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file failed verification."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write_fn) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode()))


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the usable log
    return records


def truncate_jsonl(path: str, max_step: int) -> None:
    """Keep only records with step <= max_step (used when resuming from a checkpoint)."""
    records = [r for r in read_jsonl(path) if r.get("step", -1) <= max_step]
    _atomic_write(path, lambda f: f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()))


def save_arrays(path: str, arrays: dict[str, Any]) -> None:
    """Atomically write a dict of arrays as .npz (analysis artifacts)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype == object:
            raise TypeError(f"save_arrays: {k!r} is an object array; only numeric/string arrays are stored")
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _leaf_names(tree) -> tuple[list[str], list[Any], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [jax.tree_util.keystr(path) for path, _ in paths_leaves]
    return names, [leaf for _, leaf in paths_leaves], treedef


def _digest(names, arrays) -> str:
    h = hashlib.sha256()
    for name, a in zip(names, arrays):
        a = np.ascontiguousarray(a)
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def checkpoint_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, CHECKPOINT_DIR, f"step_{step:09d}.npz")


def save_checkpoint(workdir: str, step: int, state) -> str:
    """Atomically write `state` (any pytree of arrays) as the checkpoint of `step`."""
    names, leaves, _ = _leaf_names(state)
    arrays = [np.asarray(jax.device_get(leaf)) for leaf in leaves]
    payload = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
    payload["__names__"] = np.array(names)
    payload["__sha256__"] = np.array(_digest(names, arrays))
    path = checkpoint_path(workdir, step)
    _atomic_write(path, lambda f: np.savez(f, **payload))
    return path


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
    """Verified leaves of a checkpoint as {path name: array}, e.g. ".params['out']['w']".

    Raises:
      CorruptCheckpoint: unreadable file or hash mismatch.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            names = [str(n) for n in f["__names__"]]
            digest = str(f["__sha256__"])
            arrays = [f[f"leaf_{i:05d}"] for i in range(len(names))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptCheckpoint(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    if _digest(names, arrays) != digest:
        raise CorruptCheckpoint(f"{path}: SHA-256 mismatch, the file is corrupt")
    return dict(zip(names, arrays))


def load_checkpoint(path: str, like) -> Any:
    """Load and verify a checkpoint into the structure of `like` (arrays or ShapeDtypeStructs).

    Raises:
      CorruptCheckpoint: unreadable file, hash mismatch, or a leaf whose name,
        shape or dtype differs from `like`.
    """
    stored = read_checkpoint(path)
    names, arrays = list(stored), list(stored.values())
    want_names, want_leaves, treedef = _leaf_names(like)
    if names != want_names:
        raise CorruptCheckpoint(f"{path}: holds leaves {names[:4]}... but the run expects {want_names[:4]}...")
    for name, a, w in zip(names, arrays, want_leaves):
        shape, dtype = tuple(np.shape(w)), np.dtype(getattr(w, "dtype", None) or np.asarray(w).dtype)
        if a.shape != shape or a.dtype != dtype:
            raise CorruptCheckpoint(f"{path}: leaf {name} is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)}")
    return jax.tree_util.tree_unflatten(treedef, arrays)


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint file, sorted by step."""
    found = []
    for path in glob.glob(os.path.join(workdir, CHECKPOINT_DIR, "step_*.npz")):
        match = _STEP_RE.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_valid_checkpoint(workdir: str, like, *, log=print):
    """The newest checkpoint that verifies, as (step, state); corrupt ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(workdir)):
        try:
            return step, load_checkpoint(path, like)
        except CorruptCheckpoint as err:
            log(f"skipping corrupt checkpoint: {err}")
    return None

"""Artifacts on disk: checkpoints, run metadata, metrics and analysis arrays.

Layout of a workdir:

    config.json                 the run's config + versions + start time (sme.runs)
    metrics.jsonl               one JSON object per evaluation (see sme/train/loop.py)
    checkpoints/step_<N>.npz    training state at step N (kept steps + rolling latest)
    analysis/<name>/step_<N>.npz, settings.json, *.png   written by analyze.py
    .lock                       the writer's lock (sme.runs.WorkdirLock)

Checkpoints are .npz files (no pickle: loaded with allow_pickle=False). Each
leaf of the state pytree is stored under its path name, with a SHA-256 of all
leaves' bytes in ``__sha256__``. Writes go to a temporary file in the same
directory, are fsynced, then atomically renamed, so a crash leaves either the
old file or the new one, never half of one. Loading recomputes the hash and
raises `CorruptCheckpoint` on any mismatch, missing leaf, shape or dtype change.

Every other artifact is verified the same way: `save_arrays` stores a SHA-256
of its arrays in ``__sha256__`` and `load_arrays` checks it (and strips it), and
`write_json(..., digest=True)` stores one of the canonical JSON in
``__sha256__`` that `read_json` checks; a mismatch or an unreadable file raises
`CorruptArtifact` naming the file. JSON is strict: a non-finite float is written
as ``null`` with its reason ("nan", "inf", "-inf") in a sibling field
``<key>__nonfinite``, and read back as the float.

In a multi-process run (`sme.distributed`) only process 0 writes: every write and
removal here (`_atomic_write`, `append_jsonl`, `remove`) does nothing in the others.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import math
import json
import os
import re
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

from sme import distributed

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"step_(\d+)\.npz$")


DIGEST_KEY = "__sha256__"
NONFINITE = "__nonfinite"  # suffix of the sibling field that gives a null's reason


class CorruptArtifact(RuntimeError):
    """An artifact (arrays or JSON) is unreadable or fails its SHA-256."""


class CorruptCheckpoint(CorruptArtifact):
    """A checkpoint file failed verification."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove(path: str) -> None:
    """Delete a file if it exists (in process 0 only, like every write)."""
    if distributed.is_writer():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _atomic_write(path: str, write_fn) -> None:
    if not distributed.is_writer():
        return  # a multi-process run: process 0 writes
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
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(err, OSError) and not err.filename:  # e.g. ENOSPC from write(): name the file
            raise OSError(err.errno, f"cannot write {path}: {os.strerror(err.errno or errno.EIO)}") from err
        raise


def _strict(obj):
    """``obj`` as strict JSON values: non-finite floats -> None plus a "<key>__nonfinite" sibling."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            k = str(k)
            if isinstance(v, (float, np.floating)) and not math.isfinite(v):
                out[k], out[k + NONFINITE] = None, str(float(v))
            elif isinstance(v, (list, tuple, np.ndarray)) and _has_nonfinite(v):
                flat = np.asarray(v, np.float64)
                out[k] = [None if not math.isfinite(x) else x for x in flat.tolist()] if flat.ndim == 1 else _strict(
                    np.where(np.isfinite(flat), flat, np.nan).tolist())
                out[k + NONFINITE] = {str(i): str(x) for i, x in enumerate(flat.ravel().tolist())
                                      if not math.isfinite(x)}
            else:
                out[k] = _strict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _has_nonfinite(values) -> bool:
    try:
        a = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        return False
    return a.size > 0 and not np.all(np.isfinite(a))


def _restore(obj):
    """Inverse of `_strict` for the reader: nulls with a "__nonfinite" reason become floats again."""
    if isinstance(obj, dict):
        out = {k: _restore(v) for k, v in obj.items() if not k.endswith(NONFINITE)}
        for k, reason in obj.items():
            base = k[:-len(NONFINITE)]
            if not k.endswith(NONFINITE) or base not in out:
                continue
            if isinstance(reason, str):
                out[base] = float(reason)
            elif isinstance(reason, dict) and isinstance(out[base], list):
                flat = np.asarray(out[base], dtype=object).ravel()
                for i, r in reason.items():
                    flat[int(i)] = float(r)
                out[base] = np.asarray(flat.tolist(), np.float64).reshape(np.shape(out[base])).tolist()
        return out
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def dumps(obj) -> str:
    """Strict JSON text of ``obj`` (one line, sorted keys; non-finite floats as null + reason)."""
    return json.dumps(_strict(obj), sort_keys=True, allow_nan=False)


def write_json(path: str, obj: Any, *, digest: bool = False) -> None:
    """Atomically write strict JSON; with ``digest`` (a dict) add its SHA-256 under ``__sha256__``."""
    obj = _strict(obj)
    if digest:
        obj = {**obj, DIGEST_KEY: hashlib.sha256(_canonical(obj).encode()).hexdigest()}
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False)
    _atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str) -> Any:
    """Parse, verify (when it carries ``__sha256__``) and return a JSON file, non-finite floats restored.

    Raises:
      CorruptArtifact: the file is not valid JSON or fails its SHA-256.
    """
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptArtifact(f"{path}: not valid JSON ({err})") from None
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        stored = obj.pop(DIGEST_KEY)
        if hashlib.sha256(_canonical(obj).encode()).hexdigest() != stored:
            raise CorruptArtifact(f"{path}: SHA-256 mismatch, the file is corrupt")
    return _restore(obj)


def append_jsonl(path: str, record: dict) -> None:
    """Append one strict-JSON line. A line cut by a crash or a full disk is dropped by `read_jsonl`."""
    if not distributed.is_writer():
        return
    try:
        with open(path, "a") as f:
            f.write(dumps(record) + "\n")
            f.flush()
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, f"cannot write {path}: {os.strerror(err.errno or errno.EIO)}") from err


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(_restore(json.loads(line)))
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the usable log
    return records


def write_jsonl(path: str, records: list[dict]) -> None:
    """Atomically replace a JSONL file by ``records``."""
    text = "".join(dumps(r) + "\n" for r in records)
    _atomic_write(path, lambda f: f.write(text.encode()))


def truncate_jsonl(path: str, max_step: int) -> None:
    """Keep the records with step <= max_step, in strictly increasing step order (resuming from a
    checkpoint): a line cut by a crash, and any duplicate or out-of-order line, is dropped."""
    records, last = [], -1
    for r in read_jsonl(path):
        step = r.get("step", -1)
        if last < step <= max_step:
            records.append(r)
            last = step
    write_jsonl(path, records)


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and bytes of a dict of arrays."""
    names = sorted(arrays)
    return _digest(names, [arrays[n] for n in names])


def save_arrays(path: str, arrays: dict[str, Any], *, meta: dict[str, str] | None = None) -> None:
    """Atomically write a dict of arrays as .npz with their SHA-256 under ``__sha256__``.

    ``meta`` (e.g. {"settings": digest}) is stored as strings under ``__<name>__``, inside the hash.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items() if k != DIGEST_KEY}
    for k, v in arrays.items():
        if v.dtype == object:
            raise TypeError(f"save_arrays: {k!r} is an object array; only numeric/string arrays are stored")
    arrays.update({f"__{k}__": np.array(str(v)) for k, v in (meta or {}).items()})
    payload = {**arrays, DIGEST_KEY: np.array(digest_arrays(arrays))}
    _atomic_write(path, lambda f: np.savez(f, **payload))


def load_artifact(path: str, *, require_digest: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, meta) of an .npz written by `save_arrays`, verified against its ``__sha256__``
    (meta["sha256"], when stored).

    Files without a digest (written by other tools) load unverified unless ``require_digest``.

    Raises:
      FileNotFoundError: no file.
      CorruptArtifact: unreadable file, digest mismatch, or no digest when one is required.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise CorruptArtifact(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    stored = arrays.pop(DIGEST_KEY, None)
    if stored is None and require_digest:
        raise CorruptArtifact(f"{path}: no SHA-256 stored (not written by sme, or by an older version)")
    if stored is not None and digest_arrays(arrays) != str(stored):
        raise CorruptArtifact(f"{path}: SHA-256 mismatch, the file is corrupt")
    meta = {k[2:-2]: str(arrays.pop(k)) for k in [k for k in arrays if k.startswith("__") and k.endswith("__")]}
    if stored is not None:
        meta["sha256"] = str(stored)
    return arrays, meta


def load_arrays(path: str, *, require_digest: bool = False) -> dict[str, np.ndarray]:
    """The arrays of an .npz, verified as `load_artifact` does (without its metadata)."""
    return load_artifact(path, require_digest=require_digest)[0]


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
    """Atomically write `state` (any pytree of arrays) as the checkpoint of `step`, then read it
    back and verify it (so a caller may delete older checkpoints once this returns).

    Raises:
      CorruptCheckpoint: the file read back does not verify.
    """
    names, leaves, _ = _leaf_names(state)
    arrays = [np.asarray(jax.device_get(leaf)) for leaf in leaves]
    payload = {f"leaf_{i:05d}": a for i, a in enumerate(arrays)}
    payload["__names__"] = np.array(names)
    payload["__sha256__"] = np.array(_digest(names, arrays))
    path = checkpoint_path(workdir, step)
    _atomic_write(path, lambda f: np.savez(f, **payload))
    if distributed.is_writer():
        read_checkpoint(path)
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


def latest_valid_checkpoint(workdir: str, like, *, log=print, max_step: int | None = None):
    """The newest checkpoint (at most ``max_step``) that verifies, as (step, state), or None;
    corrupt ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(workdir)):
        if max_step is not None and step > max_step:
            continue
        try:
            return step, load_checkpoint(path, like)
        except CorruptCheckpoint as err:
            log(f"skipping corrupt checkpoint: {err}")
    return None

"""Trajectory snapshots over a late-training window ("random trajectory data").

Feng & Tu (PNAS 2021) run PCA on the weights visited over a window of late
training. With ``train.snapshot_start = s0 >= 0`` the loop stops at steps
s0, s0 + k, s0 + 2k, ... (k = ``train.snapshot_every``) and keeps the raveled
parameters of every replica. They are written to ``<workdir>/snapshots.npz``
(``params``: float32 (R, S, P); ``steps``: (S,); a SHA-256 checked on load)
whenever a checkpoint is written, atomically, so an interrupted run resumes with
the snapshots taken up to its checkpoint and ends with exactly the same file as
an uninterrupted one. A corrupt file raises `sme.io.CorruptArtifact` on restore;
the loop then retrains from before the window to retake them.
"""

from __future__ import annotations

import os

import jax
import jax.flatten_util
import numpy as np

from sme import distributed, io

FILENAME = "snapshots.npz"


def snapshot_steps(start: int, every: int, num_steps: int) -> list[int]:
    """Steps at which snapshots are taken (empty when start < 0)."""
    return list(range(start, num_steps + 1, every)) if start >= 0 else []


class SnapshotBuffer:
    """Host-side buffer of (step, raveled params of every replica)."""

    def __init__(self, workdir: str, steps: list[int]):
        self.path = os.path.join(workdir, FILENAME)
        self.steps = set(steps)
        self.taken: list[int] = []
        self.rows: list[np.ndarray] = []

    def restore(self, up_to_step: int) -> None:
        """Reload snapshots taken at steps <= up_to_step (resume).

        Raises:
          CorruptArtifact: the file is unreadable, fails its SHA-256 or lacks its arrays.
        """
        if not self.steps or not os.path.exists(self.path):
            return
        arrays = io.load_arrays(self.path)
        if "steps" not in arrays or "params" not in arrays or arrays["params"].ndim != 3 or \
                arrays["params"].shape[1] != arrays["steps"].shape[0]:
            raise io.CorruptArtifact(f"{self.path}: not a snapshots file (needs params (R, S, P) and steps (S,))")
        for i, step in enumerate(arrays["steps"].tolist()):
            if step <= up_to_step:
                self.taken.append(int(step))
                self.rows.append(arrays["params"][:, i])

    def maybe_take(self, step: int, params) -> None:
        if step in self.steps and step not in self.taken:
            flat = jax.vmap(lambda p: jax.flatten_util.ravel_pytree(p)[0])(params)
            self.taken.append(step)
            self.rows.append(np.asarray(distributed.to_host(flat), np.float32))

    def save(self) -> None:
        if self.rows:
            io.save_arrays(self.path, {"params": np.stack(self.rows, axis=1),
                                       "steps": np.asarray(self.taken, np.int64)})

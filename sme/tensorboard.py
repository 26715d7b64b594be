"""Optional TensorBoard event files beside metrics.jsonl (``config.log.tensorboard``).

Off by default. When on, every metrics record (the same scalars as the line in
``metrics.jsonl``: risks, accuracies, norms, steps_per_sec, replica stds) is
also written to ``<workdir>/tensorboard`` through tensorboardX, which needs no
TensorFlow (``pip install -e '.[tensorboard]'``), and ``analyze.py`` adds the
scalars of each analysis it runs (``analysis/<name>/<key>`` at the checkpoint's step). Watch a run with
``tensorboard --logdir <workdir>/tensorboard``.

A resumed run purges the events at or after its resume step, as metrics.jsonl
is truncated there, so TensorBoard shows one curve, not two overlapping ones.
"""

from __future__ import annotations

import glob
import os
import struct

import jax
import numpy as np

SUBDIR = "tensorboard"
_NOT_SCALARS = ("step", "time")


class _Null:
    """The writer when logging is off: does nothing."""

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


class _Writer:
    """Opens its event file at the first record, so a run with nothing to log leaves none."""

    def __init__(self, make):
        self._make, self._w = make, None

    def write(self, record: dict) -> None:
        """Every finite scalar of a metrics record at its step (wall time from the record's ``time``)."""
        if self._w is None:
            self._w = self._make()
        step = int(record["step"])
        for tag, value in record.items():
            if tag in _NOT_SCALARS or not isinstance(value, (int, float)) or not np.isfinite(value):
                continue
            self._w.add_scalar(tag, float(value), global_step=step, walltime=record.get("time"))
        self._w.flush()  # a live view: records are seconds apart, so flushing each costs nothing

    def close(self) -> None:
        if self._w is not None:
            self._w.close()


def open_writer(workdir: str, *, enabled: bool, resume_step: int | None = None):
    """A writer with ``write(record)`` and ``close()``; a no-op one unless `enabled`.

    Args:
      workdir: the run directory; events go to ``<workdir>/tensorboard``.
      enabled: ``config.log.tensorboard``.
      resume_step: when resuming, events at steps >= this are hidden (purged).

    Raises:
      sme.config.ConfigError: one line naming the extra to install, when enabled without tensorboardX.
    """
    if not enabled or jax.process_index() != 0:  # a multi-process run: process 0 writes (sme.distributed)
        return _Null()
    try:
        from tensorboardX import SummaryWriter
    except ImportError as err:
        from sme.config import ConfigError

        raise ConfigError("config.log.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'") from err
    return _Writer(lambda: SummaryWriter(logdir=os.path.join(workdir, SUBDIR), purge_step=resume_step))


def write_summary(workdir: str, summary: dict) -> int:
    """The scalars of an analysis summary (``analysis/summary.json``) as ``analysis/<name>/<key>`` events.

    Args:
      workdir: the run directory; events go to ``<workdir>/tensorboard`` beside the training ones.
      summary: ``{analysis name: {step: {key: value}}}``; keys that are not steps (digests,
        failures) and values that are not finite numbers (settings, labels) are skipped.

    Returns:
      The number of scalars written. Cost: one event file per call.
    """
    from tensorboardX import SummaryWriter

    points = []
    for name, per_step in summary.items():
        if not isinstance(per_step, dict):
            continue
        for step, values in per_step.items():
            if not str(step).isdigit() or not isinstance(values, dict):
                continue
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                    points.append((f"analysis/{name}/{key}", float(value), int(step)))
    if points:
        with SummaryWriter(logdir=os.path.join(workdir, SUBDIR)) as writer:
            for tag, value, step in points:
                writer.add_scalar(tag, value, global_step=step)
    return len(points)


def _records(path: str):
    """The payloads of one TFRecord file (8-byte length, 4-byte CRC, payload, 4-byte CRC)."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                return  # a record being written; the rest arrives with the next flush
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            if len(payload) < length or len(f.read(4)) < 4:
                return
            yield payload


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file in `logdir` as ``{tag: [(step, value), ...]}`` in file order.

    Purges of resumed runs are not applied: a tag may list a step twice. Cost: one pass over the files.
    """
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for payload in _records(path):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out

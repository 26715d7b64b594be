"""CIFAR-10 and CIFAR-100 from the user's local copy of the binary version (no pickle).

The binary version is a directory of fixed-length records (Krizhevsky 2009):

* CIFAR-10 (``cifar-10-batches-bin/``): ``data_batch_1.bin`` ... ``data_batch_5.bin``
  and ``test_batch.bin``; each record is 1 label byte + 3,072 pixel bytes;
* CIFAR-100 (``cifar-100-binary/``): ``train.bin`` and ``test.bin``; each record is
  1 coarse-label byte, 1 fine-label byte + 3,072 pixel bytes (the fine label, 100
  classes, is used).

The 3,072 bytes are the red, green and blue 32x32 planes, rows in order. Images
come out as (32, 32, 3) height-width-channel, flattened to 3,072 floats in
[0, 1] (the layout `sme.models` and `sme.flax_models` reshape with
``input_shape=(32, 32, 3)``). Files are read with NumPy only: nothing is
downloaded and nothing is unpickled.
"""

from __future__ import annotations

import os

import numpy as np

from sme.errors import DataError

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3
_LAYOUT = {
    # name: (train files, test files, label bytes per record, index of the label used, classes, archive)
    "cifar10": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 0, 10,
                "the CIFAR-10 binary version (cifar-10-binary.tar.gz)"),
    "cifar100": (["train.bin"], ["test.bin"], 2, 1, 100, "the CIFAR-100 binary version (cifar-100-binary.tar.gz)"),
}
_SUBDIRS = {"cifar10": "cifar-10-batches-bin", "cifar100": "cifar-100-binary"}


class CifarError(DataError):
    """CIFAR files are missing or malformed."""


def _directory(path: str, name: str) -> str:
    """`path` itself or its unpacked-archive subdirectory, whichever holds the files."""
    train = _LAYOUT[name][0][0]
    for candidate in (path, os.path.join(path, _SUBDIRS[name])):
        if os.path.isfile(os.path.join(candidate, train)):
            return candidate
    archive = _LAYOUT[name][5]
    raise CifarError(f"data.path={path!r} holds no {train}: download {archive} from "
                     f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into that directory")


def read_records(path: str, *, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary CIFAR file as (images (n, 32, 32, 3) uint8, labels (n,) int64). Cost: one read."""
    record = label_bytes + _PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise CifarError(f"{path}: cannot read ({err})") from err
    if raw.size == 0 or raw.size % record:
        raise CifarError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    raw = raw.reshape(-1, record)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, raw[:, label_index].astype(np.int64)


def load(path: str, name: str):
    """Train and test splits of ``cifar10`` or ``cifar100`` from directory `path`.

    Returns:
      ``(x_train (n, 3072) float32 in [0, 1], labels_train (n,) int64, x_test, labels_test,
      num_classes)``, images flattened from (32, 32, 3). Cost: reads the files once.

    Raises:
      CifarError: a one-line message naming what to download and where to put it
        when the files are absent, or the file that is malformed.
    """
    if name not in _LAYOUT:
        raise CifarError(f"unknown CIFAR set {name!r}; expected one of {tuple(_LAYOUT)}")
    train_files, test_files, label_bytes, label_index, classes, archive = _LAYOUT[name]
    if not path:
        raise CifarError(f"data.path is empty: {name} needs a directory holding {archive}, unpacked")
    directory = _directory(path, name)
    splits = []
    for files in (train_files, test_files):
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise CifarError(f"{directory}: missing {missing} of {archive}")
        parts = [read_records(os.path.join(directory, f), label_bytes=label_bytes, label_index=label_index)
                 for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.max() >= classes:
            raise CifarError(f"{directory}: label {labels.max()} out of range for {classes} classes")
        splits += [(images.reshape(len(images), -1) / 255.0).astype(np.float32), labels]
    return (*splits, classes)


def write_records(path: str, images: np.ndarray, labels: np.ndarray, *, coarse: np.ndarray | None = None) -> None:
    """Write images (n, 32, 32, 3) uint8 and labels in the binary format (CIFAR-100 when `coarse` is given)."""
    planes = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
    head = [np.asarray(labels, np.uint8)[:, None]]
    if coarse is not None:
        head.insert(0, np.asarray(coarse, np.uint8)[:, None])
    np.concatenate([*head, planes], axis=1).tofile(path)

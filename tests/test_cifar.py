"""CIFAR binary-version loader on small files written here byte by byte."""

import os

import numpy as np
import pytest

from sme import cifar
from sme import data as data_lib
from sme import testing


_images, _record_bytes, _write = testing.cifar_images, testing.cifar_record, testing.write_cifar_file
write_cifar10 = testing.write_cifar10


def test_cifar10_pixels_labels_and_order(tmp_path):
    truth = write_cifar10(str(tmp_path))
    xtr, ytr, xte, yte, classes = cifar.load(str(tmp_path), "cifar10")
    assert classes == 10 and xtr.shape == (10, 3072) and xte.shape == (3, 3072) and xtr.dtype == np.float32
    np.testing.assert_array_equal(ytr, truth["train"][1])
    np.testing.assert_array_equal(yte, truth["test"][1])
    # x = pixel / 255 laid out (32, 32, 3): exact in float32 up to one rounding (< 1 ulp of 1).
    np.testing.assert_allclose(xtr.reshape(-1, 32, 32, 3) * 255.0, truth["train"][0], atol=1e-4)
    np.testing.assert_allclose(xte.reshape(-1, 32, 32, 3) * 255.0, truth["test"][0], atol=1e-4)


def test_cifar100_uses_fine_labels_and_finds_the_unpacked_subdirectory(tmp_path):
    sub = tmp_path / "cifar-100-binary"
    sub.mkdir()
    images = _images(4, 0)
    fine, coarse = [3, 99, 0, 57], [1, 19, 0, 11]
    _write(str(sub / "train.bin"), images, list(zip(coarse, fine)))
    _write(str(sub / "test.bin"), images[:2], list(zip(coarse[:2], fine[:2])))
    xtr, ytr, xte, yte, classes = cifar.load(str(tmp_path), "cifar100")
    assert classes == 100
    np.testing.assert_array_equal(ytr, fine)
    np.testing.assert_array_equal(yte, fine[:2])
    np.testing.assert_allclose(xtr.reshape(-1, 32, 32, 3) * 255.0, images, atol=1e-4)


def test_write_records_matches_the_byte_layout(tmp_path):
    images = _images(3, 5)
    cifar.write_records(str(tmp_path / "a.bin"), images, [4, 5, 6], coarse=[1, 2, 3])
    expected = b"".join(_record_bytes(im, [c, f]) for im, c, f in zip(images, [1, 2, 3], [4, 5, 6]))
    assert (tmp_path / "a.bin").read_bytes() == expected


def test_through_load_dataset_one_hot_and_subset(tmp_path):
    write_cifar10(str(tmp_path))
    ds = data_lib.load_dataset(data_lib.DataSpec(name="cifar10", path=str(tmp_path), num_train=4))
    assert ds.x_train.shape == (4, 3072) and ds.y_train.shape == (4, 10) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.y_train.argmax(1), [1, 2, 2, 3])


def test_missing_and_malformed_files_are_named_in_one_line(tmp_path):
    with pytest.raises(data_lib.DataError, match="download .*cifar-10-binary.tar.gz.* unpack it into") as err:
        data_lib.load_dataset(data_lib.DataSpec(name="cifar10", path=str(tmp_path)))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(data_lib.DataError, match="cifar-100-binary.tar.gz"):
        cifar.load("", "cifar100")
    write_cifar10(str(tmp_path))
    os.remove(tmp_path / "data_batch_4.bin")
    with pytest.raises(data_lib.DataError, match="data_batch_4.bin"):
        cifar.load(str(tmp_path), "cifar10")
    write_cifar10(str(tmp_path))
    with open(tmp_path / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)  # a truncated extra record
    with pytest.raises(data_lib.DataError, match="test_batch.bin: .* not a whole number of 3073-byte"):
        cifar.load(str(tmp_path), "cifar10")

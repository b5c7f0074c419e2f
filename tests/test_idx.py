"""IDX reading (`bj.datasets.load_idx`, `fashion_mnist`) on tiny files the test writes itself,
plain and gzip-compressed; no test needs the Fashion-MNIST package."""
import gzip
import struct

import numpy as np
import pytest

import bilevel_jax as bj


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, array, code, compress=False):
    raw = _idx_bytes(array, code)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trips_uint8_and_float(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = bj.datasets.load_idx(_write(tmp_path / "img", images, 0x08, compress))
    np.testing.assert_array_equal(got, images)
    assert got.dtype == np.uint8
    floats = np.linspace(-1, 1, 6).reshape(3, 2)
    np.testing.assert_array_equal(bj.datasets.load_idx(_write(tmp_path / "f", floats, 0x0E, compress)), floats)


def test_load_idx_rejects_malformed_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="is not an IDX file"):
        bj.datasets.load_idx(tmp_path / "bad")
    truncated = _idx_bytes(np.zeros((4, 4), np.uint8), 0x08)[:-3]
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match="header says shape"):
        bj.datasets.load_idx(tmp_path / "short")


def test_fashion_mnist_reads_a_folder_and_says_how_to_get_the_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        img_name, lab_name = bj.datasets.FASHION_MNIST_FILES[split]
        _write(tmp_path / (img_name + ".gz"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08, True)
        _write(tmp_path / lab_name, rng.integers(0, 10, n, dtype=np.uint8), 0x08)
    images, labels = bj.datasets.fashion_mnist(tmp_path, "test")
    assert images.shape == (3, 28, 28) and labels.shape == (3,)
    monkeypatch.setenv(bj.datasets.FASHION_MNIST_ENV, str(tmp_path))
    assert bj.datasets.fashion_mnist(split="train")[0].shape == (5, 28, 28)
    with pytest.raises(ValueError, match="split must be one of"):
        bj.datasets.fashion_mnist(tmp_path, "val")
    monkeypatch.delenv(bj.datasets.FASHION_MNIST_ENV)
    monkeypatch.setattr(bj.datasets, "FASHION_MNIST_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        bj.datasets.fashion_mnist(tmp_path / "nowhere")

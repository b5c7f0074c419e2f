"""Data loaders: libsvm files (plain/.bz2), IJCNN1 files or its generator, breast cancer."""
import bz2
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import datasets

LIBSVM_TEXT = """+1 1:0.5 3:-1.25
-1 2:2 4:0.75
+1 1:-0.5 2:1 3:1 4:1
"""
DENSE = np.array([[0.5, 0, -1.25, 0], [0, 2, 0, 0.75], [-0.5, 1, 1, 1]])


def _write(path, text, compress=False):
    data = text.encode()
    path.write_bytes(bz2.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("name,compress", [("small.svm", False), ("small.svm.bz2", True)])
def test_load_libsvm_plain_and_bz2(tmp_path, name, compress):
    X, y = datasets.load_libsvm(_write(tmp_path / name, LIBSVM_TEXT, compress))
    assert X.shape == (3, 4) and X.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(X), DENSE)
    np.testing.assert_array_equal(np.asarray(y), [1, -1, 1])
    X32, _ = datasets.load_libsvm(tmp_path / name, n_features=6, dtype=jnp.float32)
    assert X32.shape == (3, 6) and X32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(X32[:, :4]), DENSE)


def test_load_libsvm_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        datasets.load_libsvm(tmp_path / "missing")
    with pytest.raises(ValueError, match="floating"):
        datasets.load_libsvm(_write(tmp_path / "f", LIBSVM_TEXT), dtype=jnp.int32)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # scikit-learn not installed
    with pytest.raises(ImportError, match=r"bilevel_jax\[experiments\]"):
        datasets.load_libsvm(tmp_path / "f")


def test_ijcnn1_falls_back_to_generator(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.IJCNN1_ENV, raising=False)
    with pytest.warns(UserWarning, match="not found"):
        out = datasets.ijcnn1(tmp_path, n_train=300, n_val=500)
    (Xv, yv), (X, y) = out.data
    assert out.synthetic and out.source.startswith(datasets.SYNTHETIC_IJCNN1)
    assert X.shape == (300, 22) and Xv.shape == (500, 22) and y.shape == (300,) and yv.shape == (500,)
    again = datasets.ijcnn1(n_train=300, n_val=500)             # no path, no env: silent fallback
    np.testing.assert_array_equal(np.asarray(again.data[1][0]), np.asarray(X))
    with pytest.raises(FileNotFoundError, match="ijcnn1"):
        datasets.ijcnn1(tmp_path, allow_synthetic=False)


def test_ijcnn1_reads_files(tmp_path, monkeypatch):
    train = "-1 1:1 12:0.25 22:-0.5\n1 2:1 13:0.75\n-1 3:1 11:-1\n"
    test = "1 4:1 20:0.5\n-1 1:1\n"
    _write(tmp_path / "ijcnn1", train)
    _write(tmp_path / "ijcnn1.t.bz2", test, compress=True)
    out = datasets.ijcnn1(tmp_path)
    (Xv, yv), (X, y) = out.data
    assert not out.synthetic and "IJCNN1" in out.source
    assert X.shape == (3, 22) and Xv.shape == (2, 22)          # train file = lower, test file = upper
    np.testing.assert_array_equal(np.asarray(y), [-1, 1, -1])
    np.testing.assert_array_equal(np.asarray(yv), [1, -1])
    assert float(X[0, 21]) == -0.5 and float(Xv[0, 19]) == 0.5
    monkeypatch.setenv(datasets.IJCNN1_ENV, str(tmp_path))     # the directory from the environment
    np.testing.assert_array_equal(np.asarray(datasets.ijcnn1().data[1][0]), np.asarray(X))


def test_ijcnn1_like_deterministic_and_shaped():
    (Xv, yv), (X, y) = datasets.ijcnn1_like(3, n_train=4000, n_val=3000)
    (Xv2, yv2), (X2, y2) = datasets.ijcnn1_like(3, n_train=4000, n_val=3000)
    for a, b in ((X, X2), (y, y2), (Xv, Xv2), (yv, yv2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (_, _), (X_other, _) = datasets.ijcnn1_like(4, n_train=4000, n_val=3000)
    assert not np.array_equal(np.asarray(X_other), np.asarray(X))
    (_, _), (X_small_val, _) = datasets.ijcnn1_like(3, n_train=4000, n_val=10)
    np.testing.assert_array_equal(np.asarray(X_small_val), np.asarray(X))   # train ignores n_val
    assert set(np.unique(np.asarray(y))) == {-1.0, 1.0}
    assert abs(float(jnp.mean(y > 0)) - 0.1) < 0.01 and abs(float(jnp.mean(yv > 0)) - 0.1) < 0.02
    X = np.asarray(X)
    np.testing.assert_array_equal(X[:, :10].sum(axis=1), 1.0)   # one-hot block
    assert np.all(np.abs(X[:, 10:]) < 1.0) and X[:, 10:].std() > 0.2
    (_, _), (X32, _) = datasets.ijcnn1_like(3, n_train=4000, n_val=10, dtype=jnp.float32)
    assert X32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(X32), X, rtol=1e-6)    # the same data in float32
    with pytest.raises(ValueError):
        datasets.ijcnn1_like(0, n_train=0)


def test_ijcnn1_like_not_separable():
    """Both classes overlap: along the Bayes-like direction the margins of the two classes mix."""
    (_, _), (X, y) = datasets.ijcnn1_like(0, n_train=3000, n_val=10)
    X, y = np.asarray(X), np.asarray(y)
    w, *_ = np.linalg.lstsq(X, y, rcond=None)                   # a linear fit of the labels
    score = X @ w
    assert score[y > 0].min() < score[y < 0].max()


def test_breast_cancer_split_and_standardization():
    (Xv, yv), (X, y) = datasets.breast_cancer(0, val_fraction=0.5)
    assert Xv.shape == (284, 30) and X.shape == (285, 30) and yv.shape == (284,)
    assert set(np.unique(np.asarray(y))) == {-1.0, 1.0}
    np.testing.assert_allclose(np.asarray(X).mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(X).std(axis=0), 1.0, atol=1e-12)
    assert np.abs(np.asarray(Xv).mean(axis=0)).max() < 0.5     # validation: train statistics
    (Xv2, _), (X2, _) = datasets.breast_cancer(0, val_fraction=0.5)
    np.testing.assert_array_equal(np.asarray(X), np.asarray(X2))
    (_, _), (X3, _) = datasets.breast_cancer(1, val_fraction=0.5)
    assert not np.array_equal(np.asarray(X), np.asarray(X3))
    (Xv4, _), (X4, _) = datasets.breast_cancer(0, val_fraction=0.25, dtype=jnp.float32)
    assert Xv4.shape[0] == 142 and X4.shape[0] == 427 and X4.dtype == jnp.float32
    with pytest.raises(ValueError):
        datasets.breast_cancer(0, val_fraction=1.0)


def test_to_pm1():
    np.testing.assert_array_equal(datasets.to_pm1([0, 1, 1, 0]), [-1, 1, 1, -1])
    np.testing.assert_array_equal(datasets.to_pm1([2, 1]), [1, -1])
    with pytest.raises(ValueError):
        datasets.to_pm1([0, 1, 2])

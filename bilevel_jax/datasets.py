"""Data sets for the experiments: libsvm files, IJCNN1 (or an IJCNN1-shaped generator), the
breast-cancer data embedded in scikit-learn, and IDX files (Fashion-MNIST from Debian's
`dataset-fashion-mnist` package or a folder in `$BILEVEL_JAX_FASHION_MNIST`).

Every loader returns `data = (upper_data, lower_data)` with `upper_data = (X_val, y_val)` (the
validation set of the upper level) and `lower_data = (X_train, y_train)` (the training set of the
lower level): `X` of shape `(n, d)`, `y` of shape `(n,)` with values in {-1, +1} for binary tasks.
Arrays are `jax.Array`s of the requested floating `dtype`; `dtype=None` gives JAX's default float
(float64 when `jax_enable_x64` is on, float32 otherwise).

scikit-learn is an optional dependency (`pip install bilevel_jax[experiments]`), imported only by
the loaders that need it (`load_libsvm`, `breast_cancer`, and `ijcnn1` when it reads files).
"""
from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
XY = Tuple[Array, Array]

IJCNN1_ENV = "BILEVEL_JAX_IJCNN1"
IJCNN1_SHAPE = {"n_train": 49_990, "n_val": 91_701, "n_features": 22}
SYNTHETIC_IJCNN1 = "synthetic IJCNN1-shaped data"


class LoadedData(NamedTuple):
    """A data pair and where it came from.

    data: `(upper_data, lower_data)` = `((X_val, y_val), (X_train, y_train))`.
    source: a human-readable description for logs and figure titles, e.g. "IJCNN1 (libsvm files
      in /data/ijcnn1)" or "synthetic IJCNN1-shaped data (ijcnn1_like, seed 0)".
    synthetic: True when the data come from a generator rather than the real files.
    """

    data: Tuple[XY, XY]
    source: str
    synthetic: bool


# --------------------------------------------------------------------------------------------------
# small pure helpers

def _sklearn_datasets():
    try:
        import sklearn.datasets as skd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this loader needs scikit-learn, an optional dependency of bilevel_jax: "
            "`pip install bilevel_jax[experiments]` (or `pip install scikit-learn`)."
        ) from e
    return skd


def resolve_dtype(dtype=None):
    """The floating dtype to build arrays with: `None` -> JAX's default float.

    Raises a ValueError for non-floating dtypes, and for float64 while `jax_enable_x64` is off
    (JAX would otherwise silently truncate to float32).
    """
    if dtype is None:
        return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (float32 or float64), got {dtype}.")
    if dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first "
            "(or ask for dtype=jnp.float32)."
        )
    return dtype


def to_pm1(y) -> np.ndarray:
    """Binary labels (any two distinct values, e.g. {0, 1} or {-1, 1}) -> {-1., +1.}: the smaller
    value becomes -1. A single class is kept as +-1 if it already is; more than two is an error."""
    y = np.asarray(y, dtype=np.float64)
    values = np.unique(y)
    if values.size > 2:
        raise ValueError(f"expected binary labels, got {values.size} classes: {values[:10]}.")
    if values.size == 2:
        return np.where(y == values[1], 1.0, -1.0)
    if values.size == 1 and values[0] not in (-1.0, 1.0):
        raise ValueError(f"a single label value {values[0]} cannot be mapped to {{-1, +1}}.")
    return y


def _as_jax(X, y, dtype) -> XY:
    return jnp.asarray(X, dtype=dtype), jnp.asarray(y, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# libsvm files

def load_libsvm(path, n_features: Optional[int] = None, *, zero_based="auto", dtype=None) -> XY:
    """Read a libsvm/svmlight file (plain, `.bz2` or `.gz`) into dense arrays.

    Args:
      path: the file (scikit-learn decompresses `.bz2`/`.gz` from the file name).
      n_features: number of columns d (default: the largest index in the file). Give it when
        several files must share a width (train and test files).
      zero_based: whether indices start at 0 (libsvm files are 1-based); "auto" guesses.
      dtype: floating dtype of the outputs (None: JAX's default float).

    Returns:
      `(X, y)`: X of shape `(n, d)`, y of shape `(n,)` with the labels as stored in the file.
    """
    dtype = resolve_dtype(dtype)
    return _as_jax(*_read_libsvm(path, n_features, zero_based), dtype)


def _read_libsvm(path, n_features, zero_based):
    """Dense float64 numpy `(X, y)` from a libsvm file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no libsvm file at {path!r}.")
    skd = _sklearn_datasets()
    X, y = skd.load_svmlight_file(path, n_features=n_features, zero_based=zero_based,
                                  dtype=np.float64)
    return X.toarray(), np.asarray(y, np.float64)


# --------------------------------------------------------------------------------------------------
# IJCNN1

def _find_file(directory: str, name: str) -> Optional[str]:
    for candidate in (name, name + ".bz2", name + ".gz"):
        full = os.path.join(directory, candidate)
        if os.path.isfile(full):
            return full
    return None


def ijcnn1_files(path=None) -> Optional[Tuple[str, str]]:
    """`(train_file, test_file)` found in `path` (default: `$BILEVEL_JAX_IJCNN1`), or None.

    Looks for `ijcnn1` and `ijcnn1.t`, each possibly with a `.bz2`/`.gz` suffix (the names of the
    LIBSVM data page). `path` may also be the training file itself.
    """
    path = os.environ.get(IJCNN1_ENV) if path is None else os.fspath(path)
    if not path:
        return None
    directory = os.path.dirname(path) if os.path.isfile(path) else path
    train, test = _find_file(directory, "ijcnn1"), _find_file(directory, "ijcnn1.t")
    return (train, test) if train is not None and test is not None else None


def ijcnn1_like(key=0, n_train: int = IJCNN1_SHAPE["n_train"], n_val: int = IJCNN1_SHAPE["n_val"],
                *, positive_fraction: float = 0.1, dtype=None) -> Tuple[XY, XY]:
    """A deterministic IJCNN1-shaped binary data set (a stand-in when the files are missing).

    22 features like the libsvm IJCNN1 files: 10 one-hot indicators of a categorical variable
    followed by 12 correlated continuous features in (-1, 1). Labels come from one ground truth
    shared by both splits: a mostly linear score (plus a small interaction term) and logistic
    noise, so the classes overlap (not separable: a linear classifier reaches about 92% accuracy
    against a 90% majority class); the threshold is the (1 - positive_fraction) quantile of the
    training scores, so about `positive_fraction` (default 10%) of the labels are +1.

    Drawn with NumPy's `RandomState`, whose streams are frozen: the same seed gives the same data
    on every platform and NumPy version, with or without `jax_enable_x64`, and no compilation.

    Args:
      key: an int seed or a JAX PRNG key; the ground truth depends only on it, and each split
        only on it and its own size.
      n_train, n_val: sizes of the training (lower) and validation (upper) sets; the defaults are
        IJCNN1's 49,990 and 91,701.
      positive_fraction: share of +1 labels, in (0, 1).
      dtype: floating dtype (None: JAX's default float).

    Returns:
      `((X_val, y_val), (X_train, y_train))`, X of shape `(n, 22)`, y in {-1, +1}.
    """
    dtype = resolve_dtype(dtype)
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}.")
    if not 0.0 < positive_fraction < 1.0:
        raise ValueError(f"positive_fraction must lie in (0, 1), got {positive_fraction!r}.")
    seed = _seed_words(key)
    truth = _ijcnn1_truth(np.random.RandomState(seed + [0]))
    X, s = _ijcnn1_sample(np.random.RandomState(seed + [1]), int(n_train), truth)
    Xv, sv = _ijcnn1_sample(np.random.RandomState(seed + [2]), int(n_val), truth)
    threshold = np.quantile(s, 1.0 - positive_fraction)
    y, yv = np.where(s > threshold, 1.0, -1.0), np.where(sv > threshold, 1.0, -1.0)
    return _as_jax(Xv, yv, dtype), _as_jax(X, y, dtype)


_N_CAT, _N_CONT = 10, 12
_SIGNAL = 7.5   # weight of the linear part against the unit logistic noise (~92% linear accuracy)


def _seed_words(key) -> list:
    """An int seed or a JAX PRNG key -> a list of uint32 words for `RandomState`."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if key < 0:
            raise ValueError(f"seed must be >= 0, got {key}.")
        return [int(key) & 0xFFFFFFFF, int(key) >> 32]
    try:
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        words = np.asarray(data, dtype=np.uint32).ravel()
    except (AttributeError, TypeError) as e:
        raise TypeError(f"key must be an int seed or a JAX PRNG key, got {type(key).__name__}.") from e
    return [int(w) for w in words]


def _ijcnn1_truth(rs: np.random.RandomState):
    """The fixed ground truth: category frequencies and effects, feature mixing and weights."""
    cat_logits = 0.5 * rs.standard_normal(_N_CAT)                # unequal category frequencies
    cat_probs = np.exp(cat_logits) / np.exp(cat_logits).sum()
    cat_effect = 0.7 * rs.standard_normal(_N_CAT)
    mixing = rs.standard_normal((_N_CONT, _N_CONT)) / np.sqrt(_N_CONT) + np.eye(_N_CONT)
    relevant = np.arange(_N_CONT) % 3 != 2                       # a third of the features are noise
    weights = 1.5 * rs.standard_normal(_N_CONT) * relevant
    scales = rs.uniform(0.3, 1.0, _N_CONT)
    return cat_probs, cat_effect, mixing, weights, scales


def _ijcnn1_sample(rs: np.random.RandomState, n: int, truth):
    """n rows `[one-hot(10), continuous(12)]` (float64 numpy) and their noisy scores."""
    cat_probs, cat_effect, mixing, weights, scales = truth
    cat = rs.choice(_N_CAT, size=n, p=cat_probs)
    onehot = np.eye(_N_CAT)[cat]
    z = rs.standard_normal((n, _N_CONT)) @ mixing.T / np.sqrt(2.0)
    cont = np.tanh(scales * z)                                    # in (-1, 1), like scaled libsvm data
    score = (cat_effect[cat] + _SIGNAL * cont @ weights / np.sqrt(_N_CONT)
             + 1.5 * cont[:, 0] * cont[:, 1]                       # a mild non-linearity
             + rs.logistic(size=n))                                # overlap between the classes
    return np.concatenate([onehot, cont], axis=1), score


def ijcnn1(path=None, *, key=0, n_train: int = IJCNN1_SHAPE["n_train"],
           n_val: int = IJCNN1_SHAPE["n_val"], dtype=None, allow_synthetic: bool = True) -> LoadedData:
    """The IJCNN1 hyperparameter-selection data of the SOBA/SABA experiments (Dagreou et al. 2022, arXiv:2201.13409).

    Training file `ijcnn1` (49,990 x 22) is the LOWER (train) data; test file `ijcnn1.t`
    (91,701 x 22) is the UPPER (validation) data; labels in {-1, +1}; features as in the files
    (already scaled by LIBSVM). The files (plain, `.bz2` or `.gz`) are looked up in `path`, else in
    the directory named by the environment variable `BILEVEL_JAX_IJCNN1`.

    If they are not found, the data come from `ijcnn1_like(key, n_train, n_val)` (a deterministic
    IJCNN1-shaped generator) and `source` says "synthetic IJCNN1-shaped data"; a warning is issued
    when a path was given but holds no files. `n_train`/`n_val` only size the synthetic data.

    Returns:
      `LoadedData(data, source, synthetic)` with `data = ((X_val, y_val), (X_train, y_train))`.
    """
    given = path if path is not None else os.environ.get(IJCNN1_ENV)
    files = ijcnn1_files(path)
    if files is not None:
        train_file, test_file = files
        dtype = resolve_dtype(dtype)
        d = IJCNN1_SHAPE["n_features"]
        X, y = _read_libsvm(train_file, d, zero_based=False)
        Xv, yv = _read_libsvm(test_file, d, zero_based=False)
        lower, upper = _as_jax(X, to_pm1(y), dtype), _as_jax(Xv, to_pm1(yv), dtype)
        where = os.path.dirname(os.path.abspath(train_file))
        return LoadedData((upper, lower), f"IJCNN1 (libsvm files in {where})", False)
    if not allow_synthetic:
        raise FileNotFoundError(
            f"IJCNN1 files `ijcnn1` and `ijcnn1.t` (optionally .bz2) not found in {given!r}; "
            f"download them from the LIBSVM data page and pass path= or set ${IJCNN1_ENV}."
        )
    if given:
        warnings.warn(f"IJCNN1 files not found in {given!r}: using {SYNTHETIC_IJCNN1} instead.",
                      stacklevel=2)
    seed = f"seed {int(key)}" if isinstance(key, (int, np.integer)) else "given key"
    data = ijcnn1_like(key, n_train, n_val, dtype=dtype)
    return LoadedData(data, f"{SYNTHETIC_IJCNN1} (ijcnn1_like, {seed})", True)


# --------------------------------------------------------------------------------------------------
# breast cancer (embedded in scikit-learn: no download)

def breast_cancer(key=0, val_fraction: float = 0.5, *, dtype=None) -> Tuple[XY, XY]:
    """The Wisconsin breast-cancer data shipped with scikit-learn (569 x 30, binary).

    Rows are shuffled by `key` (an int seed or a JAX PRNG key; NumPy's frozen `RandomState`
    stream, so the split is the same everywhere) and split deterministically into a
    validation (upper) part of `round(val_fraction * 569)` rows and a training (lower) part;
    features are standardised with the training mean and standard deviation. Labels: +1 benign,
    -1 malignant.

    Returns:
      `((X_val, y_val), (X_train, y_train))`, X of shape `(n, 30)`.
    """
    dtype = resolve_dtype(dtype)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}.")
    X, y = _sklearn_datasets().load_breast_cancer(return_X_y=True)
    n = X.shape[0]
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val <= n - 2:
        raise ValueError(f"val_fraction={val_fraction} leaves an empty or one-row split of {n} rows.")
    perm = np.random.RandomState(_seed_words(key)).permutation(n)
    X, y = X[perm], to_pm1(y)[perm]
    X_val, y_val, X_tr, y_tr = X[:n_val], y[:n_val], X[n_val:], y[n_val:]
    X_tr, X_val = standardize(X_tr, X_val)
    return _as_jax(X_val, y_val, dtype), _as_jax(X_tr, y_tr, dtype)


def standardize(X_train, *others):
    """Centre and scale columns with the training mean and std (constant columns: scale 1).
    Returns `(X_train', *others')` as float64 numpy arrays."""
    X_train = np.asarray(X_train, np.float64)
    mean, std = X_train.mean(axis=0), X_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return tuple((np.asarray(X, np.float64) - mean) / std for X in (X_train, *others))


__all__ = [
    "IJCNN1_ENV", "IJCNN1_SHAPE", "LoadedData", "SYNTHETIC_IJCNN1", "breast_cancer", "ijcnn1",
    "ijcnn1_files", "ijcnn1_like", "load_libsvm", "resolve_dtype", "standardize", "to_pm1",
]


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

FASHION_MNIST_ENV = "BILEVEL_JAX_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzip-compressed) as a NumPy array.

    Layout: two zero bytes, a type code, the number of dimensions d, d big-endian uint32 sizes,
    then the data in C order. Raises ValueError on a malformed file (bad magic, truncated data).
    """
    import gzip

    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4]!r}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes), the file holds "
                         f"{len(raw) - header} bytes of data.")
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_dir(path=None) -> Optional[str]:
    """The folder holding the Fashion-MNIST IDX files: `path`, else `$BILEVEL_JAX_FASHION_MNIST`,
    else Debian's `/usr/share/datasets/fashion-mnist` (package `dataset-fashion-mnist`); None
    when none of them has the files."""
    for candidate in (path, os.environ.get(FASHION_MNIST_ENV), FASHION_MNIST_DIR):
        if candidate and all(_find_file(candidate, name) for pair in FASHION_MNIST_FILES.values() for name in pair):
            return candidate
    return None


def fashion_mnist(path=None, split: str = "train"):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747) images and labels of `split`
    ("train": 60000, "test": 10000) as NumPy arrays: images (n, 28, 28) uint8, labels (n,) uint8.

    Reads the IDX files (gz or not) from `fashion_mnist_dir(path)`; raises FileNotFoundError
    saying how to get them when they are missing."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(FASHION_MNIST_FILES)}, got {split!r}.")
    folder = fashion_mnist_dir(path)
    if folder is None:
        raise FileNotFoundError(
            "Fashion-MNIST IDX files not found (looked in "
            f"{', '.join(p for p in (str(path) if path else None, os.environ.get(FASHION_MNIST_ENV), FASHION_MNIST_DIR) if p)}). "
            "Install Debian's package as root: `apt-get install -y dataset-fashion-mnist`, or point "
            f"${FASHION_MNIST_ENV} at a folder with {', '.join(FASHION_MNIST_FILES['train'])} (.gz or not).")
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = load_idx(_find_file(folder, images_name))
    labels = load_idx(_find_file(folder, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match.")
    return images, labels

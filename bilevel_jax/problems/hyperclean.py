"""Data hyper-cleaning: learn one weight per training sample so that a classifier trained on
corrupted labels does well on clean validation data.

Franceschi, Frasconi, Salzo, Grazzi, Pontil, "Bilevel Programming for Hyperparameter
Optimization and Meta-Learning", ICML 2018, arXiv:1806.04910 (the problem); the setting here is
the one of Yang, Gao, Yuan, "Tackling the Hessian-Inverse Approximations in Bilevel
Optimization via Subspace Techniques" (SubBiO/LancBiO), ICLR 2025, arXiv:2404.03331, section 4:

    f_lower(lambda, W; D_tr)  = 1/|D_tr| sum_{i in D_tr} sigmoid(lambda_i) CE(W x_i, y~_i) + reg ||W||^2
    f_upper(lambda, W; D_val) = 1/|D_val| sum_{j in D_val} CE(W x_j, y_j)

theta = lambda in R^{n_train} (one logit per training sample, start 0: every weight 1/2), phi = W
the 10 x 785 weights of a linear classifier on the 784 pixels and a constant 1 (or an equinox MLP,
`model="mlp"`), reg = 0.01, y~ the corrupted training labels (a fraction p of them replaced by
(y + U{1, ..., 9}) mod 10, so every corrupted label is wrong), CE the softmax cross-entropy.
The lower level is 2 reg-strongly convex for the linear model (softmax CE is convex in W).

grad_theta f_upper = 0, so the hypergradient is only the implicit term: with
v = A^{-1} grad_W f_upper(W*) (the bilevel_jax sign convention, A = grad^2_WW f_lower),

    d h / d lambda_i = -(1/n) sigmoid'(lambda_i) <grad_W CE_i(W*), v>.

The lower data carry the sample index (`(X, y~, index)`), so a minibatch of the lower level reads
its own lambda_i: minibatch algorithms work unchanged.

Reference evaluators (dense; for the small problems of the tests): `phi_star` (Newton with the
dense LL Hessian), `implicit_grad` (the formula above with a dense solve). Metrics for the
figures: `accuracy`, `loss`, `residual` (||A v - b|| matrix-free), `downweighted` (the share of
corrupted samples whose weight sigmoid(lambda_i) went below 1/2).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type

REG = 0.01
FASHION_NORMALIZATION = (0.5, 0.5)     # (mean, std) of pixels in [0, 1], as the LancBiO code


def logits(phi, X):
    """Class scores of the model phi on rows X: `X @ W'` for a weight matrix, `vmap(phi)(X)` for an
    equinox model."""
    if isinstance(phi, eqx.Module):
        return jax.vmap(phi)(X)
    return X @ phi.T


def cross_entropy(phi, X, y):
    """Per-sample softmax cross-entropy, shape `(n,)` (y integer labels)."""
    z = logits(phi, X)
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _sq_norm(phi):
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(eqx.filter(phi, eqx.is_inexact_array)))


def make_problem(reg: float = REG) -> BilevelProblem:
    """The hyper-cleaning `BilevelProblem` with LL regularisation `reg ||W||^2` (all float leaves of
    phi). Upper data `(X_val, y_val)`, lower data `(X_train, y_train_corrupted, index)`."""
    reg = float(reg)
    if not reg >= 0.0:
        raise ValueError(f"reg must be >= 0, got {reg}.")

    def f_lower(theta, phi, batch):
        X, y, idx = batch
        w = jax.nn.sigmoid(theta[idx])
        return jnp.mean(w * cross_entropy(phi, X, y)) + reg * _sq_norm(phi)

    def f_upper(theta, phi, batch):
        del theta
        X, y = batch
        return jnp.mean(cross_entropy(phi, X, y))

    return BilevelProblem(f_upper, f_lower)


# --------------------------------------------------------------------------------------------------
# data

def features(images, normalization=FASHION_NORMALIZATION, dtype=jnp.float64) -> np.ndarray:
    """Rows `(n, pixels + 1)`: images scaled to [0, 1] (uint8 / 255), standardised by
    `normalization = (mean, std)`, flattened, with a constant 1 appended (the bias)."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    mean, std = normalization
    x = ((x - mean) / std).reshape(x.shape[0], -1)
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(dtype)


def corrupt_labels(labels, fraction: float, key, num_classes: int = 10):
    """`(noisy_labels, corrupted_mask)`: exactly round(fraction * n) samples, chosen uniformly,
    get (y + U{1, ..., num_classes - 1}) mod num_classes, so every corrupted label is wrong."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corruption must lie in [0, 1], got {fraction}.")
    labels = np.asarray(labels).astype(np.int64)
    n = labels.shape[0]
    k_pick, k_shift = jax.random.split(key)
    chosen = np.asarray(jax.random.permutation(k_pick, n))[: int(round(fraction * n))]
    mask = np.zeros(n, bool)
    mask[chosen] = True
    shift = np.asarray(jax.random.randint(k_shift, (n,), 1, num_classes))
    return np.where(mask, (labels + shift) % num_classes, labels), mask


# --------------------------------------------------------------------------------------------------
# reference evaluators and metrics

def accuracy(phi, batch):
    """Share of rows of `batch = (X, y, ...)` whose argmax class is y."""
    X, y = batch[0], batch[1]
    return jnp.mean((jnp.argmax(logits(phi, X), axis=-1) == y).astype(X.dtype))


def loss(phi, batch):
    """Mean cross-entropy of phi on `batch = (X, y, ...)`."""
    return jnp.mean(cross_entropy(phi, batch[0], batch[1]))


def residual(problem: BilevelProblem, theta, phi, v, data):
    """||A v - b|| with A = grad^2_WW f_lower and b = grad_W f_upper at (theta, phi) on the full
    data (one HVP, matrix-free): the residual of the linear system that v approximates."""
    av = oracles.hvp(problem, theta, phi, v, data[1])
    b = oracles.upper_grads(problem, theta, phi, data[0])[1]
    diff = jax.tree_util.tree_map(lambda a, c: a - c, av, b)
    return jnp.sqrt(_sq_norm(diff))


def downweighted(theta, corrupted):
    """`(share of corrupted samples with sigmoid(lambda_i) < 1/2, share of clean samples with
    sigmoid(lambda_i) >= 1/2)`."""
    low = theta < 0.0
    corrupted = jnp.asarray(corrupted, bool)
    frac_bad = jnp.sum(low & corrupted) / jnp.maximum(jnp.sum(corrupted), 1)
    frac_good = jnp.sum(~low & ~corrupted) / jnp.maximum(jnp.sum(~corrupted), 1)
    return frac_bad, frac_good


def _flat_lower(problem, theta, data, phi_like):
    flat, unravel = ravel_pytree(phi_like)
    return (lambda w: problem.f_lower(theta, unravel(w), data[1])), flat, unravel


@functools.partial(jax.jit, static_argnums=(0, 4))
def _newton(problem, theta, data, phi0, steps):
    f, w, unravel = _flat_lower(problem, theta, data, phi0)

    def step(w, _):
        g, H = jax.grad(f)(w), jax.hessian(f)(w)
        return w - jnp.linalg.solve(H, g), None

    w, _ = jax.lax.scan(step, w, None, length=steps)
    return unravel(w)


def phi_star(problem: BilevelProblem, theta, data, phi0, steps: int = 20):
    """W*(lambda) by `steps` Newton steps with the dense LL Hessian from phi0 (a reference for
    small problems: the Hessian is d_phi x d_phi). The linear model's LL is strongly convex and
    smooth; for the default sizes Newton from zero converges in a few steps."""
    check_positive_int("steps", steps)
    return _newton(problem, theta, data, phi0, steps)


def implicit_grad(problem: BilevelProblem, theta, phi, data):
    """grad h(lambda) at the LL solution phi = W*(lambda), dense:
    `-J' A^{-1} grad_W f_upper` with A and J = grad^2_{lambda W} f_lower formed explicitly."""
    f, w, unravel = _flat_lower(problem, theta, data, phi)
    b = ravel_pytree(oracles.upper_grads(problem, theta, phi, data[0])[1])[0]
    A = jax.hessian(f)(w)
    v = jnp.linalg.solve(A, b)
    J = jax.jacobian(lambda t: jax.grad(lambda ww: problem.f_lower(t, unravel(ww), data[1]))(w))(theta)
    return -J.T @ v


# --------------------------------------------------------------------------------------------------
# the bundle

@instance_type
class HyperCleaning(Instance):
    """The problem, its data `((X_val, y_val), (X_train, y_noisy, index))`, a start point, the
    held-out test set `(X_test, y_test)`, the corruption mask and the clean training labels."""

    test: tuple
    corrupted: Any            # (n_train,) bool: which training labels were changed
    clean_labels: Any         # (n_train,) int

    def test_accuracy(self, phi):
        return accuracy(phi, self.test)

    def test_loss(self, phi):
        return loss(phi, self.test)

    def downweighted(self, theta):
        """(share of corrupted samples with weight < 1/2, share of clean samples with weight >= 1/2)."""
        return downweighted(theta, self.corrupted)

    def residual(self, theta, phi, v):
        return residual(self.problem, theta, phi, v, self.data)

    def phi_star(self, theta, steps: int = 20):
        return phi_star(self.problem, theta, self.data, jax.tree_util.tree_map(jnp.zeros_like, self.phi0), steps)

    def value(self, theta, steps: int = 20):
        """h(lambda) = f_upper(W*(lambda)) with the dense Newton reference (small problems)."""
        return self.problem.f_upper(theta, self.phi_star(theta, steps), self.data[0])

    def grad(self, theta, steps: int = 20):
        """grad h(lambda) by the dense implicit formula at the Newton W*(lambda) (small problems)."""
        return implicit_grad(self.problem, theta, self.phi_star(theta, steps), self.data)


MODELS = ("linear", "mlp")


def hyper_cleaning(train, val, test, corruption: float, key=0, *, model: str = "linear", hidden: int = 64,
                   depth: int = 1, reg: float = REG, num_classes: int = 10,
                   normalization=FASHION_NORMALIZATION, dtype=jnp.float64, source: str = "") -> HyperCleaning:
    """Hyper-cleaning on given splits `(images, labels)` (images uint8 `(n, ...)` or floats).

    Args:
      train, val, test: `(images, labels)` pairs; only the training labels are corrupted.
      corruption: the fraction p of training labels made wrong (`corrupt_labels`).
      key: PRNG key or int: the corruption and the model's initialisation.
      model: "linear" (W of shape (num_classes, pixels + 1), Kaiming-normal start) or "mlp" (an
        `eqx.nn.MLP` with `depth` hidden layers of `hidden` units, tanh; its LL is not convex).
      reg: the LL regularisation reg ||W||^2 (0.01 in the paper).
      normalization: (mean, std) applied to pixels in [0, 1] (Fashion-MNIST: (0.5, 0.5)).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    k_noise, k_model = jax.random.split(key)
    (Xtr, ytr), (Xv, yv), (Xte, yte) = ((features(x, normalization, dtype), np.asarray(y).astype(np.int32))
                                        for x, y in (train, val, test))
    for name, y in (("train", ytr), ("val", yv), ("test", yte)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}.")
    noisy, mask = corrupt_labels(ytr, corruption, k_noise, num_classes)
    n, d = Xtr.shape
    if model == "linear":
        phi0 = jax.random.normal(k_model, (num_classes, d), dtype) * jnp.sqrt(2.0 / d)
    else:
        check_positive_int("hidden", hidden)
        check_positive_int("depth", depth)
        phi0 = eqx.nn.MLP(d, num_classes, hidden, depth, activation=jnp.tanh, key=k_model, dtype=dtype)
    data = ((jnp.asarray(Xv), jnp.asarray(yv)),
            (jnp.asarray(Xtr), jnp.asarray(noisy.astype(np.int32)), jnp.arange(n, dtype=jnp.int32)))
    desc = (f"data hyper-cleaning{' on ' + source if source else ''}: n_train={n}, n_val={Xv.shape[0]}, "
            f"n_test={Xte.shape[0]}, corruption p={corruption:g}, {model} model, reg={reg:g}")
    return HyperCleaning(make_problem(reg), data, jnp.zeros(n, dtype), phi0, (jnp.asarray(Xte), jnp.asarray(yte)),
                         jnp.asarray(mask), jnp.asarray(ytr), name="hyper_cleaning", description=desc)


VAL_SPLITS = ("train", "test")


def fashion_mnist_hyper_cleaning(corruption: float = 0.5, key=0, *, n_train: int = 5000, n_val: int = 5000,
                                 n_test: int = 10000, path: Optional[str] = None, val_split: str = "train",
                                 **kwargs) -> HyperCleaning:
    """Hyper-cleaning on Fashion-MNIST (Xiao, Rasul, Vollgraf 2017, arXiv:1708.07747) with the split
    of the LancBiO experiments: the first `n_train` images of the training split (labels
    corrupted), `n_val` validation images drawn at random from the other training images (the
    LancBiO code draws them from all 60000, so they may overlap the training set; here they are
    disjoint from it), the first `n_test` images of the test split. Pixels normalised with
    (0.5, 0.5). `kwargs` go to `hyper_cleaning` (model, reg, ...). Reads the IDX files with
    `bj.datasets.fashion_mnist(path)` (FileNotFoundError saying how to install them).

    `val_split="test"` draws the `n_val` validation images at random from the test split instead
    and tests on the first `n_test` of the other test images (n_val + n_test <= 10000), so that
    `n_train = 60000` trains on the whole training split."""
    from bilevel_jax import datasets
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_positive_int(name, value)
    if val_split not in VAL_SPLITS:
        raise ValueError(f"val_split must be one of {VAL_SPLITS}, got {val_split!r}.")
    images, labels = datasets.fashion_mnist(path, "train")
    test_images, test_labels = datasets.fashion_mnist(path, "test")
    from_train = n_val if val_split == "train" else 0
    if n_train + from_train > images.shape[0] or n_test + n_val - from_train > test_images.shape[0]:
        raise ValueError(f"n_train = {n_train}, n_val = {n_val} (from the {val_split} split) and n_test = {n_test} "
                         f"exceed the {images.shape[0]} training / {test_images.shape[0]} test images.")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    k_val, k_rest = jax.random.split(key)
    if val_split == "train":
        rest = n_train + np.asarray(jax.random.permutation(k_val, images.shape[0] - n_train))[:n_val]
        val, test = (images[rest], labels[rest]), (test_images[:n_test], test_labels[:n_test])
    else:
        order = np.asarray(jax.random.permutation(k_val, test_images.shape[0]))
        held, rest = order[:n_val], np.sort(order[n_val:])[:n_test]
        val, test = (test_images[held], test_labels[held]), (test_images[rest], test_labels[rest])
    return hyper_cleaning((images[:n_train], labels[:n_train]), val, test, corruption, k_rest,
                          source="Fashion-MNIST", **kwargs)


__all__ = ["FASHION_NORMALIZATION", "HyperCleaning", "MODELS", "REG", "VAL_SPLITS", "accuracy", "corrupt_labels",
           "cross_entropy", "downweighted", "fashion_mnist_hyper_cleaning", "features", "hyper_cleaning", "implicit_grad", "logits",
           "loss", "make_problem", "phi_star", "residual"]

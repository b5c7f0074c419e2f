"""Data subset selection: weights on the training samples under a budget on their sum.

Borsos, Mutny, Krause, "Coresets via Bilevel Optimization for Continual Learning and Streaming",
NeurIPS 2020, arXiv:2006.03875; Killamsetty, Sivasubramanian, Ramakrishnan, Iyer, "GLISTER:
Generalization based Data Subset Selection for Efficient and Robust Learning", AAAI 2021,
arXiv:2012.10630. As in hyper-cleaning, the upper level weighs training samples, but here the
weights themselves are the variable, in the capped simplex of the budget k:

    Theta = {w in [0, 1]^n : sum_i w_i <= k}
    f_lower(w, W; D_tr)  = 1/k sum_i w_i CE(W x_i, y_i) + reg ||W||^2
    f_upper(w, W; D_val) = 1/m sum_j CE(W x_j, y_j)

(a linear classifier W on the features and a constant 1; the LL is 2 reg-strongly convex). The
projection onto Theta (`project_budget`) is clip(w - tau, 0, 1) with tau = 0 when the clipped
weights fit the budget, else the tau >= 0 where they sum to k, found by bisection (a fixed number
of halvings, jit-friendly). `select(w, k)` rounds to the k samples of largest weight.

The lower data carry the sample index `(X, y, index)`, so minibatches read their own w_i.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bilevel_jax._checks import check_positive_int
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type, static


def project_budget(w, budget: float, iterations: int = 60):
    """Euclidean projection of w onto {0 <= w_i <= 1, sum_i w_i <= budget}."""
    budget = jnp.asarray(budget, w.dtype)
    clipped = jnp.clip(w, 0.0, 1.0)

    def total(tau):
        return jnp.sum(jnp.clip(w - tau, 0.0, 1.0))

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        over = total(mid) > budget
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros((), w.dtype), jnp.maximum(jnp.max(w), 0.0)))
    return jnp.where(jnp.sum(clipped) <= budget, clipped, jnp.clip(w - hi, 0.0, 1.0))


def _ce(W, X, y):
    z = X @ W.T
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


def make_problem(budget: float, reg: float = 0.01) -> BilevelProblem:
    """The subset-selection `BilevelProblem` (module docstring) with the budget projection."""
    budget, reg = float(budget), float(reg)
    if not budget > 0.0:
        raise ValueError(f"budget must be > 0, got {budget}.")
    if not reg > 0.0:
        raise ValueError(f"reg must be > 0 (the LL's strong convexity), got {reg}.")

    def f_lower(w, W, batch):
        X, y, idx = batch
        n_total = w.shape[0]
        # a minibatch of b rows estimates the sum over all n rows by n/b times its sum
        return jnp.sum(w[idx] * _ce(W, X, y)) * (n_total / X.shape[0]) / budget + reg * jnp.sum(W ** 2)

    def f_upper(w, W, batch):
        del w
        X, y = batch
        return jnp.mean(_ce(W, X, y))

    return BilevelProblem(f_upper, f_lower, project_upper=lambda w: project_budget(w, budget))


def select(w, k: int):
    """Indices of the k largest weights (the selected subset)."""
    check_positive_int("k", k)
    return jnp.argsort(-w)[:k]


@instance_type
class SubsetSelection(Instance):
    """Data `((X_val, y_val), (X_train, y_train, index))`, start w0 = budget / n on every sample and
    W0 = 0, the budget k."""

    budget: float = static()

    def accuracy(self, W, batch):
        X, y = batch[0], batch[1]
        return jnp.mean((jnp.argmax(X @ W.T, axis=-1) == y).astype(X.dtype))

    def upper_value(self, W):
        return self.problem.f_upper(None, W, self.data[0])


def subset_selection(train, val, budget: int, *, reg: float = 0.01, num_classes: int = None) -> SubsetSelection:
    """The problem on features `train = (X, y)` (lower level) and `val = (X, y)` (upper level); a
    constant 1 is appended to X. Starts at the uniform weights budget / n and W = 0."""
    check_positive_int("budget", budget)
    add_one = lambda X: jnp.concatenate([jnp.asarray(X), jnp.ones((X.shape[0], 1), jnp.asarray(X).dtype)], axis=1)  # noqa: E731
    X, y = add_one(train[0]), jnp.asarray(train[1]).astype(jnp.int32)
    Xv, yv = add_one(val[0]), jnp.asarray(val[1]).astype(jnp.int32)
    n = X.shape[0]
    if budget > n:
        raise ValueError(f"budget {budget} exceeds the {n} training samples.")
    c = int(num_classes or int(max(y.max(), yv.max())) + 1)
    data = ((Xv, yv), (X, y, jnp.arange(n, dtype=jnp.int32)))
    return SubsetSelection(make_problem(budget, reg), data, jnp.full((n,), budget / n, X.dtype),
                           jnp.zeros((c, X.shape[1]), X.dtype), float(budget), name="subset_selection")


__all__ = ["SubsetSelection", "make_problem", "project_budget", "select", "subset_selection"]

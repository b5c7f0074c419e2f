"""Ridge-regression hyperparameter optimisation with a closed-form hypergradient.

    f_lower(theta, w; X, y) = 1/(2n) ||X w - y||^2 + 1/2 sum_k exp(theta_k) w_k^2
    f_upper(theta, w; Xv, yv) = 1/(2m) ||Xv w - yv||^2

theta is a scalar (one log-regularisation) or a vector (one per feature). With
A(theta) = X'X/n + diag(exp(theta)),  w*(theta) = A^{-1} X'y/n  and, by d w*/d theta_k =
-A^{-1} e_k exp(theta_k) w*_k,

    grad F(theta)_k = -exp(theta_k) w*_k (A^{-1} grad_w f_upper(w*))_k     (summed for scalar theta).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type


def _lower(theta, w, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(theta) * w ** 2)


def _upper(theta, w, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


RIDGE = BilevelProblem(_upper, _lower)


@instance_type
class RidgeHPO(Instance):
    """Ridge HPO with data `((X_val, y_val), (X_train, y_train))` and the closed forms."""

    def _system(self, theta):
        X, _ = self.data[1]
        return X.T @ X / X.shape[0] + jnp.diag(jnp.broadcast_to(jnp.exp(theta), (X.shape[1],)))

    def phi_star(self, theta):
        X, y = self.data[1]
        return jnp.linalg.solve(self._system(theta), X.T @ y / X.shape[0])

    def value(self, theta):
        return _upper(theta, self.phi_star(theta), self.data[0])

    def grad(self, theta):
        Xv, yv = self.data[0]
        w = self.phi_star(theta)
        b = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
        per_feature = -jnp.exp(theta) * w * jnp.linalg.solve(self._system(theta), b)
        return per_feature.sum() if jnp.ndim(theta) == 0 else per_feature


def ridge_hpo(key, n_train: int = 40, n_val: int = 40, dim: int = 8, per_feature: bool = False,
              noise: float = 0.5, dtype=jnp.float64) -> RidgeHPO:
    """A synthetic ridge HPO instance (a sparse true model, so regularisation helps)."""
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    w_true = jax.random.normal(k1, (dim,), dtype) * (jnp.arange(dim) < max(1, dim // 2))
    X = jax.random.normal(k2, (n_train, dim), dtype)
    Xv = jax.random.normal(k3, (n_val, dim), dtype)
    y = X @ w_true + noise * jax.random.normal(k4, (n_train,), dtype)
    yv = Xv @ w_true + noise * jax.random.normal(k5, (n_val,), dtype)
    theta0 = jnp.zeros((dim,) if per_feature else (), dtype)
    return RidgeHPO(RIDGE, ((Xv, yv), (X, y)), theta0, jnp.zeros(dim, dtype), name="ridge_hpo")

"""Model pruning as a bilevel problem: a relaxed mask on a model's weights.

Zhang, Yao, Ram, Zhao, Chen, Hong, Wang, Liu, "Advancing Model Pruning via Bi-level
Optimization", NeurIPS 2022, arXiv:2210.04092 (BiP); in the form:

    f_upper(theta, phi; D_val) = 1/m sum_j l(y_j, M_{theta (.) phi}(x_j)) + sparsity * mean(theta)
    f_lower(theta, phi; D_tr)  = 1/n sum_i l(y_i, M_{theta (.) phi}(x_i)) + rho ||phi||^2

phi is an equinox model (or any pytree the `apply` function accepts), theta a relaxed mask with
one entry in [0, 1] per entry of each weight matrix of phi (every 2-D float leaf; biases and
other leaves are not masked), kept in [0, 1] by projection (clip) after every UL step;
theta (.) phi multiplies each weight matrix by its mask. l is the softmax cross-entropy. With
`sparsity` > 0 the UL trades validation loss against the mean mask (an L1 penalty on the relaxed
mask; BiP instead projects onto a fixed number of non-zeros). For a linear model the LL is
2 rho-strongly convex in phi for every mask. `hard_mask(theta, keep)` rounds the relaxed mask
to the `keep` fraction of largest entries (the pruned model is `mask_model(phi, hard_mask)`).

theta is a tuple of arrays, one per masked matrix (in `jax.tree_util` leaf order of phi).
"""
from __future__ import annotations

from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type, static


def _masked_leaves(phi):
    return [x for x in jax.tree_util.tree_leaves(eqx.filter(phi, eqx.is_inexact_array)) if x.ndim == 2]


def mask_like(phi, value: float = 1.0) -> tuple:
    """A mask (tuple of arrays) for every weight matrix of phi, filled with `value`."""
    leaves = _masked_leaves(phi)
    if not leaves:
        raise ValueError("phi has no 2-D float leaf (weight matrix) to mask.")
    return tuple(jnp.full_like(x, value) for x in leaves)


def mask_model(phi, theta):
    """theta (.) phi: each weight matrix of phi multiplied by its mask, the other leaves as they are."""
    params, static = eqx.partition(phi, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    masks = iter(theta)
    leaves = [x * next(masks) if x.ndim == 2 else x for x in leaves]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)


def default_apply(model, X):
    """Logits of an equinox model (vmapped over rows) or of a weight matrix W (X @ W')."""
    return jax.vmap(model)(X) if isinstance(model, eqx.Module) else X @ model.T


def _ce(apply, model, batch):
    X, y = batch
    z = apply(model, X)
    return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None].astype(jnp.int32), axis=-1)[:, 0])


def project_mask(theta):
    """Euclidean projection onto [0, 1] for every mask entry."""
    return jax.tree_util.tree_map(lambda t: jnp.clip(t, 0.0, 1.0), theta)


def make_problem(rho: float = 1e-3, sparsity: float = 0.0, apply: Callable = default_apply) -> BilevelProblem:
    """The pruning `BilevelProblem` (module docstring) with the mask projection onto [0, 1]."""
    rho, sparsity = float(rho), float(sparsity)
    if not rho > 0.0:
        raise ValueError(f"rho must be > 0 (the LL's strong convexity), got {rho}.")
    if not sparsity >= 0.0:
        raise ValueError(f"sparsity must be >= 0, got {sparsity}.")

    def f_lower(theta, phi, batch):
        reg = sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(eqx.filter(phi, eqx.is_inexact_array)))
        return _ce(apply, mask_model(phi, theta), batch) + rho * reg

    def f_upper(theta, phi, batch):
        size = sum(t.size for t in theta)
        return _ce(apply, mask_model(phi, theta), batch) + sparsity * sum(jnp.sum(t) for t in theta) / size

    return BilevelProblem(f_upper, f_lower, project_upper=project_mask)


def hard_mask(theta, keep: float) -> tuple:
    """The 0/1 mask keeping the `keep` fraction (0 < keep <= 1) of largest relaxed mask entries
    over all matrices together."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}.")
    flat = jnp.concatenate([t.ravel() for t in theta])
    k = max(1, int(round(keep * flat.size)))
    threshold = jnp.sort(flat)[::-1][k - 1]
    return tuple((t >= threshold).astype(t.dtype) for t in theta)


@instance_type
class Pruning(Instance):
    """The problem, data `((X_val, y_val), (X_train, y_train))`, start (theta0, phi0), and the
    functions of the bundle."""

    apply: Callable = static(default_apply)

    def accuracy(self, theta, phi, batch):
        X, y = batch
        return jnp.mean((jnp.argmax(self.apply(mask_model(phi, theta), X), axis=-1) == y).astype(X.dtype))

    def upper_value(self, theta, phi):
        """f_upper at (theta, phi) on the whole validation set."""
        return self.problem.f_upper(theta, phi, self.data[0])


def pruning(model, train, val, *, rho: float = 1e-3, sparsity: float = 0.0, mask_init: float = 0.5,
            apply: Optional[Callable] = None) -> Pruning:
    """A pruning problem for `model` (an equinox model or a weight matrix) on `train = (X, y)` (the
    lower level) and `val = (X, y)` (the upper level); every mask entry starts at `mask_init`."""
    if not 0.0 <= mask_init <= 1.0:
        raise ValueError(f"mask_init must lie in [0, 1], got {mask_init}.")
    apply = default_apply if apply is None else apply
    problem = make_problem(rho, sparsity, apply)
    data = ((jnp.asarray(val[0]), jnp.asarray(val[1])), (jnp.asarray(train[0]), jnp.asarray(train[1])))
    return Pruning(problem, data, mask_like(model, mask_init), model, apply, name="pruning")


__all__ = ["Pruning", "default_apply", "hard_mask", "make_problem", "mask_like", "mask_model", "project_mask", "pruning"]

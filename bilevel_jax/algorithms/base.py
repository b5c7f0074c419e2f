"""`Algorithm(init, update)`: the interface of every bilevel algorithm (optax-style).

    state = alg.init(theta0, phi0, key, data=None)      # data only to size memories/check shapes
    state, step_info = alg.update(state, data)           # one outer iteration; pure, jittable

Every state exposes `theta`, `phi`, `count` (outer iterations done) and `key` (the run's root PRNG
key: per-step keys are derived with `fold_in(key, count)`, so the key never changes).
`step_info` carries the oracle calls of the step, so results can be plotted against oracle calls
as well as against time.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

PyTree = Any


class Algorithm(NamedTuple):
    init: Callable
    update: Callable


class OracleCounts(NamedTuple):
    """Oracle calls: gradients of f_lower / f_upper (one pass may give both partials), Hessian-
    vector products A v, and cross products J v (or J^T d)."""

    lower_grads: jax.Array
    upper_grads: jax.Array
    hvps: jax.Array
    cross: jax.Array

    @staticmethod
    def of(lower_grads=0, upper_grads=0, hvps=0, cross=0) -> "OracleCounts":
        return OracleCounts(*(jnp.asarray(c, jnp.int32) for c in (lower_grads, upper_grads, hvps, cross)))

    def __add__(self, other):  # type: ignore[override]
        return OracleCounts(*(a + b for a, b in zip(self, other)))

    def scale(self, k) -> "OracleCounts":
        return OracleCounts(*(a * k for a in self))


class StepInfo(NamedTuple):
    oracles: OracleCounts
    residual_norm: jax.Array   # ||b - A v|| of the step's linear solve (NaN when not computed)
    finite: jax.Array          # all of theta, phi (and v) finite after the step


class BilevelState(NamedTuple):
    """The state of the generic loops.

    v: the linear-system variable (v ~ A^{-1} grad_phi f_upper), None for IG-free methods.
    aux: the direction rule's persistent state (a linear solver's warm start / Krylov state).
    estimator: the variance-reduction state (momentum, SAGA memories, previous point).
    """

    theta: PyTree
    phi: PyTree
    count: jax.Array
    key: jax.Array
    v: PyTree
    lower_opt_state: PyTree
    upper_opt_state: PyTree
    v_opt_state: PyTree
    aux: PyTree
    estimator: PyTree


def all_finite(*trees) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t) if hasattr(x, "dtype")
              and jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def guard_finite(theta, phi, v, check: bool):
    """(theta, finite): whether theta, phi and v are all finite; with `check`, theta carries an
    `eqx.error_if` that raises when they are not (the step is then an error under jit)."""
    finite = all_finite(theta, phi, v)
    if check:
        theta = eqx.error_if(theta, ~finite, "bilevel_jax: non-finite iterate (theta, phi or v).")
    return theta, finite


def check_key(key) -> None:
    """A PRNG key (`jax.random.key` / `jax.random.PRNGKey`, or a batch of them under `vmap`)."""
    ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                         or (key.dtype == jnp.uint32 and key.shape == (2,)))
    if not ok:
        raise TypeError(f"key must be a PRNG key (jax.random.PRNGKey / jax.random.key), got {key!r}.")


def step_key(state, stream: int):
    """The PRNG key of `stream` for this step (sampler keys use the root key + a draw counter)."""
    return jax.random.fold_in(jax.random.fold_in(state.key, stream), state.count)


def tree_norm(tree) -> jax.Array:
    return otu.tree_norm(tree)

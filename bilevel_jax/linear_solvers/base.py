"""The linear-solver protocol: one interface, with a state that persists across solves.

A linear solver approximately solves  A x = b  for a symmetric positive definite operator A given
only as `matvec: x -> A x` on pytrees. It never knows about bilevel problems.

    solver = bj.linear_solvers.cg(maxiter=10, warm_start=True)
    state = solver.init(b_like)                      # zeros (or x0=...)
    x, state, info = solver.solve(matvec, b, state, key=None)

`state` carries what the next solve may reuse: the last solution (the warm start when
`solver.warm_start`), and for Krylov methods their basis. Stochastic solvers (`solver.stochastic`)
call `matvec(x, key)`, which must apply an independent stochastic estimate of A for each key (a
fresh minibatch per factor).

Solvers are equinox Modules: array hyperparameters (step sizes) are fields, so a sweep can `vmap`
over them; counts and flags are static fields, so two equal configurations compile once. Every
loop has a static length (`lax.scan`); a tolerance may freeze the iterate.

Failures are loud: when a solve breaks down (non-positive or non-finite curvature, divergence) the
returned `x` is NaN and `info.status` says why (`bj.status`); it never returns a finite-looking
wrong answer. The rule, for every solver here: `x` (every leaf) is NaN exactly when
`info.status != OK`, and the returned state then holds that NaN too (a warm start from it stays
NaN: the failure is not forgotten at the next solve).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import check_bool, check_in_range, check_positive_int

PyTree = Any


class SolverInfo(NamedTuple):
    """What a solve reports.

    residual_norm: ||b - A x|| at the returned x (NaN for stochastic operators, whose A is random).
    num_matvecs: operator applications the method makes (its oracle cost; int32: a NumPy scalar
      when it is fixed by the configuration, e.g. CG's maxiter (+1 warm), so that it counts
      statically, `bj.oracles.solve`; an array when it depends on the data, e.g. Lanczos restarts).
    status: a `bj.status` code (OK, BREAKDOWN, NONFINITE).
    """

    residual_norm: jax.Array
    num_matvecs: jax.Array
    status: jax.Array


class WarmStart(NamedTuple):
    """The state of the solvers whose only memory is their last solution."""

    x: PyTree


class LinearSolver(eqx.Module):
    """Base class of the linear solvers.

    Subclasses implement `solve(matvec, b, state, key=None) -> (x, state, SolverInfo)` and, when
    they keep more than the last solution, `init`.
    """

    # whether a solve starts from the previous solution (`state.x`) instead of zero; solvers with
    # no initial point (Neumann series, dense) ignore it. Subclasses give every field a default.
    warm_start: bool = eqx.field(default=False, static=True)
    stochastic: ClassVar[bool] = False
    # whether the solver assumes a symmetric A (all but `normal`, which sees A'A): callers whose
    # operator may not be symmetric (`bj.custom_root`) check it when this is True
    needs_symmetric: ClassVar[bool] = True

    def init(self, b_like: PyTree, x0: Optional[PyTree] = None):
        """The state before the first solve: `x0` (default zeros shaped like `b_like`)."""
        return WarmStart(otu.tree_zeros_like(b_like) if x0 is None else x0)

    @abc.abstractmethod
    def solve(self, matvec: Callable, b: PyTree, state, key=None):
        """`(x, new_state, SolverInfo)` for A x = b."""


class KrylovSolver(LinearSolver):
    """Base of the Krylov solvers that run `maxiter` iterations (a static `lax.scan` length) and
    freeze once the residual is below max(rtol ||b||, atol) or at rounding level; `rtol`, `atol` are
    array fields (a sweep may vmap over them). Subclasses set their own `maxiter` default."""

    maxiter: int = eqx.field(default=50, static=True)
    rtol: Any = 0.0
    atol: Any = 0.0

    def __check_init__(self):
        check_positive_int("maxiter", self.maxiter)
        check_in_range("rtol", self.rtol, 0.0, float("inf"))
        check_in_range("atol", self.atol, 0.0, float("inf"))
        check_bool("warm_start", self.warm_start)


def start(solver: LinearSolver, matvec: Callable, b: PyTree, state) -> tuple:
    """`(x0, r0, extra_matvecs)`: the initial point and residual of a solve. With
    `solver.warm_start`, x0 = state.x and r0 = b - A x0 (one matvec); else x0 = 0 and r0 = b (none;
    known statically, so a cold start costs nothing and never reads `state`)."""
    if solver.warm_start:
        x0 = state.x
        if jax.tree_util.tree_structure(x0) != jax.tree_util.tree_structure(b):
            raise ValueError("the solver state's x does not have the structure of b: "
                             f"{jax.tree_util.tree_structure(x0)} vs {jax.tree_util.tree_structure(b)}.")
        return x0, otu.tree_sub(b, matvec(x0)), 1
    return otu.tree_zeros_like(b), b, 0


def rounding_eps(tree: PyTree) -> float:
    """Machine epsilon of the least precise inexact leaf of `tree` (static: from the dtypes)."""
    eps = [float(jnp.finfo(jnp.result_type(x)).eps) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return max(eps) if eps else float(jnp.finfo(jnp.result_type(float)).eps)


def make_info(residual, num_matvecs, status=st.OK) -> SolverInfo:
    dtype = residual.dtype if isinstance(residual, jax.Array) else jnp.result_type(float)   # the solve's precision
    static = isinstance(num_matvecs, (int, np.integer))
    return SolverInfo(jnp.asarray(residual, dtype), np.int32(num_matvecs) if static else jnp.asarray(num_matvecs, jnp.int32),
                      jnp.asarray(status, jnp.int32))


def residual_norm(matvec: Callable, b: PyTree, x: PyTree) -> jax.Array:
    """||b - A x||."""
    return otu.tree_norm(otu.tree_sub(b, matvec(x)))


def fail_where(failed, x: PyTree) -> PyTree:
    """`x` with every leaf set to NaN where `failed` (a scalar bool): a failed solve is never finite."""
    return jax.tree_util.tree_map(lambda a: jnp.where(failed, jnp.nan, a), x)


__all__ = ["KrylovSolver", "LinearSolver", "SolverInfo", "WarmStart", "fail_where", "make_info", "residual_norm", "rounding_eps",
           "start"]

"""The linear-solver interface.

A linear solver approximately solves  A x = b  for a symmetric positive definite operator A given
only as `matvec: x -> A x` (a pytree function). It never knows about bilevel problems.

Pure form (`LinearSolver.solve`):
    x, info = solver.solve(matvec, b, x0=None, key=None)
Stochastic solvers (`solver.stochastic`) receive `matvec(x, key)`, which applies an independent
stochastic estimate of A for every key (a fresh minibatch per factor).

Stateful form (`StatefulLinearSolver`, optax-style init/update) for state that persists across
outer iterations: warm starts (`stateful(solver, warm_start=True)`), Krylov subspaces.
    state = s.init(b_like)
    x, state, info = s.update(matvec, b, state, key=None)

Every loop has a static length (`lax.scan`); a tolerance may freeze the iterate.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

PyTree = Any


class SolverInfo(NamedTuple):
    """What a solve reports.

    residual_norm: ||b - A x|| at the returned x (NaN for stochastic operators, whose A is random).
    num_matvecs: operator applications made (int).
    breakdown: True when the method met non-positive or non-finite curvature and froze.
    """

    residual_norm: jax.Array
    num_matvecs: jax.Array
    breakdown: jax.Array


class LinearSolver(NamedTuple):
    """A pure linear solver.

    solve: `(matvec, b, x0=None, key=None) -> (x, SolverInfo)`; `info.num_matvecs` counts the
      operator applications (static for a given solver and warm/cold start).
    stochastic: True when `matvec` is called as `matvec(x, key)`.
    """

    solve: Callable
    stochastic: bool = False


class LinearSolverState(NamedTuple):
    x: PyTree  # the last solution: the next warm start


class StatefulLinearSolver(NamedTuple):
    """init/update form: `init(b_like) -> state`; `update(matvec, b, state, key) -> (x, state, info)`."""

    init: Callable
    update: Callable
    stochastic: bool = False


def stateful(solver: LinearSolver, warm_start: bool = True) -> StatefulLinearSolver:
    """The init/update form of a pure solver; with `warm_start`, each solve starts at the last x."""

    def init(b_like):
        return LinearSolverState(x=otu.tree_zeros_like(b_like))

    def update(matvec, b, state, key=None):
        x, info = solver.solve(matvec, b, state.x if warm_start else None, key)
        return x, LinearSolverState(x=x), info

    return StatefulLinearSolver(init, update, solver.stochastic)


def residual_norm(matvec: Callable, b: PyTree, x: PyTree) -> jax.Array:
    """||b - A x||."""
    return otu.tree_norm(otu.tree_sub(b, matvec(x)))


def info(residual, num_matvecs: int, breakdown=False) -> SolverInfo:
    return SolverInfo(jnp.asarray(residual), jnp.asarray(num_matvecs, jnp.int32), jnp.asarray(breakdown))


def initial_point(b: PyTree, x0: Optional[PyTree]) -> PyTree:
    return otu.tree_zeros_like(b) if x0 is None else x0

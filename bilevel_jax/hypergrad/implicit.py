"""Implicit (approximate implicit differentiation, AID) hypergradient, any linear solver.

By the implicit function theorem at grad_phi f_lower(theta, phi*(theta)) = 0 (e.g. Pedregosa, "Hyperparameter optimization with approximate gradient", 2016, arXiv:1602.02355):

    grad F(theta) = grad_theta f_upper - J v,     A v = b,
    A = grad^2_{phi phi} f_lower,  J = grad^2_{theta phi} f_lower,  b = grad_phi f_upper,

evaluated at the current (theta, phi) (exact when phi = phi*(theta) and v = A^{-1} b).
`A v` and `J v` come from one linearization of grad_phi f_lower (`oracles.linearize_lower`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import equinox as eqx
import jax
from jax.sharding import Mesh
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax.hypergrad.info import HypergradInfo
from bilevel_jax.linear_solvers import LinearSolver, SolverInfo, cg, fail_where
from bilevel_jax.precision import Precision, check_precision, diagnose, wrap_problem
from bilevel_jax.problem import BilevelProblem, check_optimistic, check_problem, check_same_structure
from bilevel_jax.sharding import local_problem, sharded

PyTree = Any


def make_matvec(problem: BilevelProblem, theta, phi, lin: oracles.LowerLinearization, stochastic: bool,
                lower_sampler: Optional[Callable], mode: str):
    """The operator handed to a linear solver: the linearized HVP, or for a stochastic solver
    `(v, key) -> A_{xi(key)} v` with a minibatch drawn by `lower_sampler(key)`."""
    if not stochastic:
        return lin.hvp
    if lower_sampler is None:
        return lambda v, key: lin.hvp(v)
    return lambda v, key: oracles.hvp(problem, theta, phi, v, lower_sampler(key), mode)


class ImplicitDirection(NamedTuple):
    g: PyTree                 # grad_theta f_upper - J v (NaN when the solve failed)
    state: PyTree             # the solver's new state; it holds v (`state.x`)
    info: SolverInfo
    lin: oracles.LowerLinearization  # reusable: grad_phi f_lower, A., J., J^T. at this point

    @property
    def v(self) -> PyTree:
        """v ~ A^{-1} grad_phi f_upper: the solution held by the solver state (stored once)."""
        return self.state.x


def implicit_direction(problem: BilevelProblem, theta, phi, upper_batch, lower_batch, solver: LinearSolver,
                       solver_state, key=None, lower_sampler: Optional[Callable] = None,
                       mode: str = "rev") -> ImplicitDirection:
    """grad_theta f_upper - J v with `v, state, info = solver.solve(matvec, b, solver_state, key)`,
    b = grad_phi f_upper. When the solve fails (`info.status` not OK: v is NaN), g is NaN too, in
    every leaf (J v could otherwise hide the NaN where theta does not couple with phi)."""
    g_theta, b = oracles.upper_grads(problem, theta, phi, upper_batch)
    lin = oracles.linearize_lower(problem, theta, phi, lower_batch, mode)
    matvec = make_matvec(problem, theta, phi, lin, solver.stochastic, lower_sampler, mode)
    _, state, info = oracles.solve(solver, matvec, b, solver_state, key)
    g = fail_where(info.status != st.OK, otu.tree_sub(g_theta, lin.cross(state.x)))
    return ImplicitDirection(g, state, info, lin)


def hypergradient(problem: BilevelProblem, theta, phi, data, solver: Optional[LinearSolver] = None, *,
                  x0=None, key=None, lower_sampler: Optional[Callable] = None, mode: str = "rev",
                  precision: Optional[Precision] = None, mesh: Optional[Mesh] = None):
    """The implicit hypergradient at (theta, phi).

    Args:
      problem: a `BilevelProblem`.
      theta, phi: pytrees (phi should be close to phi*(theta): the estimate is exact there).
      data: `(upper_batch, lower_batch)`.
      solver: a `bj.linear_solvers` solver (default `cg(maxiter=50)`).
      x0: warm start for v (structure of phi's float leaves); the solver is then run with
        `warm_start=True` (solvers without an initial point, neumann/dense/HIA, ignore it).
      key: PRNG key, required by stochastic solvers.
      lower_sampler: `key -> lower batch` for stochastic solvers (a fresh minibatch per factor);
        default: every factor uses `lower_batch`.
      mode: "rev" (vjp of grad_phi f_lower) or "fwd" (forward-over-reverse).
      precision: a `bj.Precision` policy (`bj.precision`): the objectives evaluated in its compute
        dtype, theta, phi, x0, v, the solver's state and g in its state dtype (theta, phi, x0 are
        cast to it). A failed result whose cause is the compute dtype's range (an overflow or
        underflow of a value or gradient, `bj.precision.precision_status`) gets the status PRECISION.
      mesh: a `jax.sharding.Mesh` whose axis `"data"` splits the samples of `data` (`bj.shard`):
        the computation runs in `jax.shard_map`, each device on its shard, the objectives
        averaged over the devices (`bj.sharding`; parameter-sized all-reduces only). The same g as
        on one device (up to the order of sums).

    On a constrained problem (`lower_inequality`/`lower_equality`) this is the KKT implicit
    gradient `bj.hypergrad.kkt_hypergradient` (default solver `minres(100)`, multipliers by least
    squares from phi; its `HypergradInfo` then also holds the adjoint, multipliers, active set and
    stationarity).
    There a DEGENERATE status (a weakly active constraint, LICQ failure) keeps g, the one-sided
    estimate, flagged, as the loops' KKT rules do (see `bj.hypergrad.kkt`).

    Returns:
      `(g, info)` with `g = grad_theta f_upper - J v` and `info` a `HypergradInfo`: `v ~ A^{-1}
      grad_phi f_upper`, its residual norm, `status` (the solver's status, | NONFINITE if g is
      non-finite) and the solver's `SolverInfo`. g is NaN in every leaf exactly when the status is not
      OK: the solve failed (a concave or singular lower level: BREAKDOWN; NaN in the data:
      NONFINITE; v is NaN too) or g itself is non-finite. Never a finite-looking value.
    """
    check_optimistic(check_problem(problem), "bj.hypergradient")
    if check_precision(precision) is not None:  # the policy: objectives wrapped, theta, phi, x0 in the state dtype
        problem = wrap_problem(problem, precision)
        theta, phi, x0 = (precision.cast_state(tree) for tree in (theta, phi, x0))
    if problem.constrained:  # constrained LL: the KKT implicit gradient (multipliers by least squares)
        from bilevel_jax.hypergrad.kkt import kkt_hypergradient
        if key is not None or lower_sampler is not None or mode != "rev":
            raise ValueError("hypergradient: a constrained problem uses the deterministic KKT gradient; "
                             "key, lower_sampler and mode do not apply (see bj.hypergrad.kkt_hypergradient).")
        return kkt_hypergradient(problem, theta, phi, data, solver, x0=x0)
    solver = cg(maxiter=50) if solver is None else solver
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"solver must be a bj.linear_solvers solver (e.g. cg(maxiter=50)), got {solver!r}.")
    oracles.check_mode(mode)
    if x0 is not None:
        check_same_structure("x0", oracles.differentiable(phi), x0)
        solver = dataclasses.replace(solver, warm_start=True)
    if solver.stochastic and key is None:
        raise ValueError("this solver is stochastic: pass `key=`.")
    if mesh is not None:
        local = local_problem(problem)
        return sharded(lambda theta, phi, x0, key, data: _hypergradient(local, theta, phi, data, solver, x0, key,
                                                                        lower_sampler, mode), mesh)(
            theta, phi, x0, key, data)
    return _hypergradient(problem, theta, phi, data, solver, x0, key, lower_sampler, mode)


@eqx.filter_jit
def _hypergradient(problem: BilevelProblem, theta, phi, data, solver: LinearSolver, x0, key,
                   lower_sampler: Optional[Callable], mode: str):
    """`hypergradient` after its argument checks, compiled once per configuration: the problem
    (equal when it holds the same functions), the solver's configuration, `lower_sampler`, `mode`
    and the structures and shapes of the arrays are the cache key. The structural validation runs
    while tracing, i.e. once per key (it depends on nothing else)."""
    problem.validate(theta, phi, data)
    phi_d = oracles.differentiable(phi)
    out = implicit_direction(problem, theta, phi, data[0], data[1], solver, solver.init(phi_d, x0), key,
                             lower_sampler, mode)
    status = diagnose(problem, theta, phi, data, st.merge(out.info.status, st.nonfinite(out.g)))
    g = fail_where(status != st.OK, out.g)  # as for the solvers: g is NaN (every leaf) iff status is not OK
    return g, HypergradInfo(v=out.v, residual_norm=out.info.residual_norm, status=status, solver=out.info)

"""STABLE: single-timescale stochastic bilevel optimization (Chen, Sun, Xiao, Yin, "A
Single-Timescale Method for Stochastic Bilevel Optimization", 2022, arXiv:2102.04671). UL step
first, then an LL step with a correction term:

    theta_{k+1} = P_Theta(theta_k - alpha (grad_theta f_upper - J v_k)),   A v_k = grad_phi f_upper
    phi_{k+1}   = phi_k - beta grad_phi f_lower - A^{-1} J^T (theta_{k+1} - theta_k)

all at (theta_k, phi_k). The correction is the first-order drift of the LL solution,
phi*(theta_{k+1}) - phi*(theta_k) ~ -A^{-1} J^T (theta_{k+1} - theta_k) (differentiate
grad_phi f_lower(theta, phi*(theta)) = 0), with beta on the gradient only (a variant that puts the
correction inside beta[...] with the opposite sign does not track phi*).
Matrix-free: the correction is one more linear solve with the same linearization, not a dense
inverse; both solves may be warm-started. (The paper's momentum-tracked Hessian estimates are
dense matrices and are not used.)

Written only with the public step primitives (`bj.algorithms.steps`) and
`bj.hypergrad.implicit_direction`: the order of its steps is its own, not a flag of the loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Algorithm, OracleCounts, check_key, step_key
from bilevel_jax.algorithms.loop import BatchSize, check_data, make_samplers
from bilevel_jax.algorithms.steps import SOLVER_STREAM, StepRule, apply_step, draw_batches, finish, init_rule
from bilevel_jax.hypergrad.implicit import implicit_direction, make_matvec
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sampling import Sampler

PyTree = Any


class StableState(NamedTuple):
    theta: PyTree
    phi: PyTree
    count: Any
    key: Any
    upper_opt_state: Any
    lower_opt_state: Any
    solver: Any        # the state of the solve for v (its x is v)
    correction: Any    # the state of the correction solve

    @property
    def v(self):
        return self.solver.x


class Stable(Algorithm):
    problem: BilevelProblem = eqx.field(static=True)
    upper: StepRule
    lower: StepRule
    solver: LinearSolver
    samplers: Tuple[Sampler, Sampler] = eqx.field(static=True)
    mode: str = eqx.field(static=True, default="rev")
    check: bool = eqx.field(static=True, default=False)

    def init(self, theta0, phi0, key, data=None) -> StableState:
        check_key(key)
        theta0 = self.problem.project(theta0)
        if data is not None:
            check_data(data, self.samplers)
            self.problem.validate(theta0, phi0, data)
        phi_d = oracles.differentiable(phi0)
        return StableState(theta0, phi0, jnp.zeros((), jnp.int32), key, init_rule(self.upper, theta0),
                           init_rule(self.lower, phi0), self.solver.init(phi_d), self.solver.init(phi_d))

    def update(self, state: StableState, data):
        check_data(data, self.samplers)
        count = state.count
        batches = draw_batches(self.samplers, data, state.key, count)
        key_v, key_c = jax.random.split(step_key(state.key, count, SOLVER_STREAM))

        out = implicit_direction(self.problem, state.theta, state.phi, batches.upper, batches.lower, self.solver,
                                 state.solver, key_v, batches.fresh_lower, self.mode)
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, out.g, count,
                                                   self.problem.project)
        delta = otu.tree_sub(oracles.differentiable(theta), oracles.differentiable(state.theta))
        matvec = make_matvec(self.problem, state.theta, state.phi, out.lin, self.solver.stochastic,
                             batches.fresh_lower, self.mode)
        correction, c_state, c_info = self.solver.solve(matvec, out.lin.cross_transpose(delta), state.correction,
                                                        key_c)
        phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state, out.lin.grad_phi,
                                                  count)
        phi = eqx.apply_updates(phi, otu.tree_scale(-1.0, correction))

        counts = OracleCounts.of(lower_grads=1, upper_grads=1, cross=2,
                                 hvps=out.info.num_matvecs + c_info.num_matvecs)
        (theta, phi), info = finish((theta, phi), counts, out.info.residual_norm,
                                    (out.info.status, c_info.status, up_status, low_status), check=self.check,
                                    where="stable outer step")
        return StableState(theta, phi, count + 1, state.key, upper_state, lower_state, out.state, c_state), info


def stable(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None,
           linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, batch_size: BatchSize = None,
           sampler: str = "iid", mode: str = "rev", check: bool = False) -> Stable:
    """STABLE with step sizes alpha = `upper_lr`, beta = `lower_lr` (floats, arrays or schedules, or
    whole optax rules `upper_opt`/`lower_opt`; the paper's single timescale is alpha, beta =
    Theta(K^{-1/2}) constants) and `linear_solver` (default cg(10), warm-started) for both v and
    the correction. `batch_size`, `sampler`, `mode` and `check` as in `bilevel_loop`."""
    with named("stable"):
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bj.BilevelProblem, got {type(problem).__name__}.")
        solver = cg(10) if linear_solver is None else linear_solver
        if not isinstance(solver, LinearSolver):
            raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {solver!r}.")
        oracles.check_mode(mode)
        return Stable(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                      dataclasses.replace(solver, warm_start=warm_start), make_samplers(batch_size, sampler), mode,
                      check)


__all__ = ["Stable", "StableState", "stable"]

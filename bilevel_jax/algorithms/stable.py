"""STABLE: single-timescale stochastic bilevel optimization (Chen, Sun, Xiao, Yin 2022;
seed 001 Alg. 5, seed 002 Alg. 5-6). UL step first, then an LL step with a correction term:

    theta_{k+1} = P_Theta(theta_k - alpha (grad_theta f_upper - J v_k)),   A v_k = grad_phi f_upper
    phi_{k+1}   = phi_k - beta grad_phi f_lower - A^{-1} J^T (theta_{k+1} - theta_k)

all at (theta_k, phi_k). The correction is the first-order drift of the LL solution,
phi*(theta_{k+1}) - phi*(theta_k) ~ -A^{-1} J^T (theta_{k+1} - theta_k) (differentiate
grad_phi f_lower(theta, phi*(theta)) = 0); seed 001's form, with beta on the gradient only (seed 002's
Alg. 6 puts the correction inside beta[...] with the opposite sign, which does not track phi*).
Matrix-free: the correction is one more linear solve with the same linearization, not a dense
inverse; both solves may be warm-started. (The paper's momentum-tracked Hessian estimates are
dense matrices and are not used.)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import check_step_size
from bilevel_jax.algorithms.base import (Algorithm, BilevelState, OracleCounts, StepInfo, check_key, guard_finite,
                                         step_key)
from bilevel_jax.algorithms.loop import (LOWER_STREAM, SOLVER_STREAM, UPPER_STREAM, BatchSize, _apply,
                                         _check_data, make_samplers)
from bilevel_jax.hypergrad.implicit import implicit_direction, make_matvec
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem


def stable(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, linear_solver: Optional[LinearSolver] = None,
           warm_start: bool = True, batch_size: BatchSize = None, sampler: str = "iid",
           mode: str = "rev", check_finite: bool = False) -> Algorithm:
    """STABLE with step sizes alpha = `upper_lr`, beta = `lower_lr` (floats, arrays or schedules;
    the paper's single timescale is alpha, beta = Theta(K^{-1/2}) constants) and `linear_solver`
    (default cg(10), warm-started) for both v and the correction. `batch_size`, `sampler`, `mode`
    and `check_finite` as in `bilevel_loop`."""
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a bj.BilevelProblem, got {type(problem).__name__}.")
    check_step_size("upper_lr", upper_lr)
    check_step_size("lower_lr", lower_lr)
    solver = cg(10) if linear_solver is None else linear_solver
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {solver!r}.")
    solver = dataclasses.replace(solver, warm_start=warm_start or solver.warm_start)
    upper_opt, lower_opt = optax.sgd(upper_lr), optax.sgd(lower_lr)
    samplers = make_samplers(batch_size, sampler)

    def init(theta0, phi0, key, data=None):
        check_key(key)
        theta0 = problem.project(theta0)
        if data is not None:
            _check_data(data, samplers)
            problem.validate(theta0, phi0, data)
        phi_d = oracles.differentiable(phi0)
        return BilevelState(theta0, phi0, jnp.zeros((), jnp.int32), key, otu.tree_zeros_like(phi_d),
                            lower_opt.init(phi_d), upper_opt.init(oracles.differentiable(theta0)), None,
                            (solver.init(phi_d), solver.init(phi_d)), None)

    def update(state, data):
        _check_data(data, samplers)
        upper_sampler, lower_sampler = samplers
        key_low = jax.random.fold_in(state.key, LOWER_STREAM)
        upper_batch, _ = upper_sampler.sample(data[0], jax.random.fold_in(state.key, UPPER_STREAM), state.count)
        lower_batch, _ = lower_sampler.sample(data[1], key_low, state.count)
        sample_lower = lambda key: lower_sampler.sample(data[1], key, 0)[0]
        key_v, key_c = jax.random.split(step_key(state, SOLVER_STREAM))
        v_state, c_state = state.aux

        out = implicit_direction(problem, state.theta, state.phi, upper_batch, lower_batch,
                                 solver, v_state, key_v, sample_lower, mode)
        theta, upper_state = _apply(upper_opt, out.g, state.upper_opt_state, state.theta)
        theta = problem.project(theta)
        delta = otu.tree_sub(oracles.differentiable(theta), oracles.differentiable(state.theta))
        matvec = make_matvec(problem, state.theta, state.phi, out.lin, solver.stochastic, sample_lower, mode)
        correction, c_state, c_info = solver.solve(matvec, out.lin.cross_transpose(delta), c_state, key_c)
        phi, lower_state = _apply(lower_opt, out.lin.grad_phi, state.lower_opt_state, state.phi)
        phi = eqx.apply_updates(phi, otu.tree_scale(-1.0, correction))

        theta, finite = guard_finite(theta, phi, out.v, check_finite)
        counts = OracleCounts.of(lower_grads=1, upper_grads=1, cross=2) + \
            OracleCounts.of(hvps=out.info.num_matvecs + c_info.num_matvecs)
        new_state = BilevelState(theta, phi, state.count + 1, state.key, out.v, lower_state, upper_state,
                                 None, (out.state, c_state), None)
        return new_state, StepInfo(counts, out.info.residual_norm, finite)

    return Algorithm(init, update)

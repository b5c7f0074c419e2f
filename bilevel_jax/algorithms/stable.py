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
from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_in_range, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State, step_key
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import SOLVER_STREAM, Composed, apply_step
from bilevel_jax.hypergrad.implicit import implicit_direction, make_matvec
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


class StableState(State):
    header: Header
    solver: Any        # the state of the solve for v (its x is v)
    correction: Any    # the state of the correction solve

    @property
    def v(self):
        return self.solver.x


class Stable(Composed):
    solver: LinearSolver
    mode: str = eqx.field(static=True, default="rev")
    name: str = eqx.field(static=True, default="stable", kw_only=True)

    def init(self, theta0, phi0, key, data=None) -> StableState:
        phi_d = oracles.differentiable(phi0)
        return StableState(self.start(theta0, phi0, key, data), self.solver.init(phi_d), self.solver.init(phi_d))

    def update(self, state: StableState, data):
        count = state.count
        batches = self.batches(state, data)
        key_v, key_c = jax.random.split(step_key(state.key, count, SOLVER_STREAM))

        with oracles.counting() as tally:
            out = implicit_direction(self.problem, state.theta, state.phi, batches.upper, batches.lower, self.solver,
                                     state.solver, key_v, batches.fresh_lower, self.mode)
            theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, out.g, count,
                                                       self.problem.project)
            delta = otu.tree_sub(oracles.differentiable(theta), oracles.differentiable(state.theta))
            matvec = make_matvec(self.problem, state.theta, state.phi, out.lin, self.solver.stochastic,
                                 batches.fresh_lower, self.mode)
            correction, c_state, c_info = oracles.solve(self.solver, matvec, out.lin.cross_transpose(delta),
                                                        state.correction, key_c)
            phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state,
                                                      out.lin.gradient(), count)
        phi = eqx.apply_updates(phi, otu.tree_scale(-1.0, correction))

        (theta, phi), info = self.finish((theta, phi), tally.counts, out.info.residual_norm,
                                         (out.info.status, c_info.status, up_status, low_status))
        return StableState(state.header.next(theta, phi, upper_state, lower_state), out.state, c_state), info


class TrackedState(State):
    header: Header
    hessian: jax.Array     # H_yy^k, the tracked LL Hessian (n_phi x n_phi), projected onto {H >= mu I}
    cross: jax.Array       # H_xy^k, the tracked cross block (n_theta x n_phi)
    prev_theta: PyTree     # z_{k-1} = (theta_{k-1}, phi_{k-1}), where the tracking re-evaluates
    prev_phi: PyTree
    v: jax.Array           # H_yy^{-1} grad_phi f_upper of the last step (flat)


def project_spd(h: jax.Array, mu) -> jax.Array:
    """The Euclidean projection of a symmetric matrix onto {H : H >= mu I}: eigenvalues clipped at mu."""
    w, q = jnp.linalg.eigh(0.5 * (h + h.T))
    return (q * jnp.maximum(w, mu)) @ q.T


class StableTracked(Composed):
    """STABLE with the paper's recursive Hessian/Jacobian estimates (dense; small problems):

        H_yy^k = (1 - tau)(H_yy^{k-1} - grad^2_yy g(z_{k-1}; xi_k)) + grad^2_yy g(z_k; xi_k),  projected onto {H >= mu I}
        H_xy^k = (1 - tau)(H_xy^{k-1} - grad^2_xy g(z_{k-1}; xi_k)) + grad^2_xy g(z_k; xi_k)
        theta_{k+1} = P(theta_k - alpha (grad_theta f - H_xy^k (H_yy^k)^{-1} grad_phi f))
        phi_{k+1}   = phi_k - beta grad_phi g - (H_yy^k)^{-1} (H_xy^k)' (theta_{k+1} - theta_k)

    the same minibatch xi_k at z_k and z_{k-1} (a STORM-type recursion of momentum 1 - tau), H^0 the
    first sample's; mu = `hessian_floor`.
    Cost per step: two dense blocks, i.e. 2 (n_theta + n_phi) JVPs of grad_phi g (counted as
    n_phi HVPs and n_theta cross products each), 1 LL and 1 UL gradient, two Cholesky solves.
    """

    momentum: jax.Array   # 1 - tau
    mu: jax.Array
    name: str = eqx.field(static=True, default="stable", kw_only=True)

    def init(self, theta0, phi0, key, data=None) -> TrackedState:
        head = self.start(theta0, phi0, key, data)
        n_t = ravel_pytree(oracles.differentiable(head.theta))[0].size
        p_flat = ravel_pytree(oracles.differentiable(phi0))[0]
        n_p = p_flat.size
        return TrackedState(head, jnp.zeros((n_p, n_p), p_flat.dtype), jnp.zeros((n_t, n_p), p_flat.dtype),
                            head.theta, phi0, jnp.zeros_like(p_flat))

    def update(self, state: TrackedState, data):
        p, k = self.problem, state.count
        batches = self.batches(state, data)
        with oracles.counting() as tally:
            h_now, j_now = oracles.lower_hessian_blocks(p, state.theta, state.phi, batches.lower)
            h_old, j_old = oracles.lower_hessian_blocks(p, state.prev_theta, state.prev_phi, batches.lower)
            g_theta, g_phi = oracles.upper_grads(p, state.theta, state.phi, batches.upper)
            g_low = oracles.lower_grad_phi(p, state.theta, state.phi, batches.lower)
        w = jnp.where(k > 0, self.momentum, 0.0)
        hessian = project_spd(w * (state.hessian - h_old) + h_now, self.mu)
        cross = w * (state.cross - j_old) + j_now
        factor = jax.scipy.linalg.cho_factor(hessian)

        theta_flat, unravel_theta = ravel_pytree(g_theta)
        b, unravel_phi = ravel_pytree(g_phi)
        v = jax.scipy.linalg.cho_solve(factor, b)
        direction = unravel_theta(theta_flat - cross @ v)
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, direction, k,
                                                   p.project)
        delta = ravel_pytree(otu.tree_sub(oracles.differentiable(theta), oracles.differentiable(state.theta)))[0]
        correction = unravel_phi(jax.scipy.linalg.cho_solve(factor, cross.T @ delta))
        phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state, g_low, k)
        phi = eqx.apply_updates(phi, otu.tree_scale(-1.0, correction))

        residual = jnp.linalg.norm(h_now @ v - b)   # the step's sampled system at the tracked solution
        (theta, phi, hessian), info = self.finish((theta, phi, hessian), tally.counts, residual,
                                                  (up_status, low_status))
        return TrackedState(state.header.next(theta, phi, upper_state, lower_state), hessian, cross, state.theta,
                            state.phi, v), info


def stable(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None,
           linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, hessian_tracking: bool = False,
           hessian_momentum=0.5, hessian_floor=1e-3, batch_size: BatchSize = 64, sampler: str = "iid",
           mode: str = "rev", check: bool = False):
    """STABLE with step sizes alpha = `upper_lr`, beta = `lower_lr` (floats, arrays or schedules, or
    whole optax rules `upper_opt`/`lower_opt`; the paper's single timescale is alpha, beta =
    Theta(K^{-1/2}) constants) and `linear_solver` (default cg(10), warm-started) for both v and
    the correction, matrix-free. With `hessian_tracking=True`, the paper's own estimator instead:
    dense recursive estimates of the LL Hessian and cross block with momentum `hessian_momentum`
    = 1 - tau (the paper's tau: Theta(K^{-1/2}) or a constant; 0.5 in the MRBO authors'
    re-implementation) and the projection onto {H >= mu I}, mu = `hessian_floor` (`StableTracked`;
    small problems only). `batch_size`, `sampler`, `mode` and `check` as in `bilevel_loop` (default minibatches of 64). Sampling: i.i.d. minibatches (the paper's)."""
    with named("stable"):
        check_problem(problem)
        oracles.check_mode(mode)
        if hessian_tracking:
            if linear_solver is not None:
                raise ValueError("hessian_tracking solves with the tracked dense Hessian: linear_solver is not used.")
            check_in_range("hessian_momentum", hessian_momentum, 0.0, 1.0)
            check_step_size("hessian_floor", hessian_floor)
            return StableTracked(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                                 make_samplers(batch_size, sampler), as_array(hessian_momentum), as_array(hessian_floor),
                                 check=check)
        solver = cg(10) if linear_solver is None else linear_solver
        if not isinstance(solver, LinearSolver):
            raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {solver!r}.")
        return Stable(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                      make_samplers(batch_size, sampler), dataclasses.replace(solver, warm_start=warm_start), mode,
                      check=check)


__all__ = ["Stable", "StableState", "StableTracked", "TrackedState", "project_spd", "stable"]

"""FSLA: the fully single loop algorithm of Li, Gu, Huang ("A Fully Single Loop Algorithm for
Bilevel Optimization without Hessian Inverse", AAAI 2022, arXiv:2112.04660), in its alternating
order: the LL variable first, then v at the new LL point, then the hypergradient at the new
(phi, v), with STORM momentum on the UL direction:

    phi_{k+1} = phi_k - rho grad_phi f_lower(theta_k, phi_k; xi_k)
    v_{k+1}   = v_k - eta (A(theta_k, phi_{k+1}; xi_k) v_k - grad_phi f_upper(theta_k, phi_{k+1}; zeta_k))
    h_k       = grad_theta f_upper(theta_k, phi_{k+1}; zeta_k) - J(theta_k, phi_{k+1}; xi_k) v_{k+1}
    d_k       = h_k + a_k (d_{k-1} - h(theta_{k-1}, phi_k, v_k; xi_k, zeta_k)),   a_0 = 0
    theta_{k+1} = P_Theta(theta_k - gamma d_k)

(v ~ +A^{-1} grad_phi f_upper, the sign convention of bilevel_jax.) The previous-point term uses
the same samples (STORM, Cutkosky & Orabona 2019). Verified against the paper's description of the
alternating update (z, then v at z_{k+1}, then the hypergradient at (x_k, z_{k+1}, v_{k+1})); the
paper ties a_k to the step schedule (a_k = 1 - c gamma_k^2 in its analysis) — pass
`momentum` = a_k as a schedule for that form; the default is the constant a = 0.5, not a value
from the paper.

Cost per step: 1 LL gradient, 2 UL gradients (current and previous point), 1 HVP, 2 cross
products. Written with the public step primitives and the STORM estimator
(`bj.algorithms.estimators.storm`, on the oracle h; its state holds d_{k-1} and the previous point).
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import check_in_range
from bilevel_jax.algorithms import estimators as est
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State
from bilevel_jax.algorithms.directions import Evaluation, Joint, Point
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import Composed, StepRule, apply_step, init_rule
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


class FslaState(State):
    header: Header
    v: PyTree
    v_opt_state: Any
    estimator: est.RecursiveState   # d_{k-1} (`Joint(hypergrad=...)`) and the previous point (theta_{k-1}, phi_k, v_k)


class FSLA(Composed):
    v_rule: StepRule
    estimator: est.Recursive   # STORM with a_k = 1 - eta_k on h
    mode: str = eqx.field(static=True, default="rev")
    name: str = eqx.field(static=True, default="fsla", kw_only=True)

    def init(self, theta0, phi0, key, data=None) -> FslaState:
        head = self.start(theta0, phi0, key, data)
        v0 = otu.tree_zeros_like(oracles.differentiable(phi0))
        like = Joint(otu.tree_zeros_like(oracles.differentiable(head.theta)))
        return FslaState(head, v0, init_rule(self.v_rule, v0),
                         self.estimator.init(like, Point(head.theta, phi0, v0), None, None))

    def _evaluation(self, h, v) -> Evaluation:
        """The oracle h at a point (theta, phi, v), as STORM reads it."""
        return Evaluation(Joint(h), v, jnp.nan, st.ok())

    def _hypergradient(self, point: Point, batches) -> Evaluation:
        """h(theta, phi, v) = grad_theta f_upper - J v on the step's batches (at the previous point)."""
        p = self.problem
        g_theta = oracles.upper_grad_theta(p, point.theta, point.phi, batches.upper)
        return self._evaluation(otu.tree_sub(g_theta, oracles.cross(p, point.theta, point.phi, point.rule_state,
                                                                    batches.lower, self.mode)), point.rule_state)

    def update(self, state: FslaState, data):
        p, k, mode = self.problem, state.count, self.mode
        batches = self.batches(state, data)
        with oracles.counting() as tally:
            # phi_{k+1}
            g_low = oracles.lower_grad_phi(p, state.theta, state.phi, batches.lower)
            phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state, g_low, k)
            # v_{k+1} at (theta_k, phi_{k+1})
            lin = oracles.linearize_lower(p, state.theta, phi, batches.lower, mode)
            g_theta, g_phi = oracles.upper_grads(p, state.theta, phi, batches.upper)
            d_v = otu.tree_sub(lin.hvp(state.v), g_phi)
            v, v_state, v_status = apply_step(self.v_rule, state.v, state.v_opt_state, d_v, k)
            # STORM on h at (theta_k, phi_{k+1}, v_{k+1}) and the previous point (theta_{k-1}, phi_k, v_k)
            now = self._evaluation(otu.tree_sub(g_theta, lin.cross(v)), v)
            d, _, est_state = self.estimator.recurse(self._hypergradient, Point(state.theta, phi, v), state.estimator,
                                                     k, batches, current=now)
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, d.hypergrad, k,
                                                   p.project)

        (theta, phi, v, est_state), info = self.finish((theta, phi, v, est_state), tally.counts, otu.tree_norm(d_v),
                                                       (low_status, v_status, up_status))
        return FslaState(state.header.next(theta, phi, upper_state, lower_state), v, v_state, est_state), info


def fsla(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, upper_opt=None, lower_opt=None,
         v_opt=None, momentum=0.5, batch_size: BatchSize = 64, sampler: str = "iid", mode: str = "rev",
         check: bool = False) -> FSLA:
    """FSLA with steps gamma = `upper_lr`, rho = `lower_lr`, eta = `v_lr` (default lower_lr), or
    whole optax rules; STORM weight a_k = `momentum` (a float or a schedule; 0: no momentum).
    Sampling: i.i.d. minibatches (the paper's). See the module docstring for the update."""
    with named("fsla"):
        check_problem(problem)
        check_in_range("momentum", momentum, 0.0, 1.0)
        oracles.check_mode(mode)
        lower = rule("lower_lr", lower_lr, lower_opt)
        v_rule = lower if (v_lr is None and v_opt is None) else rule("v_lr", lower_lr if v_lr is None else v_lr, v_opt)
        return FSLA(problem, rule("upper_lr", upper_lr, upper_opt), lower, make_samplers(batch_size, sampler), v_rule,
                    est.storm(momentum), mode, check=check)


__all__ = ["FSLA", "FslaState", "fsla"]

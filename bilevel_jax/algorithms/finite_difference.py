"""HJFBiO: SOBA's directions with the second-order products replaced by central finite
differences of the LL gradient (Huang, "Optimal Hessian/Jacobian-Free Nonconvex-PL Bilevel
Optimization", ICML 2024, arXiv:2407.17823):

    A v ~ (grad_y g(x, y + delta v) - grad_y g(x, y - delta v)) / (2 delta)
    J v ~ (grad_x g(x, y + delta v) - grad_x g(x, y - delta v)) / (2 delta)
    y <- y - alpha grad_y g,   v <- v - eta (A v - grad_y f),   x <- P_X(x - beta (grad_x f - J v))

all at (x_k, y_k, v_k) (v ~ +A^{-1} grad_y f, the sign convention of bilevel_jax). The error of
the differences is O(delta^2) (zero on a quadratic LL) plus round-off eps ||grad g|| / delta:
delta = 1e-5 (the LancBiO authors' setting) suits float64; in float32 use delta ~ 1e-2.
Oracles per step: 3 LL gradient passes (at y and y +- delta v), 1 UL gradient, no HVP.

`FiniteDifference` is a direction rule (`bj.algorithms.directions`) composed with `bilevel_loop`,
so estimators (STORM, SAGA) apply to it as to SOBA.
"""
from __future__ import annotations

import jax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_step_size
from bilevel_jax.algorithms._common import loop_options, named, rule
from bilevel_jax.algorithms.directions import Amortized, Evaluation, LowerTerms, Separable, UpperTerms
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop


class FiniteDifference(Amortized):
    """SOBA's directions (`Amortized`: same state, directions and v step) with A v and J v from
    central differences of step `delta` instead of the fused vjp."""

    delta: jax.Array = None

    def evaluate(self, problem, point, batches, key, mode):
        g_theta, g_phi = oracles.upper_grads(problem, point.theta, point.phi, batches.upper)
        grad_phi = oracles.lower_grad_phi(problem, point.theta, point.phi, batches.lower)
        av, jv = oracles.finite_difference_products(problem, point.theta, point.phi, point.rule_state.v,
                                                    batches.lower, self.delta)
        return Evaluation(Separable(UpperTerms(g_theta, g_phi), LowerTerms(grad_phi, av, jv)), point.rule_state,
                          otu.tree_norm(otu.tree_sub(av, g_phi)), st.ok())


def hjfbio(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, upper_opt=None, lower_opt=None, v_opt=None,
           delta=1e-5, batch_size=64, upper_decay=0.0, lower_decay=0.0, **kw) -> BilevelLoop:
    """HJFBiO (module docstring): steps beta = `upper_lr`, alpha = `lower_lr`, eta = `v_lr` (default
    alpha), constant by default (`upper_decay`/`lower_decay` give (k+1)^-p decays), difference step
    `delta` (default 1e-5). `batch_size`, `sampler`, `estimator`, `check` as in `bilevel_loop`;
    the paper's analysis draws i.i.d. minibatches (`sampler="iid"`, the default)."""
    with named("hjfbio"):
        check_step_size("delta", delta)
        lower = rule("lower_lr", lower_lr, lower_opt, lower_decay)
        v_rule = (lower if (v_lr is None and v_opt is None)
                  else rule("v_lr", lower_lr if v_lr is None else v_lr, v_opt, lower_decay))
        return bilevel_loop(problem, direction=FiniteDifference(v_rule, as_array(delta)),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay), lower_opt=lower,
                            batch_size=batch_size, name="hjfbio", **loop_options(kw))


__all__ = ["FiniteDifference", "hjfbio"]

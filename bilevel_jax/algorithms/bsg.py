"""BSG-1: the rank-one adjoint of Giovannelli, Kent, Vicente ("Bilevel stochastic methods for
optimization and machine learning: Bilevel stochastic descent and DARTS", 2021, arXiv:2110.00604).

With the rank-one approximations A ~ grad_y g grad_y g' and J ~ grad_x g grad_y g' (exact up to a
common scale for a single-residual least-squares LL g = r(x, y)^2 / 2, the Gauss-Newton model),
the adjoint needs no Hessian and no linear solve:

    d_x = grad_x f - (<grad_y g, grad_y f> / (||grad_y g||^2 + eps)) grad_x g        (all at (x, y))

after T LL gradient steps (warm-started). Where grad_y g = 0 the correction is set to 0 (eps = 0,
the default) — at an exact LL solution the approximation degenerates and BSG-1 takes the partial
gradient; on general LLs it is a biased heuristic (it does not reach theta* of a generic
quadratic). The BOME authors' comparison code uses eps = 1e-4. Oracles per step: T + 1 LL
gradients, 1 UL gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_in_range
from bilevel_jax.algorithms._common import lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.base import OracleCounts
from bilevel_jax.algorithms.directions import DirectionRule, Directions, Evaluation, Joint
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop


class RankOne(DirectionRule):
    """D_theta = grad_x f - (<grad_y g, grad_y f> / (||grad_y g||^2 + eps)) grad_x g."""

    eps: jax.Array

    def init(self, theta, phi):
        return None

    def evaluate(self, problem, point, batches, key, mode):
        g_theta, g_phi = oracles.upper_grads(problem, point.theta, point.phi, batches.upper)
        gx, gy = oracles.lower_grads(problem, point.theta, point.phi, batches.lower)
        sq = otu.tree_norm(gy, squared=True) + self.eps
        ratio = jnp.where(sq > 0, otu.tree_vdot(gy, g_phi) / jnp.where(sq > 0, sq, 1.0), 0.0)
        d = otu.tree_add_scale(g_theta, -ratio, gx)
        counts = OracleCounts.of(lower_grads=1, upper_grads=1)
        return Evaluation(Joint(d), point.rule_state, counts, jnp.asarray(jnp.nan, jnp.result_type(float)), st.ok())

    def directions(self, estimate):
        return Directions(estimate.hypergrad)


def bsg1(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 1, eps=0.0,
         batch_size=None, upper_decay=0.0, **kw) -> BilevelLoop:
    """BSG-1 (module docstring) with T = `lower_steps` warm-started LL steps of `lower_lr`, UL step
    `upper_lr` (decayed as (k+1)^-`upper_decay`), `eps` in the denominator."""
    with named("bsg1"):
        check_in_range("eps", eps, 0.0, float("inf"))
        return bilevel_loop(problem, direction=RankOne(as_array(eps)),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt),
                            lower_steps=lower_steps_at_least_one(lower_steps), batch_size=batch_size, name="bsg1",
                            **kw)


__all__ = ["RankOne", "bsg1"]

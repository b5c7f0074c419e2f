"""BSG-1: the rank-one adjoint of Giovannelli, Kent, Vicente, "Inexact bilevel stochastic gradient
methods for constrained and unconstrained lower-level problems" (arXiv:2110.00604, 2021; first
version "Bilevel stochastic methods for optimization and machine learning: Bilevel stochastic
descent and DARTS").

The hypergradient is grad F = grad_x f - J A^{-1} grad_y f (A = grad^2_yy g, J = grad^2_xy g, all
at (x, y), f the UL and g the LL objective). BSG-1 replaces A by grad_y g grad_y g' and J by
grad_x g grad_y g'; the minimum-norm solution of the rank-one adjoint system then gives a direction
with no Hessian and no linear solve,

    d_x = grad_x f - (<grad_y g, grad_y f> / (||grad_y g||^2 + eps)) grad_x g        (all at (x, y)),

after T warm-started LL gradient steps. This is the authors' `calc_dx_ulp` (eps = 0, their code;
the BOME authors' comparison code uses eps = 1e-4). Their runs grow T by one whenever the relative
change of f is below 3e-3 (up to 30) with constant UL steps of 1e-3; here T is fixed.

When it is right. Expand around the LL solution y*(x), e = y - y*(x), and write
v(x) = g(x, y*(x)) for the LL value function (grad v(x) = grad_x g(x, y*(x)), Danskin):

    grad_y g = A e + O(|e|^2),        grad_x g = grad v(x) + J e + O(|e|^2),

so with w = A e and P_w the orthogonal projector onto w,

    BSG-1's correction = J A^{-1} P_w grad_y f  +  grad v(x) <w, grad_y f> / |w|^2  + O(|e|).

- It is exact when grad v = 0 (the LL's optimal value does not depend on x, e.g. any
  g = (1/2)(y - y*(x))' A (y - y*(x)) + c) and J A^{-1} (I - P_w) grad_y f = 0: always for a scalar
  y (a single-residual least-squares LL, g = r(x, y)^2 / 2), and for vector y when y*(x) moves
  along one eigenvector u of A and e is along u (then the LL steps keep it there). On this class
  bsg1 converges linearly to theta* (tests/test_hessian_free.py: 1e-9 relative after 30 steps,
  1e-6 after 60) down to the rounding level, where the ratio is rounding noise over rounding
  noise: kicks away from theta* (up to 1e-2 relative measured with eps = 1e-30), and BREAKDOWN
  with eps = 0 once grad_y g cancels exactly (scalar y, after ~50 steps there).
- With grad v = 0 but a generic coupling the first term keeps only the component of the adjoint
  along grad_y g: a bounded bias (the iterates settle about 20% from theta* on the tests' 4 x 6
  quadratic).
- With grad v != 0 (the generic quadratic) the second term is of order |grad v| |grad_y f| / |e|:
  it grows as the LL is solved more accurately (at theta* of the tests' 4 x 6 quadratic, where
  grad F = 0, the direction's norm is 23, 240, 2400 for |e| = 2e-2, 2e-3, 2e-4, matching the
  closed-form constant to O(|e|)), and full-batch runs diverge geometrically at every
  step size tried (0.01 to 0.5, T = 1 to 20: ||theta|| ~ 1e22 after 2000 steps at step 0.01) until
  they overflow, which `bj.run` reports as NONFINITE. Minibatch noise in grad_y g keeps |w| away from
  0 and the runs bounded, but biased (make fig-hessian-free).

Failures are loud: where ||grad_y g||^2 + eps is 0 or below the smallest normal float (the LL solved
exactly: the ratio is 0/0) the direction is NaN and the step reports BREAKDOWN; eps > 0 removes this
case but turns the correction off (d_x -> grad_x f) at exact LL solutions. Oracles per step: T + 1 LL
gradients, 1 UL gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_in_range
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.directions import DirectionRule, Directions, Evaluation, Joint
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import fail_where


class RankOne(DirectionRule):
    """D_theta = grad_x f - (<grad_y g, grad_y f> / (||grad_y g||^2 + eps)) grad_x g; NaN and
    BREAKDOWN where the denominator is 0 or subnormal."""

    eps: jax.Array

    def init(self, theta, phi):
        return None

    def evaluate(self, problem, point, batches, key, mode):
        g_theta, g_phi = oracles.upper_grads(problem, point.theta, point.phi, batches.upper)
        gx, gy = oracles.lower_grads(problem, point.theta, point.phi, batches.lower)
        sq = otu.tree_norm(gy, squared=True) + self.eps
        broken = sq < jnp.finfo(sq.dtype).tiny
        ratio = otu.tree_vdot(gy, g_phi) / jnp.where(broken, 1.0, sq)
        d = fail_where(broken, otu.tree_add_scale(g_theta, -ratio, gx))
        return Evaluation(Joint(d), point.rule_state, jnp.asarray(jnp.nan, sq.dtype),
                          st.flag(broken, st.BREAKDOWN))

    def directions(self, estimate):
        return Directions(estimate.hypergrad)


def bsg1(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 1, eps=0.0,
         batch_size=64, upper_decay=0.0, **kw) -> BilevelLoop:
    """BSG-1 (module docstring: where its rank-one adjoint is exact, and where it diverges) with
    T = `lower_steps` warm-started LL steps of `lower_lr`, UL step `upper_lr` (decayed as
    (k+1)^-`upper_decay`), `eps` in the denominator. A stochastic method: minibatches of 64 by
    default (`batch_size=None`: full batch), i.i.d. as in the paper's analysis."""
    with named("bsg1"):
        check_in_range("eps", eps, 0.0, float("inf"))
        return bilevel_loop(problem, direction=RankOne(as_array(eps)),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt),
                            lower_steps=lower_steps_at_least_one(lower_steps), batch_size=batch_size, name="bsg1",
                            **loop_options(kw))


__all__ = ["RankOne", "bsg1"]

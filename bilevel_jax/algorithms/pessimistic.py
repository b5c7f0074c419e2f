"""The pessimistic bilevel problem, by a penalty on the lower-level value gap.

    min_{theta in Theta} max_{phi in S(theta)} f_upper(theta, phi),   S(theta) = argmin_{phi in Phi} f_lower(theta, phi)

(the pessimistic form of a bilevel problem whose LL has many solutions; e.g. Dempe, "Foundations of
Bilevel Programming", 2002, ch. 5; Liu, Mu, Yuan, Zeng, Zhang, "A generic first-order algorithmic
framework for bi-level programming beyond lower-level singleton", ICML 2020, arXiv:2006.04045,
for the optimistic first-order view). `BilevelProblem(..., pessimistic=True)` states it.

Method (`pessimistic_penalty`). With v(theta) = min_{z in Phi} f_lower(theta, z), the follower's
worst case over S(theta) = {phi in Phi : f_lower(theta, phi) - v(theta) <= 0} is replaced by the
penalised inner maximisation

    Phi_rho(theta) = max_{phi in Phi} h_rho(theta, phi),   h_rho = f_upper(theta, phi) - rho (f_lower(theta, phi) - v(theta)),

with rho increasing (rho_k = min(rho0 + rate k^power, rho_max)). One outer step:

    1. tracker   z <- `tracker_steps` (projected) gradient steps on f_lower(theta_k, .)     (v(theta) ~ f_lower(theta, z))
    2. follower  phi <- `follower_steps` (projected) ascent steps on h_rho / rho,
                 i.e. descent on f_lower - f_upper / rho (steps relative to h_rho's curvature ~ rho)
    3. leader    theta <- P_Theta(theta - alpha d),  d = grad_theta f_upper(theta, phi)
                           - rho (grad_theta f_lower(theta, phi) - grad_theta f_lower(theta, z))

d is Danskin's gradient of Phi_rho at the inner maximiser phi and the tracked minimiser z (both
maximisers/minimisers taken as unique and attained). First order: no Hessian.

Assumptions (stated, not checked): f_lower(theta, .) convex on the closed convex set Phi (so S(theta)
is convex and v is attained, tracked by projected gradient steps); for rho > rho_0,
rho f_lower - f_upper is strongly convex on Phi around S(theta) (f_upper's curvature is dominated
off S(theta)) and f_upper has a unique maximiser over S(theta) (e.g. f_upper concave or linear
along S(theta) and S(theta) compact, as for a box-constrained LL); then the penalised maximiser is
within O(1/rho) of argmax_{S(theta)} f_upper and the stationary points of Phi_rho within O(1/rho)
of those of the pessimistic value function. The penalty's bias is O(1/rho): rho_max sets the
accuracy, and the follower's and the leader's steps must resolve gradients scaled by rho.

The same steps with the follower *descending* on f_upper + rho (f_lower - v) and
d = grad_theta f_upper + rho (grad_theta f_lower(theta, phi) - grad_theta f_lower(theta, z)) solve the
optimistic problem min_theta min_{phi in S(theta)} f_upper (a value-function penalty with an inner
phi loop, as F2SA's); the problem option `BilevelProblem(..., pessimistic=...)` chooses which.

Oracles per outer step: T_z + T_phi + 2 LL gradients, T_phi + 1 UL gradients, 2 LL values (the
state's `gap` diagnostic, from the last two LL gradient passes).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import equinox as eqx
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles, sampling
from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import Composed, StepRule, apply_step, float_dtype, init_rule, lower_phase
from bilevel_jax.algorithms.value_function import PenaltyRamp, penalty_ramp
from bilevel_jax.algorithms.constrained import lower_projection, project_rule
from bilevel_jax.lower import lower_steps as run_lower_steps
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


class PessimisticState(State):
    """header.phi is the follower, the penalised worst (pessimistic) or best (optimistic) case in
    S(theta); header.lower_opt_state the follower rule's state."""

    header: Header
    z: PyTree            # the tracker of argmin_{Phi} f_lower(theta, .)
    tracker_opt_state: Any
    penalty: Any         # the last rho (a diagnostic)
    gap: Any             # the last f_lower(theta, phi) - f_lower(theta, z) (a diagnostic)


class PessimisticPenalty(Composed):
    """See the module docstring; build with `pessimistic_penalty` (`lower`: the follower's rule)."""

    tracker: StepRule
    penalty: PenaltyRamp
    follower_steps: int = eqx.field(static=True, default=10)
    tracker_steps: int = eqx.field(static=True, default=10)
    name: str = eqx.field(static=True, default="pessimistic_penalty", kw_only=True)
    handles_constraints: ClassVar[bool] = True   # by projected follower and tracker steps
    handles_pessimistic: ClassVar[bool] = True   # pessimistic=True and False alike

    def init(self, theta0, phi0, key, data=None) -> PessimisticState:
        head = self.start(theta0, phi0, key, data)
        zero = jnp.zeros((), float_dtype((head.theta, phi0)))
        return PessimisticState(head, phi0, init_rule(self.tracker, phi0), zero, zero)

    def update(self, state: PessimisticState, data):
        k, p = state.count, self.problem
        batches = self.batches(state, data, self.tracker_steps)
        dtype = float_dtype((state.theta, state.phi))   # the run's precision (rho must not promote it)
        rho = jnp.asarray(self.penalty(k), dtype)
        with oracles.counting() as tally:
            # 1. the tracker of v(theta)
            z, z_opt, z_status = lower_phase(p, self.tracker, state.theta, state.z, state.tracker_opt_state,
                                         self.tracker_steps, batches.lower_at, k)
            # 2. the follower: ascent on h_rho / rho = f_upper / rho - (f_lower - v)
            upper_batch = sampling.read(batches.upper)   # a batch the objective can take (not a Rows)
            sign = 1.0 if p.pessimistic else -1.0   # the follower maximises (pessimistic) or minimises f_upper
            scaled = oracles.PenalisedLower(p.f_upper,
                                    lambda t, y, b: p.f_lower(t, y, b) - sign * p.f_upper(t, y, upper_batch) / rho)
            phi, f_opt = run_lower_steps(scaled, self.lower.build(state.theta), state.theta, state.phi, state.lower_opt_state,
                                         self.follower_steps, batches.lower_at)
            # 3. the leader: Danskin's gradient of Phi_rho at (phi, z)
            g_theta = oracles.upper_grad_theta(p, state.theta, phi, batches.upper)
            value_phi, (gx_phi, _) = oracles.lower_value_and_grads(p, state.theta, phi, batches.lower)
            value_z, (gx_z, _) = oracles.lower_value_and_grads(p, state.theta, z, batches.lower)
        d = otu.tree_add_scale(g_theta, -sign * rho, otu.tree_sub(gx_phi, gx_z))
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, d, k, p.project)
        (theta, phi, z), info = self.finish((theta, phi, z), tally.counts, jnp.nan,
                                            (z_status, self.lower.status(k), up_status))
        return PessimisticState(state.header.next(theta, phi, upper_state, f_opt), z, z_opt, rho,
                                jnp.asarray(value_phi - value_z, dtype)), info


def _projected_rule(name: str, lr, opt, project: Optional[Callable]) -> StepRule:
    step = rule(name, lr, opt)
    return step if project is None else project_rule(step, project)


def pessimistic_penalty(problem: BilevelProblem, *, upper_lr=0.1, follower_lr=0.5, tracker_lr=0.5, upper_opt=None,
                        follower_opt=None, tracker_opt=None, follower_steps: int = 10, tracker_steps: int = 10,
                        penalty=2.0, penalty_rate=10.0, penalty_power=1.0, penalty_max=1e3, lower_set=None,
                        batch_size: BatchSize = None, sampler: str = "iid", check: bool = False) -> PessimisticPenalty:
    """The value-gap penalty method for the pessimistic problem (module docstring).

    Args:
      problem: a `BilevelProblem`; `pessimistic=True` solves the pessimistic problem, False the
        optimistic one (the follower minimises instead of maximising f_upper over S(theta)).
      upper_lr / upper_opt: theta's step (projected by `problem.project_upper`).
      follower_lr / follower_opt, follower_steps: the follower's steps on f_lower - f_upper / rho.
      tracker_lr / tracker_opt, tracker_steps: the tracker's steps on f_lower.
      penalty, penalty_rate, penalty_power, penalty_max: rho_k = min(penalty + rate k^power, max).
      lower_set: the LL's feasible set Phi, a `bj.constraints.ConstraintSet` or a projection
        phi -> P_Phi(phi): follower and tracker steps are projected onto it. None: on a constrained
        problem the set it was built from (`ConstraintSet.problem`; an error if there is none),
        else Phi = everything.
      batch_size, sampler: full batch by default; minibatches (i.i.d. by default) make every step
        stochastic (the method is ours: no paper fixes a sampling scheme).
    """
    with named("pessimistic_penalty"):
        check_problem(problem)
        project = (lower_projection(problem, lower_set) if (lower_set is not None or problem.constrained)
                   else None)
        check_positive_int("follower_steps", follower_steps)
        check_positive_int("tracker_steps", tracker_steps)
        ramp = penalty_ramp(penalty, penalty_rate, penalty_power, penalty_max)
        return PessimisticPenalty(problem, rule("upper_lr", upper_lr, upper_opt),
                                  _projected_rule("follower_lr", follower_lr, follower_opt, project),
                                  make_samplers(batch_size, sampler),
                                  _projected_rule("tracker_lr", tracker_lr, tracker_opt, project), ramp,
                                  follower_steps, tracker_steps, check=check)


__all__ = ["PessimisticPenalty", "PessimisticState", "pessimistic_penalty"]

"""Implicit-gradient methods on constrained lower levels: the KKT direction rule and BSG with
constraints.

`KKT` is the implicit direction rule of a constrained LL (`bj.hypergrad.kkt`): at (theta, phi) the
multipliers are recovered by least squares from stationarity, the active set is read from them and
the constraint values, and the adjoint of the symmetric indefinite KKT system is solved by MINRES
(warm-started across outer steps when the solver is):

    K (a, b_P, b_Q) = (grad_phi f_upper, 0, 0),
    D_theta = grad_theta f_upper - grad^2_{theta phi} L a - grad_theta P_A' b_P - grad_theta Q' b_Q.

A weakly active constraint or a wrong-sign multiplier makes the step's status DEGENERATE (the
direction is kept finite: the one-sided estimate with the weakly active constraints held active,
so a run can pass through such a point; `bj.run(..., check=True)` stops on it).

`bsg_constrained` is BSG with constraints (Giovannelli, Kent, Vicente, "Bilevel stochastic methods
for optimization and machine learning: Bilevel stochastic descent and DARTS", 2021,
arXiv:2110.00604): T projected (stochastic) gradient steps on the LL, least-squares multipliers,
the KKT adjoint, and theta <- P_Theta(theta - alpha_k D_theta): `bilevel_loop` with projected LL
steps (`bj.constraints.projected`) and the `KKT` rule. Any other preset's composition (more LL
steps, another UL rule) is `bilevel_loop(problem, direction=KKT(...), lower_opt=projected(...))`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import equinox as eqx
import jax
import optax

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_in_range, check_step_size
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.base import OracleCounts
from bilevel_jax.algorithms.directions import DirectionRule, Directions, Evaluation, Joint
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.algorithms.steps import StepRule
from bilevel_jax.constraints import ConstraintSet, projected
from bilevel_jax.hypergrad.kkt import adjoint_like, kkt_direction
from bilevel_jax.linear_solvers import LinearSolver, minres
from bilevel_jax.problem import BilevelProblem


class KKTState(NamedTuple):
    solver: Any   # the adjoint solver's state; its x is (a, (b_P, b_Q))

    @property
    def v(self):
        return self.solver.x[0]


class KKT(DirectionRule):
    """D_theta from the KKT implicit gradient (module docstring)."""

    problem: BilevelProblem = eqx.field(static=True)
    solver: LinearSolver
    tol: jax.Array

    def init(self, theta, phi):
        return KKTState(self.solver.init(adjoint_like(phi, oracles.constraint_values(self.problem, theta, phi))))

    def evaluate(self, problem, point, batches, key, mode):
        out = kkt_direction(problem, point.theta, point.phi, batches.upper, batches.lower, self.solver,
                            point.rule_state.solver, None, self.tol, nan_if_degenerate=False)
        counts = OracleCounts.of(upper_grads=1, lower_grads=2, cross=1, hvps=out.info.solver.num_matvecs)
        return Evaluation(Joint(out.g), KKTState(out.state), counts, out.info.residual_norm, out.info.status)

    def directions(self, estimate):
        return Directions(estimate.hypergrad)


def kkt(problem: BilevelProblem, linear_solver: Optional[LinearSolver] = None, tol=1e-6) -> KKT:
    """The KKT direction rule with `linear_solver` (default `minres(50, warm_start=True)`)."""
    if not isinstance(problem, BilevelProblem) or not problem.constrained:
        raise ValueError("kkt: the problem must be a bj.BilevelProblem with lower_inequality / lower_equality.")
    solver = minres(50, warm_start=True) if linear_solver is None else linear_solver
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver (e.g. minres(50)), got {solver!r}.")
    check_in_range("tol", tol, 0.0, float("inf"))
    return KKT(problem, solver, as_array(tol))


def bsg_constrained(problem: BilevelProblem, *, lower_set, upper_lr=0.1, lower_lr=0.1, upper_opt=None,
                    lower_opt=None, lower_steps: int = 10, linear_solver: Optional[LinearSolver] = None, tol=1e-6,
                    batch_size=None, upper_decay=0.0, **kw) -> BilevelLoop:
    """BSG with constraints (module docstring). `lower_set`: the LL's feasible set (a
    `bj.constraints.ConstraintSet`, or a projection phi -> P_Phi(phi)) for the projected LL steps
    (`lower_lr`, or the optax rule `lower_opt`, then projected); the problem's constraint
    functions give the KKT system. UL steps `upper_lr` / (k+1)^`upper_decay`."""
    with named("bsg_constrained"):
        project = lower_set.project if isinstance(lower_set, ConstraintSet) else lower_set
        if not callable(project):
            raise TypeError(f"lower_set must be a bj.constraints.ConstraintSet or a projection, got {lower_set!r}.")
        if lower_opt is None:
            check_step_size("lower_lr", lower_lr)
        lower = StepRule(optimizer=projected(lower_opt if lower_opt is not None else optax.sgd(lower_lr), project))
        return bilevel_loop(problem, direction=kkt(problem, linear_solver, tol),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay), lower_opt=lower,
                            lower_steps=lower_steps_at_least_one(lower_steps), batch_size=batch_size,
                            name="bsg_constrained", **loop_options(kw))


__all__ = ["KKT", "KKTState", "bsg_constrained", "kkt"]

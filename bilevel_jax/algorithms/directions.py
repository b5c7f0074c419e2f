"""Direction rules: what an outer step computes at the point (theta, phi, rule state).

A rule `evaluate`s oracles on a batch into a small typed pytree, an estimator (SGD, STORM, SAGA,
SARAH) may recombine them, and the rule turns the estimate into `Directions` for theta (always)
and phi (single-loop rules that move phi with theta); a rule with a variable of its own (SOBA's v)
moves it in `advance`.

- `partial`   : D_theta = grad_theta f_upper. The alternating baseline that ignores the implicit
                gradient, and the zero-IG step of SignSGD + UL (Fan, Ram, Liu, "Sign-MAML", 2021,
                arXiv:2109.07497).
- `implicit`  : D_theta = grad_theta f_upper - J v,  v = linear_solver(A, grad_phi f_upper)
                (BA/BSA, Ghadimi & Wang 2018, arXiv:1802.02246; AID-BiO/StocBiO, Ji, Yang, Liang
                2021, arXiv:2010.07962; AmIGO, Arbel & Mairal 2022, arXiv:2111.14580; TTSA).
                The solver's state (warm start, Krylov basis) is the rule's state; v is its solution.
- `amortized` : SOBA's directions (Dagreou, Ablin, Vaiter, Moreau 2022, arXiv:2201.13409) from one
                fused vjp at the current (theta, phi, v):
                D_phi = grad_phi f_lower,  D_v = A v - grad_phi f_upper,  D_theta = grad_theta f_upper - J v.
                (v here is +A^{-1} b; SOBA's paper variable is -v.)

Oracle outputs are typed: `Separable(upper=UpperTerms, lower=LowerTerms)` when each part depends
on one level's batch only and is linear in its samples (what SAGA memories need), `Joint`
otherwise. Estimators select leaves with a mask of the same structure (as `optax.masked`).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax.algorithms.steps import Batches, Rule, StepRule, apply_step, as_rule, init_rule
from bilevel_jax.hypergrad.implicit import implicit_direction
from bilevel_jax.linear_solvers import LinearSolver
from bilevel_jax.problem import BilevelProblem

PyTree = Any


class UpperTerms(NamedTuple):
    """Oracles of f_upper on the UL batch."""
    g_theta: PyTree
    g_phi: PyTree = None


class LowerTerms(NamedTuple):
    """Oracles of f_lower on the LL batch: grad_phi f_lower, A v, J v."""
    grad_phi: PyTree = None
    hvp: PyTree = None
    cross: PyTree = None


class Separable(NamedTuple):
    upper: UpperTerms
    lower: LowerTerms


class Joint(NamedTuple):
    """An implicit hypergradient (both batches) and, for simultaneous rules, grad_phi f_lower."""
    hypergrad: PyTree
    grad_phi: PyTree = None


class Directions(NamedTuple):
    theta: PyTree
    phi: Optional[PyTree] = None


class Point(NamedTuple):
    """Where a rule is evaluated: the iterates and the rule's state."""
    theta: PyTree
    phi: PyTree
    rule_state: Any


class Evaluation(NamedTuple):
    """One evaluation: the oracles, the rule state to keep, residual, status. (Its oracle calls are
    counted by the oracle functions it makes them with, `bj.oracles.counting`.)"""
    oracles: Any
    rule_state: Any
    residual_norm: jax.Array
    status: jax.Array


class DirectionRule(eqx.Module):
    """Base class of the direction rules."""

    separable: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, theta, phi):
        """The rule's state before the first step."""

    @abc.abstractmethod
    def evaluate(self, problem: BilevelProblem, point: Point, batches: Batches, key, mode: str) -> Evaluation:
        """The oracles at `point` on `batches.upper` / `batches.lower`."""

    @abc.abstractmethod
    def directions(self, estimate) -> Directions:
        """D_theta (and D_phi) from an estimate of the oracles."""

    def advance(self, rule_state, estimate, count):
        """Move the rule's own variables after the step: `(rule_state, status)`."""
        return rule_state, st.ok()

    @property
    def moves_phi(self) -> bool:
        return False


def _no_residual():
    return jnp.asarray(jnp.nan, jnp.result_type(float))


class Partial(DirectionRule):
    """D_theta = grad_theta f_upper (no implicit gradient); with `simultaneous`, also D_phi."""

    simultaneous: bool = eqx.field(static=True, default=False)
    separable: ClassVar[bool] = True

    def init(self, theta, phi):
        return None

    def evaluate(self, problem, point, batches, key, mode):
        g_theta = oracles.upper_grad_theta(problem, point.theta, point.phi, batches.upper)
        grad_phi = (oracles.lower_grad_phi(problem, point.theta, point.phi, batches.lower)
                    if self.simultaneous else None)
        return Evaluation(Separable(UpperTerms(g_theta), LowerTerms(grad_phi)), point.rule_state, _no_residual(),
                          st.ok())

    def directions(self, estimate):
        return Directions(estimate.upper.g_theta, estimate.lower.grad_phi)

    @property
    def moves_phi(self):
        return self.simultaneous


class ImplicitState(NamedTuple):
    solver: Any   # the linear solver's state; its `x` is v

    @property
    def v(self):
        return self.solver.x


class Implicit(DirectionRule):
    """D_theta = grad_theta f_upper - J v with v from `solver` (warm started when the solver is);
    with `simultaneous`, D_phi = grad_phi f_lower at the same point (free: the primal output of
    the linearization)."""

    solver: LinearSolver
    simultaneous: bool = eqx.field(static=True, default=False)

    def init(self, theta, phi):
        return ImplicitState(self.solver.init(oracles.differentiable(phi)))

    def evaluate(self, problem, point, batches, key, mode):
        out = implicit_direction(problem, point.theta, point.phi, batches.upper, batches.lower, self.solver,
                                 point.rule_state.solver, key, batches.fresh_lower, mode)
        grad_phi = out.lin.gradient() if self.simultaneous else None
        return Evaluation(Joint(out.g, grad_phi), ImplicitState(out.state), out.info.residual_norm, out.info.status)

    def directions(self, estimate):
        return Directions(estimate.hypergrad, estimate.grad_phi)

    @property
    def moves_phi(self):
        return self.simultaneous


class AmortizedState(NamedTuple):
    v: PyTree
    opt_state: Any


class Amortized(DirectionRule):
    """SOBA's directions from one fused vjp of grad_phi f_lower and one reverse pass of f_upper;
    v moves by `v_rule` on D_v = A v - grad_phi f_upper."""

    v_rule: StepRule
    separable: ClassVar[bool] = True

    def init(self, theta, phi):
        v = otu.tree_zeros_like(oracles.differentiable(phi))
        return AmortizedState(v, init_rule(self.v_rule, v))

    def evaluate(self, problem, point, batches, key, mode):
        g_theta, g_phi = oracles.upper_grads(problem, point.theta, point.phi, batches.upper)
        grad_phi, av, jv = oracles.grad_hvp_cross(problem, point.theta, point.phi, point.rule_state.v,
                                                  batches.lower, mode)
        return Evaluation(Separable(UpperTerms(g_theta, g_phi), LowerTerms(grad_phi, av, jv)), point.rule_state,
                          otu.tree_norm(otu.tree_sub(av, g_phi)), st.ok())

    def directions(self, estimate):
        return Directions(otu.tree_sub(estimate.upper.g_theta, estimate.lower.cross), estimate.lower.grad_phi)

    def advance(self, rule_state, estimate, count):
        d_v = otu.tree_sub(estimate.lower.hvp, estimate.upper.g_phi)
        v, opt_state, status = apply_step(self.v_rule, rule_state.v, rule_state.opt_state, d_v, count)
        return AmortizedState(v, opt_state), status

    @property
    def moves_phi(self):
        return True


def partial(simultaneous: bool = False) -> Partial:
    return Partial(simultaneous)


def implicit(linear_solver: LinearSolver, warm_start: Optional[bool] = None, simultaneous: bool = False) -> Implicit:
    """The implicit rule with `linear_solver`; `warm_start` (if given) overrides the solver's."""
    if not isinstance(linear_solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver (e.g. cg(maxiter=10)), "
                        f"got {linear_solver!r}.")
    if warm_start is not None and warm_start != linear_solver.warm_start:
        linear_solver = dataclasses.replace(linear_solver, warm_start=warm_start)
    return Implicit(linear_solver, simultaneous)


def amortized(v_opt: Rule) -> Amortized:
    """SOBA's directions; `v_opt` moves v (an optax transform or a `StepRule`)."""
    return Amortized(as_rule("v_opt", v_opt))


__all__ = ["Amortized", "AmortizedState", "DirectionRule", "Directions", "Evaluation", "Implicit", "ImplicitState",
           "Joint", "LowerTerms", "Partial", "Point", "Separable", "UpperTerms", "amortized", "implicit", "partial"]

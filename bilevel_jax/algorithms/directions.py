"""Direction rules: what an outer step computes at the point (theta, phi, v).

Each rule evaluates raw oracle outputs on a batch, and `combine`s them into the directions
D_theta (always), D_phi (single-loop methods that move phi with theta) and D_v (amortized v):

- `partial`   : D_theta = grad_theta f_upper. The alternating baseline that ignores the implicit
                gradient (seed 001 "Meta-algorithm"), and the zero-IG step of SignSGD + UL
                (seed 000, Alg. 1).
- `implicit`  : D_theta = grad_theta f_upper - J v,  v = linear_solver(A, grad_phi f_upper)
                (BA/BSA/AID-BiO/StocBiO/AmIGO/TTSA, seed 002 Alg. 1-4), warm-started or not.
- `amortized` : the SOBA framework of seed 003: with one fused vjp at the current (theta, phi, v)
                D_phi = grad_phi f_lower,  D_v = A v - grad_phi f_upper,  D_theta = grad_theta f_upper - J v.
                (v here is +A^{-1} b; SOBA's paper variable is -v.)

Raw outputs are nested dicts. A rule is `separable` when they split into an "upper" part (upper
batch only) and a "lower" part (lower batch only), each linear in the samples, which SAGA-type
memories (SABA) need.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax.algorithms.base import OracleCounts
from bilevel_jax.hypergrad.implicit import implicit_direction
from bilevel_jax.linear_solvers import LinearSolver
from bilevel_jax.problem import BilevelProblem

PyTree = Any


class Point(NamedTuple):
    theta: PyTree
    phi: PyTree
    v: PyTree
    aux: PyTree


class Directions(NamedTuple):
    theta: PyTree
    phi: Optional[PyTree] = None
    v: Optional[PyTree] = None


class Evaluation(NamedTuple):
    """One evaluation of a rule: raw oracles, the v and aux to keep, its oracle calls, residual."""

    raw: dict
    v: PyTree
    aux: PyTree
    counts: OracleCounts
    residual_norm: Any


class DirectionRule(NamedTuple):
    init: Callable       # (theta, phi) -> (v, aux)
    evaluate: Callable   # (problem, point, upper_batch, lower_batch, key, lower_sampler, mode) -> Evaluation
    combine: Callable    # raw -> Directions
    separable: bool
    name: str


def partial(simultaneous: bool = False) -> DirectionRule:
    """D_theta = grad_theta f_upper (no implicit gradient); with `simultaneous`, also D_phi."""

    def init(theta, phi):
        return None, None

    def evaluate(problem, point, upper_batch, lower_batch, key, lower_sampler, mode):
        raw = {"upper": {"g_theta": oracles.upper_grad_theta(problem, point.theta, point.phi, upper_batch)},
               "lower": {}}
        if simultaneous:
            raw["lower"]["grad_phi"] = oracles.lower_grad_phi(problem, point.theta, point.phi, lower_batch)
        return Evaluation(raw, None, None, OracleCounts.of(upper_grads=1, lower_grads=int(simultaneous)),
                          jnp.asarray(jnp.nan))

    def combine(raw):
        return Directions(theta=raw["upper"]["g_theta"], phi=raw["lower"].get("grad_phi"))

    return DirectionRule(init, evaluate, combine, True, "partial")


def implicit(linear_solver: LinearSolver, warm_start: bool = False, simultaneous: bool = False) -> DirectionRule:
    """D_theta = grad_theta f_upper - J v with v from `linear_solver` (its state carried across
    steps; warm started from the previous v if `warm_start` or the solver's own `warm_start`). With
    `simultaneous`, D_phi = grad_phi f_lower at the same point (free: the primal output of the
    linearization)."""
    if not isinstance(linear_solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {linear_solver!r}.")
    solver = dataclasses.replace(linear_solver, warm_start=warm_start or linear_solver.warm_start)

    def init(theta, phi):
        phi_d = oracles.differentiable(phi)
        return otu.tree_zeros_like(phi_d), solver.init(phi_d)

    def evaluate(problem, point, upper_batch, lower_batch, key, lower_sampler, mode):
        out = implicit_direction(problem, point.theta, point.phi, upper_batch, lower_batch, solver,
                                 point.aux, key, lower_sampler, mode)
        raw = {"joint": {"theta": out.g}}
        if simultaneous:
            raw["joint"]["phi"] = out.lin.grad_phi
        counts = OracleCounts.of(upper_grads=1, lower_grads=int(simultaneous), cross=1) + \
            OracleCounts.of(hvps=out.info.num_matvecs)
        return Evaluation(raw, out.v, out.state, counts, out.info.residual_norm)

    def combine(raw):
        return Directions(theta=raw["joint"]["theta"], phi=raw["joint"].get("phi"))

    return DirectionRule(init, evaluate, combine, False, "implicit")


def amortized() -> DirectionRule:
    """The SOBA directions (Dagreou et al. 2022; seed 003 "General framework") from one fused
    vjp of grad_phi f_lower and one reverse pass of f_upper."""

    def init(theta, phi):
        return otu.tree_zeros_like(oracles.differentiable(phi)), None

    def evaluate(problem, point, upper_batch, lower_batch, key, lower_sampler, mode):
        g_theta, g_phi = oracles.upper_grads(problem, point.theta, point.phi, upper_batch)
        grad_phi, av, jv = oracles.grad_hvp_cross(problem, point.theta, point.phi, point.v, lower_batch, mode)
        raw = {"upper": {"g_theta": g_theta, "g_phi": g_phi},
               "lower": {"grad_phi": grad_phi, "hvp": av, "cross": jv}}
        counts = OracleCounts.of(lower_grads=1, upper_grads=1, hvps=1, cross=1)
        return Evaluation(raw, point.v, None, counts, otu.tree_norm(otu.tree_sub(av, g_phi)))

    def combine(raw):
        up, low = raw["upper"], raw["lower"]
        return Directions(theta=otu.tree_sub(up["g_theta"], low["cross"]), phi=low["grad_phi"],
                          v=otu.tree_sub(low["hvp"], up["g_phi"]))

    return DirectionRule(init, evaluate, combine, True, "amortized")

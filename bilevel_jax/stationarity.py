"""Stationarity of a projected or non-smooth upper level: the gradient mapping.

    min_{theta in Theta}  F(theta) + h(theta),      F(theta) = f_upper(theta, phi*(theta))

Unconstrained (Theta the whole space, h = 0), theta is eps-stationary when ||grad F(theta)|| is
small. On a closed convex set Theta (`BilevelProblem.project_upper`) the stationarity condition is

    <grad F(theta*), theta - theta*> >= 0   for all theta in Theta,

and ||grad F(theta*)|| need not vanish: at a solution on a face of a box, grad F points out of the
box. The gradient mapping (Nesterov, "Introductory Lectures on Convex Optimization", 2004,
Section 2.2.3; with stochastic gradients, Ghadimi, Lan, Zhang, "Mini-batch stochastic
approximation methods for nonconvex stochastic composite optimization", Math. Program. 155, 2016,
arXiv:1308.6594)

    G_eta(theta) = (theta - P_Theta(theta - eta grad F(theta))) / eta

vanishes exactly at those points (any eta > 0), is grad F where Theta is the whole space, and
satisfies ||G_eta(theta)|| <= ||grad F(theta)|| for theta in Theta (P_Theta is non-expansive and
fixes theta). It is what a projected step theta+ = P_Theta(theta - eta d) moves by, per unit step,
when d = grad F.

With a non-smooth convex term h (an l1 penalty; the indicator of Theta included when theta is also
projected), the same formula with the proximal map of eta h in place of the projection,

    G_eta(theta) = (theta - prox_{eta h}(theta - eta grad F(theta))) / eta,
    prox_{eta lam ||.||_1}(x) = sign(x) max(|x| - eta lam, 0)        (soft thresholding),

is the prox-gradient mapping; it vanishes exactly where 0 in grad F + dh. It stands in for the
Moreau-envelope measure of Hong, Wai, Wang, Yang ("A two-timescale stochastic algorithm framework
for bilevel optimization", SIAM J. Optim. 33(1), 2023, arXiv:2007.05170): with the proximal point
theta_hat(theta) = argmin_u {F(u) + h(u) + (rho/2) ||u - theta||^2}, theta is nearly stationary
when ||theta_hat(theta) - theta|| (= ||grad M_{1/rho}(theta)|| / rho) is small. theta_hat needs an
inner minimisation; the prox-gradient mapping needs one gradient, and for an L-smooth F and a
convex h the two measures vanish at the same points and bound each other up to constants
depending on eta L (Drusvyatskiy, Lewis, "Error bounds, quadratic growth, and linear convergence
of proximal methods", Math. Oper. Res. 43(3), 2018, arXiv:1602.06661; Davis, Drusvyatskiy,
"Stochastic model-based minimization of weakly convex functions", SIAM J. Optim. 29(1), 2019,
arXiv:1803.06523). Where grad F is the identity plus a constant (F = ||theta - c||^2 / 2) they
coincide: theta_hat(theta) = prox_{eta h}(theta - eta grad F(theta)) with rho = 1/eta - 1
(eta < 1), so ||theta_hat - theta|| = eta ||G_eta(theta)||.

`measure(problem, grad_fn)` is an `eval_fn` for `bj.run`: its histories then report
`grad_mapping_norm` = ||G_eta|| when the problem projects theta, `prox_grad_mapping_norm` when a
`prox` is given, and `grad_norm` = ||grad F|| always (alone for an unconstrained problem, where it
is the gradient mapping). No oracle is called beyond `grad_fn`, which computes grad F as the
history's ||grad F|| would (a closed form, or `bj.hypergradient` at phi*(theta)). The default step
eta = 1 is the one of the projected-gradient norm ||theta - P(theta - grad F)|| that reference
solvers report; pass the upper step size to measure what a projected step of that size sees.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax._checks import check_step_size
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any
Prox = Callable[[PyTree, jax.Array], PyTree]   # (x, eta) -> prox_{eta h}(x)


def gradient_mapping(theta: PyTree, grad: PyTree, step_size=1.0, prox: Optional[Prox] = None) -> PyTree:
    """G_eta(theta) = (theta - prox(theta - eta grad, eta)) / eta (module docstring), on the
    inexact-array leaves of theta; `grad` itself when `prox` is None (Theta the whole space).

    `prox(x, eta)` is prox_{eta h}(x): `projection(problem.project)` for a projected theta,
    `l1_prox(weight)` for an l1 term. A concrete step size must be a positive finite number."""
    if prox is None:
        return grad
    _check_positive("step_size", step_size)
    return _mapping(theta, _prox_point(theta, grad, step_size, prox), step_size)


def projection(project: Callable[[PyTree], PyTree]) -> Prox:
    """The proximal map of the indicator of Theta: `project` (e.g. `problem.project`), for any eta."""
    return lambda x, step_size: project(x)


def soft_threshold(x: PyTree, threshold) -> PyTree:
    """sign(x) max(|x| - threshold, 0) on every inexact-array leaf: the proximal map of threshold ||.||_1."""
    return _on_arrays(lambda a: jnp.sign(a) * jnp.maximum(jnp.abs(a) - threshold, 0.0), x)


def l1_prox(weight, bounds: Optional[Sequence[float]] = None) -> Prox:
    """The proximal map of eta h with h = weight ||.||_1, plus the indicator of the box
    `bounds = (lower, upper)` when given: clip(soft_threshold(x, eta weight), lower, upper), exact
    because both terms act coordinate by coordinate (a 1-D convex function restricted to an
    interval has the clipped proximal point)."""
    _check_positive("weight", weight)
    if bounds is None:
        return lambda x, step_size: soft_threshold(x, step_size * weight)
    lower, upper = bounds
    if not lower <= upper:
        raise ValueError(f"l1_prox: bounds must satisfy lower <= upper, got {bounds!r}.")
    return lambda x, step_size: _on_arrays(lambda a: jnp.clip(a, lower, upper), soft_threshold(x, step_size * weight))


def measure(problem: BilevelProblem, grad_fn: Callable[[Any, Any], PyTree], step_size=1.0,
            prox: Optional[Prox] = None) -> Callable[[Any, Any], Dict[str, jax.Array]]:
    """An `eval_fn` for `bj.run`: `(state, data) -> {"grad_norm": ||grad F(theta)||, ...}` with
    `grad_fn(state, data)` = grad F(state.theta) (of the smooth part when `prox` is given), plus

    - `grad_mapping_norm` = ||G_eta(theta)|| with P_Theta = `problem.project`, when the problem
      projects theta (`project_upper`) and no `prox` is given;
    - `prox_grad_mapping_norm` = ||G_eta(theta)|| with `prox` (module docstring), when given. On a
      problem that projects theta the prox must be that of h plus the indicator of Theta
      (`l1_prox(weight, bounds)` for a box): where its point is not in Theta (P_Theta moves it by
      more than rounding) the record is NaN, not a number of another problem.

    Merge it with other metrics in one eval_fn: `lambda s, d: {**stat(s, d), "value": ...}`."""
    check_problem(problem, "bj.stationarity.measure")
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be a callable (state, data) -> grad F(theta), got {type(grad_fn).__name__}.")
    _check_positive("step_size", step_size)
    projected = problem.project_upper is not None
    if prox is not None and not callable(prox):
        raise TypeError(f"prox must be a callable (x, step_size) -> prox_(step_size h)(x), got {type(prox).__name__}.")

    def record(state, data):
        theta = state.theta
        grad = grad_fn(state, data)
        out = {"grad_norm": otu.tree_norm(grad)}
        if prox is not None:
            point = _prox_point(theta, grad, step_size, prox)
            mapping = otu.tree_norm(_mapping(theta, point, step_size))
            if projected:
                mapping = jnp.where(_in_set(problem, point), mapping, jnp.nan)
            out["prox_grad_mapping_norm"] = mapping
        elif projected:
            out["grad_mapping_norm"] = otu.tree_norm(gradient_mapping(theta, grad, step_size,
                                                                      projection(problem.project)))
        return out

    return record


def _prox_point(theta, grad, step_size, prox: Prox):
    """prox(theta - eta grad, eta), the step on the inexact leaves of theta."""
    theta_d, rest = eqx.partition(theta, eqx.is_inexact_array)
    return prox(eqx.combine(otu.tree_add_scale(theta_d, -step_size, grad), rest), step_size)


def _mapping(theta, point, step_size):
    """(theta - point) / eta on the inexact leaves."""
    diff = otu.tree_sub(eqx.filter(theta, eqx.is_inexact_array), eqx.filter(point, eqx.is_inexact_array))
    return otu.tree_scale(1.0 / step_size, diff)


def _in_set(problem: BilevelProblem, point) -> jax.Array:
    """Whether P_Theta leaves `point` where it is, to rounding (relative sqrt(eps))."""
    point_d = eqx.filter(point, eqx.is_inexact_array)
    moved = otu.tree_norm(otu.tree_sub(eqx.filter(problem.project(point), eqx.is_inexact_array), point_d))
    leaves = jax.tree_util.tree_leaves(point_d)
    tol = jnp.sqrt(jnp.finfo(leaves[0].dtype).eps) if leaves else 0.0
    return moved <= tol * (1.0 + otu.tree_norm(point_d))


def _on_arrays(fn: Callable, tree: PyTree) -> PyTree:
    """`fn` on the inexact-array leaves of `tree`; the other leaves as they are."""
    return jax.tree_util.tree_map(lambda a: fn(a) if eqx.is_inexact_array(a) else a, tree)


def _check_positive(name: str, value) -> None:
    """A positive finite number or array (a traced one passes)."""
    if callable(value):
        raise TypeError(f"{name} must be a positive number or array, got {value!r}.")
    check_step_size(name, value)


__all__ = ["Prox", "gradient_mapping", "l1_prox", "measure", "projection", "soft_threshold"]

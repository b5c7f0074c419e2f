"""Lower-level steps (below `hypergrad/` and `constraints.py`, which both use them): `steps` updates of any optax transform on f_lower(theta, ., batch), in a `lax.scan`.

    phi_{t+1} = phi_t + optimizer.update(grad_phi f_lower(theta, phi_t, batch_t), ...)

The optimizer may be a plain `optax.GradientTransformation` (sgd, adam, ...) or an
`optax.GradientTransformationExtraArgs` that needs the objective itself (`optax.lbfgs()`, the
zoom / backtracking line searches): every update is called with

    value=f_lower(theta, phi_t, batch_t),  grad=grad_phi f_lower(...),  value_fn=p -> f_lower(theta, p, batch_t)

where `p` (and `grad`, and the `params` the optimizer sees) is the differentiable part of phi,
`eqx.filter(phi, eqx.is_inexact_array)`; plain transforms ignore the extra arguments
(`optax.with_extra_args_support`). Value and gradient come from one `jax.value_and_grad`.

phi may be an equinox Module (a neural network): only its inexact-array leaves are updated and
carried through the scan; static parts (activation functions, integer leaves) stay outside it.

Shared by the double loops of `bj.algorithms`, by unrolled differentiation (which differentiates
through it) and by `bj.argmin` (which does not).
"""
from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import optax

from bilevel_jax import oracles
from bilevel_jax.cache import same_code_rule
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sampling import read

PyTree = Any


def _lower_objective(problem: BilevelProblem, theta, phi_static, batch) -> Callable[[PyTree], jax.Array]:
    """p -> f_lower(theta, combine(p, phi_static), batch): the LL objective of the differentiable
    part of phi at fixed theta and batch (the `value_fn` of line searches and L-BFGS)."""

    batch = read(batch)

    def value_fn(phi_d):
        return problem.f_lower(theta, eqx.combine(phi_d, phi_static), batch)

    return value_fn


def apply_rule(optimizer: optax.GradientTransformation, grad, opt_state, phi_d, /, **extra_args):
    """phi_d + optimizer.update(grad, opt_state, phi_d, **extra_args) and the new state: the rule
    alone, with the gradient as an input (mixed-mode unrolling differentiates it separately)."""
    updates, opt_state = optax.with_extra_args_support(optimizer).update(grad, opt_state, phi_d, **extra_args)
    return eqx.apply_updates(phi_d, updates), opt_state


def lower_step(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi, opt_state, batch):
    """One LL step: (phi, opt_state) -> (phi', opt_state').

    `opt_state` is `optimizer.init(oracles.differentiable(phi))`'s shape. The update receives
    `value`, `grad` and `value_fn` as extra arguments (used by `optax.lbfgs()` and line searches,
    ignored by plain transforms).
    """
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)
    value_fn = _lower_objective(problem, theta, phi_s, batch)
    value, grad = oracles.lower_value_and_grad_phi(problem, theta, phi, batch)
    phi_d, opt_state = apply_rule(optimizer, grad, opt_state, phi_d, value=value, grad=grad, value_fn=value_fn)
    return eqx.combine(phi_d, phi_s), opt_state


def lower_steps(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi, opt_state,
                steps: int, batch_fn: Callable[[Any], PyTree], checkpoint: bool = False):
    """`steps` LL steps; `batch_fn(t)` gives the batch of step t (t a traced int).

    The scan carries only the inexact-array part of phi (and the optimizer state); the rest of
    phi (e.g. an equinox Module's activation functions) is closed over and recombined. Counted as
    `steps` LL gradients (`oracles.counting`).
    """
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)

    def step(carry, t):
        phi_d, opt_state = carry
        phi, opt_state = lower_step(problem, optimizer, theta, eqx.combine(phi_d, phi_s), opt_state, batch_fn(t))
        return (oracles.differentiable(phi), opt_state), None

    if checkpoint:
        step = jax.checkpoint(step)
    with oracles.counting(times=steps):   # the body is traced once and runs `steps` times
        (phi_d, opt_state), _ = jax.lax.scan(step, (phi_d, opt_state), jax.numpy.arange(steps))
    return eqx.combine(phi_d, phi_s), opt_state


def solve_lower(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi0, batch,
                steps: int, checkpoint: bool = False):
    """phi_T after `steps` deterministic LL steps from phi0 (fresh optimizer state).

    Compiled once per configuration: the problem (equal when it holds the same functions), the
    optimizer (its functions compared by code and closure, `bj.cache.same_code_rule`: a new
    `optax.lbfgs()` in every call is the same configuration), `steps`, `checkpoint` and the
    arrays' shapes are the key."""
    return _solve_lower(problem, same_code_rule(optimizer), theta, phi0, batch, steps, checkpoint)


@eqx.filter_jit
def _solve_lower(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi0, batch,
                 steps: int, checkpoint: bool):
    opt_state = optimizer.init(oracles.differentiable(phi0))
    phi, _ = lower_steps(problem, optimizer, theta, phi0, opt_state, steps, lambda t: batch, checkpoint)
    return phi

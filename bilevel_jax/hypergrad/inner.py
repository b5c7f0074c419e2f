"""Lower-level steps: `steps` updates of any optax transform on grad_phi f_lower, in a `lax.scan`.

    phi_{t+1} = phi_t + optimizer.update(grad_phi f_lower(theta, phi_t, batch_t))

Shared by the double loops of `bj.algorithms`, by unrolled differentiation (which differentiates
through it) and by `bj.argmin` (which does not).
"""
from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import optax

from bilevel_jax import oracles
from bilevel_jax.problem import BilevelProblem

PyTree = Any


def lower_step(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi, opt_state, batch):
    """One LL step: (phi, opt_state) -> (phi', opt_state')."""
    g = oracles.lower_grad_phi(problem, theta, phi, batch)
    updates, opt_state = optimizer.update(g, opt_state, oracles.differentiable(phi))
    return eqx.apply_updates(phi, updates), opt_state


def lower_steps(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi, opt_state,
                steps: int, batch_fn: Callable[[Any], PyTree], checkpoint: bool = False):
    """`steps` LL steps; `batch_fn(t)` gives the batch of step t (t a traced int)."""

    def step(carry, t):
        phi, opt_state = carry
        return lower_step(problem, optimizer, theta, phi, opt_state, batch_fn(t)), None

    if checkpoint:
        step = jax.checkpoint(step)
    (phi, opt_state), _ = jax.lax.scan(step, (phi, opt_state), jax.numpy.arange(steps))
    return phi, opt_state


def solve_lower(problem: BilevelProblem, optimizer: optax.GradientTransformation, theta, phi0, batch,
                steps: int, checkpoint: bool = False):
    """phi_T after `steps` deterministic LL steps from phi0 (fresh optimizer state)."""
    opt_state = optimizer.init(oracles.differentiable(phi0))
    phi, _ = lower_steps(problem, optimizer, theta, phi0, opt_state, steps, lambda t: batch, checkpoint)
    return phi

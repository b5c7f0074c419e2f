"""Shared keyword handling of the presets: step sizes to optax rules, paper decays."""
from __future__ import annotations

import optax

from bilevel_jax._checks import check_step_size
from bilevel_jax.schedules import inverse_power


def decayed(name: str, lr, exponent: float):
    """`lr` as given if it is a schedule; else lr / (k + 1)^exponent (constant for exponent 0)."""
    check_step_size(name, lr)
    if callable(lr) or exponent == 0:
        return lr
    return inverse_power(lr, exponent)


def sgd(name: str, lr, exponent: float = 0.0) -> optax.GradientTransformation:
    """Plain (projected, by the loop) SGD with the decayed step size."""
    return optax.sgd(decayed(name, lr, exponent))


def const(value):
    """Linear solvers take a constant step (their own loop has no outer count)."""
    if callable(value):
        raise ValueError("the linear solver's step (neumann_eta / lower_lr used as eta) must be a number or "
                         "an array, not a schedule: pass neumann_eta= or linear_solver= explicitly.")
    return value

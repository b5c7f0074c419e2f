"""Shared keyword handling of the presets: step sizes to optax rules, paper decays."""
from __future__ import annotations

import optax

from bilevel_jax._checks import check_step_size
from bilevel_jax.schedules import inverse_power


def decayed(name: str, lr, exponent: float, every: int = 1):
    """`lr` as given if it is a schedule; else lr / (k + 1)^exponent (constant for exponent 0),
    with k the outer iteration when the optimiser makes `every` updates per outer iteration (the
    T LL steps of a double loop all use the outer step's beta_k)."""
    check_step_size(name, lr)
    if callable(lr) or exponent == 0:
        return lr
    schedule = inverse_power(lr, exponent)
    if every == 1:
        return schedule
    per_outer = lambda count: schedule(count // every)
    per_outer.exponent = schedule.exponent
    return per_outer


def sgd(name: str, lr, exponent: float = 0.0, every: int = 1) -> optax.GradientTransformation:
    """Plain (projected, by the loop) SGD with the decayed step size."""
    return optax.sgd(decayed(name, lr, exponent, every))


def solver_eta(lower_lr, neumann_eta=None):
    """The linear solver's constant step: `neumann_eta`, or `lower_lr` when it is None (the
    presets' default). Checked under the name the user gave; a schedule is refused (the solver's
    own loop has no outer count)."""
    name, value = ("lower_lr", lower_lr) if neumann_eta is None else ("neumann_eta", neumann_eta)
    if callable(value):
        raise ValueError(f"{name} is used as the linear solver's step here and must be a number or an array, "
                         "not a schedule: pass neumann_eta= (or linear_solver=) explicitly.")
    check_step_size(name, value)
    return value

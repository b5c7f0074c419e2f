"""Shared keyword handling of the presets: step sizes or optax rules into `StepRule`s, with
errors that name the preset and its own arguments."""
from __future__ import annotations

import contextlib
from typing import Optional

import optax

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.algorithms.steps import StepRule, step_rule


@contextlib.contextmanager
def named(preset: str):
    """Prefix the preset's name to the errors raised by its argument checks."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if str(e).startswith(f"{preset}:"):
            raise
        raise type(e)(f"{preset}: {e}") from None


def rule(name: str, lr, opt: Optional[optax.GradientTransformation] = None, exponent: float = 0.0,
         every: int = 1, transform=optax.sgd) -> StepRule:
    """The step rule of argument `name` (e.g. "upper_lr"): the optax rule `opt` if given, else
    `transform(lr / (k // every + 1)^exponent)` (constant for exponent 0, `lr` as given if it is a
    schedule)."""
    return step_rule(name, lr, optimizer=opt, exponent=exponent, every=every, transform=transform)


def lower_steps_at_least_one(lower_steps) -> int:
    """Double-loop methods need LL steps: 0 would leave phi where it starts."""
    return check_positive_int("lower_steps", lower_steps, minimum=1)


def solver_eta(lower_lr, neumann_eta=None):
    """The linear solver's constant step: `neumann_eta`, or `lower_lr` when it is None (the
    presets' default). A schedule is refused (the solver's own loop has no outer count)."""
    name, value = ("lower_lr", lower_lr) if neumann_eta is None else ("neumann_eta", neumann_eta)
    if callable(value):
        raise ValueError(f"{name} is used as the linear solver's step here and must be a number or an array, "
                         "not a schedule: pass neumann_eta= (or linear_solver=) explicitly.")
    check_step_size(name, value)
    return value

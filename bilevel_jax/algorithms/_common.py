"""Shared keyword handling of the presets: step sizes or optax rules into `StepRule`s, with
errors that name the preset and its own arguments."""
from __future__ import annotations

import contextlib
from typing import Optional

import optax

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.algorithms.steps import StepRule, step_rule
from bilevel_jax.linear_solvers import neumann, sampled_neumann


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


LOOP_OPTIONS = ("sampler", "mode", "check")


def loop_options(kw: dict) -> dict:
    """The `bilevel_loop` options a preset forwards (sampler, mode, check); anything else is an
    error (e.g. `lower_steps` for a single-loop method, which would silently change it)."""
    unknown = sorted(set(kw) - set(LOOP_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the loop options are {', '.join(LOOP_OPTIONS)}.")
    return kw


def lower_steps_at_least_one(lower_steps) -> int:
    """Double-loop methods need LL steps: 0 would leave phi where it starts."""
    return check_positive_int("lower_steps", lower_steps, minimum=1)


def neumann_series(steps, eta, batch_size, shared_batch: bool):
    """The Neumann-series solver of StocBiO-type presets: a fresh minibatch per factor
    (`sampled_neumann`, unbiased for the truncated series) when the LL is sampled, else
    (full batch, or `shared_batch=True`) every factor on the step's LL batch (`neumann`; with
    minibatches biased: E[(I - eta A_xi)^q] != (I - eta A)^q)."""
    lower = batch_size[1] if isinstance(batch_size, tuple) else batch_size
    if lower is None or shared_batch:
        return neumann(steps, eta)
    return sampled_neumann(steps, eta)


def solver_eta(lower_lr, neumann_eta=None, lower_opt=None):
    """The linear solver's constant step: `neumann_eta`, or `lower_lr` when it is None (the
    presets' default). A schedule is refused (the solver's own loop has no outer count), and so is
    the default when `lower_opt` replaces `lower_lr` as phi's rule (the solver would silently use
    the unused `lower_lr`)."""
    if neumann_eta is None and lower_opt is not None:
        raise ValueError("lower_opt replaces lower_lr as the step rule of phi, but the linear solver's step "
                         "defaults to lower_lr: pass neumann_eta= (or linear_solver=) explicitly.")
    name, value = ("lower_lr", lower_lr) if neumann_eta is None else ("neumann_eta", neumann_eta)
    if callable(value):
        raise ValueError(f"{name} is used as the linear solver's step here and must be a number or an array, "
                         "not a schedule: pass neumann_eta= (or linear_solver=) explicitly.")
    check_step_size(name, value)
    return value

"""Step-size schedules not in optax: the polynomial decays of two-timescale analyses.

    inverse_power(c, p)(k) = c / (k + offset)^p

TTSA (Hong, Wai, Wang, Yang, "A Two-Timescale Framework for Bilevel Optimization", 2020,
arXiv:2007.05170): alpha_k ~ K^{-3/5}, beta_k ~ K^{-2/5} (weakly convex UL) or alpha_k ~ 1/k,
beta_k ~ k^{-2/3} (strongly convex UL); SOBA's theorem (Dagreou, Ablin, Vaiter, Moreau 2022,
arXiv:2201.13409): rho_k ~ k^{-2/5}, gamma_k ~ k^{-3/5}; MRBO/SUSTAIN: (w + k)^{-1/3}.

A schedule here is an equinox Module: its constants are array fields (a sweep can `vmap` over
them), and two equal schedules compare equal, so an algorithm holding one crosses `jit` without
recompiling. It is also an optax schedule (a function of the step count).
"""
from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax

from bilevel_jax._checks import as_array, check_in_range, check_positive_int, check_step_size


class InversePower(eqx.Module):
    """k -> c / (j + offset)^p with j = floor(k / every) (or k mod cycle).

    `every` > 1 holds the value for `every` consecutive counts: the T lower-level steps of outer
    iteration k of a double loop all use beta_k. `cycle` > 1 restarts the decay every `cycle`
    counts: the inner steps t = 0..T-1 of every outer iteration use beta_t.
    """

    c: jax.Array
    p: jax.Array
    offset: jax.Array
    every: int = eqx.field(static=True, default=1)
    cycle: int = eqx.field(static=True, default=1)

    @property
    def exponent(self):
        return self.p

    def __call__(self, count):
        k = count // self.every if self.every > 1 else count
        k = k % self.cycle if self.cycle > 1 else k
        return self.c / (k + self.offset) ** self.p


def inverse_power(c, p, offset=1.0, every: int = 1, cycle: int = 1) -> InversePower:
    """k -> c / (j + offset)^p, j = k // every (or k mod cycle), an optax-compatible schedule;
    c, p may be arrays (sweeps)."""
    check_step_size("c", c)
    check_in_range("p", p, 0.0, 1.0)
    check_step_size("offset", offset)
    check_positive_int("every", every)
    check_positive_int("cycle", cycle)
    if every > 1 and cycle > 1:
        raise ValueError("inverse_power: give `every` or `cycle`, not both.")
    return InversePower(as_array(c), as_array(p), as_array(offset), every, cycle)


class Constant(eqx.Module):
    """k -> value."""

    value: jax.Array

    def __call__(self, count):
        return self.value


class OneMinus(eqx.Module):
    """k -> 1 - schedule(k) (STORM's a_k = 1 - eta_k)."""

    schedule: Callable

    def __call__(self, count):
        return 1.0 - self.schedule(count)


def as_schedule(value):
    """A float/array or a schedule, as a schedule."""
    return value if callable(value) else Constant(as_array(value))


__all__ = ["Constant", "InversePower", "OneMinus", "as_schedule", "inverse_power"]

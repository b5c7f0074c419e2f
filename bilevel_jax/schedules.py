"""Step-size schedules not in optax: the polynomial decays of two-timescale analyses.

    inverse_power(c, p)(k) = c / (k + offset)^p

TTSA (Hong et al. 2020/2023, seed 002 eq. 48-52): alpha_k ~ K^{-3/5}, beta_k ~ K^{-2/5} (weakly
convex UL) or alpha_k ~ 1/k, beta_k ~ k^{-2/3} (strongly convex UL); SOBA's theorem (Dagreou et
al. 2022): rho_k ~ k^{-2/5}, gamma_k ~ k^{-3/5}; MRBO/SUSTAIN: (w + k)^{-1/3}.
Any of them is an optax schedule (a function of the step count), so optax step rules take it.
"""
from __future__ import annotations

import jax.numpy as jnp

from bilevel_jax._checks import check_in_range, check_step_size


def inverse_power(c, p, offset=1.0):
    """k -> c / (k + offset)^p, an optax-compatible schedule; c, p may be arrays (vmapped sweeps)."""
    check_step_size("c", c)
    check_in_range("p", p, 0.0, 1.0)
    check_step_size("offset", offset)

    def schedule(count):
        return c / (count + offset) ** p

    schedule.exponent = p  # introspection for tests and plots
    return schedule


def as_schedule(value):
    """A float/array or a schedule, as a schedule."""
    return value if callable(value) else (lambda count: jnp.asarray(value))

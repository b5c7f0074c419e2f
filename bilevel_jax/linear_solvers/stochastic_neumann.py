"""Stochastic Neumann estimate of A^{-1} b: the HIA of BSA (Ghadimi & Wang 2018) and TTSA
(Hong et al. 2020), seed 002 "Neumann series approximation".

    x = N eta * prod_{i=1}^{p} (I - eta A_{xi_i}) b,     p ~ Uniform{0, ..., N-1}

with an independent stochastic Hessian A_{xi_i} (a fresh minibatch) per factor. Its expectation
is the truncated series  eta * sum_{i<N} (I - eta A)^i b  (`neumann(N, eta)`).
The scan has N-1 static iterations; factors beyond p leave the iterate unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.linear_solvers.base import LinearSolver, info


def stochastic_neumann(steps: int = 10, eta: float = 0.1) -> LinearSolver:
    """HIA with N = `steps` terms and step `eta`; `matvec(x, key)` must draw its own minibatch
    from `key`. Requires a `key` at solve time. info.residual_norm is NaN (A is random)."""
    check_positive_int("steps", steps)
    check_step_size("eta", eta)

    def solve(matvec, b, x0=None, key=None):
        del x0
        if key is None:
            raise ValueError("stochastic_neumann needs a PRNG key to draw the truncation and minibatches.")
        key_p, key_factors = jax.random.split(key)
        p = jax.random.randint(key_p, (), 0, steps)

        def step(x, i):
            y = otu.tree_add_scale(x, -eta, matvec(x, jax.random.fold_in(key_factors, i)))
            return otu.tree_where(i <= p, y, x), None

        x, _ = jax.lax.scan(step, b, jnp.arange(1, steps))
        x = otu.tree_scale(steps * eta, x)
        return x, info(jnp.nan, steps - 1)

    return LinearSolver(solve, stochastic=True)

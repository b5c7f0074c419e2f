"""Stochastic Neumann estimate of A^{-1} b: the Hessian inverse approximation (HIA) of BSA
(Ghadimi & Wang, "Approximation methods for bilevel programming", 2018, arXiv:1802.02246) and TTSA
(Hong, Wai, Wang & Yang, "A two-timescale framework for bilevel optimization: complexity analysis
and application to actor-critic", 2020, arXiv:2007.05170).

    x = N eta * prod_{i=1}^{p} (I - eta A_{xi_i}) b,     p ~ Uniform{0, ..., N-1}

with an independent stochastic Hessian A_{xi_i} (a fresh minibatch) per factor. Its expectation
is the truncated series  eta * sum_{i<N} (I - eta A)^i b  (`neumann(N, eta)`).
The scan has N-1 static iterations (N-1 matvecs, counted as such); factors beyond p leave the
iterate unchanged. There is no initial point: `warm_start` and the state's x are ignored.

Status: `info.residual_norm` is always NaN (A is random: no residual to report); the status is
NONFINITE, with x NaN (every leaf), when x is non-finite, else OK. Divergence of a single draw is
not detectable here (a product of random factors may legitimately grow).
"""
from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool, check_positive_int
from bilevel_jax.linear_solvers.base import LinearSolver, WarmStart, fail_where, make_info
from bilevel_jax.linear_solvers.gd import _check_eta


class StochasticNeumann(LinearSolver):
    """HIA with N = `steps` terms and step `eta` (an array field). `matvec(x, key)` must draw its
    own minibatch from `key`; `solve` requires a `key`."""

    steps: int = eqx.field(default=10, static=True)
    eta: float = 0.1
    stochastic: ClassVar[bool] = True

    def __check_init__(self):
        check_positive_int("steps", self.steps)
        _check_eta(self.eta)
        check_bool("warm_start", self.warm_start)

    def solve(self, matvec, b, state, key=None):
        del state
        if key is None:
            raise ValueError("stochastic_neumann needs a PRNG key to draw the truncation and minibatches.")
        key_p, key_factors = jax.random.split(key)
        p = jax.random.randint(key_p, (), 0, self.steps)
        eta = self.eta

        def step(x, i):
            y = otu.tree_add_scale(x, -eta, matvec(x, jax.random.fold_in(key_factors, i)))
            return otu.tree_where(i <= p, y, x), None

        x, _ = jax.lax.scan(step, b, jnp.arange(1, self.steps))
        x = otu.tree_scale(self.steps * eta, x)
        status = st.nonfinite(x)
        x = fail_where(status != st.OK, x)
        return x, WarmStart(x), make_info(jnp.nan, self.steps - 1, status)


def stochastic_neumann(steps: int = 10, eta: float = 0.1) -> StochasticNeumann:
    """HIA with N = `steps` terms and step `eta`; `matvec(x, key)` must draw its own minibatch
    from `key`. Requires a `key` at solve time. info.residual_norm is NaN (A is random); status
    NONFINITE (x NaN) when x is non-finite."""
    return StochasticNeumann(steps=steps, eta=as_array(eta))

"""Gradient descent on the quadratic  q(x) = 0.5 x'Ax - b'x  (Richardson iteration), and the
truncated Neumann series it equals.

    x_{i+1} = x_i - eta (A x_i - b) = x_i + eta r_i,      r_{i+1} = (I - eta A) r_i

From x0 = 0, k steps give  x_k = eta * sum_{i<k} (I - eta A)^i b,  the truncated Neumann series
of A^{-1} = eta * sum_i (I - eta A)^i (StocBiO: Ji, Yang & Liang, "Bilevel
Optimization: Convergence Analysis and Enhanced Design", 2021, arXiv:2010.07962), and the error
x* - x_k = (I - eta A)^k (x* - x0) contracts like (1 - eta mu)^k for 0 < eta <= 1/L.
The residual r is carried, so info.residual_norm is ||b - A x|| at the returned x (the recursive
residual: exact up to rounding, no extra matvec).

Failures are loud. For an SPD A and 0 < eta < 2/L, ||r|| never grows; when the final residual norm
exceeds the initial one (beyond rounding, a factor 1 + sqrt(eps)), the iteration diverged: eta is
too large for A's spectrum, or A is not positive definite (a concave lower level). Then x is NaN and
the status BREAKDOWN. A non-finite residual or iterate (NaN/inf in b, x0 or the matvec) gives x NaN
and NONFINITE (a divergence run into overflow reads as NONFINITE too). Status: OK, BREAKDOWN,
NONFINITE.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool, check_positive_int, check_step_size
from bilevel_jax.linear_solvers.base import LinearSolver, WarmStart, fail_where, make_info, rounding_eps, start


def _check_eta(eta):
    if callable(eta):
        raise TypeError("eta must be a number or an array, not a schedule (a linear solve has no outer count).")
    check_step_size("eta", eta)


class GD(LinearSolver):
    """`steps` gradient steps of size `eta` on 0.5 x'Ax - b'x (AmIGO's inner solver: Arbel & Mairal,
    "Amortized implicit differentiation for stochastic bilevel optimization", 2022,
    arXiv:2111.14580). `eta` is an array field (a sweep may vmap over it)."""

    steps: int = eqx.field(default=10, static=True)
    eta: float = 0.1

    def __check_init__(self):
        check_positive_int("steps", self.steps)
        _check_eta(self.eta)
        check_bool("warm_start", self.warm_start)

    def _start(self, matvec, b, state):
        return start(self, matvec, b, state)

    def solve(self, matvec, b, state, key=None):
        del key
        x, r, extra = self._start(matvec, b, state)
        r0_norm = otu.tree_norm(r)
        eta = self.eta

        def step(carry, _):
            x, r = carry
            return (otu.tree_add_scale(x, eta, r), otu.tree_add_scale(r, -eta, matvec(r))), None

        (x, r), _ = jax.lax.scan(step, (x, r), None, length=self.steps)
        r_norm = otu.tree_norm(r)
        diverged = r_norm > (1.0 + rounding_eps(b) ** 0.5) * r0_norm
        nonfinite = ~jnp.isfinite(r_norm) | ~jnp.isfinite(r0_norm) | (st.nonfinite(x) != st.OK)
        status = st.merge(st.flag(diverged, st.BREAKDOWN), st.flag(nonfinite, st.NONFINITE))
        x = fail_where(status != st.OK, x)
        r_norm = jnp.where(status != st.OK, jnp.nan, r_norm)
        return x, WarmStart(x), make_info(r_norm, self.steps + extra, status)


class Neumann(GD):
    """The truncated Neumann series  eta * sum_{i<steps} (I - eta A)^i b: GD from x0 = 0. The
    series has no initial point, so `warm_start` (and the state's x) is ignored."""

    def _start(self, matvec, b, state):
        return otu.tree_zeros_like(b), b, 0


def gd(steps: int = 10, eta: float = 0.1, warm_start: bool = False) -> GD:
    """`steps` gradient steps of size `eta` on 0.5 x'Ax - b'x, from the state's last solution with
    `warm_start` (else from 0). Cost: `steps` matvecs, +1 with a warm start (for the residual).
    Diverged (final residual > initial) -> x NaN, BREAKDOWN; non-finite -> x NaN, NONFINITE."""
    return GD(warm_start=warm_start, steps=steps, eta=as_array(eta))


def neumann(steps: int = 10, eta: float = 0.1) -> Neumann:
    """The truncated Neumann series  eta * sum_{i<steps} (I - eta A)^i b  (StocBiO): `gd(steps,
    eta)` from x0 = 0 (no initial point: a warm start is ignored). Cost: `steps` matvecs. Status as
    `gd`."""
    return Neumann(steps=steps, eta=as_array(eta))

"""Gradient descent on the quadratic  q(x) = 0.5 x'Ax - b'x  (Richardson iteration), and the
truncated Neumann series it equals.

    x_{i+1} = x_i - eta (A x_i - b) = x_i + eta r_i,      r_{i+1} = (I - eta A) r_i

From x0 = 0, k steps give  x_k = eta * sum_{i<k} (I - eta A)^i b,  the truncated Neumann series
of A^{-1} = eta * sum_i (I - eta A)^i (seed 001 eq. 24; StocBiO, Ji et al. 2021), and the error
x* - x_k = (I - eta A)^k (x* - x0) contracts like (1 - eta mu)^k for 0 < eta <= 1/L.
The residual r is carried, so info.residual_norm is exact at the returned x.
"""
from __future__ import annotations

import jax
import optax.tree_utils as otu

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.linear_solvers.base import LinearSolver, info, initial_point


def gd(steps: int = 10, eta: float = 0.1) -> LinearSolver:
    """`steps` gradient steps of size `eta` on 0.5 x'Ax - b'x from x0 (AmIGO's inner solver,
    Arbel & Mairal 2022). Cost: `steps` matvecs, +1 with a warm start (for the residual)."""
    check_positive_int("steps", steps)
    check_step_size("eta", eta)

    def solve(matvec, b, x0=None, key=None):
        del key
        x = initial_point(b, x0)
        r = b if x0 is None else otu.tree_sub(b, matvec(x0))

        def step(carry, _):
            x, r = carry
            return (otu.tree_add_scale(x, eta, r), otu.tree_add_scale(r, -eta, matvec(r))), None

        (x, r), _ = jax.lax.scan(step, (x, r), None, length=steps)
        return x, info(otu.tree_norm(r), steps + (x0 is not None))

    return LinearSolver(solve)


def neumann(steps: int = 10, eta: float = 0.1) -> LinearSolver:
    """The truncated Neumann series  eta * sum_{i<steps} (I - eta A)^i b  (StocBiO).

    It is `gd(steps, eta)` from x0 = 0: the series has no initial point, so x0 is ignored.
    """
    base = gd(steps, eta)

    def solve(matvec, b, x0=None, key=None):
        return base.solve(matvec, b, None, key)

    return LinearSolver(solve)

"""Dense reference solver: materialise A with `jax.jacfwd` of the matvec, then `jnp.linalg.solve`.

Used as ground truth in tests and for small problems (BA's exact Hessian inverse); the only place
in bilevel_jax where a Hessian is formed. Cost: n matvecs (n = size of b) and O(n^3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax.linear_solvers.base import LinearSolver, info


def dense() -> LinearSolver:
    """Exact solve of A x = b through the materialised matrix."""

    def solve(matvec, b, x0=None, key=None):
        del x0, key
        b_flat, unravel = ravel_pytree(b)
        flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
        a = jax.jacfwd(flat_matvec)(jnp.zeros_like(b_flat))
        x_flat = jnp.linalg.solve(a, b_flat)
        return unravel(x_flat), info(jnp.linalg.norm(b_flat - a @ x_flat), b_flat.size)

    return LinearSolver(solve)

"""Dense reference solver: materialise A with `jax.jacfwd` of the matvec, then a Cholesky
factorization A = L L' and two triangular solves.

Used as ground truth in tests and for small problems (BA's exact Hessian inverse: Ghadimi & Wang,
"Approximation methods for bilevel programming", 2018, arXiv:1802.02246); the only place in
bilevel_jax where a Hessian is formed. Cost: n matvecs (n = size of b, one jvp column each) and
O(n^3). `info.residual_norm` is ||b - A x|| with the materialised A (no further matvec).

The operator must be symmetric positive definite (A is symmetrised, (A + A')/2, against autodiff
rounding). The factorization fails on a concave, indefinite or (numerically) singular A, detected as
a non-finite factor or a pivot L_ii^2 <= c eps max_i A_ii (c = 4 n); then x is NaN (every leaf) and
the status BREAKDOWN. A non-finite A or b (NaN/inf in the data or the matvec) adds NONFINITE, with
x NaN. Status: OK, BREAKDOWN, NONFINITE or both.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.flatten_util import ravel_pytree

from bilevel_jax import status as st
from bilevel_jax._checks import check_bool
from bilevel_jax.linear_solvers.base import LinearSolver, WarmStart, fail_where, make_info, rounding_eps


class Dense(LinearSolver):
    """Exact solve of A x = b through the materialised matrix and its Cholesky factor (reference).
    No initial point: `warm_start` is ignored."""

    def __check_init__(self):
        check_bool("warm_start", self.warm_start)

    def solve(self, matvec, b, state, key=None):
        del state, key
        b_flat, unravel = ravel_pytree(b)
        flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
        a = jax.jacfwd(flat_matvec)(jnp.zeros_like(b_flat))
        a = 0.5 * (a + a.T)
        n = b_flat.size
        factor = jnp.linalg.cholesky(a)
        pivots = jnp.diagonal(factor) ** 2
        tiny = 4.0 * n * rounding_eps(b) * jnp.max(jnp.abs(jnp.diagonal(a)))
        broke = ~jnp.all(jnp.isfinite(factor)) | jnp.any(pivots <= tiny)
        nonfinite = ~jnp.all(jnp.isfinite(a)) | ~jnp.all(jnp.isfinite(b_flat))
        status = st.merge(st.flag(broke, st.BREAKDOWN), st.flag(nonfinite, st.NONFINITE))
        safe = jnp.where(broke, jnp.eye(n, dtype=a.dtype), factor)
        x_flat = jsl.cho_solve((safe, True), b_flat)
        failed = status != st.OK
        x = fail_where(failed, unravel(x_flat))
        res = jnp.where(failed, jnp.nan, jnp.linalg.norm(b_flat - a @ x_flat))
        return x, WarmStart(x), make_info(res, n, status)


def dense() -> Dense:
    """Exact solve of A x = b through the materialised matrix (Cholesky: A must be SPD; otherwise
    x NaN and BREAKDOWN, plus NONFINITE for non-finite input). Cost: n matvecs, O(n^3)."""
    return Dense()

"""Normal equations: any symmetric solver applied to A'A x = A'b, for a square A that is not
symmetric (the Jacobian of a fixed-point map or of a general root equation).

    x = solver((A'A)^{-1} A'b)

With `cg` inside this is CGNR (Hestenes & Stiefel, "Methods of conjugate gradients for solving
linear systems", J. Res. NBS 49(6), 1952, section 10; Saad, "Iterative Methods for Sparse Linear
Systems", 2nd ed., 2003, section 8.3). A' is applied as `jax.linear_transpose` of `matvec`, so the
operator must be transposable by JAX (true of every `jax.jvp`/`jax.linearize`/`jax.vjp`-built
operator and of plain array arithmetic); one application of A'A costs one matvec and one
transposed matvec. The conditioning is squared: cond(A'A) = cond(A)^2.

Loud failure on a singular A: A'A x = A'b is always consistent, so the inner solver converges to
the least-squares solution even when A x = b has none. That point is reported, not returned: with
r = b - A x, the solve is BREAKDOWN (x NaN) when

    ||r|| > sqrt(eps) ||b||   and   ||A' r|| <= sqrt(eps) ||A||_est ||r||

(b has a component in null(A'): A is singular, or its normal equations are numerically singular,
cond(A) >~ 1/sqrt(eps), at this precision). ||A||_est is the largest of ||A'b|| / ||b||,
||A'r|| / ||r|| and ||Ax|| / ||x||. The wrapped solver's status (BREAKDOWN, NONFINITE) is kept.

`info.residual_norm` is the residual ||b - A x|| of the original system (one more matvec); the
state is the wrapped solver's (warm starts from the last x); `num_matvecs` counts applications of
A and of A', 2 per inner matvec, +2 for A'b and the final check.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax.linear_solvers.base import LinearSolver, fail_where, make_info, rounding_eps


def _ratio(num, den):
    return num / jnp.where(den > 0, den, 1.0)


class Normal(LinearSolver):
    """`solver` on A'A x = A'b (module docstring)."""

    solver: LinearSolver = eqx.field(kw_only=True)
    needs_symmetric: ClassVar[bool] = False

    def __check_init__(self):
        if not isinstance(self.solver, LinearSolver):
            raise TypeError(f"normal: solver must be a bj.linear_solvers solver, got {type(self.solver).__name__}.")
        if self.solver.stochastic:
            raise TypeError("normal: the solver must be deterministic (A' of a sampled operator needs the same sample).")

    def init(self, b_like, x0: Optional[Any] = None):
        return self.solver.init(b_like, x0)

    def solve(self, matvec, b, state, key=None):
        del key
        transpose = jax.linear_transpose(matvec, b)
        rmatvec = lambda y: transpose(y)[0]
        atb = rmatvec(b)
        x, state, info = self.solver.solve(lambda z: rmatvec(matvec(z)), atb, state)
        ax = matvec(x)
        r = otu.tree_sub(b, ax)
        atr = rmatvec(r)
        eps = rounding_eps(b)
        b_norm, r_norm, atr_norm = otu.tree_norm(b), otu.tree_norm(r), otu.tree_norm(atr)
        a_est = jnp.maximum(jnp.maximum(_ratio(otu.tree_norm(atb), b_norm), _ratio(atr_norm, r_norm)),
                            _ratio(otu.tree_norm(ax), otu.tree_norm(x)))
        tol = jnp.sqrt(eps)
        inconsistent = (r_norm > tol * b_norm) & (atr_norm <= tol * a_est * r_norm)
        status = st.merge(info.status, st.flag(inconsistent, st.BREAKDOWN))
        failed = status != st.OK
        x = fail_where(failed, x)
        kept, static = eqx.partition(state, eqx.is_inexact_array)
        state = eqx.combine(fail_where(failed, kept), static)   # a warm start from a failure stays NaN
        res = jnp.where(failed, jnp.nan, r_norm)
        return x, state, make_info(res, 2 * info.num_matvecs + 2, status)


def normal(solver: LinearSolver) -> Normal:
    """`solver` (e.g. `cg(maxiter=100)`) applied to the normal equations A'A x = A'b of a square,
    non-symmetric A (CGNR with `cg`); a singular A is BREAKDOWN with x NaN, not the least-squares
    point. jaxopt's `solve_normal_cg` is `normal(cg(...))`. See the module docstring."""
    return Normal(solver=solver)


__all__ = ["Normal", "normal"]

"""SubBiO's two-dimensional subspace solve (Yang, Gao & Yuan, "LancBiO: Dynamic Lanczos-aided
Bilevel Optimization via Krylov Subspace", ICLR 2025, arXiv:2404.03331, the SubBiO algorithm).

With the previous solution v_{k-1} (the state's `x`), the solve is the Galerkin solution of
A v = b on the subspace

    S_k = span{ b_k, (I - eta A_k) v_{k-1} },      v_k = W (W'A_k W)^{-1} W' b_k,   W = [w_1, w_2]

i.e. the minimiser of 1/2 v'A v - b'v over S_k. S_k lies in the Krylov space K_{k+1}(A, b) when
v_{k-1} lies in K_k, and (I - eta A) v_{k-1} is the gradient step of the Neumann series, so the
iterates are at least as good (in the A-norm, for a fixed A) as the truncated Neumann series /
gradient descent with step eta that they extend. In the paper eta is the lower-level step size.

Implementation: W is orthonormalised (q_1 = b/||b||; q_2 from w_2 by Gram-Schmidt, twice), the
2 x 2 projected matrix M = Q'A Q (symmetrised) is factorised as L D L' and the small system solved
in closed form. Cost: 3 matvecs per solve (A v_{k-1}, A q_1, A q_2). `info.residual_norm` is the
exact ||b - A x|| = ||b - s_1 A q_1 - s_2 A q_2|| (no further matvec).

Degenerate cases (documented, not failures):
- b = 0: x = 0.
- w_2 numerically in span{b} (||w_2 - (q_1'w_2) q_1|| <= sqrt(eps) ||w_2||, e.g. v_{k-1} = 0 at
  the first solve): the subspace is span{b}, the 1-D Galerkin step x = (b'b / b'A b) b.
Failures (loud): a pivot of M <= c eps max ||A q_i|| (A not positive definite on S_k) gives x NaN
and BREAKDOWN; a non-finite b, state or matvec gives x NaN and BREAKDOWN | NONFINITE.

The state is the last solution (`WarmStart`); it is the method's memory, so `warm_start=True` is
the default. With `warm_start=False` every solve uses v_{k-1} = 0 (the 1-D step along b).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool
from bilevel_jax.linear_solvers.base import LinearSolver, WarmStart, fail_where, make_info, rounding_eps
from bilevel_jax.linear_solvers.gd import _check_eta

_PIVOT = 4.0  # a pivot <= _PIVOT eps max ||A q|| is non-positive


def _unit(tree, norm, ok):
    return otu.tree_scale(jnp.where(ok, 1.0 / jnp.where(ok, norm, 1.0), 0.0), tree)


class Subspace(LinearSolver):
    """SubBiO's 2-D Galerkin solve on span{b, (I - eta A) x_prev}; `eta` is an array field."""

    eta: float = 0.1
    warm_start: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        _check_eta(self.eta)
        check_bool("warm_start", self.warm_start)

    def solve(self, matvec, b, state, key=None):
        del key
        if self.warm_start:
            v = state.x
            if jax.tree_util.tree_structure(v) != jax.tree_util.tree_structure(b):
                raise ValueError("the solver state's x does not have the structure of b: "
                                 f"{jax.tree_util.tree_structure(v)} vs {jax.tree_util.tree_structure(b)}.")
        else:
            v = otu.tree_zeros_like(b)
        eps = rounding_eps(b)
        av = matvec(v)
        w2 = otu.tree_add_scale(v, -self.eta, av)

        b_norm = otu.tree_norm(b)
        has_b = b_norm > 0
        q1 = _unit(b, b_norm, has_b)
        p = w2
        for _ in range(2):  # Gram-Schmidt, twice (orthogonal to working precision)
            p = otu.tree_add_scale(p, -otu.tree_vdot(q1, p), q1)
        p_norm = otu.tree_norm(p)
        keep2 = has_b & (p_norm > jnp.sqrt(eps) * otu.tree_norm(w2))
        q2 = _unit(p, p_norm, keep2)

        aq1, aq2 = matvec(q1), matvec(q2)
        m11 = otu.tree_vdot(q1, aq1)
        m12 = 0.5 * (otu.tree_vdot(q1, aq2) + otu.tree_vdot(q2, aq1))
        m22 = otu.tree_vdot(q2, aq2)
        r1 = otu.tree_vdot(q1, b)
        r2 = otu.tree_vdot(q2, b)
        # L D L' of [[m11, m12], [m12, m22]]; the second row masked to the identity when dropped
        m12 = jnp.where(keep2, m12, 0.0)
        m22 = jnp.where(keep2, m22, 1.0)
        r2 = jnp.where(keep2, r2, 0.0)
        d1 = jnp.where(has_b, m11, 1.0)
        l21 = m12 / jnp.where(d1 != 0, d1, 1.0)
        d2 = m22 - l21 * m12
        scale = jnp.maximum(otu.tree_norm(aq1), otu.tree_norm(aq2))
        tiny = _PIVOT * eps * scale
        finite = (jnp.isfinite(d1) & jnp.isfinite(d2) & jnp.isfinite(scale) & jnp.isfinite(b_norm)
                  & jnp.isfinite(otu.tree_norm(w2)))
        pivots_ok = (~has_b | (d1 > tiny)) & (~keep2 | (d2 > tiny))
        failed = ~finite | ~pivots_ok
        y2 = r2 - l21 * r1
        s2 = jnp.where(keep2, y2 / jnp.where(d2 != 0, d2, 1.0), 0.0)
        s1 = jnp.where(has_b, r1 / d1 - l21 * s2, 0.0)
        x = otu.tree_add(otu.tree_scale(s1, q1), otu.tree_scale(s2, q2))
        ax = otu.tree_add(otu.tree_scale(s1, aq1), otu.tree_scale(s2, aq2))
        res = otu.tree_norm(otu.tree_sub(b, ax))

        nonfinite = ~finite | (st.nonfinite(x) != st.OK)
        status = st.merge(st.flag(failed | nonfinite, st.BREAKDOWN), st.flag(nonfinite, st.NONFINITE))
        bad = status != st.OK
        x = fail_where(bad, x)
        res = jnp.where(bad, jnp.nan, res)
        return x, WarmStart(x), make_info(res, 3, status)


def subspace(eta=0.1, warm_start: bool = True) -> Subspace:
    """SubBiO's 2-D Galerkin solve: v = argmin of 1/2 v'Av - b'v over span{b, (I - eta A) v_prev},
    v_prev the state's last solution (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331). Cost: 3
    matvecs. Not positive definite on the subspace -> x NaN, BREAKDOWN. See the module docstring."""
    return Subspace(eta=as_array(eta), warm_start=warm_start)


__all__ = ["Subspace", "subspace"]

"""MINRES (Paige & Saunders, "Solution of sparse indefinite systems of linear equations", SIAM J.
Numer. Anal. 12(4), 1975), matrix-free, on pytrees: the Krylov solver for symmetric *indefinite*
systems, such as the KKT system of a constrained lower level (`bj.hypergrad.kkt`), where CG's
positive-curvature assumption fails.

Lanczos builds an orthonormal basis V_k of the Krylov space of r0 with A V_k = V_{k+1} Tbar_k
(Tbar_k tridiagonal, diagonal alpha_j, off-diagonal beta_j); x_k = x0 + V_k y_k minimises
||b - A x|| over that space, i.e. y_k = argmin ||beta_1 e_1 - Tbar_k y||, solved by Givens rotations
updated one column at a time:

    delta'_k = c_{k-2} beta_k,  eps_k = s_{k-2} beta_k
    delta_k = c_{k-1} delta'_k + s_{k-1} alpha_k,   gbar_k = -s_{k-1} delta'_k + c_{k-1} alpha_k
    gamma_k = sqrt(gbar_k^2 + beta_{k+1}^2),  c_k = gbar_k / gamma_k,  s_k = beta_{k+1} / gamma_k
    w_k = (v_k - delta_k w_{k-1} - eps_k w_{k-2}) / gamma_k,  x_k = x_{k-1} + c_k eta_k w_k,  eta_{k+1} = -s_k eta_k

|eta_{k+1}| = ||b - A x_k|| (in exact arithmetic). `maxiter` iterations in a `lax.scan` (static
length); the iterate freezes once |eta| <= max(rtol ||b||, atol, c eps max(||b||, ||r0||)) (c = 4),
as in `cg`. A must be symmetric (indefinite or singular-but-consistent is fine).

Breakdown: gamma_k <= 100 eps ||A|| before convergence means T_k is (numerically) singular; and
an iterate with ||A|| ||x|| > ||b|| / (10 eps) is explained only by a numerically singular A (it
exceeds cond(A) ||b|| / ||A||: the rhs is not in the range of a singular A, e.g. a KKT system
whose active constraints are linearly dependent). Either way x is NaN (every leaf) and the status
BREAKDOWN, plus NONFINITE for a non-finite value. (||A|| is estimated by the largest column of
Tbar seen.) Running out of iterations is not a failure (read
`info.residual_norm`, the true ||b - A x|| from one more matvec).

Cost: `maxiter` matvecs, +1 with a warm start.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array
from bilevel_jax.linear_solvers.base import (KrylovSolver, WarmStart, fail_where, make_info, residual_norm,
                                             rounding_eps, start)

_ROUNDING = 4.0
_SINGULAR = 100.0  # gamma_k <= this * eps * ||A||: T_k numerically singular
_BLOWUP = 10.0     # ||A|| ||x|| > ||b|| / (this * eps): x explained only by a singular A


class MINRES(KrylovSolver):
    """MINRES for symmetric (indefinite) A: `maxiter` iterations, freezing at
    `max(rtol ||b||, atol)` (and rounding level). `rtol`, `atol` are array fields."""

    maxiter: int = eqx.field(default=100, static=True)

    def solve(self, matvec, b, state, key=None):
        del key
        x, r, extra = start(self, matvec, b, state)
        eps = rounding_eps(b)
        beta1 = otu.tree_norm(r)
        b_norm = otu.tree_norm(b)
        floor = _ROUNDING * eps * jnp.maximum(b_norm, beta1)
        threshold = jnp.maximum(jnp.maximum(self.rtol * b_norm, self.atol), floor)
        safe = lambda d: jnp.where(d > 0, d, 1.0)
        v = otu.tree_scale(1.0 / safe(beta1), r)
        zeros = otu.tree_zeros_like(r)
        one, zero = jnp.ones((), beta1.dtype), jnp.zeros((), beta1.dtype)
        # (x, v_prev, v, w_prev2, w_prev, beta, c_prev, s_prev, c, s, eta, ||A|| estimate, done, status)
        carry0 = (x, zeros, v, zeros, zeros, beta1, one, zero, one, zero, beta1, zero, beta1 <= threshold, st.ok())

        def step(carry, _):
            x, v_prev, v, w2, w1, beta, c2, s2, c1, s1, eta, a_norm, done, status = carry
            p = matvec(v)
            alpha = otu.tree_vdot(v, p)
            p = otu.tree_add_scale(otu.tree_add_scale(p, -alpha, v), -beta, v_prev)
            beta_next = otu.tree_norm(p)
            v_next = otu.tree_scale(1.0 / safe(beta_next), p)
            delta_p = c2 * beta
            eps_k = s2 * beta
            delta = c1 * delta_p + s1 * alpha
            gbar = -s1 * delta_p + c1 * alpha
            gamma = jnp.sqrt(gbar ** 2 + beta_next ** 2)
            finite = jnp.isfinite(gamma) & jnp.isfinite(alpha) & jnp.isfinite(eta)
            # ||A|| estimate: the largest column norm of Tbar seen so far
            a_norm = jnp.where(done, a_norm, jnp.maximum(a_norm, jnp.sqrt(alpha ** 2 + beta ** 2 + beta_next ** 2)))
            good = finite & (gamma > _SINGULAR * eps * a_norm)
            failed = ~done & ~good
            active = ~done & good
            g = jnp.where(active, gamma, 1.0)
            c, s = gbar / g, beta_next / g
            w = otu.tree_scale(1.0 / g, otu.tree_add_scale(otu.tree_add_scale(v, -delta, w1), -eps_k, w2))
            x_new = otu.tree_add_scale(x, c * eta, w)
            eta_new = -s * eta
            status = st.merge(status, st.flag(failed, st.BREAKDOWN), st.flag(failed & ~finite, st.NONFINITE))
            keep = lambda new, old: otu.tree_where(active, new, old)
            kept = lambda new, old: jnp.where(active, new, old)
            new_done = done | failed | (active & ((jnp.abs(eta_new) <= threshold) | (beta_next == 0)))
            return (keep(x_new, x), keep(v, v_prev), keep(v_next, v), keep(w1, w2), keep(w, w1), kept(beta_next, beta),
                    kept(c1, c2), kept(s1, s2), kept(c, c1), kept(s, s1), kept(eta_new, eta), a_norm, new_done, status), None

        out, _ = jax.lax.scan(step, carry0, None, length=self.maxiter)
        x, a_norm, status = out[0], out[11], out[-1]
        # an iterate only a (numerically) singular operator explains: ||A|| ||x|| / ||b|| <= cond(A)
        blown = a_norm * otu.tree_norm(x) > b_norm / (_BLOWUP * eps)
        status = st.merge(status, st.flag(blown | ~jnp.isfinite(otu.tree_norm(x)), st.BREAKDOWN),
                          st.nonfinite(x))
        x = fail_where(status != st.OK, x)
        res = jnp.where(status != st.OK, jnp.nan, residual_norm(matvec, b, x))
        return x, WarmStart(x), make_info(res, self.maxiter + extra, status)


def minres(maxiter: int = 100, rtol: float = 0.0, atol: float = 0.0, warm_start: bool = False) -> MINRES:
    """MINRES with `maxiter` iterations (maxiter matvecs, +1 with `warm_start`) for a symmetric,
    possibly indefinite A (the KKT systems of constrained lower levels). Freezes once
    ||r|| <= max(rtol ||b||, atol) (or rounding level). On a singular T_k before convergence, x is
    NaN and the status BREAKDOWN (| NONFINITE). See the module docstring."""
    return MINRES(warm_start=warm_start, maxiter=maxiter, rtol=as_array(rtol), atol=as_array(atol))

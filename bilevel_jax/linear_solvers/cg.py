"""Conjugate gradient (Hestenes & Stiefel, "Methods of conjugate gradients for solving linear
systems", 1952), matrix-free, on pytrees.

    r0 = b - A x0,  d0 = r0
    alpha_i = r_i'r_i / d_i'A d_i,  x_{i+1} = x_i + alpha_i d_i,  r_{i+1} = r_i - alpha_i A d_i
    beta_{i+1} = r_{i+1}'r_{i+1} / r_i'r_i,  d_{i+1} = r_{i+1} + beta_{i+1} d_i

`maxiter` iterations in a `lax.scan` (static length). The iterate freezes once the recursive
residual satisfies

    ||r_i|| <= max(rtol ||b||, atol, c eps max(||b||, ||r0||))        (c = 4, eps of b's dtype)

The last term is a floor at rounding level: past it, the recursive residual keeps shrinking while
the true one stagnates, and iterating on round-off makes CG drift (without it, thousands of
iterations on a well-conditioned system end at a relative error of 1e68).

Breakdown: CG needs A symmetric positive definite. When a search direction has non-positive or
non-finite curvature, d'Ad <= c eps ||d||^2 * max_j ||A d_j|| / ||d_j|| (numerically zero or negative
relative to the largest curvature seen so far; NaN and inf included), the operator is concave,
singular or non-finite, and the solve fails loudly: x is NaN (every leaf) and `info.status` is
BREAKDOWN, plus NONFINITE when the cause is a non-finite value (NaN/inf in b, x0 or the matvec).
The tolerance check comes first: a system solved to tolerance before meeting such a direction is
OK (b = 0 returns x = 0).

Status: OK, or BREAKDOWN [| NONFINITE] with x NaN. Running out of iterations is not a failure.

Cost: `maxiter` matvecs, +1 with a warm start (for r0). `info.residual_norm` is the true
||b - A x|| at the returned x, from one more matvec after the loop (a diagnostic, not counted in
`info.num_matvecs`; NaN when the solve failed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array
from bilevel_jax.linear_solvers.base import (KrylovSolver, WarmStart, fail_where, make_info, residual_norm,
                                             rounding_eps, start)

_ROUNDING = 4.0  # the c above: multiples of eps treated as rounding level


class CG(KrylovSolver):
    """Conjugate gradient: `maxiter` iterations, freezing at `max(rtol ||b||, atol)` (and at
    rounding level). `rtol`, `atol` are array fields (a sweep may vmap over them)."""

    def solve(self, matvec, b, state, key=None):
        del key
        x, r, extra = start(self, matvec, b, state)
        eps = rounding_eps(b)
        rr = otu.tree_vdot(r, r)
        b_norm = otu.tree_norm(b)
        floor = _ROUNDING * eps * jnp.maximum(b_norm, jnp.sqrt(rr))
        threshold = jnp.maximum(jnp.maximum(self.rtol * b_norm, self.atol), floor) ** 2
        zero = jnp.zeros((), rr.dtype)
        carry0 = (x, r, r, rr, zero, rr <= threshold, st.ok())

        def step(carry, _):
            x, r, d, rr, scale, done, status = carry
            ad = matvec(d)
            dad = otu.tree_vdot(d, ad)
            dd = otu.tree_vdot(d, d)
            # the largest ||A d|| / ||d|| seen: the scale against which curvature is "zero"
            gain = jnp.sqrt(otu.tree_vdot(ad, ad) / jnp.where(dd > 0, dd, 1.0))
            scale = jnp.where(done, scale, jnp.maximum(scale, gain))
            finite = jnp.isfinite(dad) & jnp.isfinite(rr) & jnp.isfinite(scale)
            curvature_ok = finite & (dad > _ROUNDING * eps * scale * dd)
            failed = ~done & ~curvature_ok
            active = ~done & curvature_ok
            alpha = jnp.where(active, rr / jnp.where(active, dad, 1.0), 0.0)
            x_new = otu.tree_add_scale(x, alpha, d)
            r_new = otu.tree_add_scale(r, -alpha, ad)
            rr_new = otu.tree_vdot(r_new, r_new)
            beta = jnp.where(active, rr_new / jnp.where(active, rr, 1.0), 0.0)
            d_new = otu.tree_add_scale(r_new, beta, d)
            keep = lambda new, old: otu.tree_where(active, new, old)
            status = st.merge(status, st.flag(failed, st.BREAKDOWN), st.flag(failed & ~finite, st.NONFINITE))
            done = done | failed | (active & (rr_new <= threshold))
            return (keep(x_new, x), keep(r_new, r), keep(d_new, d), jnp.where(active, rr_new, rr), scale,
                    done, status), None

        (x, _, _, _, _, _, status), _ = jax.lax.scan(step, carry0, None, length=self.maxiter)
        x = fail_where(status != st.OK, x)
        res = jnp.where(status != st.OK, jnp.nan, residual_norm(matvec, b, x))
        return x, WarmStart(x), make_info(res, self.maxiter + extra, status)


def cg(maxiter: int = 50, rtol: float = 0.0, atol: float = 0.0, warm_start: bool = False) -> CG:
    """Conjugate gradient with `maxiter` iterations (maxiter matvecs, +1 with `warm_start`, which
    starts each solve from the state's last solution). Freezes once ||r|| <= max(rtol ||b||, atol)
    (or rounding level). Needs A SPD: on non-positive or non-finite curvature, x is NaN and the
    status BREAKDOWN (| NONFINITE). See the module docstring."""
    return CG(warm_start=warm_start, maxiter=maxiter, rtol=as_array(rtol), atol=as_array(atol))

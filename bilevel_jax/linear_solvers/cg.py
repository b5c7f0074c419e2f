"""Conjugate gradient (Hestenes & Stiefel 1952; seed 001, Algorithm 7), matrix-free.

    r0 = b - A x0,  d0 = r0
    alpha_i = r_i'r_i / d_i'A d_i,  x_{i+1} = x_i + alpha_i d_i,  r_{i+1} = r_i - alpha_i A d_i
    beta_{i+1} = r_{i+1}'r_{i+1} / r_i'r_i,  d_{i+1} = r_{i+1} + beta_{i+1} d_i

`maxiter` iterations in a `lax.scan`; the iterate freezes once ||r|| <= max(rtol ||b||, atol).
On a singular or indefinite operator (d'Ad <= 0, or non-finite) the iterate freezes and
`info.breakdown` is set: the solve never returns NaN from a finite input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax._checks import check_in_range, check_positive_int
from bilevel_jax.linear_solvers.base import LinearSolver, info, initial_point


def cg(maxiter: int = 50, rtol: float = 0.0, atol: float = 0.0) -> LinearSolver:
    """Conjugate gradient with `maxiter` iterations (maxiter matvecs, +1 with a warm start)."""
    check_positive_int("maxiter", maxiter)
    check_in_range("rtol", rtol, 0.0, float("inf"))
    check_in_range("atol", atol, 0.0, float("inf"))

    def solve(matvec, b, x0=None, key=None):
        del key
        x = initial_point(b, x0)
        r = b if x0 is None else otu.tree_sub(b, matvec(x0))
        rr = otu.tree_vdot(r, r)
        threshold = jnp.maximum(rtol * otu.tree_norm(b), atol) ** 2
        carry0 = (x, r, r, rr, rr <= threshold, jnp.asarray(False))

        def step(carry, _):
            x, r, d, rr, done, broke = carry
            ad = matvec(d)
            dad = otu.tree_vdot(d, ad)
            curvature_ok = jnp.isfinite(dad) & (dad > 0)
            active = ~done & curvature_ok
            alpha = jnp.where(active, rr / jnp.where(active, dad, 1.0), 0.0)
            x_new = otu.tree_add_scale(x, alpha, d)
            r_new = otu.tree_add_scale(r, -alpha, ad)
            rr_new = otu.tree_vdot(r_new, r_new)
            beta = jnp.where(active, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
            d_new = otu.tree_add_scale(r_new, beta, d)
            keep = lambda new, old: otu.tree_where(active, new, old)
            broke = broke | (~done & ~curvature_ok)
            done = done | ~curvature_ok | (active & (rr_new <= threshold))
            return (keep(x_new, x), keep(r_new, r), keep(d_new, d),
                    jnp.where(active, rr_new, rr), done, broke), None

        (x, _, _, rr, _, broke), _ = jax.lax.scan(step, carry0, None, length=maxiter)
        return x, info(jnp.sqrt(rr), maxiter + (x0 is not None), broke)

    return LinearSolver(solve)

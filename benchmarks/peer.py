"""Measure 6: a peer. The hypergradient of the logistic HPO problem by jaxopt's implicit
differentiation (`jaxopt.implicit_diff.custom_root` on the LL optimality condition
grad_w f_lower(theta, w) = 0, linear system by `jaxopt.linear_solve.solve_cg`) against
`bj.hypergradient` with `bj.linear_solvers.cg`, both with `maxiter` CG iterations (tol = 0, so
neither stops early; jax's CG makes one extra matvec for its initial residual), at the same LL
solution w* (damped Newton, `LogisticHPO.phi_star`). Time per hypergradient (interleaved calls),
max abs difference between the two results, and each one's error against the dense closed form.

If jaxopt cannot be imported (it is only installed by the `bench` extra), the peer falls back to
a hand-written `jax.custom_vjp` implicit-differentiation reference (labelled as such).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

import bilevel_jax as bj
from benchmarks import timing
from benchmarks.setups import Benchmark


def _jaxopt_hypergrad(problem, maxiter):
    from jaxopt import implicit_diff, linear_solve

    def optimality(w, theta, lower):
        return jax.grad(problem.f_lower, argnums=1)(theta, w, lower)

    solve = functools.partial(linear_solve.solve_cg, maxiter=maxiter, tol=0.0, atol=0.0)

    @implicit_diff.custom_root(optimality, solve=solve)
    def inner(w_init, theta, lower):
        return w_init   # w* is given: the inner solver is the identity on its warm start

    def hypergrad(theta, w_star, data):
        upper, lower = data
        return jax.grad(lambda th: problem.f_upper(th, inner(w_star, th, lower), upper))(theta)

    return hypergrad


def _custom_vjp_hypergrad(problem, maxiter):
    """Fallback peer: implicit differentiation by hand with `jax.custom_vjp` and
    `jax.scipy.sparse.linalg.cg` (no bilevel_jax code)."""

    def hypergrad(theta, w_star, data):
        upper, lower = data

        @jax.custom_vjp
        def inner(theta):
            return w_star

        def fwd(theta):
            return w_star, theta

        def bwd(theta, g):
            grad_w = lambda th, w: jax.grad(problem.f_lower, argnums=1)(th, w, lower)
            _, pull_w = jax.vjp(lambda w: grad_w(theta, w), w_star)
            u, _ = jax.scipy.sparse.linalg.cg(lambda x: pull_w(x)[0], g, maxiter=maxiter, tol=0.0, atol=0.0)
            _, pull_t = jax.vjp(lambda th: grad_w(th, w_star), theta)
            return (-pull_t(u)[0],)

        inner.defvjp(fwd, bwd)
        return jax.grad(lambda th: problem.f_upper(th, inner(th), upper))(theta)

    return hypergrad


def measure(setup: Benchmark, hpo, maxiter: int, repeats: int) -> dict:
    try:
        peer_fn, peer = _jaxopt_hypergrad(setup.problem, maxiter), "jaxopt custom_root + solve_cg"
        import importlib.metadata as md
        peer_version = md.version("jaxopt")
    except ImportError as e:
        peer_fn, peer = _custom_vjp_hypergrad(setup.problem, maxiter), f"hand-written jax.custom_vjp + jax CG (jaxopt unavailable: {e})"
        peer_version = None

    def toolkit(theta, w_star, data):
        return bj.hypergradient(setup.problem, theta, w_star, data, bj.linear_solvers.cg(maxiter=maxiter))[0]

    theta = setup.theta0
    w_star = hpo.phi_star(theta)
    dense = np.asarray(hpo.grad(theta))
    fns = {"bilevel_jax": jax.jit(toolkit), "peer": jax.jit(peer_fn)}
    args = (theta, w_star, setup.data)
    res = timing.interleaved(fns, {k: args for k in fns}, repeats=repeats)
    g_bj, g_peer = (np.asarray(fns[k](*args)) for k in ("bilevel_jax", "peer"))
    return {"problem": setup.description, "peer": peer, "peer_version": peer_version, "cg_iterations": maxiter,
            "bilevel_jax": res["bilevel_jax"], "peer_timing": res["peer"],
            "ratio": timing.ratio(res["bilevel_jax"]["samples"], res["peer"]["samples"]),
            "max_abs_diff": float(np.max(np.abs(g_bj - g_peer))),
            "max_abs_grad": float(np.max(np.abs(g_bj))),
            "error_vs_dense": {"bilevel_jax": float(np.max(np.abs(g_bj - dense))),
                               "peer": float(np.max(np.abs(g_peer - dense)))}}

"""`bj.argmin`: a differentiable lower-level solution.

Forward: `steps` iterations of any optax transform on f_lower(theta, ., batch) from phi0.
Backward (`jax.custom_vjp`, implicit function theorem at grad_phi f_lower = 0, seed 001 eq. 15-16):
for a cotangent u of phi*,

    v = A^{-1} u  (any linear solver),     theta_bar = -J v,     batch_bar = -(d_batch grad_phi f_lower)^T v,

so `jax.grad(lambda th: f_upper(th, argmin(...)(th, phi0, batch), val))` is the implicit
hypergradient. phi0 gets no gradient (the solution does not depend on the initial point).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.hypergrad.inner import solve_lower
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem


def _zero_cotangent(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


def _merge(cotangent_inexact, primal):
    """Cotangent for `primal`: the computed one at inexact leaves, float0 zeros elsewhere."""
    return jax.tree_util.tree_map(
        lambda c, x: c if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else _zero_cotangent(x),
        cotangent_inexact, primal, is_leaf=lambda c: c is None)


def argmin(f_lower: Callable, optimizer: optax.GradientTransformation, steps: int,
           solver: Optional[LinearSolver] = None, mode: str = "rev") -> Callable:
    """`solve(theta, phi0, batch) -> phi*(theta)`, differentiable in theta (and batch) by the IFT.

    Args:
      f_lower: `f_lower(theta, phi, batch) -> scalar`, strongly convex in phi.
      optimizer: the inner optax transform (e.g. `optax.sgd(0.1)`, `optax.lbfgs()`).
      steps: number of inner iterations (static).
      solver: linear solver of the backward pass (default `cg(maxiter=50)`); deterministic only.
      mode: "rev" or "fwd" derivative products (`oracles.linearize_lower`).
    Works under `jit` and `vmap`; theta, phi0 and batch must be pytrees of arrays.
    """
    if not callable(f_lower):
        raise TypeError(f"f_lower must be callable, got {type(f_lower).__name__}.")
    check_positive_int("steps", steps)
    oracles.check_mode(mode)
    solver = cg(maxiter=50) if solver is None else solver
    if not isinstance(solver, LinearSolver) or solver.stochastic:
        raise TypeError("argmin needs a deterministic bj.linear_solvers solver (cg, gd, neumann, dense).")
    problem = BilevelProblem(lambda theta, phi, batch: jnp.zeros(()), f_lower)

    @jax.custom_vjp
    def solve(theta, phi0, batch):
        return solve_lower(problem, optimizer, theta, phi0, batch, steps)

    def fwd(theta, phi0, batch):
        phi = solve(theta, phi0, batch)
        return phi, (theta, phi0, phi, batch)

    def bwd(residuals, u):
        theta, phi0, phi, batch = residuals
        lin = oracles.linearize_lower(problem, theta, phi, batch, mode)
        v, _, _ = solver.solve(lin.hvp, u, solver.init(u))  # a failed solve gives NaN cotangents
        batch_d = jax.tree_util.tree_map(lambda x: x if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else None, batch)

        def grad_phi_at(t, bd):
            full_batch = jax.tree_util.tree_map(lambda d, x: x if d is None else d, bd, batch,
                                                is_leaf=lambda d: d is None)
            return oracles.lower_grad_phi(problem, t, phi, full_batch)

        _, pullback = jax.vjp(grad_phi_at, theta, batch_d)
        theta_bar, batch_bar = pullback(v)
        theta_bar = otu.tree_scale(-1.0, theta_bar)
        batch_bar = _merge(otu.tree_scale(-1.0, batch_bar), batch) if batch is not None else None
        return theta_bar, otu.tree_zeros_like(phi0), batch_bar

    solve.defvjp(fwd, bwd)

    def checked(theta, phi0, batch):
        problem.validate(theta, phi0, (None, batch))
        return solve(theta, phi0, batch)

    return checked

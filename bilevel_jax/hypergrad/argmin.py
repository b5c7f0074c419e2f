"""`bj.argmin`: a lower-level solution that is differentiable in both modes of autodiff.

Primal: `steps` iterations of any optax transform (L-BFGS and line searches included) on
f_lower(theta, ., batch) from phi0 (`hypergrad.inner.solve_lower`); autodiff never goes through
these iterations.

Tangent (implicit function theorem; Blondel et al. 2022, "Efficient and Modular Implicit
Differentiation", arXiv:2105.15183): with g(theta, phi, batch) = grad_phi
f_lower and A = grad^2_phi f_lower, both at the returned phi*, differentiating g(theta, phi*(theta,
batch), batch) = 0 gives

    phi*_dot = -A^{-1} (d_theta g . theta_dot + d_batch g . batch_dot),      phi0_dot ignored.

`argmin` is a `jax.custom_jvp` with this rule. The bracket is one `jax.jvp` of grad_phi f_lower
in (theta, batch) at fixed phi*; A^{-1} is `jax.lax.custom_linear_solve` with the A-matvec of
`oracles.linearize_lower` and the user's linear solver. The tangent is linear in the input
tangents and the linear solve is transposable (A is symmetric: its transpose is the same solve),
so JAX derives reverse mode by transposition:

    jax.grad:   v = A^{-1} u (one linear solve),  theta_bar = -(d_theta g)^T v,  batch_bar = -(d_batch g)^T v

which is the implicit hypergradient grad F = grad_theta f_upper - J v of `bj.hypergradient` when
u = grad_phi f_upper. `jax.jacfwd`, `jax.jvp` and higher derivatives (`jax.hessian`, jacfwd of
jacrev) work as well: the rule re-enters the custom_jvp for phi*, so every order of derivative is
implicit (d A / d theta included, through custom_linear_solve's own derivative).

phi0 gets a zero tangent (the solution does not depend on the initial point); integer batch leaves
get float0 tangents. Only inexact-array leaves of theta, phi and batch are variables: an equinox
Module as phi (a neural network) is split with `eqx.partition` before the custom_jvp and the scan.
A failed linear solve (a lower level that is not strongly convex at phi*) returns NaN tangents,
never a finite-looking derivative.
"""
from __future__ import annotations

from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.hypergrad.inner import solve_lower
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem


def _no_upper(theta, phi, batch):
    return jnp.zeros(())


def _where_inexact(values, reference):
    """`values` at the inexact-array leaves of `reference`, None elsewhere (same structure)."""
    return jax.tree_util.tree_map(lambda x, v: v if eqx.is_inexact_array(x) else None, reference, values)


def argmin(f_lower: Callable, optimizer: optax.GradientTransformation, steps: int,
           solver: Optional[LinearSolver] = None, mode: str = "rev") -> Callable:
    """`solve(theta, phi0, batch) -> phi*(theta, batch)`, differentiable by the implicit function theorem.

    Args:
      f_lower: `f_lower(theta, phi, batch) -> scalar`, strongly convex in phi near phi*.
      optimizer: the inner optax transform (e.g. `optax.sgd(0.1)`; `optax.lbfgs()` and line
        searches get `value`, `grad`, `value_fn` as extra arguments).
      steps: number of inner iterations (static).
      solver: linear solver of the tangent A^{-1} (default `cg(maxiter=50)`); deterministic only.
        Called as `solver.solve(matvec, b, solver.init(b))` once per JVP/VJP (a fresh state: the
        solve does not depend on the previous one).
      mode: "rev" or "fwd" derivative products for the A-matvec (`oracles.linearize_lower`).

    Works under `jit`, `vmap`, `jax.grad`, `jax.jacfwd`, `jax.jacrev` and `jax.hessian`. theta and
    batch are pytrees of arrays (integer batch leaves are constants); phi0 is a pytree whose
    inexact-array leaves are the LL variables (an equinox Module included).
    """
    if not callable(f_lower):
        raise TypeError(f"f_lower must be callable, got {type(f_lower).__name__}.")
    check_positive_int("steps", steps)
    oracles.check_mode(mode)
    solver = cg(maxiter=50) if solver is None else solver
    if not isinstance(solver, LinearSolver) or solver.stochastic:
        raise TypeError("argmin needs a deterministic bj.linear_solvers solver (cg, gd, neumann, dense).")
    problem = BilevelProblem(_no_upper, f_lower)

    def inverse(matvec, b):
        """A^{-1} b with the user's solver (NaN where the solve failed, by the solver protocol)."""
        return solver.solve(matvec, b, solver.init(b))[0]

    def solve(theta, phi0, batch):
        problem.validate(theta, phi0, (None, batch))
        theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
        phi0_d, phi_s = eqx.partition(phi0, eqx.is_inexact_array)
        batch_a, batch_s = eqx.partition(batch, eqx.is_array)  # integer arrays pass, as constants

        def full(t, p, b):
            return eqx.combine(t, theta_s), eqx.combine(p, phi_s), eqx.combine(b, batch_s)

        @jax.custom_jvp
        def phi_star(t, p0, b):
            theta, phi0, batch = full(t, p0, b)
            return oracles.differentiable(solve_lower(problem, optimizer, theta, phi0, batch, steps))

        @phi_star.defjvp
        def phi_star_jvp(primals, tangents):
            t, p0, b = primals
            t_dot, _, b_dot = tangents  # the solution does not depend on phi0
            p = phi_star(t, p0, b)  # re-entering the custom_jvp keeps higher orders implicit
            b_x, b_int = eqx.partition(b, eqx.is_inexact_array)

            def grad_phi(t, b_x):
                return oracles.lower_grad_phi(problem, *full(t, p, eqx.combine(b_x, b_int)))

            # d_theta g . theta_dot + d_batch g . batch_dot, at fixed phi*: linear in the tangents
            _, g_dot = jax.jvp(grad_phi, (t, b_x), (t_dot, _where_inexact(b_dot, b)))
            matvec = oracles.linearize_lower(problem, *full(t, p, b), mode).hvp
            p_dot = jax.lax.custom_linear_solve(matvec, otu.tree_scale(-1.0, g_dot), inverse, symmetric=True)
            return p, p_dot

        return eqx.combine(phi_star(theta_d, phi0_d, batch_a), phi_s)

    return solve

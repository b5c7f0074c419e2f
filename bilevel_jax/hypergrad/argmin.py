"""`bj.argmin`: a lower-level solution that is differentiable in both modes of autodiff.

Primal: `steps` iterations of any optax transform (L-BFGS and line searches included) on
f_lower(theta, ., batch) from phi0 (`bj.lower.solve_lower`); autodiff never goes through
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

phi0 gets a zero tangent (the solution does not depend on the initial point); integer leaves are
constants. Only inexact-array leaves of theta, phi and batch are variables: an equinox Module as
phi (a neural network) is split with `eqx.partition` before the custom_jvp and the scan.
A failed linear solve (a lower level that is not strongly convex at phi*) returns NaN tangents,
never a finite-looking derivative.

Compiled once per configuration (`eqx.filter_jit`): a second call of `solve`, or of `jax.grad`
through it, with the same f_lower, optimizer and solver objects and arrays of the same shapes,
reuses the compiled program (JAX differentiates the cached program).
"""
from __future__ import annotations

from typing import Callable, Optional

import equinox as eqx
import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax.cache import same_code_rule
from bilevel_jax._checks import check_positive_int
from bilevel_jax.lower import solve_lower
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.precision import Precision, check_precision, wrap_problem
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sharding import local_problem, sharded


def _no_upper(theta, phi, batch):
    return jnp.zeros(())


def argmin(f_lower: Callable, optimizer: optax.GradientTransformation, steps: int,
           solver: Optional[LinearSolver] = None, mode: str = "rev", precision: Optional[Precision] = None,
           mesh: Optional[Mesh] = None) -> Callable:
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
      precision: a `bj.Precision` policy (`bj.precision`): f_lower and its derivatives evaluated in
        its compute dtype; theta and phi0 cast to its state dtype, in which the inner optimizer's
        state, phi* and the tangent solve are kept.
      mesh: a `jax.sharding.Mesh` whose axis `"data"` splits the batch's samples (`bj.shard`): the
        solve and its derivatives run in `jax.shard_map` on each device's shard with f_lower
        averaged over the devices (`bj.sharding`; parameter-sized all-reduces only).

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
    problem = wrap_problem(BilevelProblem(_no_upper, f_lower), check_precision(precision))
    optimizer = same_code_rule(optimizer)   # optax.lbfgs() built again is the same configuration

    local = problem if mesh is None else local_problem(problem, vary=False)   # custom_linear_solve: see local_problem

    def solve(theta, phi0, batch):
        if precision is not None:
            theta, phi0 = precision.cast_state(theta), precision.cast_state(phi0)
        if mesh is not None:
            return sharded(lambda t, p, b: _solve(local, optimizer, steps, solver, mode, t, p, b), mesh)(
                theta, phi0, batch)
        return _solve(problem, optimizer, steps, solver, mode, theta, phi0, batch)

    return solve


@eqx.filter_jit
def _solve(problem: BilevelProblem, optimizer: optax.GradientTransformation, steps: int, solver: LinearSolver,
           mode: str, theta, phi0, batch):
    """The `solve` of `argmin`, compiled once per configuration: f_lower (the same object), the
    optimizer (by code and closure), `steps`, the solver's configuration, `mode` and the arrays'
    shapes are the cache key, so a second call (and its derivatives: JAX differentiates the
    cached program) reuses it."""
    problem.validate(theta, phi0, (None, batch))
    theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
    phi0_d, phi_s = eqx.partition(phi0, eqx.is_inexact_array)
    batch_d, batch_s = eqx.partition(batch, eqx.is_inexact_array)
    # The arrays that are not variables (integer leaves, the solver's fields) are an argument of the
    # custom_jvp, not a closure: its rule runs when JAX differentiates the compiled program, after
    # this trace has ended.
    consts, static = eqx.partition((theta_s, phi_s, batch_s, solver), eqx.is_array)

    def unpack(t, p, b, c):
        """(theta, phi, batch, solver) from the variables and the constants."""
        theta_s, phi_s, batch_s, solver = eqx.combine(c, static)
        return eqx.combine(t, theta_s), eqx.combine(p, phi_s), eqx.combine(b, batch_s), solver

    @jax.custom_jvp
    def phi_star(t, p0, b, c):
        theta, phi0, batch, _ = unpack(t, p0, b, c)
        return oracles.differentiable(solve_lower(problem, optimizer, theta, phi0, batch, steps))

    @phi_star.defjvp
    def phi_star_jvp(primals, tangents):
        t, p0, b, c = primals
        t_dot, _, b_dot, _ = tangents  # the solution does not depend on phi0; c holds no variable
        p = phi_star(t, p0, b, c)  # re-entering the custom_jvp keeps higher orders implicit

        def grad_phi(t, b):
            theta, phi, batch, _ = unpack(t, p, b, c)
            return oracles.lower_grad_phi(problem, theta, phi, batch)

        # d_theta g . theta_dot + d_batch g . batch_dot, at fixed phi*: linear in the tangents
        _, g_dot = jax.jvp(grad_phi, (t, b), (t_dot, b_dot))
        theta, phi, batch, solver = unpack(t, p, b, c)
        matvec = oracles.linearize_lower(problem, theta, phi, batch, mode).hvp

        def inverse(matvec, r):
            """A^{-1} r with the user's solver (NaN where the solve failed, by the solver protocol)."""
            return solver.solve(matvec, r, solver.init(r))[0]

        p_dot = jax.lax.custom_linear_solve(matvec, otu.tree_scale(-1.0, g_dot), inverse, symmetric=True)
        return p, p_dot

    return eqx.combine(phi_star(theta_d, phi0_d, batch_d, consts), phi_s)

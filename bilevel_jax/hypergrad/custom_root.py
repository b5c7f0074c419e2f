"""`bj.custom_root` and `bj.custom_fixed_point`: implicit differentiation of any root or fixed-point
solver, with jaxopt's call signatures (`jaxopt.implicit_diff`, archived in 2025).

The decorated solver `solver(init_params, *args, **kwargs) -> sol` returns a root of the
optimality function, F(sol, *args) = 0 (for a fixed point T, F(x, *args) = T(x, *args) - x).
Differentiating F(sol(args), args) = 0 (Blondel, Berthet, Cuturi, Frostig, Hoyer, Llinares-Lopez,
Pedregosa, Vert, "Efficient and Modular Implicit Differentiation", NeurIPS 2022,
arXiv:2105.15183, eq. 2-3) gives, with A = d_x F and B = d_args F at (sol, args),

    jvp:   sol_dot = -A^{-1} (B args_dot)                    (A sol_dot = -B args_dot)
    vjp:   args_bar = -B' u,   A' u = sol_bar                (one adjoint solve per cotangent)

The decorated solver is a `jax.custom_jvp` with the jvp rule; A^{-1} is `jax.lax.custom_linear_solve`
with A as the `jax.linearize` of F in x and the chosen linear solver, so reverse mode comes from
JAX's transposition (the solver applied to A'). `jax.grad`, `jax.jacrev`, `jax.jacfwd`, `jax.jvp`,
`jax.hessian` (higher orders re-enter the rule), `jit` and `vmap` all work; autodiff never goes
through the solver's iterations (`lax.while_loop` inside is fine). init_params gets no derivative;
aux outputs (`has_aux=True`: the solver returns `(sol, aux)`) get zero derivatives, as in jaxopt.

Arguments: every inexact-array leaf of `args`/`kwargs` is differentiated (keyword arguments too);
integer arrays pass through as constants; other leaves (Python numbers outside `jit`, strings,
functions) are static. `sol` must be a pytree of inexact arrays and F(sol, ...) a pytree of the
same structure, shapes and dtypes (a square system).

Linear solvers (`solve=`):
  - a `bj.linear_solvers` solver: `cg`, `minres`, `dense`, `gd`, `neumann`, `damped(...)` assume a
    symmetric A (F the gradient of an objective: A its Hessian); each solve first compares A b
    with A'b (one matvec, one transposed matvec) and reports an A that is visibly not symmetric
    (||Ab - A'b|| > sqrt(eps) max(||Ab||, ||A'b||)) as BREAKDOWN with NaN. `normal(cg(...))`
    solves the normal equations A'A x = A'b and is right for any non-singular A (fixed points,
    general roots); a singular A is BREAKDOWN, not a least-squares point. Stochastic solvers are
    refused.
  - a jaxopt-style callable `solve(matvec, b) -> x` (jaxopt's own `linear_solve.solve_cg`,
    `solve_gmres`, ... or `lambda mv, b: jax.scipy.sparse.linalg.gmres(mv, b)[0]`): trusted as is,
    no status beyond a non-finite result (NONFINITE, NaN).
  - default (None): `normal(cg(maxiter=100))`, jaxopt's default (`solve_normal_cg`) in this
    library's terms: any non-singular A; the iteration freezes at rounding level (jaxopt's stops
    at a relative tolerance of 1e-5, up to 10 n iterations). It squares the condition number: for
    a gradient F (A a Hessian) pass `cg(...)`, and more iterations for larger or ill-conditioned
    systems (float32, cond(A) = 1000: relative error 0.57 by the default, 5e-7 by `cg(maxiter=100)`).
    Running out of iterations is not a failure (the solver protocol): `root_vjp(...,
    return_info=True)` gives the residual.

Failures are loud. A failed solve (BREAKDOWN: a singular or indefinite A for CG, a singular A
for `normal`, an asymmetric A for a symmetric solver; NONFINITE) returns NaN, so every tangent and
cotangent it touches is NaN, never a finite-looking derivative. To see why:
  - `check=True` raises at run time (under `jit`, readable under `eqx.filter_jit`) naming the cause;
  - `root_vjp(optimality_fun, sol, args, cotangent, solve, return_info=True)` runs the adjoint solve
    that `jax.grad` through the decorated solver runs and returns `(vjps, info)` with
    `info.status` (a `bj.status` code) and `info.residual_norm`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import check_bool
from bilevel_jax.linear_solvers import LinearSolver, WarmStart, cg, fail_where, normal, residual_norm
from bilevel_jax.linear_solvers.base import make_info, rounding_eps

PyTree = Any


class _External(LinearSolver):
    """A jaxopt-style `solve(matvec, b) -> x` behind the solver protocol: trusted (no symmetry or
    breakdown check), NONFINITE and NaN for a non-finite x; `num_matvecs` is not counted (0)."""

    fn: Callable = eqx.field(static=True, kw_only=True)
    needs_symmetric: ClassVar[bool] = False

    def solve(self, matvec, b, state, key=None):
        del state, key
        x = self.fn(matvec, b)
        status = st.nonfinite(x)
        x = fail_where(status != st.OK, x)
        res = jnp.where(status != st.OK, jnp.nan, residual_norm(matvec, b, x))
        return x, WarmStart(x), make_info(res, 0, status)


def _has_dtype(x) -> bool:
    """An array or a typed scalar: the solver's arguments that may be traced (differentiated)."""
    return eqx.is_array(x) or isinstance(getattr(x, "dtype", None), np.dtype)


def _is_float(x) -> bool:
    """A floating-point leaf: an inexact array, or a Python float (rules may receive one as a primal)."""
    return isinstance(x, float) or (_has_dtype(x) and jnp.issubdtype(x.dtype, jnp.inexact))


def _as_solver(solve) -> LinearSolver:
    if solve is None:
        return normal(cg(maxiter=100))
    if isinstance(solve, LinearSolver):
        if solve.stochastic:
            raise TypeError("solve must be a deterministic linear solver (a stochastic one needs keys and batches).")
        return solve
    if callable(solve):
        return _External(fn=solve)
    raise TypeError(f"solve must be a bj.linear_solvers solver or a callable solve(matvec, b), got {type(solve).__name__}.")


def _asymmetry(matvec: Callable, b: PyTree) -> jax.Array:
    """BREAKDOWN when A b and A'b differ beyond sqrt(eps) of their size (A not symmetric), else OK."""
    ab = matvec(b)
    atb = jax.linear_transpose(matvec, b)(b)[0]
    scale = jnp.maximum(otu.tree_norm(ab), otu.tree_norm(atb))
    return st.flag(otu.tree_norm(otu.tree_sub(ab, atb)) > jnp.sqrt(rounding_eps(b)) * scale, st.BREAKDOWN)


def _solve(solver: LinearSolver, matvec: Callable, b: PyTree):
    """`(x, info)` for A x = b (a fresh solver state), with the symmetry check of a symmetric solver
    (counted as 2 matvecs)."""
    x, _, info = solver.solve(matvec, b, solver.init(b))
    if solver.needs_symmetric:
        status = st.merge(info.status, _asymmetry(matvec, b))
        failed = status != st.OK
        info = info._replace(status=status, residual_norm=jnp.where(failed, jnp.nan, info.residual_norm),
                             num_matvecs=info.num_matvecs + 2)
        x = fail_where(failed, x)
    return x, info


def _check_square(fun: Callable, sol: PyTree, args: PyTree) -> None:
    """A clear error (at trace time) unless sol is inexact and F(sol, args) is shaped like sol."""
    leaves = jax.tree_util.tree_leaves(sol)
    if not all(_is_float(x) for x in leaves):
        raise TypeError("the solution must be a pytree of floating-point arrays, got leaves of types "
                        f"{sorted({type(x).__name__ for x in leaves if not _is_float(x)})}.")
    shapes = lambda t: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), t)
    out, want = shapes(jax.eval_shape(fun, sol, args)), shapes(sol)
    if out != want:
        raise ValueError("the optimality function must return a pytree shaped like the solution (a square "
                         f"system F(sol, *args) = 0): got {out} for a solution {want}.")


def _tangent(fun: Callable, sol: PyTree, args: PyTree, args_dot: PyTree, solver: LinearSolver, check: bool):
    """sol_dot = -A^{-1} (B args_dot), A = d_x fun, B = d_args fun at (sol, args); transposable."""
    _check_square(fun, sol, args)
    a_x, a_rest = eqx.partition(args, _is_float)
    t_x, _ = eqx.partition(args_dot, _is_float)   # integer leaves: float0 tangents, dropped
    _, g_dot = jax.jvp(lambda ax: fun(sol, eqx.combine(ax, a_rest)), (a_x,), (t_x,))
    _, matvec = jax.linearize(lambda x: fun(x, args), sol)

    def solve_fn(mv, b):   # A^{-1} b, and (A')^{-1} b when JAX transposes the solve
        x, info = _solve(solver, mv, b)
        return st.raise_if(x, info.status, "custom_root's implicit linear solve") if check else x

    return jax.lax.custom_linear_solve(matvec, otu.tree_scale(-1.0, g_dot), solve_fn, solve_fn)


def _zero_tangent(x):
    x = jnp.asarray(x)
    return jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.inexact) else np.zeros(x.shape, jax.dtypes.float0)


def _signature(fun: Callable) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):   # builtins and C callables: no signature to check against
        return None


def custom_root(optimality_fun: Callable, has_aux: bool = False, solve=None,
                reference_signature: Optional[Callable] = None, check: bool = False) -> Callable:
    """Decorator: `custom_root(optimality_fun)(solver)` is `solver`, differentiable in its arguments
    by the implicit function theorem at `optimality_fun(sol, *args, **kwargs) = 0`.

    As `jaxopt.implicit_diff.custom_root` (module docstring for the equations and the statuses):

        @bj.custom_root(jax.grad(ridge_objective), solve=bj.linear_solvers.cg(maxiter=50))
        def ridge_solver(init_w, lam, X, y):
            return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)

        jax.grad(lambda lam: val_loss(ridge_solver(w0, lam, X, y)))(1.0)

    Args:
      optimality_fun: `F(params, *args, **kwargs)`, zero at the solution, shaped like params.
      has_aux: the solver returns `(sol, aux)`; aux gets zero derivatives.
      solve: a `bj.linear_solvers` solver (symmetric ones check that A is symmetric), a
        jaxopt-style callable `solve(matvec, b)`, or None for `normal(cg(maxiter=100))`.
      reference_signature: the function whose signature the solver's arguments are checked
        against before tracing (default `optimality_fun`), as in jaxopt; keyword arguments are
        passed to `optimality_fun` by name.
      check: raise (under jit) when an implicit linear solve fails, instead of NaN derivatives.

    Returns:
      a decorator; the decorated solver has the solver's signature `(init_params, *args, **kwargs)`.
    """
    if not callable(optimality_fun):
        raise TypeError(f"optimality_fun must be callable, got {type(optimality_fun).__name__}.")
    check_bool("has_aux", has_aux)
    check_bool("check", check)
    solver = _as_solver(solve)
    signature = _signature(optimality_fun if reference_signature is None else reference_signature)

    def decorator(solver_fun: Callable) -> Callable:
        if not callable(solver_fun):
            raise TypeError(f"custom_root decorates a solver function, got {type(solver_fun).__name__}.")

        @functools.wraps(solver_fun)
        def solver_with_implicit_diff(init_params, *args, **kwargs):
            if signature is not None:
                try:
                    signature.bind(init_params, *args, **kwargs)
                except TypeError as e:
                    raise TypeError(f"{getattr(solver_fun, '__name__', 'the solver')} was called with arguments "
                                    f"that the optimality function's signature {signature} does not accept: {e}") from None
            p0_d, p0_s = eqx.partition(init_params, _has_dtype)
            dyn, static = eqx.partition((args, kwargs), _has_dtype)

            def call(fn, x, d):
                a, k = eqx.combine(d, static)
                return fn(x, *a, **k)

            @jax.custom_jvp
            def root(p0, d):
                return call(solver_fun, eqx.combine(p0, p0_s), d)

            @root.defjvp
            def root_jvp_rule(primals, tangents):
                p0, d = primals
                out = root(p0, d)   # re-entering the custom_jvp keeps higher orders implicit
                sol = out[0] if has_aux else out
                sol_dot = _tangent(functools.partial(call, optimality_fun), sol, d, tangents[1], solver, check)
                if has_aux:
                    return out, (sol_dot, jax.tree_util.tree_map(_zero_tangent, out[1]))
                return out, sol_dot

            return root(p0_d, dyn)

        return solver_with_implicit_diff

    return decorator


def custom_fixed_point(fixed_point_fun: Callable, has_aux: bool = False, solve=None,
                       reference_signature: Optional[Callable] = None, check: bool = False) -> Callable:
    """Decorator: `custom_fixed_point(T)(solver)` differentiates a solver of x = T(x, *args, **kwargs)
    by the implicit function theorem: `custom_root` with F(x, ...) = T(x, ...) - x, so A = d_x T - I,
    which is not symmetric in general (the default `normal(cg(maxiter=100))` fits; `cg()` alone is
    reported as BREAKDOWN where A is visibly asymmetric). As `jaxopt.implicit_diff.custom_fixed_point`;
    the arguments are those of `custom_root` (reference_signature defaults to `fixed_point_fun`)."""
    if not callable(fixed_point_fun):
        raise TypeError(f"fixed_point_fun must be callable, got {type(fixed_point_fun).__name__}.")

    def optimality_fun(x, *args, **kwargs):
        return otu.tree_sub(fixed_point_fun(x, *args, **kwargs), x)

    return custom_root(optimality_fun, has_aux, solve,
                       fixed_point_fun if reference_signature is None else reference_signature, check)


def root_jvp(optimality_fun: Callable, sol: PyTree, args: tuple, tangents: tuple, solve=None) -> PyTree:
    """The tangent of the root `sol` of `optimality_fun(sol, *args) = 0` along `tangents` (one per
    argument, shaped like it): -A^{-1} (B tangents), as `jaxopt.implicit_diff.root_jvp`."""
    fun = lambda x, a: optimality_fun(x, *a)
    return _tangent(fun, sol, tuple(args), tuple(tangents), _as_solver(solve), False)


def root_vjp(optimality_fun: Callable, sol: PyTree, args: tuple, cotangent: PyTree, solve=None,
             return_info: bool = False):
    """The cotangents of `args` for a cotangent of the root `sol` of `optimality_fun(sol, *args) = 0`:
    `-B' u` with `A' u = cotangent`, a tuple with one entry per argument (None at leaves that are not
    inexact arrays), as `jaxopt.implicit_diff.root_vjp`. With `return_info=True`, `(vjps, info)`:
    `info` is the adjoint solve's `SolverInfo` (`status`, `residual_norm`, `num_matvecs`), the solve
    `jax.grad` through a `custom_root`-decorated solver runs; the vjps are NaN where it failed."""
    check_bool("return_info", return_info)
    solver = _as_solver(solve)
    args = tuple(args)
    fun = lambda x, a: optimality_fun(x, *a)
    _check_square(fun, sol, args)
    a_x, a_rest = eqx.partition(args, _is_float)
    _, vecmat = jax.vjp(lambda x: fun(x, args), sol)
    u, info = _solve(solver, lambda y: vecmat(y)[0], cotangent)
    _, pullback = jax.vjp(lambda ax: fun(sol, eqx.combine(ax, a_rest)), a_x)
    vjps = tuple(otu.tree_scale(-1.0, pullback(u)[0]))
    return (vjps, info) if return_info else vjps


__all__ = ["custom_fixed_point", "custom_root", "root_jvp", "root_vjp"]

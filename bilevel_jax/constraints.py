"""Constrained lower levels: feasible sets, projected LL steps, an augmented-Lagrangian LL
solver and least-squares multipliers.

    Phi(theta) = {phi : P(theta, phi) <= 0,  Q(theta, phi) = 0}       (`BilevelProblem.lower_inequality`/`lower_equality`)

Sets with an exact Euclidean projection in `optax.projections` (box, non-negative orthant,
simplex, l2 ball, hyperplane, halfspace; their factories check the parameters: an empty or
degenerate set raises) are `ConstraintSet` Modules that give both the projection (for projected
LL steps, `projected`) and the smooth constraint functions P, Q (for the KKT implicit gradient,
`bj.hypergrad.kkt`): `box(0.0).problem(f_upper, f_lower)` is a
`BilevelProblem` whose LL is constrained to phi >= 0.

General (theta-dependent, nonlinear) constraints: `augmented_lagrangian`, the method of
multipliers (Hestenes, "Multiplier and gradient methods", 1969; Powell 1969; Rockafellar, "The
multiplier method of Hestenes and Powell applied to convex programming", 1973):

    L_rho(phi) = f_lower + <lambda_Q, Q> + rho/2 ||Q||^2 + 1/(2 rho) sum (max(0, lambda_P + rho P)^2 - lambda_P^2)
    phi <- `inner_steps` optax steps on L_rho;   lambda_P <- max(0, lambda_P + rho P),  lambda_Q <- lambda_Q + rho Q

It returns phi, its multipliers and an `ALMInfo` (NONFINITE when it diverges). A solver that
gives no multipliers (projected steps) gets them by least squares from stationarity
(`least_squares_multipliers`; Giovannelli, Kent, Vicente, "Bilevel stochastic methods for
optimization and machine learning: Bilevel stochastic descent and DARTS", 2021, arXiv:2110.00604):

    lambda = argmin ||grad_phi f_lower + grad_phi P' lambda_P + grad_phi Q' lambda_Q||^2 + ||P * lambda_P||^2
    i.e. (J J' + diag(P^2, 0)) lambda = -J grad_phi f_lower,  J = [grad_phi P; grad_phi Q]

solved by CG on the normal equations (J and J' by jvp/vjp of the constraints, never formed).
The second term makes the multipliers of inactive constraints vanish; at a KKT point the
minimum is zero and lambda is the KKT multiplier. The system is SPD under LICQ; a breakdown of
that solve (dependent active gradients) is reported as `bj.status.DEGENERATE`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.projections as proj
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax.cache import StaticFields
from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.lower import lower_steps
from bilevel_jax.linear_solvers import LinearSolver, SolverInfo, cg, fail_where
from bilevel_jax.linear_solvers.base import rounding_eps
from bilevel_jax.oracles import Multipliers
from bilevel_jax.problem import BilevelProblem

PyTree = Any


# ------------------------------------------------------------------ sets with a projection

class ConstraintSet(eqx.Module):
    """A theta-independent feasible set: its projection and its smooth constraints P <= 0, Q = 0.

    Its bound methods end up in static places (a `BilevelProblem`, a projected optax rule held by
    an algorithm), so a set hashes and compares by identity (its fields may be arrays): reuse one
    instance to share compilations."""

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    def project(self, phi: PyTree) -> PyTree:
        raise NotImplementedError

    def inequality(self, theta, phi) -> Optional[PyTree]:
        """P(theta, phi) (<= 0 on the set), or None."""
        return None

    def equality(self, theta, phi) -> Optional[PyTree]:
        """Q(theta, phi) (= 0 on the set), or None."""
        return None

    @property
    def has_inequality(self) -> bool:
        return type(self).inequality is not ConstraintSet.inequality

    @property
    def has_equality(self) -> bool:
        return type(self).equality is not ConstraintSet.equality

    def problem(self, f_upper: Callable, f_lower: Callable, project_upper: Optional[Callable] = None,
                pessimistic: bool = False) -> BilevelProblem:
        """The `BilevelProblem` whose LL is constrained to this set."""
        return BilevelProblem(f_upper, f_lower, project_upper,
                              lower_inequality=self.inequality if self.has_inequality else None,
                              lower_equality=self.equality if self.has_equality else None, pessimistic=pessimistic)


class Box(ConstraintSet):
    """lower <= phi <= upper (scalars or pytrees like phi; None for no bound on that side).
    P = (lower - phi, phi - upper), the absent sides left out. The bounds are checked: no NaN, and
    lower <= upper everywhere (an empty box raises; `require`)."""

    lower: Any = None
    upper: Any = None

    def __init__(self, lower=None, upper=None):
        if lower is None and upper is None:
            raise ValueError("box: give `lower`, `upper` or both (a box with no bound is the whole space).")
        if lower is not None:
            lower = require("box", lower, _not_nan, "the lower bound has NaN entries")
        if upper is not None:
            upper = require("box", upper, _not_nan, "the upper bound has NaN entries")
        if lower is not None and upper is not None:
            lower = require("box", lower, lambda lo: _pairs(lambda l, u: jnp.asarray(l) <= jnp.asarray(u), lo, upper),
                            "lower > upper somewhere: the box is empty")
        self.lower, self.upper = lower, upper

    def project(self, phi):
        lo = jax.tree_util.tree_map(lambda p: -jnp.inf, phi) if self.lower is None else self._like(self.lower, phi)
        hi = jax.tree_util.tree_map(lambda p: jnp.inf, phi) if self.upper is None else self._like(self.upper, phi)
        return proj.projection_box(phi, lo, hi)

    @staticmethod
    def _like(bound, phi):
        if jax.tree_util.tree_structure(bound) == jax.tree_util.tree_structure(phi):
            return bound
        return jax.tree_util.tree_map(lambda p: jnp.broadcast_to(jnp.asarray(bound, p.dtype), p.shape), phi)

    def inequality(self, theta, phi):
        out = {}
        if self.lower is not None:
            out["lower"] = otu.tree_sub(self._like(self.lower, phi), phi)
        if self.upper is not None:
            out["upper"] = otu.tree_sub(phi, self._like(self.upper, phi))
        return out


class Simplex(ConstraintSet):
    """phi >= 0, sum of all entries = scale. P = -phi, Q = sum(phi) - scale."""

    scale: Any = 1.0

    def __init__(self, scale=1.0):
        self.scale = _positive("simplex", "scale", scale)

    def project(self, phi):
        return proj.projection_simplex(phi, self.scale)

    def inequality(self, theta, phi):
        return otu.tree_scale(-1.0, phi)

    def equality(self, theta, phi):
        return otu.tree_sum(phi) - self.scale


class L2Ball(ConstraintSet):
    """||phi|| <= radius. P = (||phi||^2 - radius^2) / 2 (smooth)."""

    radius: Any = 1.0

    def __init__(self, radius=1.0):
        self.radius = _positive("l2_ball", "radius", radius)

    def project(self, phi):
        return proj.projection_l2_ball(phi, self.radius)

    def inequality(self, theta, phi):
        return 0.5 * (otu.tree_norm(phi, squared=True) - self.radius ** 2)


class Hyperplane(ConstraintSet):
    """<a, phi> = b. Q = <a, phi> - b."""

    a: Any
    b: Any = 0.0

    def __init__(self, a, b=0.0):
        self.a, self.b = _plane("hyperplane", a, b)

    def project(self, phi):
        return proj.projection_hyperplane(phi, self.a, self.b)

    def equality(self, theta, phi):
        return otu.tree_vdot(self.a, phi) - self.b


class Halfspace(ConstraintSet):
    """<a, phi> <= b. P = <a, phi> - b."""

    a: Any
    b: Any = 0.0

    def __init__(self, a, b=0.0):
        self.a, self.b = _plane("halfspace", a, b)

    def project(self, phi):
        return proj.projection_halfspace(phi, self.a, self.b)

    def inequality(self, theta, phi):
        return otu.tree_vdot(self.a, phi) - self.b


def require(where: str, value, ok: Callable, what: str):
    """`value`, checked: `ok(value)` (a boolean array, or a pytree of them) must hold everywhere.
    A concrete value that fails raises a ValueError naming `where` and `what` at once; a traced one
    (a swept parameter under jit / vmap) is returned with an `eqx.error_if` that raises the same
    message when the program runs."""
    message = f"{where}: {what}."
    with jax.ensure_compile_time_eval():   # concrete values are checked now, under jit too
        flags = [jnp.all(b) for b in jax.tree_util.tree_leaves(ok(value))]
        good = jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)
    if isinstance(good, jax.core.Tracer):
        return eqx.error_if(jax.tree_util.tree_map(jnp.asarray, value), ~good, message)
    if not bool(good):
        raise ValueError(message)
    return value


def _pairs(fn, lower, upper):
    """`fn(l, u)` leaf by leaf; a bound given as one scalar or array is broadcast over the other's leaves."""
    if jax.tree_util.tree_structure(lower) == jax.tree_util.tree_structure(upper):
        return jax.tree_util.tree_map(fn, lower, upper)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(lower)):
        return jax.tree_util.tree_map(lambda u: fn(lower, u), upper)
    return jax.tree_util.tree_map(lambda l: fn(l, upper), lower)


def _not_nan(tree):
    return jax.tree_util.tree_map(lambda x: ~jnp.isnan(jnp.asarray(x)), tree)


def _nonzero(a):
    return jnp.asarray(otu.tree_norm(a) > 0)


def box(lower=None, upper=None) -> Box:
    """The box lower <= phi <= upper (either side may be None; scalars or pytrees like phi). The
    bounds are checked: no NaN, and lower <= upper everywhere (an empty box raises)."""
    return Box(lower, upper)


def non_negative() -> Box:
    """phi >= 0."""
    return Box(0.0, None)


def simplex(scale=1.0) -> Simplex:
    """{phi >= 0, sum(phi) = scale}; scale must be a positive finite number."""
    return Simplex(scale)


def l2_ball(radius=1.0) -> L2Ball:
    """{||phi|| <= radius}; radius must be a positive finite number."""
    return L2Ball(radius)


def hyperplane(a, b=0.0) -> Hyperplane:
    """{<a, phi> = b}; a must be finite and nonzero (a = 0 is the whole space or empty)."""
    return Hyperplane(a, b)


def halfspace(a, b=0.0) -> Halfspace:
    """{<a, phi> <= b}; a must be finite and nonzero (a = 0 is the whole space or empty)."""
    return Halfspace(a, b)


def _show(value) -> str:
    return "a traced value" if isinstance(value, jax.core.Tracer) else repr(value)


def _positive(where: str, name: str, value):
    return require(where, value, lambda x: jnp.isfinite(x) & (jnp.asarray(x) > 0),
                   f"{name} must be a positive finite number, got {_show(value)}")


def _plane(where: str, a, b):
    a = require(where, a, lambda x: _nonzero(x) & jnp.isfinite(otu.tree_norm(x)),
                "`a` must be a finite nonzero vector (a = 0 gives the whole space or an empty set)")
    return a, require(where, b, lambda x: jnp.isfinite(x), f"`b` must be finite, got {_show(b)}")


# ------------------------------------------------------------------ projected LL steps

class ProjectedState(NamedTuple):
    inner: Any


def projected(optimizer: optax.GradientTransformation, projection: Callable[[PyTree], PyTree]
              ) -> optax.GradientTransformationExtraArgs:
    """`optimizer`'s step followed by a Euclidean projection: the update u becomes
    projection(params + u) - params (projected gradient descent with `optax.sgd`). Usable as the
    `lower_opt` of any preset and with `bj.hypergrad.lower_steps`; `projection` is e.g.
    `bj.constraints.box(0.0).project`."""
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"projected: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}.")
    if not callable(projection):
        raise TypeError(f"projected: projection must be a callable phi -> phi, got {type(projection).__name__}.")
    inner = optax.with_extra_args_support(optimizer)

    def init(params):
        return ProjectedState(inner.init(params))

    def update(updates, state, params=None, **extra):
        if params is None:
            raise ValueError("projected: the update needs `params` (the point to project from).")
        u, s = inner.update(updates, state.inner, params, **extra)
        new = projection(optax.apply_updates(params, u))
        return otu.tree_sub(new, params), ProjectedState(s)

    return optax.GradientTransformationExtraArgs(init, update)


@dataclasses.dataclass(frozen=True, eq=False)   # equality and hash: StaticFields
class ProjectedTransform(StaticFields):
    """`learning_rate -> projected(transform(learning_rate), projection)`: the `transform` of a
    `bj.algorithms.steps.StepRule` whose steps are projected (its step size stays an array field, so
    a sweep can vmap over it). A frozen dataclass: equal parts compare and hash equal, so equal
    configurations cross `jit` without recompiling (a set's bound method, whose Module holds arrays,
    compares by identity: `bj.cache.StaticFields`)."""

    transform: Callable
    projection: Callable

    def __call__(self, learning_rate) -> optax.GradientTransformationExtraArgs:
        return projected(self.transform(learning_rate), self.projection)


def feasible_set(problem: BilevelProblem) -> Optional[ConstraintSet]:
    """The `ConstraintSet` whose `.problem(...)` built `problem` (its constraint functions are that
    set's bound methods), else None."""
    owners = {getattr(fn, "__self__", None) for fn in (problem.lower_inequality, problem.lower_equality)
              if fn is not None}
    owner = owners.pop() if len(owners) == 1 else None
    return owner if isinstance(owner, ConstraintSet) else None


def solve_projected(problem: BilevelProblem, constraint_set: ConstraintSet, theta, phi0, batch, *,
                    learning_rate, steps: int):
    """`steps` projected gradient steps on f_lower(theta, ., batch) from P(phi0): phi only (get the
    multipliers with `least_squares_multipliers`)."""
    check_positive_int("steps", steps)
    check_step_size("learning_rate", learning_rate)
    opt = projected(optax.sgd(learning_rate), constraint_set.project)
    phi0 = constraint_set.project(phi0)
    phi, _ = lower_steps(problem, opt, theta, phi0, opt.init(oracles.differentiable(phi0)), steps, lambda t: batch)
    return phi


# ------------------------------------------------------------------ multipliers

class MultiplierInfo(NamedTuple):
    stationarity: jax.Array   # ||grad_phi L|| at the returned multipliers (0 at a KKT point)
    solver: SolverInfo
    status: jax.Array         # DEGENERATE when the normal equations broke down (LICQ fails)


def least_squares_multipliers(problem: BilevelProblem, theta, phi, batch, solver: Optional[LinearSolver] = None,
                              check_licq: bool = True):
    """Multipliers by least squares from stationarity (module docstring): `(Multipliers,
    MultiplierInfo)`. `solver` (default `cg(100)`) solves the SPD normal equations.

    `check_licq`: the right-hand side -J grad f lies in the range of J J', so a rank-deficient
    J J' (dependent active gradients: LICQ fails) does not stop CG on it. One more solve with a
    fixed random right-hand side, which has a component in any null space, detects it: CG meets
    zero curvature (BREAKDOWN) or does not reach a residual of sqrt(eps) relative (`singular`);
    either is reported as DEGENERATE (as is non-convergence of the normal equations themselves).
    (The KKT hypergradient checks LICQ on the active constraints instead, `licq_status`.)"""
    if not problem.constrained:
        raise ValueError("least_squares_multipliers: the problem has no lower_inequality / lower_equality.")
    solver = cg(100) if solver is None else solver
    grad_f = oracles.lower_grad_phi(problem, theta, phi, batch)
    cons = oracles.linearize_constraints(problem, theta, phi)
    p_sq = jax.tree_util.tree_map(jnp.square, cons.values.inequality)

    def transpose(mu):  # J' mu (phi-shaped)
        return cons.vjp(mu)[1]

    def matvec(mu):
        jjt = cons.jvp_phi(transpose(mu))
        reg = jax.tree_util.tree_map(lambda a, b: a * b, p_sq, mu.inequality)
        return Multipliers(otu.tree_add(jjt.inequality, reg), jjt.equality)

    rhs = otu.tree_scale(-1.0, cons.jvp_phi(grad_f))
    rhs = Multipliers(*rhs)
    mu, _, info = solver.solve(matvec, rhs, solver.init(rhs))
    mu = Multipliers(*mu)
    stationarity = otu.tree_norm(otu.tree_add(grad_f, transpose(mu)))
    failed = info.status != st.OK
    if check_licq:
        failed = failed | singular(matvec, rhs, solver)
    status = st.merge(st.flag(failed, st.DEGENERATE), info.status & st.NONFINITE)
    return mu, MultiplierInfo(stationarity, info, status)


def singular(matvec: Callable, like: PyTree, solver: LinearSolver) -> jax.Array:
    """Whether the symmetric positive semi-definite operator `matvec` is numerically singular: one
    solve with a fixed random right-hand side (shaped like `like`), which has a component in any
    null space, meets zero curvature (BREAKDOWN) or does not reach a residual of sqrt(eps)
    relative. (A consistent right-hand side, such as the least-squares one, does not reveal it.)"""
    probe = otu.tree_random_like(jax.random.PRNGKey(0), like)
    _, _, info = solver.solve(matvec, probe, solver.init(probe))
    tol = jnp.sqrt(rounding_eps(like))
    return (info.status != st.OK) | ~(info.residual_norm <= tol * otu.tree_norm(probe))


def licq_status(cons: oracles.ConstraintLinearization, active: Optional[PyTree], solver: Optional[LinearSolver] = None
                ) -> jax.Array:
    """DEGENERATE when the gradients of the active constraints are linearly dependent (LICQ fails),
    else OK. `cons`: `oracles.linearize_constraints` at the point; `active`: the inequality mask
    (1.0 active, 0.0 not; as `bj.hypergrad.kkt.active_set` gives), None without inequalities; every
    equality is active. The Gram matrix J_A J_A' of the active rows (identity rows for the inactive
    ones, by jvp/vjp of the constraints, never formed) is tested by `singular` with `solver`
    (default `cg(100)`). Used for given multipliers and least-squares ones alike."""
    solver = cg(100) if solver is None else solver

    def masked(mu):
        ineq = None if active is None else jax.tree_util.tree_map(lambda m, x: m * x, active, mu.inequality)
        return Multipliers(ineq, mu.equality)

    def matvec(mu):
        mu = Multipliers(*mu)
        jp, jq = cons.jvp_phi(cons.vjp(masked(mu))[1])
        ip = None if active is None else jax.tree_util.tree_map(lambda m, j, x: m * j + (1.0 - m) * x, active, jp,
                                                                mu.inequality)
        return Multipliers(ip, jq)

    like = Multipliers(*(None if v is None else otu.tree_zeros_like(v) for v in cons.values))
    return st.flag(singular(matvec, like, solver), st.DEGENERATE)


# ------------------------------------------------------------------ augmented Lagrangian

class ALMInfo(NamedTuple):
    """What `augmented_lagrangian` reports at its returned (phi, lambda).

    stationarity: ||grad_phi L(phi, lambda)|| (0 at a KKT point).
    infeasibility: the largest constraint violation, max(max_i P_i, max_j |Q_j|, 0).
    status: NONFINITE when phi or the multipliers are not finite (a diverging inner optimizer:
      phi and the multipliers are then NaN in every leaf), else OK.
    """

    stationarity: jax.Array
    infeasibility: jax.Array
    status: jax.Array


def augmented_lagrangian(problem: BilevelProblem, theta, phi0, batch, *, optimizer: optax.GradientTransformation,
                         inner_steps: int, outer_steps: int, penalty=10.0,
                         multipliers: Optional[Multipliers] = None):
    """The method of multipliers (module docstring) on the problem's LL constraints: `outer_steps`
    multiplier updates, each after `inner_steps` steps of `optimizer` on L_rho (its state carried
    across outer steps). `penalty` is rho. Returns `(phi, Multipliers, ALMInfo)`; fixed loop lengths,
    so it runs under jit and vmap. A run that does not stay finite (e.g. an inner step size too
    large for L_rho's curvature) returns NaN phi and multipliers with the status NONFINITE."""
    if not problem.constrained:
        raise ValueError("augmented_lagrangian: the problem has no lower_inequality / lower_equality.")
    check_positive_int("inner_steps", inner_steps)
    check_positive_int("outer_steps", outer_steps)
    check_step_size("penalty", penalty)
    values = oracles.constraint_values(problem, theta, phi0)
    if multipliers is None:
        multipliers = Multipliers(*(None if v is None else otu.tree_zeros_like(v) for v in values))
    rho = penalty

    def objective(lam):
        def f(th, ph, b):
            p, q = oracles.constraint_values(problem, th, ph)
            out = problem.f_lower(th, ph, b)
            if q is not None:
                out = out + otu.tree_vdot(lam.equality, q) + 0.5 * rho * otu.tree_norm(q, squared=True)
            if p is not None:
                shifted = jax.tree_util.tree_map(lambda l, c: jnp.maximum(0.0, l + rho * c), lam.inequality, p)
                out = out + 0.5 / rho * (otu.tree_norm(shifted, squared=True)
                                         - otu.tree_norm(lam.inequality, squared=True))
            return out
        return BilevelProblem(problem.f_upper, f)

    phi_d, phi_s = eqx.partition(phi0, eqx.is_inexact_array)

    def outer(carry, _):
        phi_d, opt_state, lam = carry
        phi, opt_state = lower_steps(objective(lam), optimizer, theta, eqx.combine(phi_d, phi_s), opt_state,
                                     inner_steps, lambda t: batch)
        p, q = oracles.constraint_values(problem, theta, phi)
        lam_p = None if p is None else jax.tree_util.tree_map(lambda l, c: jnp.maximum(0.0, l + rho * c),
                                                              lam.inequality, p)
        lam_q = None if q is None else otu.tree_add_scale(lam.equality, rho, q)
        return (oracles.differentiable(phi), opt_state, Multipliers(lam_p, lam_q)), None

    (phi_d, _, lam), _ = jax.lax.scan(outer, (phi_d, optimizer.init(phi_d), multipliers), None, length=outer_steps)
    phi = eqx.combine(phi_d, phi_s)
    cons = oracles.linearize_constraints(problem, theta, phi)
    stationarity = otu.tree_norm(otu.tree_add(oracles.lower_grad_phi(problem, theta, phi, batch), cons.vjp(lam)[1]))
    violations = [jnp.max(jnp.maximum(x, 0.0)) for x in jax.tree_util.tree_leaves(cons.values.inequality)]
    violations += [jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(cons.values.equality)]
    status = st.nonfinite(phi_d, lam)
    info = ALMInfo(stationarity, jnp.max(jnp.stack([jnp.zeros((), stationarity.dtype), *violations])), status)
    phi_d, lam = fail_where(status != st.OK, (phi_d, lam))
    return eqx.combine(phi_d, phi_s), lam, info


__all__ = ["ALMInfo", "Box", "ConstraintSet", "Halfspace", "Hyperplane", "L2Ball", "MultiplierInfo", "Multipliers",
           "ProjectedState", "ProjectedTransform", "Simplex", "augmented_lagrangian", "box", "feasible_set",
           "halfspace", "hyperplane", "l2_ball", "least_squares_multipliers", "licq_status", "non_negative",
           "projected", "require", "simplex", "singular", "solve_projected"]

"""Constrained lower levels: feasible sets, projected LL steps, an augmented-Lagrangian LL
solver and least-squares multipliers.

    Phi(theta) = {phi : P(theta, phi) <= 0,  Q(theta, phi) = 0}       (`BilevelProblem.lower_inequality`/`lower_equality`)

Sets with an exact Euclidean projection in `optax.projections` (box, non-negative orthant,
simplex, l2 ball, hyperplane, halfspace; their factories check the parameters: an empty or
degenerate set raises) are `ConstraintSet` Modules that give both the projection (for projected
LL steps, `projected`) and the smooth constraint functions P, Q (for the KKT implicit gradient,
`bj.hypergrad.kkt`): `box(0.0).problem(f_upper, f_lower)` is a
`BilevelProblem` whose LL is constrained to phi >= 0.

Theta-dependent sets: any parameter of a set may be a function of theta, e.g.
`halfspace(jnp.ones(2), lambda theta: 1.0 + 0.2 * theta[0])` is
Phi(theta) = {phi : phi_0 + phi_1 <= 1 + 0.2 theta_0}. Its P(theta, phi) carries the dependence
into the KKT hypergradient (the grad_theta P_A' b_P term of `bj.hypergrad.kkt`), and projected LL
steps project onto Phi(theta) at the current theta (`ConstraintSet.project_at`, `ProjectionAt`;
the step rules of `bj.algorithms` take theta when they step). A theta-independent set is the
special case whose `at(theta)` is itself.

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
import functools
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
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
    """A feasible set Phi(theta): its Euclidean projection and its smooth constraints P <= 0, Q = 0.

    A parameter of a set (a bound, an offset, a radius, ...) is a constant or a function of theta,
    `b = lambda theta: 1.0 + 0.2 * theta[0]`, so that Phi depends on theta (the constraint
    functions P(theta, phi), Q(theta, phi) then do too, and so does the KKT hypergradient through
    grad_theta P, grad_theta Q: `bj.hypergrad.kkt`). `at(theta)` is the set at theta, with every
    such parameter evaluated and checked as the factory checks a constant one; a set without one is
    its own `at(theta)` (theta-independent: the special case). `project_at(theta, phi)` projects
    onto Phi(theta); `project(phi)` only onto a theta-independent set.

    Its bound methods end up in static places (a `BilevelProblem`, a projected step rule held by
    an algorithm), so a set hashes and compares by identity (its fields may be arrays): reuse one
    instance to share compilations. A subclass implements `_project`, `_inequality` and/or
    `_equality` on its parameters' values, and takes its fields as its `__init__` arguments."""

    where: ClassVar[str] = "constraint set"   # the name in error messages (the factory's)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    @property
    def depends_on_theta(self) -> bool:
        """Whether a parameter is a function of theta."""
        return any(callable(getattr(self, f.name)) for f in dataclasses.fields(self))

    def at(self, theta) -> "ConstraintSet":
        """Phi(theta): the set with its theta-dependent parameters evaluated at theta (checked: an
        empty or degenerate Phi(theta) raises, under jit when the program runs), or the set itself
        when it does not depend on theta."""
        if not self.depends_on_theta:
            return self
        where = self.where
        if theta is None:
            raise ValueError(f"{where}: the set depends on theta (a parameter is a function of theta): project with "
                             "project_at(theta, phi), and evaluate P, Q at a theta, not None.")
        return type(self)(**{f.name: _evaluate(where, f.name, getattr(self, f.name), theta)
                             for f in dataclasses.fields(self)})

    def project(self, phi: PyTree) -> PyTree:
        """P_Phi(phi) onto a theta-independent set (a theta-dependent one raises: `project_at`)."""
        return self.project_at(None, phi)

    def project_at(self, theta, phi: PyTree) -> PyTree:
        """P_{Phi(theta)}(phi)."""
        return self.at(theta)._project(phi)

    def inequality(self, theta, phi) -> Optional[PyTree]:
        """P(theta, phi) (<= 0 on Phi(theta)), or None."""
        return self.at(theta)._inequality(phi) if self.has_inequality else None

    def equality(self, theta, phi) -> Optional[PyTree]:
        """Q(theta, phi) (= 0 on Phi(theta)), or None."""
        return self.at(theta)._equality(phi) if self.has_equality else None

    def _project(self, phi: PyTree) -> PyTree:
        raise NotImplementedError

    def _inequality(self, phi) -> Optional[PyTree]:
        return None

    def _equality(self, phi) -> Optional[PyTree]:
        return None

    @property
    def has_inequality(self) -> bool:
        return type(self)._inequality is not ConstraintSet._inequality

    @property
    def has_equality(self) -> bool:
        return type(self)._equality is not ConstraintSet._equality

    def problem(self, f_upper: Callable, f_lower: Callable, project_upper: Optional[Callable] = None,
                pessimistic: bool = False) -> BilevelProblem:
        """The `BilevelProblem` whose LL is constrained to this set."""
        return BilevelProblem(f_upper, f_lower, project_upper,
                              lower_inequality=self.inequality if self.has_inequality else None,
                              lower_equality=self.equality if self.has_equality else None, pessimistic=pessimistic)


class Box(ConstraintSet):
    """lower <= phi <= upper (scalars or pytrees like phi, or functions of theta giving them; None
    for no bound on that side). P = (lower - phi, phi - upper), the absent sides left out. The
    bounds are checked: no NaN, and lower <= upper everywhere (an empty box raises; `require`)."""

    where: ClassVar[str] = "box"

    lower: Any = None
    upper: Any = None

    def __init__(self, lower=None, upper=None):
        if lower is None and upper is None:
            raise ValueError("box: give `lower`, `upper` or both (a box with no bound is the whole space).")
        if lower is not None and not callable(lower):
            lower = require("box", lower, _not_nan, "the lower bound has NaN entries")
        if upper is not None and not callable(upper):
            upper = require("box", upper, _not_nan, "the upper bound has NaN entries")
        if lower is not None and upper is not None and not (callable(lower) or callable(upper)):
            lower = require("box", lower, lambda lo: _pairs(lambda l, u: jnp.asarray(l) <= jnp.asarray(u), lo, upper),
                            "lower > upper somewhere: the box is empty")
        self.lower, self.upper = lower, upper

    def _project(self, phi):
        lo = jax.tree_util.tree_map(lambda p: -jnp.inf, phi) if self.lower is None else self._like(self.lower, phi)
        hi = jax.tree_util.tree_map(lambda p: jnp.inf, phi) if self.upper is None else self._like(self.upper, phi)
        return proj.projection_box(phi, lo, hi)

    @staticmethod
    def _like(bound, phi):
        if jax.tree_util.tree_structure(bound) == jax.tree_util.tree_structure(phi):
            return bound
        return jax.tree_util.tree_map(lambda p: jnp.broadcast_to(jnp.asarray(bound, p.dtype), p.shape), phi)

    def _inequality(self, phi):
        out = {}
        if self.lower is not None:
            out["lower"] = otu.tree_sub(self._like(self.lower, phi), phi)
        if self.upper is not None:
            out["upper"] = otu.tree_sub(phi, self._like(self.upper, phi))
        return out


class Simplex(ConstraintSet):
    """phi >= 0, sum of all entries = scale. P = -phi, Q = sum(phi) - scale."""

    where: ClassVar[str] = "simplex"

    scale: Any = 1.0

    def __init__(self, scale=1.0):
        self.scale = _positive("simplex", "scale", scale)

    def _project(self, phi):
        return proj.projection_simplex(phi, self.scale)

    def _inequality(self, phi):
        return otu.tree_scale(-1.0, phi)

    def _equality(self, phi):
        return otu.tree_sum(phi) - self.scale


class L2Ball(ConstraintSet):
    """||phi|| <= radius. P = (||phi||^2 - radius^2) / 2 (smooth)."""

    where: ClassVar[str] = "l2_ball"

    radius: Any = 1.0

    def __init__(self, radius=1.0):
        self.radius = _positive("l2_ball", "radius", radius)

    def _project(self, phi):
        return proj.projection_l2_ball(phi, self.radius)

    def _inequality(self, phi):
        return 0.5 * (otu.tree_norm(phi, squared=True) - self.radius ** 2)


class Hyperplane(ConstraintSet):
    """<a, phi> = b. Q = <a, phi> - b."""

    where: ClassVar[str] = "hyperplane"

    a: Any
    b: Any = 0.0

    def __init__(self, a, b=0.0):
        self.a, self.b = _plane("hyperplane", a, b)

    def _project(self, phi):
        return proj.projection_hyperplane(phi, self.a, self.b)

    def _equality(self, phi):
        return otu.tree_vdot(self.a, phi) - self.b


class Halfspace(ConstraintSet):
    """<a, phi> <= b. P = <a, phi> - b."""

    where: ClassVar[str] = "halfspace"

    a: Any
    b: Any = 0.0

    def __init__(self, a, b=0.0):
        self.a, self.b = _plane("halfspace", a, b)

    def _project(self, phi):
        return proj.projection_halfspace(phi, self.a, self.b)

    def _inequality(self, phi):
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
    """The box lower <= phi <= upper (either side may be None; scalars or pytrees like phi, or
    functions of theta giving them: a box Phi(theta)). The bounds are checked: no NaN, and
    lower <= upper everywhere (an empty box raises; a theta-dependent one at the theta where it is
    empty)."""
    return Box(lower, upper)


def non_negative() -> Box:
    """phi >= 0."""
    return Box(0.0, None)


def simplex(scale=1.0) -> Simplex:
    """{phi >= 0, sum(phi) = scale}; scale must be a positive finite number (or a function of theta
    giving one)."""
    return Simplex(scale)


def l2_ball(radius=1.0) -> L2Ball:
    """{||phi|| <= radius}; radius must be a positive finite number (or a function of theta giving
    one)."""
    return L2Ball(radius)


def hyperplane(a, b=0.0) -> Hyperplane:
    """{<a, phi> = b}; a must be finite and nonzero (a = 0 is the whole space or empty), b finite;
    either may be a function of theta (a hyperplane Phi(theta))."""
    return Hyperplane(a, b)


def halfspace(a, b=0.0) -> Halfspace:
    """{<a, phi> <= b}; a must be finite and nonzero (a = 0 is the whole space or empty), b finite;
    either may be a function of theta, e.g. `halfspace(jnp.ones(2), lambda theta: 1.0 + 0.2 * theta[0])`
    is Phi(theta) = {phi_0 + phi_1 <= 1 + 0.2 theta_0}."""
    return Halfspace(a, b)


def _show(value) -> str:
    return "a traced value" if isinstance(value, jax.core.Tracer) else repr(value)


def _positive(where: str, name: str, value):
    if callable(value):   # a function of theta: checked on its value (`ConstraintSet.at`)
        return value
    return require(where, value, lambda x: jnp.isfinite(x) & (jnp.asarray(x) > 0),
                   f"{name} must be a positive finite number, got {_show(value)}")


def _plane(where: str, a, b):
    if not callable(a):
        a = require(where, a, lambda x: _nonzero(x) & jnp.isfinite(otu.tree_norm(x)),
                    "`a` must be a finite nonzero vector (a = 0 gives the whole space or an empty set)")
    if not callable(b):
        b = require(where, b, lambda x: jnp.isfinite(x), f"`b` must be finite, got {_show(b)}")
    return a, b


def _evaluate(where: str, name: str, value, theta):
    """A set's parameter at theta: `value(theta)` for a function of theta (its value must be an
    array or a pytree of arrays: a clear error otherwise), else `value`."""
    if not callable(value):
        return value
    try:
        out = value(theta)
    except TypeError as e:
        raise TypeError(f"{where}: `{name}` is a function of theta, but `{name}(theta)` failed (it must take theta "
                        f"alone and give the parameter's value): {e}") from e
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves or not all(isinstance(x, (jax.Array, np.ndarray, np.generic, float, int)) and not isinstance(x, bool)
                             for x in leaves):
        raise TypeError(f"{where}: `{name}(theta)` must give an array or a pytree of arrays (the parameter at theta), "
                        f"got {_show(out)}.")
    return out


# ------------------------------------------------------------------ projected LL steps

class ProjectedState(NamedTuple):
    inner: Any


def projected(optimizer: optax.GradientTransformation, projection: Callable[[PyTree], PyTree]
              ) -> optax.GradientTransformationExtraArgs:
    """`optimizer`'s step followed by a Euclidean projection: the update u becomes
    projection(params + u) - params (projected gradient descent with `optax.sgd`). Usable as the
    `lower_opt` of any preset and with `bj.hypergrad.lower_steps`; `projection` is e.g.
    `bj.constraints.box(0.0).project`: a fixed set (a preset's `lower_set=` projects onto
    Phi(theta) at the current theta, `ProjectionAt`)."""
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
class ProjectionAt(StaticFields):
    """(theta, phi) -> P_{Phi(theta)}(phi): the projection of projected LL steps
    (`bj.algorithms.steps.StepRule.projection`), from a `ConstraintSet` (`project_at`; its
    theta-dependent parameters evaluated at theta) or from a projection phi -> P_Phi(phi) onto a
    fixed set (theta ignored). A frozen dataclass: equal parts compare and hash equal, so equal
    configurations cross `jit` without recompiling (a set, whose Module holds arrays, compares by
    identity: `bj.cache.StaticFields`)."""

    target: Any

    def __post_init__(self):
        if not isinstance(self.target, ConstraintSet) and not callable(self.target):
            raise TypeError(f"the feasible set must be a bj.constraints.ConstraintSet or a projection phi -> "
                            f"P_Phi(phi), got {self.target!r}.")

    @property
    def depends_on_theta(self) -> bool:
        return isinstance(self.target, ConstraintSet) and self.target.depends_on_theta

    def __call__(self, theta, phi):
        if isinstance(self.target, ConstraintSet):
            return self.target.project_at(theta, phi)
        return self.target(phi)


def feasible_set(problem: BilevelProblem) -> Optional[ConstraintSet]:
    """The `ConstraintSet` whose `.problem(...)` built `problem` (its constraint functions are that
    set's bound methods), else None."""
    owners = {getattr(fn, "__self__", None) for fn in (problem.lower_inequality, problem.lower_equality)
              if fn is not None}
    owner = owners.pop() if len(owners) == 1 else None
    return owner if isinstance(owner, ConstraintSet) else None


def solve_projected(problem: BilevelProblem, constraint_set: ConstraintSet, theta, phi0, batch, *,
                    learning_rate, steps: int):
    """`steps` projected gradient steps on f_lower(theta, ., batch) onto Phi(theta) from
    P_{Phi(theta)}(phi0): phi only (get the multipliers with `least_squares_multipliers`)."""
    check_positive_int("steps", steps)
    check_step_size("learning_rate", learning_rate)
    project = functools.partial(constraint_set.project_at, theta)
    opt = projected(optax.sgd(learning_rate), project)
    phi0 = project(phi0)
    phi, _ = lower_steps(problem, opt, theta, phi0, opt.init(oracles.differentiable(phi0)), steps, lambda t: batch)
    return phi


# ------------------------------------------------------------------ multipliers

class MultiplierInfo(NamedTuple):
    stationarity: jax.Array   # ||grad_phi L|| at the returned multipliers (0 at a KKT point)
    solver: SolverInfo
    status: jax.Array         # DEGENERATE when the normal equations broke down (LICQ fails)


def least_squares_multipliers(problem: BilevelProblem, theta, phi, batch, solver: Optional[LinearSolver] = None,
                              check_licq: bool = True, grad_phi: Optional[PyTree] = None):
    """Multipliers by least squares from stationarity (module docstring): `(Multipliers,
    MultiplierInfo)`. `solver` (default `cg(100)`) solves the SPD normal equations. `grad_phi`:
    grad_phi f_lower at the point when the caller has it (else one LL gradient is taken); nothing
    else here is an oracle call (the constraints' derivatives are not counted, `bj.oracles.OracleCounts`).

    `check_licq`: the right-hand side -J grad f lies in the range of J J', so a rank-deficient
    J J' (dependent active gradients: LICQ fails) does not stop CG on it. One more solve with a
    fixed random right-hand side, which has a component in any null space, detects it: CG meets
    zero curvature (BREAKDOWN) or does not reach a residual of sqrt(eps) relative (`singular`);
    either is reported as DEGENERATE (as is non-convergence of the normal equations themselves).
    (The KKT hypergradient checks LICQ on the active constraints instead, `licq_status`.)"""
    if not problem.constrained:
        raise ValueError("least_squares_multipliers: the problem has no lower_inequality / lower_equality.")
    solver = cg(100) if solver is None else solver
    grad_f = oracles.lower_grad_phi(problem, theta, phi, batch) if grad_phi is None else grad_phi
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
           "ProjectedState", "ProjectionAt", "Simplex", "augmented_lagrangian", "box", "feasible_set",
           "halfspace", "hyperplane", "l2_ball", "least_squares_multipliers", "licq_status", "non_negative",
           "projected", "require", "simplex", "singular", "solve_projected"]

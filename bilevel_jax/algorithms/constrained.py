"""Implicit-gradient methods on constrained lower levels: the KKT direction rules (a full adjoint
solve, `kkt`, and its amortized single-loop form, `amortized_kkt`), BSG with constraints, and the
dispatch that makes aid_bio, amigo and soba use them on a constrained problem.

LL: min_{phi in Phi(theta)} f_lower, Phi(theta) = {P(theta, phi) <= 0, Q(theta, phi) = 0}. At
(theta, phi) the multipliers lambda are recovered by least squares from stationarity, the active
set A is read from them and the constraint values, and the adjoint z = (a, b_P, b_Q) of the
symmetric indefinite KKT system (`bj.hypergrad.kkt`; the KKT implicit
function theorem, as in Giovannelli, Kent, Vicente 2021, arXiv:2110.00604)

    K z = r,   K = [[grad^2_phi L, grad_phi P_A', grad_phi Q'], [grad_phi P_A, 0, 0], [grad_phi Q, 0, 0]],
    r = (grad_phi f_upper, 0, 0),
    D_theta = grad_theta f_upper - grad^2_{theta phi} L a - grad_theta P_A' b_P - grad_theta Q' b_Q

gives the hypergradient (inactive multiplier components on identity rows, b_i = 0).

`KKT` (`kkt`): z from a linear solver on K (MINRES by default, warm-started across outer steps
when the solver is): the double-loop rule of `bsg_constrained`, `aid_bio`, `amigo`.

`AmortizedKKT` (`amortized_kkt`): SOBA's amortization (Dagreou, Ablin, Vaiter, Moreau, "A framework
for bilevel optimization that enables stochastic and global variance reduction algorithms", 2022,
arXiv:2201.13409) of the KKT adjoint: z is a variable of the loop, moved once per outer step, at
the same point as phi and theta, by its step rule on

    D_z = K (K z - r),   the gradient of  1/2 ||K z - r||^2,

i.e. gradient descent on the normal equations K' K z = K' r (K' = K). Why this form: K is
indefinite (n_phi positive and |A| + n_Q negative eigenvalues at a strict local minimum), so
SOBA's step on 1/2 z'K z - r'z, z <- z - eta (K z - r), diverges along the negative eigenvectors.
K'K = K^2 is positive definite exactly when K is nonsingular, which holds under LICQ and
second-order sufficiency on the active set (strict complementarity fixes that set); then
z <- z - eta K(K z - r) contracts for 0 < eta < 2 / sigma_max(K)^2, at the rate
1 - eta sigma_min(K)^2. The alternative, SOBA on the active set's reduced Hessian Z'(grad^2 L)Z
(Z a basis of the null space of the active constraint gradients, SPD under second-order
sufficiency, with condition number at most that of grad^2 L rather than cond(K)^2), needs the
projector I - J_A'(J_A J_A')^{-1} J_A, an inner solve with the Gram matrix at every step for
general constraints, and the projected step does not compose with an arbitrary optax rule for z;
the normal equations need two K products and nothing else, for any (theta-dependent, nonlinear)
constraints, and their gradient is the step direction of any optax rule. The price: the rate is
set by cond(K)^2. The rule is SOBA's `Amortized` rule with this evaluation (same state, directions
and step of the variable): D_phi = grad_phi f_lower (a projected step onto Phi),
D_theta = grad_theta f_upper - cross(z_k) with z_k the current adjoint, then z moves.

Degeneracy (a weakly active constraint, a wrong-sign multiplier, LICQ failure) sets the step's
status DEGENERATE and the direction is kept, as in `bj.hypergradient` (the rule of
`bj.hypergrad.kkt`: a loss of differentiability, flagged; `nan_if_degenerate=True` makes it NaN,
and `bj.run(..., check=True)` stops on it). A failed adjoint solve (BREAKDOWN) is NaN.

`bsg_constrained` is BSG with constraints (Giovannelli, Kent, Vicente, "Bilevel stochastic methods
for optimization and machine learning: Bilevel stochastic descent and DARTS", 2021,
arXiv:2110.00604): T projected (stochastic) gradient steps on the LL, least-squares multipliers,
the KKT adjoint, and theta <- P_Theta(theta - alpha_k D_theta): `bilevel_loop` with projected LL
steps and the `KKT` rule.

Dispatch: aid_bio and amigo given a constrained problem use `KKT` (their `linear_solver`, default
warm-started `minres(10)`: CG and GD assume a positive definite system), soba uses `AmortizedKKT`;
the LL steps of all three are projected onto `lower_set` (default: the `bj.constraints` set the
problem was built from). Every other preset raises on a constrained problem (`Algorithm`'s check).

Theta-dependent sets Phi(theta) (a `bj.constraints` set with a parameter that is a function of
theta, e.g. `halfspace(a, lambda theta: b0 + g @ theta)`): the LL steps project onto Phi(theta_k)
at the current theta (`lower_projection`, `StepRule.build(theta)`: the LL phase at theta_k;
soba's phi step, which follows the theta step, onto Phi(theta_{k+1}), so that phi is feasible
where it is evaluated next), and the KKT system differentiates P(theta, phi), Q(theta, phi) in
theta (the grad_theta P_A' b_P, grad_theta Q' b_Q terms above). The theta-independent set is the
special case (its projection ignores theta). The presets whose theta-gradient ignores Phi's
dependence on theta (value-function, penalty, pessimistic, zeroth-order) refuse such a set.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import equinox as eqx
import jax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_bool, check_in_range, check_step_size
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.directions import (Amortized, AmortizedState, DirectionRule, Directions, Evaluation,
                                               Joint, LowerTerms, Separable, UpperTerms, implicit)
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.algorithms.steps import Rule, StepRule, as_rule, init_rule
from bilevel_jax.constraints import ProjectionAt, feasible_set
from bilevel_jax.hypergrad.kkt import adjoint_like, keep_or_fail, kkt_direction, kkt_system
from bilevel_jax.linear_solvers import LinearSolver, minres
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


def _check_problem(name: str, problem) -> None:
    if not isinstance(problem, BilevelProblem) or not problem.constrained:
        raise ValueError(f"{name}: the problem must be a bj.BilevelProblem with lower_inequality / lower_equality.")


def _check_multiplier_solver(solver) -> None:
    if solver is not None and not isinstance(solver, LinearSolver):
        raise TypeError(f"multiplier_solver must be a bj.linear_solvers solver (e.g. cg(100)), got {solver!r}.")


class KKTState(NamedTuple):
    solver: Any   # the adjoint solver's state; its x is (a, (b_P, b_Q))

    @property
    def v(self):
        return self.solver.x[0]


class KKT(DirectionRule):
    """D_theta from the KKT implicit gradient with a linear solve of the adjoint (module docstring)."""

    problem: BilevelProblem = eqx.field(static=True)
    solver: LinearSolver
    tol: jax.Array
    multiplier_solver: Optional[LinearSolver] = None
    nan_if_degenerate: bool = eqx.field(static=True, default=False)
    handles_constraints: ClassVar[bool] = True

    def init(self, theta, phi):
        return KKTState(self.solver.init(adjoint_like(phi, oracles.constraint_values(self.problem, theta, phi))))

    def evaluate(self, problem, point, batches, key, mode):
        out = kkt_direction(problem, point.theta, point.phi, batches.upper, batches.lower, self.solver,
                            point.rule_state.solver, None, self.tol, self.multiplier_solver, self.nan_if_degenerate)
        return Evaluation(Joint(out.g), KKTState(out.state), out.info.residual_norm, out.info.status)

    def directions(self, estimate):
        return Directions(estimate.hypergrad)


class AmortizedKKT(Amortized):
    """SOBA's `Amortized` rule on a constrained LL (module docstring): its state's `v` is the
    adjoint z = (a, (b_P, b_Q)), moved by `v_rule` on D_z = K (K z - r). The normal equations'
    gradient enters `Amortized`'s step of v as its `hvp` term with a zero right-hand side (the two K
    products cannot be split into K^2 z and K r without a third). Oracles that mix both levels'
    batches and are quadratic in the LL samples: no SAGA memories (not `separable`)."""

    problem: BilevelProblem = eqx.field(static=True, default=None)
    tol: jax.Array = None
    multiplier_solver: Optional[LinearSolver] = None
    nan_if_degenerate: bool = eqx.field(static=True, default=False)
    separable: ClassVar[bool] = False
    handles_constraints: ClassVar[bool] = True

    def init(self, theta, phi):
        z = adjoint_like(phi, oracles.constraint_values(self.problem, theta, phi))
        return AmortizedState(z, init_rule(self.v_rule, z))

    def evaluate(self, problem, point, batches, key, mode):
        system = kkt_system(problem, point.theta, point.phi, batches.upper, batches.lower, None, self.tol,
                            self.multiplier_solver)
        z = point.rule_state.v
        kz, cross = system.operator(z)
        residual = otu.tree_sub(kz, system.rhs)
        d_z = system.matvec(residual)
        cross = keep_or_fail(cross, system.status, self.nan_if_degenerate)
        terms = Separable(UpperTerms(system.g_theta, otu.tree_zeros_like(z)), LowerTerms(system.grad_lower, d_z, cross))
        return Evaluation(terms, point.rule_state, otu.tree_norm(residual), system.status)


def kkt(problem: BilevelProblem, linear_solver: Optional[LinearSolver] = None, tol=1e-6, *,
        multiplier_solver: Optional[LinearSolver] = None, nan_if_degenerate: bool = False) -> KKT:
    """The KKT direction rule with `linear_solver` (default `minres(50, warm_start=True)`); `tol`
    the relative active-set tolerance (`bj.hypergrad.kkt.active_set`), `multiplier_solver` the
    least-squares multipliers' CG (default `cg(100)`), `nan_if_degenerate` as in
    `bj.hypergrad.kkt_hypergradient`."""
    _check_problem("kkt", problem)
    solver = minres(50, warm_start=True) if linear_solver is None else linear_solver
    if not isinstance(solver, LinearSolver) or solver.stochastic:
        raise TypeError(f"linear_solver must be a deterministic bj.linear_solvers solver (e.g. minres(50)), "
                        f"got {solver!r}.")
    check_in_range("tol", tol, 0.0, float("inf"))
    _check_multiplier_solver(multiplier_solver)
    check_bool("nan_if_degenerate", nan_if_degenerate)
    return KKT(problem, solver, as_array(tol), multiplier_solver, nan_if_degenerate)


def amortized_kkt(problem: BilevelProblem, v_opt: Rule, tol=1e-6, *, multiplier_solver: Optional[LinearSolver] = None,
                  nan_if_degenerate: bool = False) -> AmortizedKKT:
    """The amortized KKT rule (module docstring); `v_opt` moves the adjoint z (an optax transform
    or a `StepRule`; plain steps need eta < 2 / sigma_max(K)^2)."""
    _check_problem("amortized_kkt", problem)
    check_in_range("tol", tol, 0.0, float("inf"))
    _check_multiplier_solver(multiplier_solver)
    check_bool("nan_if_degenerate", nan_if_degenerate)
    return AmortizedKKT(as_rule("v_opt", v_opt), problem, as_array(tol), multiplier_solver, nan_if_degenerate)


# ------------------------------------------------------------------ dispatch of the presets

def lower_projection(problem: BilevelProblem, lower_set, theta_dependent: bool = False) -> ProjectionAt:
    """The projection `(theta, phi) -> P_{Phi(theta)}(phi)` of the projected LL steps: onto
    `lower_set` (a `bj.constraints.ConstraintSet`, possibly theta-dependent, or a projection
    phi -> P_Phi(phi) onto a fixed set), by default the set the problem was built from
    (`ConstraintSet.problem`). Raises when there is none, and for a theta-dependent set unless
    `theta_dependent`: a method whose theta-gradient does not differentiate Phi(theta) (the
    value-function, penalty and zeroth-order presets) would silently solve another problem; the
    KKT hypergradient does (`bj.hypergrad.kkt`)."""
    if lower_set is None:
        lower_set = feasible_set(problem)
        if lower_set is None:
            raise ValueError("the lower level is constrained: pass lower_set= (a bj.constraints set, or a projection "
                             "phi -> P_Phi(phi) onto the feasible set) for the projected LL steps.")
    try:
        projection = ProjectionAt(lower_set)
    except TypeError as e:
        raise TypeError(f"lower_set must be a bj.constraints.ConstraintSet or a projection, got {lower_set!r}.") from e
    if projection.depends_on_theta and not theta_dependent:
        raise ValueError(f"the feasible set ({lower_set.where}) depends on theta, and this method's theta-gradient "
                         "ignores that dependence: use bsg_constrained, aid_bio, amigo or soba (the KKT "
                         "hypergradient includes it).")
    return projection


def project_rule(step_rule: StepRule, projection: Callable) -> StepRule:
    """`step_rule` followed by a Euclidean projection `(theta, phi) -> phi` onto the feasible set
    at the current theta (`lower_projection`; `StepRule.projection`); its step size stays an
    array field (sweepable) unless it is a whole optax rule."""
    return dataclasses.replace(step_rule, projection=projection)


def constrained_lower(problem: BilevelProblem, direction: DirectionRule, lower: Optional[StepRule],
                      lower_set=None) -> Optional[StepRule]:
    """A preset's LL step rule: projected onto the feasible set when its direction rule handles a
    constrained LL; as given otherwise (`lower_set` is then an error: the constraints would be
    ignored, which `Algorithm` reports for a constrained problem)."""
    if not getattr(direction, "handles_constraints", False):
        if lower_set is not None:
            raise ValueError("lower_set= applies to a constrained problem (lower_inequality / lower_equality).")
        return lower
    return None if lower is None else project_rule(lower, lower_projection(problem, lower_set, True))


def implicit_or_kkt(problem: BilevelProblem, linear_solver: Optional[LinearSolver], warm_start: bool,
                    default: Callable[[], LinearSolver]) -> DirectionRule:
    """An AID preset's direction rule: `implicit(linear_solver or default(), warm_start)`, or on a
    constrained problem `kkt` with `linear_solver` (default `minres(10)`; `warm_start` as given)."""
    if not check_problem(problem).constrained:
        return implicit(linear_solver or default(), warm_start)
    solver = minres(10) if linear_solver is None else linear_solver
    if isinstance(solver, LinearSolver) and solver.warm_start != warm_start:
        solver = dataclasses.replace(solver, warm_start=warm_start)
    return kkt(problem, solver)


def amortized_or_kkt(problem: BilevelProblem, v_rule: StepRule) -> DirectionRule:
    """SOBA's direction rule: `Amortized(v_rule)`, or `amortized_kkt` on a constrained problem."""
    return amortized_kkt(problem, v_rule) if check_problem(problem).constrained else Amortized(v_rule)


# ------------------------------------------------------------------ BSG with constraints

def bsg_constrained(problem: BilevelProblem, *, lower_set=None, upper_lr=0.1, lower_lr=0.1, upper_opt=None,
                    lower_opt=None, lower_steps: int = 10, linear_solver: Optional[LinearSolver] = None, tol=1e-6,
                    batch_size=None, upper_decay=0.0, **kw) -> BilevelLoop:
    """BSG with constraints (module docstring). `lower_set`: the LL's feasible set (a
    `bj.constraints.ConstraintSet`, theta-dependent or not, or a projection phi -> P_Phi(phi) onto a
    fixed set; default the set the problem was built from) for the projected LL steps onto
    Phi(theta_k) (`lower_lr`, or the optax rule `lower_opt`, then
    projected); the problem's constraint functions give the KKT system. UL steps
    `upper_lr` / (k+1)^`upper_decay`. Sampling: full batch by default; the paper's stochastic BSG
    draws i.i.d. samples (`batch_size=b`)."""
    with named("bsg_constrained"):
        _check_problem("bsg_constrained", problem)
        if lower_opt is None:
            check_step_size("lower_lr", lower_lr)
        direction = kkt(problem, linear_solver, tol)
        lower = constrained_lower(problem, direction, rule("lower_lr", lower_lr, lower_opt), lower_set)
        return bilevel_loop(problem, direction=direction,
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay), lower_opt=lower,
                            lower_steps=lower_steps_at_least_one(lower_steps), batch_size=batch_size,
                            name="bsg_constrained", **loop_options(kw))


__all__ = ["AmortizedKKT", "KKT", "KKTState", "amortized_kkt", "amortized_or_kkt", "bsg_constrained",
           "constrained_lower", "implicit_or_kkt", "kkt", "lower_projection", "project_rule"]

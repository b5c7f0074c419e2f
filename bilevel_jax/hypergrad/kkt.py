"""The KKT implicit gradient of a constrained lower level.

LL: phi*(theta) = argmin_{phi in Phi(theta)} f_lower,  Phi(theta) = {phi : P(theta, phi) <= 0, Q(theta, phi) = 0}.
With L = f_lower + lambda_P' P + lambda_Q' Q, a KKT point solves

    G(theta, phi, lambda_P, lambda_Q) = (grad_phi L,  lambda_P * P,  Q) = 0.

Under LICQ, strict complementarity and second-order sufficiency at phi*, the implicit function
theorem gives d(phi, lambda)/d theta = -[d G/d(phi, lambda)]^{-1} d G/d theta (Fiacco & McCormick,
"Nonlinear programming: sequential unconstrained minimization techniques", 1968; used for bilevel
learning by Giovannelli, Kent, Vicente, "Bilevel stochastic methods for optimization and machine
learning: Bilevel stochastic descent and DARTS", 2021, arXiv:2110.00604). Inactive inequalities
(P_i < 0, lambda_i = 0) drop out: their rows read P_i lambda_i_dot = 0. On the active set A the
system is symmetric indefinite,

    K = [[grad^2_phi L,  grad_phi P_A',  grad_phi Q'],
         [grad_phi P_A,  0,              0         ],
         [grad_phi Q,    0,              0         ]],

and the hypergradient of F(theta) = f_upper(theta, phi*(theta)) needs one adjoint solve:

    K (a, b_P, b_Q) = (grad_phi f_upper, 0, 0)
    grad F = grad_theta f_upper - grad^2_{theta phi} L a - grad_theta P_A' b_P - grad_theta Q' b_Q.

(Without constraints this is `bj.hypergradient`'s grad_theta f_upper - J v with v = a.) K is
applied matrix-free: the pullback of (grad_phi L, P, Q) over (theta, phi) gives the first block row
and the theta part (`oracles.linearize_lagrangian`: f_lower's linearization, `linearize_lower`, plus
one vjp of the constraints' part), one linearization of (P, Q) in phi the others; inactive
multiplier components get identity rows (b_i = 0), so the operator keeps a fixed shape under jit.
K is indefinite: solve it with MINRES (`bj.linear_solvers.minres`, the default). Oracle counts
(`bj.oracles.OracleCounts`): a product with K is one HVP of f_lower, the correction one cross
product, and the point costs one gradient of each level (grad_phi f_lower, taken once, gives the
least-squares multipliers, the active set and the stationarity).

Active set. The decisions are relative to the problem's scale (`active_set`; tol default 1e-6,
eps the machine epsilon):

    tol_P   = max(tol, 10 eps) * max(1, max_i |P_i|)      (the constraints' scale)
    tol_lam = max(tol, 100 eps) * max |lambda| + r         (the multipliers' scale and r, the LL's
                                                           stationarity residual ||grad_phi L|| with
                                                           the touching constraints' multipliers)

An inequality touches its bound when P_i >= -tol_P. With least-squares multipliers (which carry
no information beyond phi) the active set is the touching constraints; with multipliers given by
the solver that produced phi (an augmented Lagrangian's), a constraint with lambda_i > tol_lam is
active too: such a solver may end slightly inside the bound with a positive multiplier (its
multiplier update approaching lambda* from above), and dropping the constraint would
differentiate the wrong piece of phi*(theta). A multiplier estimated at a point that is not yet a KKT point (an LL
solved to a residual r) is uncertain by about r: so an LL that is not yet solved is not reported
degenerate for multipliers within that uncertainty, nor for a least-squares multiplier of an
inactive constraint (the LL is inexact there, not degenerate). The point is reported
`bj.status.DEGENERATE` when a touching inequality has lambda_i <= tol_lam (weakly active: strict
complementarity fails, F is not differentiable there), an active (or any given) multiplier has
the wrong sign (lambda_i < -tol_lam), or the gradients of the active constraints (and all of Q)
are linearly dependent (LICQ fails: the multipliers are not unique), whether the multipliers are
given or recovered by least squares (`bj.constraints.licq_status`). (Facchinei, Fischer, Kanzow,
"On the accurate identification of active constraints", SIAM J. Optim. 9(1), 1998, make the
active-set tolerance a function of the KKT residual in the same way.)

DEGENERATE is a loss of the implicit function theorem's assumptions at this point, not a failed
solve, and g is kept: the estimate with the active set as detected (weakly active constraints held
active: the gradient of the smooth piece of F on which they stay active, a one-sided derivative)
and the given / least-squares multipliers (under a LICQ failure the adjoint multipliers are not
unique; g is still exact when the dependent constraints do not depend on theta). The same
estimate, with the same status, comes from `bj.hypergradient`, `kkt_hypergradient` and the `KKT`
direction rules inside the loops, so a run can pass through such a point (iterates of an LL
solver are rarely exactly complementary) while the status records it; `bj.run(..., check=True)`
stops on it, and `nan_if_degenerate=True` makes g NaN instead. A failed solve is never kept: a
BREAKDOWN (e.g. an inconsistent singular KKT system) or a non-finite value makes g NaN (every leaf).

Multipliers: given, or recovered from phi by least squares on stationarity
(`bj.constraints.least_squares_multipliers`). `kkt_hypergradient_dense` is the dense reference:
it forms the full Jacobians of G (all constraints, in the form above) and solves directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax.constraints import least_squares_multipliers, licq_status
from bilevel_jax.hypergrad.info import HypergradInfo
from bilevel_jax.linear_solvers import LinearSolver, SolverInfo, fail_where, minres
from bilevel_jax.oracles import Multipliers
from bilevel_jax.problem import BilevelProblem, check_optimistic, check_problem

PyTree = Any


class KKTDirection(NamedTuple):
    g: PyTree
    state: Any          # the solver's state; its x is the adjoint (a, (b_P, b_Q))
    info: HypergradInfo
    grad_phi: PyTree    # grad_phi f_lower at the point (the system's, no further oracle call)


def _tmap(fn, *trees):
    return None if trees[0] is None else jax.tree_util.tree_map(fn, *trees)


def _max_abs(tree, dtype):
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.max(jnp.stack(leaves)).astype(dtype) if leaves else jnp.zeros((), dtype)


def active_set(cons: oracles.ConstraintLinearization, grad_lower, multipliers: Multipliers, tol, given: bool):
    """(mask of active inequalities as 1.0/0.0, DEGENERATE flag) at a point with `multipliers`, from
    the constraints' linearization there and `grad_lower` = grad_phi f_lower (module docstring,
    "Active set"):

        tol_P   = max(tol, 10 eps) * max(1, max_i |P_i|)
        tol_lam = max(tol, 100 eps) * max |lambda| + r
        r       = ||grad_phi f + grad_phi P_T' lambda_T + grad_phi Q' lambda_Q||

    eps the machine epsilon of P's dtype, T = {i : P_i >= -tol_P} the touching inequalities. tol_P
    is relative to the constraints' scale (P is computed to rounding accuracy). tol_lam is relative
    to the multipliers' scale (they come out of a linear solve: a few eps relative for well
    conditioned constraint gradients; 100 eps leaves a margin) and to r, the LL's stationarity
    residual with the touching constraints' multipliers only (what is left of grad f for the others
    to explain: an LL not yet solved to r leaves its multipliers uncertain by about r).

    `given`: the multipliers come from the solver that produced phi (an augmented Lagrangian's, or
    the user's): a constraint whose multiplier exceeds tol_lam is active even if P_i < -tol_P (the
    solver's primal point is the less accurate of the two). Otherwise (least-squares multipliers,
    which carry no information beyond phi) the active set is T."""
    p, lam = cons.values.inequality, multipliers.inequality
    if p is None:
        return None, st.ok()
    dtype = jax.tree_util.tree_leaves(p)[0].dtype
    tol, eps = jnp.asarray(tol, dtype), jnp.finfo(dtype).eps
    tol_p = jnp.maximum(tol, 10 * eps) * jnp.maximum(1.0, _max_abs(p, dtype))
    touching = _tmap(lambda c: c >= -tol_p, p)
    held = Multipliers(_tmap(lambda t, l: jnp.where(t, l, 0.0), touching, lam), multipliers.equality)
    residual = otu.tree_norm(otu.tree_add(grad_lower, cons.vjp(held)[1]))
    tol_lam = jnp.maximum(tol, 100 * eps) * _max_abs(tuple(multipliers), dtype) + residual.astype(dtype)
    active = _tmap(lambda t, l: t | (l > tol_lam), touching, lam) if given else touching
    wrong_sign = _tmap(lambda a, l: (a | given) & (l < -tol_lam), active, lam)
    bad = _tmap(lambda t, l, w: (t & (l <= tol_lam)) | w, touching, lam, wrong_sign)
    degenerate = jnp.any(jnp.stack([jnp.any(b) for b in jax.tree_util.tree_leaves(bad)]))
    mask = _tmap(lambda m, c: m.astype(c.dtype), active, p)
    return mask, st.flag(degenerate, st.DEGENERATE)


def adjoint_like(phi, values: Multipliers):
    """A zero adjoint (a, (b_P, b_Q)) shaped for the KKT system at phi (the solver state's shape)."""
    return (otu.tree_zeros_like(oracles.differentiable(phi)),
            tuple(None if v is None else otu.tree_zeros_like(v) for v in values))


class KKTOperator(NamedTuple):
    """The active-set KKT operator (module docstring) at a linearization of the Lagrangian, on
    z = (a, (b_P, b_Q)): `matvec(z)` = K z (one HVP), `cross(z)` = grad^2_{theta phi} L a +
    grad_theta P_A' b_P + grad_theta Q' b_Q, the hypergradient's correction (one cross product), and
    `self(z)` = (K z, cross(z)) from one pullback (one of each). Both come from the pullback of
    `lin` (`oracles.LagrangianLinearization`, which counts them) and the constraints' jvp; inactive
    components of b_P sit on identity rows."""

    lin: oracles.LagrangianLinearization
    mask: Any   # the active inequalities, 1.0 / 0.0 (None without inequalities)

    def _split(self, z):
        a, (bp, bq) = z
        return a, Multipliers(_tmap(lambda m, x: m * x, self.mask, bp), bq)

    def _rows(self, z, row_phi):
        a, (bp, _) = z
        jp, jq = self.lin.constraints.jvp_phi(a)
        return row_phi, (_tmap(lambda m, j, x: m * j + (1.0 - m) * x, self.mask, jp, bp), jq)

    def matvec(self, z):
        return self._rows(z, self.lin.pullback_phi(*self._split(z)))

    def cross(self, z):
        return self.lin.pullback_theta(*self._split(z))

    def __call__(self, z):
        cross, row_phi = self.lin.pullback(*self._split(z))
        return self._rows(z, row_phi), cross


def kkt_operator(lin: oracles.LagrangianLinearization, mask) -> KKTOperator:
    """The active-set KKT operator at `lin` with the inequality mask `mask` (`KKTOperator`)."""
    return KKTOperator(lin, mask)


def keep_or_fail(g, status, nan_if_degenerate: bool):
    """g NaN (every leaf) when `status` has BREAKDOWN / NONFINITE / INVALID_STEP, and with DEGENERATE
    only under `nan_if_degenerate` (the module docstring's rule, shared by every KKT path)."""
    fail = (status != st.OK) if nan_if_degenerate else ((status & ~st.DEGENERATE) != st.OK)
    return fail_where(fail, g)


class KKTSystem(NamedTuple):
    """The KKT system of the hypergradient at (theta, phi): K z = rhs, grad F = g_theta - cross(z).

    operator: a `KKTOperator` (K z, cross(z)); rhs: (grad_phi f_upper, (0, 0));
    g_theta: grad_theta f_upper; grad_lower: grad_phi f_lower (taken once, for the multipliers,
    the active set and the stationarity; a step's LL direction reuses it).
    multipliers: the lambda used; active: the inequality mask; status: DEGENERATE / NONFINITE of
    the point and the multipliers (not of a solve); stationarity: ||grad_phi L||.
    """

    g_theta: PyTree
    rhs: Any
    operator: KKTOperator
    multipliers: Multipliers
    active: PyTree
    status: jax.Array
    stationarity: jax.Array
    grad_lower: PyTree

    def matvec(self, z):
        return self.operator.matvec(z)


def kkt_system(problem: BilevelProblem, theta, phi, upper_batch, lower_batch, multipliers: Optional[Multipliers] = None,
               tol=1e-6, multiplier_solver: Optional[LinearSolver] = None) -> KKTSystem:
    """The KKT system at (theta, phi) (module docstring): multipliers given or by least squares, the
    active set, the degeneracy checks (weak activity, multiplier signs, LICQ of the active
    constraints) and the matrix-free operator. The full solve (`kkt_direction`) and the amortized
    rule (`bj.algorithms.amortized_kkt`) are both built on it. Oracles: one UL gradient and one LL
    gradient (the operator's products count as they are applied, `KKTOperator`)."""
    lower = oracles.linearize_lower(problem, theta, phi, lower_batch)
    grad_lower = lower.gradient()
    cons = oracles.linearize_constraints(problem, theta, phi)
    mult_status, given = st.ok(), multipliers is not None
    if not given:
        multipliers, minfo = least_squares_multipliers(problem, theta, phi, lower_batch, multiplier_solver,
                                                       check_licq=False, grad_phi=grad_lower)
        mult_status = minfo.status
    multipliers = Multipliers(*multipliers)
    g_theta, b = oracles.upper_grads(problem, theta, phi, upper_batch)
    lin = oracles.linearize_lagrangian(problem, theta, phi, multipliers, lower_batch, lower, cons)
    mask, deg = active_set(cons, grad_lower, multipliers, tol, given)
    licq = licq_status(cons, mask, multiplier_solver)
    rhs = (b, tuple(None if v is None else otu.tree_zeros_like(v) for v in cons.values))
    status = st.merge(mult_status, deg, licq, st.nonfinite(multipliers))
    stationarity = otu.tree_norm(otu.tree_add(grad_lower, cons.vjp(multipliers)[1]))
    return KKTSystem(g_theta, rhs, kkt_operator(lin, mask), multipliers, mask, status, stationarity, grad_lower)


def kkt_direction(problem: BilevelProblem, theta, phi, upper_batch, lower_batch, solver: LinearSolver, solver_state,
                  multipliers: Optional[Multipliers] = None, tol=1e-6, multiplier_solver: Optional[LinearSolver] = None,
                  nan_if_degenerate: bool = False) -> KKTDirection:
    """The KKT hypergradient at (theta, phi) with the adjoint solved by `solver` from `solver_state`
    (module docstring; g kept and flagged at a DEGENERATE point unless `nan_if_degenerate`).
    Without `multipliers` they are recovered by least squares. Oracles: `kkt_system`'s, the solver's
    matvecs (`oracles.solve`: `info.num_matvecs` HVPs) and one cross product."""
    system = kkt_system(problem, theta, phi, upper_batch, lower_batch, multipliers, tol, multiplier_solver)
    z, state, sinfo = oracles.solve(solver, system.matvec, system.rhs, solver_state)
    g = otu.tree_sub(system.g_theta, system.operator.cross(z))
    status = st.merge(sinfo.status, system.status, st.nonfinite(g))
    g = keep_or_fail(g, status, nan_if_degenerate)
    a, (bp, bq) = z
    info = HypergradInfo(a, sinfo.residual_norm, status, sinfo, Multipliers(bp, bq), system.multipliers, system.active,
                   system.stationarity)
    return KKTDirection(g, state, info, system.grad_lower)


def kkt_hypergradient(problem: BilevelProblem, theta, phi, data, solver: Optional[LinearSolver] = None, *,
                      multipliers: Optional[Multipliers] = None, x0=None, tol=1e-6,
                      multiplier_solver: Optional[LinearSolver] = None, nan_if_degenerate: bool = False):
    """The KKT implicit hypergradient at (theta, phi) of a constrained problem (module docstring).

    Args:
      problem: a `BilevelProblem` with `lower_inequality` and/or `lower_equality`.
      theta, phi: phi should be a KKT point of the LL at theta (the estimate is exact there).
      data: `(upper_batch, lower_batch)`.
      solver: the adjoint solver, for a symmetric indefinite system (default `minres(100)`).
      multipliers: `bj.constraints.Multipliers(lambda_P, lambda_Q)`; None: least squares from phi.
        Either way they are checked (signs, complementarity, LICQ of the active constraints).
      x0: warm start of the adjoint, `(a, (b_P, b_Q))`.
      tol: the relative active-set tolerance (`active_set`; floored at 10 eps for P, 100 eps for lambda).
      multiplier_solver: CG for the least-squares multipliers and the LICQ check (default `cg(100)`).
      nan_if_degenerate: False (default): at a DEGENERATE point g is the one-sided estimate with
        the weakly active constraints held active, flagged in the status (as in the loops' `KKT`
        rules); True: g is NaN there.

    Returns:
      `(g, HypergradInfo)` with its constrained-LL fields set. g is NaN (every leaf) when the status has BREAKDOWN or NONFINITE (a failed
      adjoint solve, a non-finite value), and with DEGENERATE only under `nan_if_degenerate`.
    """
    check_optimistic(check_problem(problem), "kkt_hypergradient")
    if not problem.constrained:
        raise ValueError("kkt_hypergradient: the problem has no lower_inequality / lower_equality; "
                         "use bj.hypergradient.")
    solver = minres(100) if solver is None else solver
    if not isinstance(solver, LinearSolver) or solver.stochastic:
        raise TypeError(f"solver must be a deterministic bj.linear_solvers solver (e.g. minres(100)), got {solver!r}.")
    problem.validate(theta, phi, data)
    if x0 is not None:
        solver = dataclasses.replace(solver, warm_start=True)
    like = adjoint_like(phi, oracles.constraint_values(problem, theta, phi))
    out = kkt_direction(problem, theta, phi, data[0], data[1], solver, solver.init(like, x0), multipliers, tol,
                        multiplier_solver, nan_if_degenerate)
    return out.g, out.info


def kkt_hypergradient_dense(problem: BilevelProblem, theta, phi, data, multipliers: Optional[Multipliers] = None):
    """Dense reference: grad F = grad_theta f_upper - G_theta' G_z^{-T} (grad_phi f_upper, 0, 0) with
    the full Jacobians of G = (grad_phi L, lambda_P * P, Q) (all constraints, inactive ones
    included) formed by `oracles.kkt_jacobians_dense` and an LU solve. Small problems only."""
    from jax.flatten_util import ravel_pytree

    if multipliers is None:
        multipliers, _ = least_squares_multipliers(problem, theta, phi, data[1])
    multipliers = Multipliers(*multipliers)
    g_z, g_t, unravel_z, unravel_t = oracles.kkt_jacobians_dense(problem, theta, phi, multipliers, data[1])
    g_theta, b = oracles.upper_grads(problem, theta, phi, data[0])
    rhs, _ = ravel_pytree((b, tuple(None if m is None else otu.tree_zeros_like(m) for m in multipliers)))
    w = jnp.linalg.solve(g_z.T, rhs)
    return otu.tree_sub(g_theta, unravel_t(g_t.T @ w))


def kkt_argmin(problem: BilevelProblem, solve_fn, solver: Optional[LinearSolver] = None, tol=1e-6):
    """`solve(theta, phi0, batch) -> phi*(theta, batch)` for a constrained LL, differentiable by the
    KKT implicit function theorem in both autodiff modes.

    `solve_fn(theta, phi0, batch) -> (phi, Multipliers or None[, info])` is the primal solver
    (e.g. `bj.constraints.augmented_lagrangian`, whose multipliers then decide the active set with
    phi: a constraint it holds with a multiplier above tol_lam is active even where its phi is
    still slightly inside, module docstring; or projected steps returning None: the multipliers
    are then recovered by least squares); autodiff never goes through it. The tangent
    solves K (phi_dot, lambda_dot_A) = -(d_theta G) theta_dot - (d_batch G) batch_dot on the active
    set with `solver` (default `minres(100)`), as a `lax.custom_linear_solve` (K is symmetric, so
    reverse mode is its transpose). theta and batch are pytrees of arrays, phi0 an array pytree.
    A derivative has no status: at a DEGENERATE point (module docstring) it is the one-sided one
    with the weakly active constraints held active (check the point with `kkt_hypergradient`); a
    breakdown of the tangent solve makes it NaN.
    """
    check_optimistic(check_problem(problem), "kkt_argmin")
    solver = minres(100) if solver is None else solver

    def inverse(matvec, b):
        return solver.solve(matvec, b, solver.init(b))[0]

    def solve(theta, phi0, batch):
        @jax.custom_jvp
        def phi_star(t, p0, bt):
            return _primal(t, p0, bt)[0]

        def _primal(t, p0, bt):
            phi, mult = solve_fn(t, p0, bt)[:2]   # (phi, multipliers or None[, info])
            given = mult is not None
            if not given:
                mult, _ = least_squares_multipliers(problem, t, phi, bt)
            return oracles.differentiable(phi), Multipliers(*mult), given

        @phi_star.defjvp
        def phi_star_jvp(primals, tangents):
            t, p0, bt = primals
            t_dot, _, b_dot = tangents
            phi, mult, given = _primal(t, p0, bt)
            mult = jax.lax.stop_gradient(mult)
            cons = oracles.linearize_constraints(problem, t, phi)
            lower = oracles.linearize_lower(problem, t, phi, bt)
            lin = oracles.linearize_lagrangian(problem, t, phi, mult, bt, lower, cons)
            mask, _ = active_set(cons, lower.gradient(), mult, tol, given)
            operator = kkt_operator(lin, mask)

            def g_active(t_, bt_):  # (grad_phi L, m * P, Q) at fixed phi and lambda
                gl = oracles.kkt_map(problem, t_, phi, mult, bt_)[0]
                p, q = oracles.constraint_values(problem, t_, phi)
                return gl, (_tmap(lambda m, c: m * c, mask, p), q)

            _, rhs = jax.jvp(g_active, (t, bt), (t_dot, b_dot))
            # rows with no theta/batch dependence (a theta-independent box) have constant zero tangents;
            # custom_linear_solve's transpose needs every rhs leaf linear in the input tangents
            anchor = 0.0 * sum(jnp.sum(x) for x in jax.tree_util.tree_leaves((t_dot, b_dot)))
            rhs = jax.tree_util.tree_map(lambda x: -x + anchor, rhs)
            z = jax.lax.custom_linear_solve(operator.matvec, rhs, inverse, symmetric=True)
            return phi, z[0]

        return phi_star(theta, phi0, batch)

    return solve


__all__ = ["KKTDirection", "KKTOperator", "KKTSystem", "active_set", "adjoint_like", "kkt_argmin", "kkt_direction",
           "kkt_hypergradient", "kkt_hypergradient_dense", "kkt_operator", "kkt_system", "keep_or_fail"]

"""Value-function reformulations: first-order methods that stay valid when the lower level (LL) has
many minima (convex or PL, not strongly convex), where the implicit gradient does not exist.

The optimistic bilevel problem is the single-level constrained problem (with v(theta) the LL's
optimal value function)

    min_{theta, phi} f_upper(theta, phi)   s.t.   q(theta, phi) = f_lower(theta, phi) - v(theta) <= 0,
    v(theta) = min_z f_lower(theta, z)

optionally with the smooth upper bound of v (Sow, Ji, Guan, Liang 2022, arXiv:2203.01123)

    v_a(theta) = min_z f_lower(theta, z) + (a1 / 2) ||z||^2 + a2,      a1, a2 >= 0.

v is never formed: a tracker z follows argmin_z of the (smoothed) LL by T gradient steps (warm-started
across outer steps, or restarted at phi), and by Danskin's theorem

    v(theta) ~ f_lower(theta, z) + (a1/2) ||z||^2 + a2,     grad v(theta) ~ grad_theta f_lower(theta, z),
    grad q = (grad_theta f_lower(theta, phi) - grad_theta f_lower(theta, z),  grad_phi f_lower(theta, phi)).

Every method here moves (theta, phi) along the first-order direction of a Lagrangian / penalty,

    d = grad f_upper + lambda grad q            (or (grad f_upper + lambda grad q) / s, `scale_upper`:
                                                  s = lambda for V-PBGD, rho for smoothing_pg)
    (theta, phi) <- (P_Theta(theta - alpha d_theta), phi - beta d_phi),

and they differ only in the multiplier lambda (a `Multiplier`):

- `PenaltySchedule`: lambda_k from a ramp (F2SA, V-PBGD, the penalty form of the seeds' eq. (28)),
  with `hinge` the exact-penalty form rho max{0, q} (weight rho 1[q > 0]);
- `Barrier`: BOME's dynamic barrier lambda = max(0, (eta ||grad q||^2 - <grad f, grad q>) / ||grad q||^2)
  (Liu, Ye, Wright, Stone, Liu, "BOME! Bilevel Optimization Made Easy: A Simple First-Order
  Approach", NeurIPS 2022, arXiv:2209.08709), which makes q decrease at rate eta ||grad q||^2;
- `DualAscent`: the primal-dual form (29), max_{lambda >= 0} min_{theta, phi} f + lambda q, with
  lambda <- P_[0, cap](lambda + gamma q) after the primal step (PDBO, Sow et al. 2022);
- `SmoothingControl`: the smoothing projected gradient method's (mu, rho): v smoothed by a1 = mu,
  a smoothed exact penalty rho max{0, q}, mu shrunk and rho grown once a step moves less than
  eta mu (`smoothing_pg`; Lin, Xu, Ye 2014).

`phi_steps` > 0 gives F2SA's order (Kwon, Kwon, Wright, Nowak, "A Fully First-Order Method for
Stochastic Bilevel Optimization", ICML 2023, arXiv:2301.10945): T steps of phi on
grad_phi f_upper + lambda grad_phi f_lower at fixed theta (interleaved with the tracker's), then
the theta step; `phi_steps` = 0 is the joint step of BOME, V-PBGD and PDBO.

Constrained lower levels (`lower_set=`, or a problem built by `bj.constraints.<set>.problem`):
with Phi a closed convex set with a Euclidean projection P_Phi,

    v(theta) = min_{z in Phi} f_lower(theta, z),   q(theta, phi) = f_lower(theta, phi) - v(theta),  phi in Phi,

and every LL-side step is projected: the tracker z <- P_Phi(z - gamma grad_z f_lower) (projected
gradient steps converge to argmin_Phi for a convex LL), phi <- P_Phi(phi - beta d_phi) (the
projected step of the single-level problem min_{theta, phi in Phi} f + lambda q) and F2SA's inner
phi steps. Danskin's theorem is unchanged (z minimises over Phi, theta-independent). The optimistic
solution is reached as without constraints: a flat LL coordinate left to the UL is set by the UL
within Phi (the tests' box with a flat coordinate, closed form).

Oracles per outer step: T tracker LL gradients (+ `phi_steps` LL and UL gradients), then one UL
gradient at (theta, phi) and two LL gradient passes, at (theta, phi) and (theta, z), which return
the two LL values (counted, `values`) when the multiplier uses q (else the state's `gap`
diagnostic is None). No Hessian-vector product.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, NamedTuple, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles, sampling
from bilevel_jax._checks import as_array, check_in_range, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import loop_options, named, rule
from bilevel_jax.algorithms.base import Header, State
from bilevel_jax.algorithms.constrained import lower_projection, project_rule
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import Composed, StepRule, apply_step, float_dtype, init_rule, lower_phase
from bilevel_jax.lower import lower_steps as run_lower_steps
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


# ----------------------------------------------------------------------------------- penalty ramps

class PenaltyRamp(eqx.Module):
    """k -> min(start + rate k^power, cap): a penalty weight that grows (array fields, sweepable)."""

    start: jax.Array
    rate: jax.Array
    power: jax.Array
    cap: jax.Array

    def __call__(self, count):
        k = jnp.asarray(count, jnp.result_type(float))
        return jnp.minimum(self.start + self.rate * k ** self.power, self.cap)


def penalty_ramp(start, rate=0.0, power=1.0, cap=jnp.inf) -> PenaltyRamp:
    """lambda_k = min(start + rate k^power, cap); `rate=0` is a constant penalty."""
    check_step_size("penalty", start)
    check_in_range("penalty_rate", rate, 0.0, float("inf"))
    check_in_range("penalty_power", power, 0.0, float("inf"))
    check_step_size("penalty_max", cap) if jnp.isfinite(cap) else None
    return PenaltyRamp(as_array(start), as_array(rate), as_array(power), jnp.asarray(cap, jnp.result_type(float)))


# ----------------------------------------------------------------------------------- multipliers

class Gap(NamedTuple):
    """The constraint at (theta, phi): q (None when the multiplier does not use it), grad q (theta- and
    phi-parts), grad f_upper."""
    q: jax.Array
    grad_q: Tuple[PyTree, PyTree]
    grad_f: Tuple[PyTree, PyTree]


class Multiplier(eqx.Module):
    """How lambda is chosen: `value(state, gap, count)`, then `advance(state, gap, count, moved)`."""

    needs_value: bool = eqx.field(static=True, default=False)
    needs_movement: ClassVar[bool] = False   # whether `advance` reads `moved` (else it is not computed)

    def init(self):
        return None

    @abc.abstractmethod
    def value(self, state, gap: Gap, count) -> jax.Array:
        """lambda_k at this point."""

    def advance(self, state, gap: Gap, count, moved):
        """The state after the step; `moved` = ||(theta, phi)_{k+1} - (theta, phi)_k|| (None unless
        `needs_movement`)."""
        return state

    def smoothing(self, state, fixed):
        """(a1, a2) of v_a at this step: the preset's `fixed` pair, or one the multiplier controls."""
        return fixed

    def scale(self, state, lam):
        """s of the scaled direction (grad f + lambda grad q) / s (`scale_upper`): lambda itself."""
        return lam


class PenaltySchedule(Multiplier):
    """lambda_k = ramp(k); with `hinge`, the exact-penalty weight rho 1[q > 0] of eq. (28)."""

    ramp: PenaltyRamp = None
    hinge: bool = eqx.field(static=True, default=False)

    def value(self, state, gap, count):
        lam = self.ramp(count)
        return jnp.where(gap.q > 0, lam, 0.0) if self.hinge else lam


class Barrier(Multiplier):
    """BOME's lambda = max(0, (phi_k - <grad f, grad q>) / ||grad q||^2), phi_k = eta ||grad q||^2
    (`control="gradient"`, the default of the public benchmark) or eta q (`control="value"`, the
    authors' hyper-cleaning code); 0 where grad q = 0."""

    eta: jax.Array = None
    control: str = eqx.field(static=True, default="gradient")

    def value(self, state, gap, count):
        sq = otu.tree_norm(gap.grad_q, squared=True)
        target = self.eta * (sq if self.control == "gradient" else gap.q)
        inner = otu.tree_vdot(gap.grad_f, gap.grad_q)
        safe = jnp.where(sq > 0, sq, 1.0)
        return jnp.where(sq > 0, jnp.maximum(0.0, (target - inner) / safe), 0.0)


class DualAscent(Multiplier):
    """lambda_{k+1} = P_[0, cap](lambda_k + lr (q_k - reg lambda_k)), from lambda_0 = start
    (`reg` > 0 is a regularised dual, 0 the plain projected ascent)."""

    lr: jax.Array = None
    start: jax.Array = None
    cap: jax.Array = None
    reg: jax.Array = None

    def init(self):
        return jnp.asarray(self.start, jnp.result_type(float))

    def value(self, state, gap, count):
        return state

    def advance(self, state, gap, count, moved):
        return jnp.clip(state + self.lr * (gap.q - self.reg * state), 0.0, self.cap)


class SmoothingControl(Multiplier):
    """The smoothing projected gradient method's parameters (`smoothing_pg`): state (mu, rho); v is
    smoothed by a1 = mu (a2 = 0), lambda = rho 1[q > 0] (`hinge`) or rho; after a step that moved
    less than eta mu (the smoothed problem is resolved at this mu), mu <- shrink mu and, where the
    smoothed constraint is still violated (q > 0), rho <- min(grow rho, rho_max)."""

    needs_movement: ClassVar[bool] = True
    mu: jax.Array = None
    rho: jax.Array = None
    shrink: jax.Array = None
    grow: jax.Array = None
    rho_max: jax.Array = None
    eta: jax.Array = None
    hinge: bool = eqx.field(static=True, default=True)

    def init(self):
        dtype = jnp.result_type(float)
        return jnp.asarray(self.mu, dtype), jnp.asarray(self.rho, dtype)

    def value(self, state, gap, count):
        mu, rho = state
        if not self.hinge:
            return rho
        # rho d/dq of the smoothed max{0, q}: (q + sqrt(q^2 + 4 mu^2)) / 2 (Chen-Harker-Kanzow-Smale)
        root = jnp.sqrt(gap.q ** 2 + 4.0 * mu ** 2)   # 0 only at q = 0 once mu underflows: weight 1/2 there
        return rho * 0.5 * (1.0 + gap.q / jnp.where(root > 0, root, 1.0))

    def advance(self, state, gap, count, moved):
        mu, rho = state
        resolved = moved <= self.eta * mu
        return (jnp.where(resolved, self.shrink * mu, mu),
                jnp.where(resolved & (gap.q > 0), jnp.minimum(self.grow * rho, self.rho_max), rho))

    def smoothing(self, state, fixed):
        return state[0], jnp.zeros_like(state[0])

    def scale(self, state, lam):
        return state[1]   # rho: (grad f + rho 1[q > 0] grad q) / rho


# ----------------------------------------------------------------------------------- the algorithm

class ValueFunctionState(State):
    header: Header
    z: PyTree            # the tracker of argmin_z f_lower(theta, z) (+ a1/2 ||z||^2)
    tracker_opt_state: Any
    multiplier: Any      # DualAscent's lambda (None otherwise)
    penalty: Any         # the last lambda used (a diagnostic)
    gap: Any             # the last q(theta, phi) (a diagnostic; None when the multiplier does not use q)


def _smoothed(problem: BilevelProblem, a1) -> BilevelProblem:
    """The tracker's objective f_lower + (a1/2) ||z||^2 (eq. (26)); the problem itself for a1 = 0."""
    def f_lower(theta, z, batch):
        return problem.f_lower(theta, z, batch) + 0.5 * a1 * otu.tree_norm(oracles.differentiable(z), squared=True)
    return BilevelProblem(problem.f_upper, f_lower, problem.project_upper)


class ValueFunction(Composed):
    """See the module docstring; build with a preset (bome, pdbo, vf_penalty, f2sa, pbgd)."""

    tracker: StepRule
    multiplier: Multiplier
    smoothing: Tuple[jax.Array, jax.Array]     # (a1, a2) of eq. (26)
    tracker_steps: int = eqx.field(static=True, default=10)
    restart_tracker: bool = eqx.field(static=True, default=False)   # z starts at phi every step (BOME)
    phi_steps: int = eqx.field(static=True, default=0)              # F2SA's inner phi steps
    scale_upper: bool = eqx.field(static=True, default=False)       # d = (grad f + lambda grad q) / s (V-PBGD)
    smooth: bool = eqx.field(static=True, default=False)
    name: str = eqx.field(static=True, default="value_function", kw_only=True)
    # a constrained LL is handled by projected phi / tracker step rules (`value_function` builds them,
    # and refuses a constrained problem it has no projection for)
    handles_constraints: ClassVar[bool] = True

    def init(self, theta0, phi0, key, data=None) -> ValueFunctionState:
        head = self.start(theta0, phi0, key, data)
        zero = jnp.zeros((), float_dtype((head.theta, phi0)))
        return ValueFunctionState(head, phi0, init_rule(self.tracker, phi0), self.multiplier.init(), zero,
                                  zero if self.multiplier.needs_value else None)

    def _tracked(self, a):
        return _smoothed(self.problem, a[0]) if self.smooth else self.problem

    def _gap(self, theta, phi, z, batches, a) -> Tuple[Gap, Any]:
        """The gap at (theta, phi) and the tracker z; q itself (two LL values) only when the multiplier
        uses it, None otherwise (the gradients come without the values)."""
        p = self.problem
        g_theta, g_phi = oracles.upper_grads(p, theta, phi, batches.upper)
        if not self.multiplier.needs_value:
            (gx_y, gy_y), (gx_z, _) = (oracles.lower_grads(p, theta, x, batches.lower) for x in (phi, z))
            return Gap(None, (otu.tree_sub(gx_y, gx_z), gy_y), (g_theta, g_phi))
        value_y, (gx_y, gy_y) = oracles.lower_value_and_grads(p, theta, phi, batches.lower)
        value_z, (gx_z, _) = oracles.lower_value_and_grads(p, theta, z, batches.lower)
        if self.smooth:
            a1, a2 = a
            value_z = value_z + 0.5 * a1 * otu.tree_norm(oracles.differentiable(z), squared=True) + a2
        return Gap(value_y - value_z, (otu.tree_sub(gx_y, gx_z), gy_y), (g_theta, g_phi))

    def _phi_steps(self, theta, phi, opt_state, lam, batches):
        """F2SA's inner loop on phi: phi <- phi - beta (grad_phi f_upper + lambda grad_phi f_lower)."""
        upper = sampling.read(batches.upper)   # a batch the objective can take (not a Rows)
        penalised = oracles.PenalisedLower(self.problem.f_upper,
                                   lambda t, y, b: self.problem.f_upper(t, y, upper) + lam * self.problem.f_lower(t, y, b))
        return run_lower_steps(penalised, self.lower.build(theta), theta, phi, opt_state, self.phi_steps, batches.lower_at)

    def update(self, state: ValueFunctionState, data):
        k = state.count
        dtype = float_dtype((state.theta, state.phi))   # the run's precision (lambda must not promote it)
        batches = self.batches(state, data, self.tracker_steps)
        a = self.multiplier.smoothing(state.multiplier, self.smoothing)
        # 1. the tracker z ~ argmin f_lower(theta_k, .) (+ a1/2 ||.||^2), T steps
        z0 = state.phi if self.restart_tracker else state.z
        z_opt = init_rule(self.tracker, z0) if self.restart_tracker else state.tracker_opt_state
        with oracles.counting() as tally:
            z, z_opt, z_status = lower_phase(self._tracked(a), self.tracker, state.theta, z0, z_opt,
                                             self.tracker_steps, batches.lower_at, k)
            phi, lower_state, statuses = state.phi, state.lower_opt_state, [z_status]
            # 2. (F2SA) T steps of phi on the penalised objective at fixed theta, lambda_k from the schedule
            if self.phi_steps:
                phi, lower_state = self._phi_steps(state.theta, phi, lower_state,
                                                   jnp.asarray(self.multiplier.ramp(k), dtype), batches)
                statuses.append(self.lower.status(k))
            # 3. the gap, the multiplier and the direction at (theta_k, phi, z)
            gap = self._gap(state.theta, phi, z, batches, a)
        lam = jnp.asarray(self.multiplier.value(state.multiplier, gap, k), dtype)
        d = otu.tree_add_scale(gap.grad_f, lam, gap.grad_q)
        if self.scale_upper:
            d = otu.tree_scale(1.0 / jnp.asarray(self.multiplier.scale(state.multiplier, lam), dtype), d)
        # 4. steps: theta (projected), phi (joint step unless F2SA moved it already), the dual variable
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, d[0], k,
                                                   self.problem.project)
        statuses.append(up_status)
        if not self.phi_steps:
            phi, lower_state, low_status = apply_step(self.lower, phi, lower_state, d[1], k, theta=theta)
            statuses.append(low_status)
        moved = None
        if self.multiplier.needs_movement:
            new_point, old_point = oracles.differentiable((theta, phi)), oracles.differentiable((state.theta, state.phi))
            moved = otu.tree_norm(otu.tree_sub(new_point, old_point))
        multiplier = self.multiplier.advance(state.multiplier, gap, k, moved)
        (theta, phi, z), info = self.finish((theta, phi, z), tally.counts, jnp.nan, statuses)
        q = None if gap.q is None else jnp.asarray(gap.q, dtype)
        return ValueFunctionState(state.header.next(theta, phi, upper_state, lower_state), z, z_opt, multiplier, lam,
                                  q), info


def _rule(name, lr, opt) -> StepRule:
    """A `StepRule` given as is (a preset's schedule), else built from `lr` / the optax rule `opt`."""
    return opt if isinstance(opt, StepRule) else rule(name, lr, opt)


def value_function(problem: BilevelProblem, *, multiplier: Multiplier, upper_lr=0.1, lower_lr=0.1, tracker_lr=None,
                   upper_opt=None, lower_opt=None, tracker_opt=None, tracker_steps: int = 10,
                   restart_tracker: bool = False, phi_steps: int = 0, scale_upper: bool = False,
                   smoothing=None, lower_set=None, batch_size: BatchSize = None, sampler: str = "iid",
                   check: bool = False, name: str = "value_function") -> ValueFunction:
    """Compose a value-function method (module docstring): step rules of theta (`upper_lr`), phi
    (`lower_lr`) and the tracker z (`tracker_lr`, default `lower_lr`), floats, arrays, schedules or
    optax rules; `tracker_steps` T; `smoothing=(a1, a2)` for v_a of eq. (26) (None: the plain v).
    `lower_set`: the LL's feasible set Phi (a `bj.constraints` set or a projection phi -> P_Phi(phi));
    phi and tracker steps are projected onto it. None: on a constrained problem the set it was built
    from (an error if there is none), else Phi = everything."""
    with named(name):
        check_problem(problem)
        if not isinstance(multiplier, Multiplier):
            raise TypeError(f"multiplier must be a value_function.Multiplier, got {multiplier!r}.")
        check_positive_int("tracker_steps", tracker_steps, minimum=1)
        check_positive_int("phi_steps", phi_steps, minimum=0)
        if phi_steps and not isinstance(multiplier, PenaltySchedule):
            raise ValueError("phi_steps > 0 (F2SA's inner loop) needs a penalty schedule multiplier.")
        upper = _rule("upper_lr", upper_lr, upper_opt)
        lower = _rule("lower_lr", lower_lr, lower_opt)
        tracker = lower if (tracker_lr is None and tracker_opt is None) else _rule(
            "tracker_lr", lower_lr if tracker_lr is None else tracker_lr, tracker_opt)
        if lower_set is not None or problem.constrained:
            project = lower_projection(problem, lower_set)
            lower, tracker = project_rule(lower, project), project_rule(tracker, project)
        if smoothing is None:
            a = (as_array(0.0), as_array(0.0))
        else:
            if not (isinstance(smoothing, (tuple, list)) and len(smoothing) == 2):
                raise ValueError(f"smoothing must be a pair (a1, a2) of non-negative numbers, got {smoothing!r}.")
            for n, val in zip(("smoothing[0] (a1)", "smoothing[1] (a2)"), smoothing):
                check_in_range(n, val, 0.0, float("inf"))
            a = (as_array(smoothing[0]), as_array(smoothing[1]))
        return ValueFunction(problem, upper, lower, make_samplers(batch_size, sampler), tracker, multiplier, a,
                             tracker_steps, restart_tracker, phi_steps, scale_upper, smoothing is not None, check=check,
                             name=name)


# ----------------------------------------------------------------------------------- presets

def bome(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=None, tracker_lr=0.1, upper_opt=None, lower_opt=None,
         tracker_opt=None, tracker_steps: int = 10, control_rate=0.5, control: str = "gradient",
         lower_set=None, batch_size: BatchSize = None, **kw) -> ValueFunction:
    """BOME (Liu, Ye, Wright, Stone, Liu, "BOME! Bilevel Optimization Made Easy: A Simple First-Order
    Approach", NeurIPS 2022, arXiv:2209.08709):

        y_hat = T = `tracker_steps` gradient steps on f_lower(x_k, .) from y_k (step `tracker_lr`), held fixed,
        q(x, y) = f_lower(x, y) - f_lower(x, y_hat),
        lambda_k = max(0, (phi_k - <grad f_upper, grad q>) / ||grad q||^2),
        (x, y) <- (x, y) - xi (grad f_upper + lambda_k grad q)          (one step xi on both)

    with phi_k = eta ||grad q||^2, eta = `control_rate` (`control="gradient"`, eta = 0.5: the public
    benchmark's default)
    or eta q (`control="value"`, the authors' code, eta in {0.1, 0.5, 0.9}). Defaults: T = 10
    (the authors' hyper-cleaning setting), xi = `upper_lr` for x and `lower_lr` (default the same)
    for y. Valid for LLs with many minima (PL). Oracles: T + 2 LL gradients, 1 UL gradient,
    2 LL values when `control="value"`. Its limit points are KKT points of min f s.t. q <= 0, where
    grad q -> 0 (no LICQ): with a constant step the iterates settle in an O(step) neighbourhood,
    plus the truncation of the T-step y_hat (strongly convex quadratic of the tests, T = 40:
    5e-2 relative from theta* at step 0.1, 7e-3 at 0.01; 1.5e-3 at 0.003 with T = 100).

    Minibatches (the paper's analysis is deterministic): lambda = eta - <grad f, grad q> / ||grad q||^2
    projects grad f off grad q only while grad q is accurate. Near the LL solution the minibatch
    noise dominates ||grad q||^2, the projection term shrinks and lambda -> eta: BOME becomes the
    fixed penalty f + eta q, whose minimiser is O(1/eta) from the bilevel solution. On the stochastic
    quadratic of `make fig-hessian-free` (batch 64) the mean lambda is 95 full batch but 0.31, 1.8
    and 6.5 at eta = 0.02, 0.5, 5, and ||phi - phi*(theta)||^2 settles near 53, 4 and 0.5 (about
    2 / eta): with eta = 0.02, ||grad F||^2 rises from 1.5 to 15 over 2000 steps while full batch it
    decreases. Not a defect of the update: with minibatches take eta of order the penalty a
    penalty method would need (5 to 10 there), or larger batches for q. Sampling: full batch (the
    paper's deterministic analysis); `batch_size=b` draws i.i.d. minibatches. `lower_set=`: a
    constrained LL (projected y and y_hat steps, module docstring)."""
    with named("bome"):
        if control not in ("gradient", "value"):
            raise ValueError(f"control must be 'gradient' or 'value', got {control!r}.")
        check_step_size("control_rate", control_rate)
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        return value_function(problem, multiplier=Barrier(control == "value", as_array(control_rate), control),
                              upper_lr=upper_lr, lower_lr=lower_lr, tracker_lr=tracker_lr, upper_opt=upper_opt,
                              lower_opt=lower_opt, tracker_opt=tracker_opt, tracker_steps=tracker_steps,
                              restart_tracker=True, lower_set=lower_set, batch_size=batch_size, name="bome",
                              **loop_options(kw))


def pdbo(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, tracker_lr=None, dual_lr=1.0, dual_start=0.0,
         dual_max=1e3, dual_reg=0.0, upper_opt=None, lower_opt=None, tracker_opt=None, tracker_steps: int = 10,
         smoothing=None, lower_set=None, batch_size: BatchSize = None, **kw) -> ValueFunction:
    """PDBO (Sow, Ji, Guan, Liang, "A Primal-Dual Approach to Bilevel Optimization with Multiple
    Inner Minima", 2022, arXiv:2203.01123), the primal-dual form (29) of the value-function problem:

        z_k = N = `tracker_steps` (warm-started) gradient steps (`tracker_lr`) on f_lower(x_k, .) [+ (a1/2) ||.||^2]
        q_k = f_lower(x_k, y_k) - f_lower(x_k, z_k) [- (a1/2) ||z_k||^2 - a2]
        (x, y) <- (P_X(x - eta_x (grad_x f + lambda_k (grad_x f_lower(x, y) - grad_x f_lower(x, z)))),
                   y - eta_y (grad_y f + lambda_k grad_y f_lower(x, y)))
        lambda_{k+1} = P_[0, Lambda](lambda_k + gamma (q_k - reg lambda_k))

    `smoothing=(a1, a2)` uses the smooth, strictly feasible bound v_a of eq. (26) (None: the plain
    value function, for which q >= 0 and lambda climbs to Lambda = `dual_max`). Settings
    [verify: no public code]: N = 10, gamma = `dual_lr` = 1, Lambda = 1e3, reg = 0. Oracles: N + 2
    LL gradients, 1 UL gradient, 2 LL values. Sampling: full batch (the paper's deterministic
    analysis); `batch_size=b` draws i.i.d. minibatches. `lower_set=`: a constrained LL
    (projected y and z steps, module docstring; the paper's Phi)."""
    with named("pdbo"):
        check_step_size("dual_lr", dual_lr)
        check_in_range("dual_start", dual_start, 0.0, float("inf"))
        check_step_size("dual_max", dual_max)
        check_in_range("dual_reg", dual_reg, 0.0, float("inf"))
        mult = DualAscent(True, as_array(dual_lr), as_array(dual_start), as_array(dual_max), as_array(dual_reg))
        return value_function(problem, multiplier=mult, upper_lr=upper_lr, lower_lr=lower_lr, tracker_lr=tracker_lr,
                              upper_opt=upper_opt, lower_opt=lower_opt, tracker_opt=tracker_opt,
                              tracker_steps=tracker_steps, smoothing=smoothing, lower_set=lower_set,
                              batch_size=batch_size, name="pdbo", **loop_options(kw))


def vf_penalty(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, tracker_lr=None, penalty=10.0,
               penalty_rate=0.0, penalty_max=float("inf"), upper_opt=None, lower_opt=None, tracker_opt=None,
               tracker_steps: int = 10, smoothing=(0.0, 0.0), hinge: bool = True, lower_set=None,
               batch_size: BatchSize = None, **kw) -> ValueFunction:
    """The penalty form (28) of the value-function problem (25)-(27) (Sow et al. 2022,
    arXiv:2203.01123; the single-level value-function reformulation):

        min_{theta, phi} f_upper + rho max{0, f_lower(theta, phi) - v_a(theta)},

    a joint (sub)gradient step on (theta, phi) with the weight rho 1[q > 0] (`hinge`; False: the
    smooth penalty rho q), v_a tracked by N = `tracker_steps` warm-started gradient steps
    (`tracker_lr`), rho_k = min(`penalty` + `penalty_rate` k, `penalty_max`). With a1 = a2 = 0 (default) q >= 0 and the hinge is rho q; the
    minimiser is within O(1/rho) of the optimistic solution. Oracles: N + 2 LL gradients, 1 UL
    gradient, 2 LL values. Sampling: full batch (a deterministic reformulation); `batch_size=b`
    draws i.i.d. minibatches. `lower_set=`: a constrained LL (projected y and z steps, module
    docstring; eq. (25)'s Phi)."""
    with named("vf_penalty"):
        mult = PenaltySchedule(hinge, penalty_ramp(penalty, penalty_rate, 1.0, penalty_max), hinge)
        return value_function(problem, multiplier=mult, upper_lr=upper_lr, lower_lr=lower_lr, tracker_lr=tracker_lr,
                              upper_opt=upper_opt, lower_opt=lower_opt, tracker_opt=tracker_opt,
                              tracker_steps=tracker_steps, smoothing=smoothing, lower_set=lower_set,
                              batch_size=batch_size, name="vf_penalty", **loop_options(kw))


def smoothing_pg(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=None, tracker_lr=None, upper_opt=None,
                 lower_opt=None, tracker_opt=None, tracker_steps: int = 10, penalty=1.0, penalty_factor=2.0,
                 penalty_max=1e3, smoothing=1.0, smoothing_shrink=0.5, resolve_tol=0.1, hinge: bool = True,
                 lower_set=None, batch_size: BatchSize = None, **kw) -> ValueFunction:
    """Smoothing projected gradient on the value-function reformulation (Lin, Xu, Ye, "On solving
    simple bilevel programs with a nonconvex lower level program", Math. Programming 144:277-305,
    2014): the simple bilevel program (Phi and Theta closed convex, Phi independent of theta)

        min_{theta in Theta, phi in Phi} f(theta, phi)   s.t.   q = g(theta, phi) - v(theta) <= 0,
        v(theta) = min_{z in Phi} g(theta, z)

    whose constraint is non-smooth (v is not differentiable where argmin_Phi g is not a singleton,
    and max{0, q} at q = 0), by projected gradient steps on a smooth approximation of its exact
    penalty, the smoothing parameter mu driven to 0 and the penalty rho increased by the method:

        q_mu = g(theta, phi) - v_mu(theta),  v_mu(theta) = min_{z in Phi} g(theta, z) + (mu/2) ||z||^2
        P_mu(t) = (t + sqrt(t^2 + 4 mu^2)) / 2          (smoothed max{0, t}; `hinge=False`: t)
        d = (grad f + rho P_mu'(q_mu) grad q_mu) / rho  (grad v_mu = grad_theta g(theta, z_mu), Danskin)
        (theta, phi) <- (P_Theta(theta - alpha d_theta), P_Phi(phi - alpha d_phi)),
        z_mu tracked by T warm-started projected gradient steps on g + (mu/2) ||.||^2,

    the direction scaled by 1/rho so that a constant step stays stable as rho grows (as V-PBGD).
    Parameter control: when a step moves less than eta mu_k, eta = `resolve_tol` (the smoothed
    problem is resolved at this mu), mu_{k+1} = `smoothing_shrink` mu_k and, if the smoothed constraint is still violated
    (q_mu > 0), rho_{k+1} = min(`penalty_factor` rho_k, `penalty_max`). Defaults: mu_0 = `smoothing` =
    1, shrink 0.5, rho_0 = `penalty` = 1, grow 2, rho_max = 1e3, eta = 0.1, T = `tracker_steps` = 10,
    alpha = `upper_lr` = 0.1 on theta, `lower_lr` (default the same) on phi, `tracker_lr` (default
    `lower_lr`) on z; needs alpha L_g < 2 (L_g: the LL Hessian's largest eigenvalue).

    Where it departs from the paper [verify]: the paper smooths v by the integral entropy function
    -mu ln int_Phi exp(-g(theta, z) / mu) dz (valid for a non-convex LL; an integral over Phi that
    does not scale past a few LL dimensions) and takes Armijo line-search steps; here v is smoothed
    by the quadratic regularisation above (gradient consistent for an LL convex in phi, the class
    of the entry "convex constraint" of the method tables) and the step is constant; the smoothing
    of max{0, .} (CHKS here) and the exact test and factors of the mu / rho updates were not
    verified. Accuracy and speed: the penalty's bias is O(1/rho_max) where the value-function
    constraint is not calm (e.g. q quadratic in phi), and theta moves at the rate alpha / rho: on
    the tests' 4 x 6 quadratic (L_g = 1) the defaults are 0.18 relative from theta* after 4,000
    steps, `upper_lr=0.5` 3.7e-3. Oracles per step: T + 2 LL gradients, 1 UL gradient, 2 LL values.
    Sampling: full batch (a deterministic method); `batch_size=b` draws i.i.d. minibatches.
    `lower_set=`: Phi, as in the other value-function presets (module docstring)."""
    with named("smoothing_pg"):
        check_step_size("penalty", penalty)
        check_in_range("penalty_factor", penalty_factor, 1.0, float("inf"))
        check_step_size("penalty_max", penalty_max)
        check_step_size("smoothing", smoothing)
        check_in_range("smoothing_shrink", smoothing_shrink, 0.0, 1.0, closed_low=False)
        check_step_size("resolve_tol", resolve_tol)
        control = SmoothingControl(True, as_array(smoothing), as_array(penalty), as_array(smoothing_shrink),
                                   as_array(penalty_factor), as_array(penalty_max), as_array(resolve_tol), hinge)
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        return value_function(problem, multiplier=control, upper_lr=upper_lr, lower_lr=lower_lr,
                              tracker_lr=tracker_lr, upper_opt=upper_opt, lower_opt=lower_opt, tracker_opt=tracker_opt,
                              tracker_steps=tracker_steps, scale_upper=True, smoothing=(0.0, 0.0), lower_set=lower_set,
                              batch_size=batch_size, name="smoothing_pg", **loop_options(kw))


__all__ = ["Barrier", "DualAscent", "Gap", "Multiplier", "PenaltyRamp", "PenaltySchedule", "ValueFunction",
           "ValueFunctionState", "SmoothingControl", "bome", "pdbo", "penalty_ramp", "smoothing_pg", "value_function",
           "vf_penalty"]

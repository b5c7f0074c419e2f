"""Penalty methods: F2SA and PBGD (value-function and gradient penalties).

- F2SA (Kwon, Kwon, Wright, Nowak, "A Fully First-Order Method for Stochastic Bilevel
  Optimization", ICML 2023, arXiv:2301.10945), on L_lambda = f(x, y) + lambda (g(x, y) - g(x, z)):
      T inner steps:  z <- z - gamma grad_y g(x, z),   y <- y - alpha (grad_y f + lambda grad_y g)(x, y)
      x <- x - xi (grad_x f(x, y) + lambda (grad_x g(x, y) - grad_x g(x, z))),   lambda_{k+1} = lambda_k + delta
  (a `value_function.ValueFunction` with `phi_steps` = T and a penalty ramp).
- V-PBGD (Shen & Chen, "On Penalty-based Bilevel Gradient Descent Method", ICML 2023,
  arXiv:2302.05185): omega tracks argmin_y g(x, .) by T warm-started steps; a joint step on
  (1/gamma) f(x, y) + g(x, y) - g(x, omega), gamma ramping linearly to `penalty_max`
  (`scale_upper`: d = grad f / gamma + grad q).
- G-PBGD (same paper): a joint step on f(x, y) + (gamma / 2) ||grad_y g(x, y)||^2, whose gradient
  (grad f + gamma (J grad_y g, A grad_y g)) needs one linearisation of grad_y g (1 HVP + 1 cross):
  not Hessian-free, but valid where grad_y g = 0 characterises the LL solutions (PL). With
  minibatches, grad_y g is taken on a second, independent LL batch: the product A_B grad_y g_B'
  is then unbiased for A grad_y g, while one batch for both estimates the gradient of
  E||grad_y g_B||^2, the penalty plus the minibatch variance of grad_y g (a biased problem).
- The optimality-condition reformulation min f(x, y) s.t. grad_y g(x, y) = 0 (Dempe & Dutta, "Is
  bilevel programming a special case of a mathematical program with complementarity
  constraints?", Math. Programming 131, 2012: for an unconstrained LL, convex in y, its global
  solutions are the bilevel problem's) by its augmented Lagrangian, c = grad_y g,
      L_rho(x, y, mu) = f(x, y) + <mu, c(x, y)> + (rho / 2) ||c(x, y)||^2,
      (x, y) <- (x, y) - alpha (grad f + (J (mu + rho c), A (mu + rho c))),   mu <- mu + sigma c(x_k, y_k)
  (`optimality_penalty`): G-PBGD is its sigma = 0 case (the same `GradientPenalty` step, one
  linearisation of c per step). At a solution mu* = -A^{-1} grad_y f, the negative adjoint, and
  the x-part grad_x f + J mu* is the implicit hypergradient: the multiplier removes the penalty's
  O(1/rho) bias, so a constant rho suffices.

Both penalties reach the bilevel solution as the penalty grows: the minimiser of the penalised
problem is within O(1/lambda) (O(1/gamma)) of it; the augmented Lagrangian at a fixed rho.
"""
from __future__ import annotations

from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_in_range, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import loop_options, named, rule
from bilevel_jax.algorithms.base import Header, State
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import Composed, apply_step, float_dtype
from bilevel_jax.algorithms.value_function import PenaltyRamp, PenaltySchedule, ValueFunction, penalty_ramp, value_function
from bilevel_jax.linear_solvers import fail_where
from bilevel_jax.problem import BilevelProblem, check_problem
from bilevel_jax.sampling import Full

PyTree = Any


def f2sa(problem: BilevelProblem, *, upper_lr=0.01, lower_lr=0.01, tracker_lr=None, upper_opt=None, lower_opt=None,
         tracker_opt=None, lower_steps: int = 10, penalty=1.0, penalty_rate=0.1, penalty_power=1.0,
         penalty_max=float("inf"), upper_decay=0.0, lower_decay=0.0, tracker_decay=0.0, lower_set=None,
         batch_size: BatchSize = 64, **kw) -> ValueFunction:
    """F2SA (module docstring) with T = `lower_steps` inner steps of both y (step alpha = `lower_lr`)
    and the tracker z (gamma = `tracker_lr`, default alpha), x step xi alpha = `upper_lr`, and
    lambda_k = min(`penalty` + `penalty_rate` k^`penalty_power`, `penalty_max`).
    Defaults: T = 10, steps 0.01, lambda_0 = 1, delta = 0.1 per step (the public benchmark's and the
    LancBiO authors' hyper-cleaning settings); the benchmark decays the steps as k^{-4/7} (x, z),
    k^{-5/7} (y) with lambda ~ k^{1/7} (`upper_decay=4/7, lower_decay=5/7, tracker_decay=4/7,
    penalty_power=1/7`), the rates of the paper's stochastic analysis [verify]. The y steps must
    stay stable: alpha lambda_k L_g < 2 (cap lambda with `penalty_max`). A stochastic method:
    minibatches of 64 by default (`batch_size=None`: full batch), i.i.d. as in the paper's analysis. Oracles per step: 2T + 2 LL
    gradients, T + 1 UL gradients, no HVP. `lower_set=`: a constrained LL (projected y and z steps,
    `value_function` module docstring)."""
    with named("f2sa"):
        check_positive_int("lower_steps", lower_steps)
        tracker = lower_lr if tracker_lr is None else tracker_lr
        ramp = penalty_ramp(penalty, penalty_rate, penalty_power, penalty_max)
        return value_function(problem, multiplier=PenaltySchedule(False, ramp, False),
                              upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay),
                              lower_opt=rule("lower_lr", lower_lr, lower_opt, lower_decay, every=lower_steps),
                              tracker_opt=rule("tracker_lr", tracker, tracker_opt, tracker_decay, every=lower_steps),
                              tracker_steps=lower_steps, phi_steps=lower_steps, lower_set=lower_set,
                              batch_size=batch_size, name="f2sa", **loop_options(kw))


class BarrierWeight(eqx.Module):
    """k -> max(mu / (k + 1)^power, mu_min): the barrier parameter driven down (array fields)."""

    mu: jax.Array
    power: jax.Array
    mu_min: jax.Array

    def __call__(self, count):
        k = jnp.asarray(count, jnp.result_type(float))
        return jnp.maximum(self.mu / (k + 1.0) ** self.power, self.mu_min)


def log_barrier(problem: BilevelProblem, mu) -> BilevelProblem:
    """The problem whose LL is f_lower - mu sum log(-P(theta, phi)) (P: `lower_inequality`), without
    constraints: its stationary points are the LL's central path (perturbed KKT points, lambda_i =
    mu / -P_i); NaN outside the interior P < 0."""
    def f_lower(theta, phi, batch):
        ineq, _ = oracles.constraint_values(problem, theta, phi)
        logs = [jnp.sum(jnp.log(-c)) for c in jax.tree_util.tree_leaves(ineq)]
        return problem.f_lower(theta, phi, batch) - mu * sum(logs)
    return BilevelProblem(problem.f_upper, f_lower, problem.project_upper)


class GradientPenaltyState(State):
    header: Header
    multiplier: Any = None   # mu, shaped like phi's array part (zeros for G-PBGD)


class GradientPenalty(Composed):
    """Joint step on the augmented Lagrangian f_upper + <mu, c> + (gamma_k / 2) ||c||^2 of
    c = grad_phi f_lower = 0, mu <- mu + dual_lr c (module docstring): `optimality_penalty`;
    G-PBGD without the multiplier (`dual_lr` None: mu stays 0); EBSA with c the gradient of the
    log-barrier LL (`barrier`, `ebsa`)."""

    penalty: PenaltyRamp
    mode: str = eqx.field(static=True, default="rev")
    dual_lr: Any = None      # sigma (None: G-PBGD, no multiplier)
    barrier: Optional["BarrierWeight"] = None   # EBSA: c = grad_phi of the log-barrier LL (module docstring)
    name: str = eqx.field(static=True, default="pbgd", kw_only=True)

    @property
    def handles_constraints(self) -> bool:
        return self.barrier is not None   # the LL's inequalities enter through the barrier

    def init(self, theta0, phi0, key, data=None) -> GradientPenaltyState:
        return GradientPenaltyState(self.start(theta0, phi0, key, data),
                                    otu.tree_zeros_like(oracles.differentiable(phi0)))

    def update(self, state: GradientPenaltyState, data):
        k = state.count
        p = self.problem if self.barrier is None else log_barrier(self.problem, self.barrier(k))
        stochastic = not isinstance(self.samplers[1], Full)
        batches = self.batches(state, data, lower_steps=int(stochastic))
        with oracles.counting() as tally:
            g_theta, g_phi = oracles.upper_grads(p, state.theta, state.phi, batches.upper)
            lin = oracles.linearize_lower(p, state.theta, state.phi, batches.lower, self.mode)
            c = lin.gradient()
            # grad of (1/2) ||grad_phi f_lower||^2 = (J grad_phi f_lower, A grad_phi f_lower); with minibatches
            # grad_phi f_lower from an independent batch (module docstring: unbiased product)
            g_lower = oracles.lower_grad_phi(p, state.theta, state.phi, batches.lower_at(0)) if stochastic else c
            gamma = jnp.asarray(self.penalty(k), float_dtype((state.theta, state.phi)))
            # (J w, A w) with w = mu + gamma grad_phi f_lower: the gradient of <mu, c> + (gamma / 2) ||c||^2
            a_w, j_w = lin.hvp_and_cross(otu.tree_add_scale(state.multiplier, gamma, g_lower))
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state,
                                                   otu.tree_add(g_theta, j_w), k, p.project)
        phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state,
                                                  otu.tree_add(g_phi, a_w), k)
        multiplier = (state.multiplier if self.dual_lr is None
                      else otu.tree_add_scale(state.multiplier, self.dual_lr, c))
        if self.barrier is not None:   # out of the barrier's domain P < 0 (where its value is NaN): NaN, loudly
            ineq, _ = oracles.constraint_values(self.problem, theta, phi)
            outside = jnp.any(jnp.stack([jnp.any(c >= 0) for c in jax.tree_util.tree_leaves(ineq)]))
            phi = eqx.combine(fail_where(outside, oracles.differentiable(phi)),
                              eqx.filter(phi, eqx.is_inexact_array, inverse=True))
        (theta, phi, multiplier), info = self.finish((theta, phi, multiplier), tally.counts, otu.tree_norm(c),
                                                     (up_status, low_status))
        return GradientPenaltyState(state.header.next(theta, phi, upper_state, lower_state), multiplier), info


def pbgd(problem: BilevelProblem, *, variant: str = "value", upper_lr=0.1, lower_lr=None, tracker_lr=None,
         upper_opt=None, lower_opt=None, tracker_opt=None, tracker_steps: int = 10, penalty=1.0, penalty_rate=0.009,
         penalty_max=10.0, lower_set=None, batch_size: BatchSize = None, sampler: str = "iid",
         mode: Optional[str] = None, check: bool = False):
    """PBGD (Shen & Chen, "On Penalty-based Bilevel Gradient Descent Method", ICML 2023,
    arXiv:2302.05185), `variant="value"` (V-PBGD) or `"gradient"` (G-PBGD):

        V-PBGD: omega <- T = `tracker_steps` warm-started steps on g(x, .) (step `tracker_lr`, default `lower_lr`),
                (x, y) <- (x, y) - alpha (grad f(x, y) / gamma_k + grad_{(x,y)} [g(x, y) - g(x, omega)])
        G-PBGD: (x, y) <- (x, y) - alpha (grad f(x, y) + gamma_k grad_{(x,y)} (1/2) ||grad_y g(x, y)||^2)

    with gamma_k = min(`penalty` + `penalty_rate` k, `penalty_max`) (default 1 -> 10 over 1000
    steps), the linear ramp of the authors' code [verify the exact ramp]; alpha = `upper_lr` on x
    and `lower_lr` (default the same) on y. Oracles: V-PBGD T + 2 LL gradients, 1 UL gradient; G-PBGD 1 LL gradient (2 with
    minibatches: the independent batch of the module docstring), 1 UL gradient, 1 HVP, 1 cross product
    (in `mode`, default "rev"; V-PBGD takes no `mode`: it has no second-order product). Sampling:
    full batch (the paper's deterministic analysis); `batch_size=b` draws i.i.d. minibatches. A constrained LL (`lower_set=`, or a problem built from a
    `bj.constraints` set): V-PBGD projects its y and omega steps (`value_function` module docstring);
    G-PBGD refuses it (grad_y g = 0 characterises unconstrained LL minima only)."""
    with named("pbgd"):
        if variant not in ("value", "gradient"):
            raise ValueError(f"variant must be 'value' (V-PBGD) or 'gradient' (G-PBGD), got {variant!r}.")
        ramp = penalty_ramp(penalty, penalty_rate, 1.0, penalty_max)
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        if variant == "value":
            if mode is not None:
                raise ValueError("mode applies to variant='gradient' (G-PBGD) only: V-PBGD takes no second-order "
                                 "product.")
            return value_function(problem, multiplier=PenaltySchedule(False, ramp, False), upper_lr=upper_lr,
                                  lower_lr=lower_lr, tracker_lr=tracker_lr, upper_opt=upper_opt, lower_opt=lower_opt,
                                  tracker_opt=tracker_opt, tracker_steps=tracker_steps, scale_upper=True,
                                  lower_set=lower_set, batch_size=batch_size, sampler=sampler, check=check,
                                  name="pbgd")
        mode = "rev" if mode is None else mode
        oracles.check_mode(mode)
        if lower_set is not None or check_problem(problem).constrained:
            raise ValueError("variant='gradient' (G-PBGD) needs an unconstrained lower level: its penalty "
                             "||grad_y g||^2 vanishes at unconstrained LL minima only; use variant='value' "
                             "(projected steps) on a constrained lower level.")
        return GradientPenalty(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                               make_samplers(batch_size, sampler), ramp, mode, check=check)


def optimality_penalty(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=None, upper_opt=None, lower_opt=None,
                       penalty=1.0, penalty_rate=0.0, penalty_max=float("inf"), dual_lr=None,
                       batch_size: BatchSize = None, sampler: str = "iid", mode: str = "rev",
                       check: bool = False) -> GradientPenalty:
    """The optimality-condition reformulation min_{x, y} f(x, y) s.t. grad_y g(x, y) = 0 (Dempe &
    Dutta, "Is bilevel programming a special case of a mathematical program with complementarity
    constraints?", Math. Programming 131:37-48, 2012) by a single-loop augmented Lagrangian
    (module docstring):

        c_k = grad_y g(x_k, y_k),   w_k = mu_k + rho_k c_k,
        (x, y) <- (x, y) - alpha (grad_x f + J w_k,  grad_y f + A w_k),   mu <- mu + sigma c_k

    with rho_k = min(`penalty` + `penalty_rate` k, `penalty_max`) (a constant rho by default: the
    multiplier removes the O(1/rho) bias of the plain penalty), sigma = `dual_lr` (default rho_0: the
    method of multipliers' rule, Hestenes 1969 / Powell 1969), alpha = `upper_lr` on x and
    `lower_lr` (default the same) on y. The paper gives the reformulation and its equivalence (global
    solutions, LL convex in y; local solutions may differ), not an algorithm: the augmented
    Lagrangian and its single-loop form are ours. Valid where grad_y g = 0 characterises the LL
    solutions (strongly convex or PL LL, unconstrained); the step must resolve the penalty's
    curvature, alpha rho L_g^2 < 2 (L_g the LL Hessian's largest eigenvalue). Oracles per step: 1 LL
    gradient (2 with minibatches, as G-PBGD), 1 UL gradient, 1 HVP, 1 cross product. Sampling: full
    batch by default (a deterministic reformulation); `batch_size=b` draws i.i.d. minibatches."""
    with named("optimality_penalty"):
        check_step_size("penalty", penalty)
        sigma = penalty if dual_lr is None else dual_lr
        check_step_size("dual_lr", sigma)
        oracles.check_mode(mode)
        check_problem(problem)
        ramp = penalty_ramp(penalty, penalty_rate, 1.0, penalty_max)
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        return GradientPenalty(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                               make_samplers(batch_size, sampler), ramp, mode, as_array(sigma), check=check,
                               name="optimality_penalty")


def ebsa(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=None, upper_opt=None, lower_opt=None, penalty=1.0,
         penalty_rate=0.0, penalty_max=float("inf"), dual_lr=None, barrier=0.1, barrier_power=1.0,
         barrier_min=1e-4, batch_size: BatchSize = None, sampler: str = "iid", mode: str = "rev",
         check: bool = False) -> GradientPenalty:
    """EBSA, the enhanced barrier-smoothing algorithm (Xu, Dai, Liu, Wang, "Enhanced Barrier-Smoothing
    Technique for Bilevel Optimization with Nonsmooth Mappings", 2024, arXiv:2408.09661) for a LL
    with inequality constraints P(x, y) <= 0 (`lower_inequality`, e.g. a `bj.constraints` set) and
    an objective that need not be convex. The LL's primal-dual solution mapping is non-smooth where
    the active set changes; the log barrier smooths it (the central path: grad_y g + grad_y P'
    lambda = 0, lambda_i (-P_i) = mu, i.e. the stationary points of B_mu = g - mu sum log(-P)), and
    the bilevel problem becomes the sequence of smooth single-level problems

        min_{x, y} f(x, y)   s.t.   c_mu(x, y) = grad_y B_mu(x, y) = 0,      mu_k -> 0,

    each handled by the augmented Lagrangian of `optimality_penalty` (module docstring) on c_mu:

        w_k = nu_k + rho_k c_k,  (x, y) <- (x, y) - alpha (grad f + (J_mu w_k, A_mu w_k)),  nu <- nu + sigma c_k,
        mu_k = max(`barrier` / (k+1)^`barrier_power`, `barrier_min`)

    (J_mu, A_mu: the barrier LL's cross and Hessian products, one linearisation per step;
    rho_k = min(`penalty` + `penalty_rate` k, `penalty_max`), sigma = `dual_lr` (default rho_0)).
    Without inequalities it is `optimality_penalty`. Defaults: mu_0 = 0.1 decreasing like 1/k to
    1e-4, rho = 1, alpha = 0.1 on x and `lower_lr` (default the same) on y.

    A reconstruction from the abstract [verify]: the paper's exact smoothing functions (its
    "enhanced" barrier-smoothing of the primal-dual mapping), its multiplier and barrier-parameter
    rules and its stationarity targets (Clarke and Bouligand points) were not available; what is
    here is the log-barrier central path with a single-loop augmented Lagrangian. What it finds: a
    point where the UL is stationary along the smoothed LL's stationary points (c_mu = 0). With a
    non-convex LL these include local maxima and non-global minima; the optimistic solution is
    reached from a start in its basin (the tests' double well), not certified. The iterates y must
    stay strictly feasible (P < 0): phi0 interior, steps small against the barrier's curvature
    (~mu / P^2) near the boundary; a step out of the interior gives NaN and the NONFINITE status.
    Oracles per step: as `optimality_penalty` (1 LL gradient, 1 UL gradient, 1 HVP, 1 cross
    product, of the barrier LL). Sampling: full batch by default (a deterministic method);
    `batch_size=b` draws i.i.d. minibatches."""
    with named("ebsa"):
        check_step_size("penalty", penalty)
        sigma = penalty if dual_lr is None else dual_lr
        check_step_size("dual_lr", sigma)
        check_step_size("barrier", barrier)
        check_in_range("barrier_power", barrier_power, 0.0, float("inf"))
        check_step_size("barrier_min", barrier_min)
        oracles.check_mode(mode)
        if check_problem(problem).lower_equality is not None:
            raise ValueError("equality constraints in the lower level are not handled (the barrier smooths "
                             "inequalities P <= 0 only).")
        weight = (BarrierWeight(as_array(barrier), as_array(barrier_power), as_array(barrier_min))
                  if problem.lower_inequality is not None else None)
        ramp = penalty_ramp(penalty, penalty_rate, 1.0, penalty_max)
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        return GradientPenalty(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                               make_samplers(batch_size, sampler), ramp, mode, as_array(sigma), weight, check=check,
                               name="ebsa")


__all__ = ["BarrierWeight", "GradientPenalty", "GradientPenaltyState", "ebsa", "f2sa", "log_barrier",
           "optimality_penalty", "pbgd"]

"""Defaults that converge: a preset called without step sizes runs on the problem rescaled at `init`.

The bilevel solution does not change when either objective is multiplied by a positive constant:

    argmin_phi s_g f_lower(theta, phi) = phi*(theta),     argmin_theta s_f F(theta) = theta*,

so a preset built with its default step sizes (numbers tuned for unit curvature) and no step-size
argument (`upper_lr`, `lower_lr`, `v_lr`, `tracker_lr`, `dual_lr`, `*_opt`, `neumann_eta`, `subspace_eta`,
penalties, ...: every argument but the structural ones of `STRUCTURAL`) is wrapped in
`Normalized`: `init(theta0, phi0, key, data)` estimates, on the full data (`curvatures`),

    L_g   = lambda_max(A),  A = grad^2_{phi phi} f_lower at (theta0, phi0)      (power iteration on HVPs)
    mu_g  = lambda_min(A) at (theta0, phi*(theta0))        (power iteration on lambda_max(A) I - A)
    L_F   = |lambda_max(grad^2 F)|,  grad^2 F u = d/de G(theta + e u, phi + e w),  w = -A^{-1} J' u
    M     = lambda_max(J A^{-1} J'),  J = grad^2_{theta phi} f_lower    (the penalty's curvature in theta)
    f_tt, f_pp = |lambda_max| of grad^2_{theta theta} f_upper and grad^2_{phi phi} f_upper

with phi*(theta0) from `NEWTON_STEPS` Newton-CG steps (G(theta, phi) = grad_theta f_upper - J A^{-1}
grad_phi f_upper, the implicit hypergradient, A solved by CG; Ghadimi & Wang, "Approximation
Methods for Bilevel Programming", 2018, arXiv:1802.02246, eq. (2.3)), and every step runs the
preset on f_lower * `LOWER_SCALE` / L_g and f_upper * `UPPER_SCALE` / L_F: the default
`lower_lr = 0.1` becomes 1 / L_g (gradient descent at 1/L, linear rate 1 - mu_g / L_g on a strongly
convex LL; Nesterov, "Introductory Lectures on Convex Optimization", 2004, Thm. 2.1.15), `upper_lr
= 0.1` becomes 0.02 / L_F (L_F is taken at theta0 only, and the UL curvature changes along the
path: 0.1 / L_F diverged on a logistic HPO). A curvature that is zero or not finite raises at
`init` (NaN factors, hence a NONFINITE run, when `init` is traced). With full batches (`batch_size`
None, or a default `batch_size` at least the smaller level's number of samples: then the preset
draws the whole data) decaying step sizes, whose purpose is to average out sampling noise, are
constant, and the random truncation of the HIA (bsa, ttsa, alset, sustain) is its expectation,
the truncated Neumann series.

What else each family needs (`_settings`; in the units of the rescaled problem, where L_g = 10):

- Truncated series and inner loops to a stated accuracy: a Neumann series of v with eta = 1 / L_g
  keeps the relative bias (1 - mu_g / L_g)^K after K terms (Ji, Yang & Liang, "Bilevel
  Optimization: Convergence Analysis and Enhanced Design", 2021, arXiv:2010.07962, Lemma 3), and
  K gradient steps contract an error by the same factor, so `loop_length` chooses
  K = ceil(ln TOL / ln(1 - mu_g / L_g)), at least `MIN_STEPS` (mu_g / L_g changes along the UL path:
  15-fold from theta0 to theta* on the logistic HPO of benchmarks/defaults.py), for `neumann_steps`
  (stocbio, bsa, ttsa, alset, mrbo, sustain, vrbo, vrbo_single_loop), the LL steps unrolled by
  pzobo (whose Jacobian keeps the same truncation) and the trackers and inner loops of the
  penalty methods. Above `MAX_STEPS` (condition number ~ 2000) `init` raises.
- Penalty methods, on f + lambda (g - v) (v the LL value function): the minimiser is O(1/lambda)
  from theta* (1.5 / lambda relative on the benchmark's cond-100 quadratic, 0.6 / lambda and
  1.2 / lambda on the ridge and logistic HPO), and a gradient step on phi needs
  beta (f_pp + lambda L_g) < 2, on theta (joint steps) xi (f_tt + lambda M) < 2, at every lambda:
  `PenaltyStep` makes both steps functions of lambda_k. F2SA (Kwon, Kwon, Wright, Nowak, "A Fully
  First-Order Method for Stochastic Bilevel Optimization", ICML 2023, arXiv:2301.10945) moves phi
  by `K` inner steps at fixed theta, so its theta step only sees the tracking error, contracted to
  TOL: lambda ramps to `PENALTY` (bias ~1e-3) over `RAMP_STEPS`. The joint steps (vf_penalty, pdbo,
  V-PBGD, BOME, smoothing_pg) move along the solution manifold at a rate ~ 1 / lambda (phi must
  follow theta with a step ~ 1 / (lambda L_g)), so they stop at `JOINT_PENALTY` (bias ~1e-2):
  vf_penalty and V-PBGD ramp to it, PDBO's dual variable starts at it (with the plain value function
  q >= 0 and lambda only grows to its cap), smoothing_pg's rho is capped there (its direction is
  divided by rho >= 1, so steps for rho = 1 hold at every rho), BOME's barrier parameter is
  `BOME_CONTROL_RATE` (its control_rate eta: its lambda is adaptive, eta is its floor).
- Methods with a bias no step size removes raise at construction without step sizes (`NO_DEFAULTS`:
  alternating, signsgd_ul, bsg1), naming the arguments to pass. The augmented-Lagrangian
  reformulations (optimality_penalty, ebsa, cdb) keep their own default steps, and `StepCheck`
  raises at `init` where their LL step is unstable for the problem (lower_lr penalty L_g^2 >= 2).

Step sizes passed explicitly are used as given on the problem as given (no wrapper).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from bilevel_jax import oracles
from bilevel_jax.algorithms.base import Algorithm, State, Wrapper
from bilevel_jax.algorithms.parallel import replace_parts
from bilevel_jax.algorithms.steps import StepRule
from bilevel_jax.algorithms.value_function import (Barrier, DualAscent, PenaltyRamp, PenaltySchedule,
                                                   SmoothingControl, ValueFunction)
from bilevel_jax.algorithms.zeroth_order import PZOBO
from bilevel_jax.linear_solvers import Neumann, SampledNeumann, StochasticNeumann, neumann
from bilevel_jax.problem import check_data_pair
from bilevel_jax.rebuild import rebuild
from bilevel_jax.sampling import Full, full, num_samples
from bilevel_jax.schedules import InversePower

PyTree = Any

LOWER_SCALE = 10.0     # the LL objective's curvature after rescaling: lower_lr = 0.1 acts as 1 / L_g
UPPER_SCALE = 0.2      # the UL value's curvature after rescaling: upper_lr = 0.1 acts as 0.02 / L_F
POWER_STEPS = 30       # power iterations for each curvature
NEWTON_STEPS = 5       # Newton-CG steps towards phi*(theta0) before the UL curvature
CG_STEPS = 50          # CG steps of the implicit system inside the UL curvature estimate
TOL = 1e-2             # relative accuracy of truncated series and inner loops: (1 - mu_g / L_g)^K <= TOL
MIN_STEPS = 100        # the least K (the LL conditioning changes along the UL path)
MAX_STEPS = 10_000     # the largest K defaults choose (condition number ~ 2000); above, init raises
PENALTY = 1e3          # F2SA's penalty cap, rescaled units (O(1/lambda) bias ~1e-3 on the benchmark problems)
JOINT_PENALTY = 100.0  # the joint-step penalty methods' (bias ~1e-2; their rate falls as 1 / lambda)
JOINT_STEP = 0.5       # xi (f_tt + lambda M) and beta (f_pp + lambda L_g) of the penalty steps
RAMP_STEPS = 1000      # outer steps of the penalty ramps (F2SA, V-PBGD) from 1 to their cap
BOME_CONTROL_RATE = 5.0  # BOME's eta (its lambda's floor), rescaled units: 0.5 stalled at 4e-2 on the quadratic

# arguments that do not carry the objectives' units: passing them keeps the rescaling
STRUCTURAL = frozenset({
    "batch_size", "sampler", "mode", "check", "mesh", "shards", "precision", "lower_steps", "tracker_steps", "neumann_steps",
    "linear_solver", "warm_start", "lower_set", "saga_init", "period", "shared_batch", "control", "directions",
    "num_directions", "correction", "exact_residual", "hinge", "upper_decay", "lower_decay", "tracker_decay",
    "strongly_convex", "horizon", "hessian_tracking", "m_start", "inc", "every", "m_max", "m0", "momentum",
    "upper_momentum", "lower_momentum", "hessian_momentum", "restart_lower_decay", "variant", "penalty_power"})

_GIVE_STEPS = "pass upper_lr= and lower_lr= to run it with step sizes of your choice"
# presets whose fixed points are not theta* for any step size: built without step sizes, they raise
NO_DEFAULTS = {
    "alternating": "it drops the implicit term J A^{-1} grad_phi f_upper of the hypergradient, so its fixed "
                   "points are theta* only where that term vanishes; no default step size makes it converge to "
                   f"theta*: {_GIVE_STEPS} (the baseline), or use a preset with an implicit gradient (soba, aid_bio)",
    "signsgd_ul": "its UL step drops the implicit term of the hypergradient (the sign steps' Jacobian is zero), "
                  "so its fixed points are theta* only where that term vanishes, and its sign steps on phi stall "
                  f"at a distance of order lower_lr from phi*: {_GIVE_STEPS}",
    "bsg1": "its rank-one adjoint is exact only when the LL optimal value does not depend on theta, and "
            "full-batch runs diverge on a generic LL (the bsg module docstring): " + _GIVE_STEPS,
}


# ----------------------------------------------------------------------------------- curvature estimates

def _start(tree):
    """A fixed pseudo-random start (no structure an operator's eigenvectors could be orthogonal to)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(0), max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _unit(tree):
    norm = otu.tree_norm(tree)
    return otu.tree_scale(1.0 / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny), tree)


def _power(matvec, like, steps: int = POWER_STEPS):
    """The extreme eigenvalue (largest in magnitude) of a symmetric operator by `steps` power
    iterations from `_start(like)`: the Rayleigh quotient."""
    x = jax.lax.fori_loop(0, steps, lambda _, x: _unit(matvec(x)), _unit(_start(like)))
    return otu.tree_vdot(x, matvec(x))


def _cg(matvec, b, steps: int):
    """`steps` CG iterations from zero (fixed count: traceable, differentiable by jvp); the
    iterations after ||r||^2 <= eps^2 ||b||^2 leave x as it is (no 0/0, no overflowing tangent)."""
    bb = otu.tree_vdot(b, b)
    tol = jnp.finfo(bb.dtype).eps ** 2 * bb

    def body(_, c):
        x, r, p, rr = c
        ap = matvec(p)
        pap = otu.tree_vdot(p, ap)
        go = (rr > tol) & (pap > 0)
        alpha = jnp.where(go, rr / jnp.where(go, pap, 1.0), 0.0)
        x, r = otu.tree_add_scale(x, alpha, p), otu.tree_add_scale(r, -alpha, ap)
        rr_new = otu.tree_vdot(r, r)
        beta = jnp.where(go, rr_new / jnp.where(go, rr, 1.0), 0.0)
        return x, r, otu.tree_add_scale(r, beta, p), jnp.where(go, rr_new, rr)

    return jax.lax.fori_loop(0, steps, body, (otu.tree_zeros_like(b), b, b, bb))[0]


def _newton(problem, theta, phi, batch):
    """phi*(theta) by `NEWTON_STEPS` Newton-CG steps from phi (the UL curvature is taken there);
    phi itself if they do not stay finite."""
    def step(_, p):
        g = oracles.lower_grad_phi(problem, theta, p, batch)
        return otu.tree_sub(p, _cg(lambda u: oracles.hvp(problem, theta, p, u, batch), g, CG_STEPS))

    new = jax.lax.fori_loop(0, NEWTON_STEPS, step, phi)
    good = jnp.isfinite(otu.tree_norm(new))
    return jax.tree_util.tree_map(lambda a, b: jnp.where(good, a, b), new, phi)


class Curvatures(NamedTuple):
    """The estimates of the module docstring (in the units of the problem they were taken on)."""

    lower: jax.Array        # L_g at (theta0, phi0)
    lower_min: jax.Array    # mu_g at (theta0, phi*(theta0))
    upper: jax.Array        # L_F at theta0
    coupling: jax.Array     # M = lambda_max(J A^{-1} J')
    upper_theta: jax.Array  # |lambda_max(grad^2_{theta theta} f_upper)|
    upper_phi: jax.Array    # |lambda_max(grad^2_{phi phi} f_upper)|


@eqx.filter_jit   # one program per problem and shapes, shared by the presets' inits
def curvatures(problem, theta, phi, data) -> Curvatures:
    """`Curvatures` at (theta, phi) on the full data (the module docstring)."""
    upper, lower = (None, None) if data is None else data
    t, p = oracles.differentiable(theta), oracles.differentiable(phi)
    l_g = _power(lambda u: oracles.hvp(problem, t, p, u, lower), p)
    p = _newton(problem, t, p, lower)

    def hvp(u):
        return oracles.hvp(problem, t, p, u, lower)

    top = _power(hvp, p)   # lambda_max(A) at phi*: the shift that makes lambda_min the largest
    mu_g = top - _power(lambda u: otu.tree_sub(otu.tree_scale(top, u), hvp(u)), p)

    def solve(b):
        return _cg(hvp, b, CG_STEPS)

    def j_t(u):   # J' u = d/de grad_phi f_lower(theta + e u, phi)
        return jax.jvp(lambda s: oracles.lower_grad_phi(problem, s, p, lower), (t,), (u,))[1]

    def hypergrad(t, p):
        g_t, g_p = oracles.upper_grads(problem, t, p, upper)
        return otu.tree_sub(g_t, oracles.cross(problem, t, p, solve(g_p), lower))

    def hess_f(u):
        return jax.jvp(hypergrad, (t, p), (u, otu.tree_scale(-1.0, solve(j_t(u)))))[1]

    def upper_block(i):
        def matvec(u):
            tangents = (u, otu.tree_zeros_like(p)) if i == 0 else (otu.tree_zeros_like(t), u)
            return jax.jvp(lambda a, b: oracles.upper_grads(problem, a, b, upper)[i], (t, p), tangents)[1]
        return matvec

    return Curvatures(l_g, mu_g, jnp.abs(_power(hess_f, t)),
                      _power(lambda u: oracles.cross(problem, t, p, solve(j_t(u)), lower), t),
                      jnp.abs(_power(upper_block(0), t)), jnp.abs(_power(upper_block(1), p)))


class Scales(NamedTuple):
    """The positive factors of f_upper and f_lower."""

    upper: jax.Array
    lower: jax.Array


def _scales(c: Curvatures) -> Scales:
    """UPPER_SCALE / L_F and LOWER_SCALE / L_g; NaN where a curvature is zero or not finite (a
    run on NaN factors reports NONFINITE at its first step: never a silent factor 1)."""
    def factor(curvature, target):
        good = jnp.isfinite(curvature) & (curvature > 0)
        return jnp.where(good, target / jnp.where(good, curvature, 1.0), jnp.nan)

    return Scales(factor(c.upper, UPPER_SCALE), factor(c.lower, LOWER_SCALE))


def scales_at(problem, theta, phi, data) -> Scales:
    """`Scales` from `curvatures` (NaN factors where a curvature is zero or not finite)."""
    return _scales(curvatures(problem, theta, phi, data))


def rescaled(c: Curvatures) -> Curvatures:
    """The curvatures of the problem rescaled by `_scales(c)` (L_g = LOWER_SCALE, L_F = UPPER_SCALE)."""
    s = _scales(c)
    return Curvatures(c.lower * s.lower, c.lower_min * s.lower, c.upper * s.upper, c.coupling * s.lower,
                      c.upper_theta * s.upper, c.upper_phi * s.upper)


def scaled_problem(problem, scales: Scales):
    """`problem` with f_upper * scales.upper and f_lower * scales.lower (same solution set)."""
    def times(fn, s):
        return lambda theta, phi, batch: s * fn(theta, phi, batch)

    return dataclasses.replace(problem, f_upper=times(problem.f_upper, scales.upper),
                               f_lower=times(problem.f_lower, scales.lower))


def _concrete(preset: str, value, argument: str) -> float:
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        raise ValueError(f"{preset}: built without step sizes, init chooses {argument} from curvatures estimated "
                         f"on the data, which needs concrete values: call init outside jit/vmap, or pass "
                         f"{argument}= and the step sizes.") from None


def check_curvatures(preset: str, c: Curvatures) -> None:
    """Raise, naming the step sizes to pass, when L_g or L_F is zero or not finite (concrete `c`;
    under a trace `_scales` makes the run NONFINITE instead)."""
    try:
        values = {"L_g": float(c.lower), "L_F": float(c.upper)}
    except jax.errors.ConcretizationTypeError:
        return
    bad = {k: v for k, v in values.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        found = ", ".join(f"{k} = {v:.3g}" for k, v in bad.items())
        raise ValueError(f"{preset}: built without step sizes, init estimates them from the curvatures at "
                         f"(theta0, phi0), but {found} (a LL that is not strongly convex there, or a UL value "
                         "flat or not finite at theta0): pass the step sizes (upper_lr=, lower_lr=).")


def loop_length(preset: str, c: Curvatures, argument: str) -> int:
    """K = max(MIN_STEPS, ceil(ln TOL / ln(1 - mu_g / L_g))): K steps at 1 / L_g contract an error
    (the truncation of a Neumann series) to TOL; `init` raises naming `argument` above MAX_STEPS."""
    ratio = _concrete(preset, c.lower_min, argument) / _concrete(preset, c.lower, argument)
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"{preset}: built without {argument}, init chooses it from the LL's smallest curvature "
                         f"mu_g, estimated as {ratio * float(c.lower):.3g} at (theta0, phi*(theta0)) (is the lower "
                         f"level strongly convex?): pass {argument}= and the step sizes.")
    steps = math.ceil(math.log(TOL) / math.log1p(-min(ratio, 0.5)))
    if steps > MAX_STEPS:
        raise ValueError(f"{preset}: the lower level's estimated condition number L_g / mu_g = {1 / ratio:.3g} needs "
                         f"{argument} = {steps} for a relative error (1 - mu_g / L_g)^K below {TOL:g}, more than "
                         f"the defaults' {MAX_STEPS}: pass {argument}= and the step sizes.")
    return max(MIN_STEPS, steps)


# ----------------------------------------------------------------------------------- per-family settings

class PenaltyStep(eqx.Module):
    """k -> c / (a + b lambda_j) (times lambda_j with `times_penalty`, for a direction divided by
    lambda), lambda_j = ramp(k // every): the step of a variable whose curvature in the penalised
    objective f + lambda (g - v) is a + b lambda, kept at c / curvature at every lambda."""

    c: jax.Array
    a: jax.Array
    b: jax.Array
    ramp: Any
    every: int = eqx.field(static=True, default=1)
    times_penalty: bool = eqx.field(static=True, default=False)

    def __call__(self, count):
        lam = self.ramp(count // self.every if self.every > 1 else count)
        step = self.c / (self.a + self.b * lam)
        return step * lam if self.times_penalty else step


def _ramp(start: float, cap: float) -> PenaltyRamp:
    """lambda_k = min(start + (cap - start) k / RAMP_STEPS, cap) (constant for start = cap)."""
    return PenaltyRamp(*(jnp.asarray(x) for x in (start, (cap - start) / RAMP_STEPS, 1.0, cap)))


def _with_lr(rule: StepRule, lr) -> StepRule:
    return dataclasses.replace(rule, learning_rate=lr, schedule=None)


def _neumann(alg, c: Curvatures, steps: Optional[int], full_batch: bool, chosen):
    """Every Neumann-type solver with `steps` terms (None: its own); full batch: the deterministic
    series (the HIA's random truncation averages to it)."""
    def replace(x):
        if isinstance(x, (Neumann, StochasticNeumann, SampledNeumann)):
            k = x.steps if steps is None else steps
            return neumann(k, x.eta) if full_batch else dataclasses.replace(x, steps=k)
        return x
    return rebuild(alg, replace)


def _penalty(alg: ValueFunction, c: Curvatures, steps: Optional[int], full_batch: bool, chosen) -> ValueFunction:
    """Steps, penalty and inner loops (`steps`; None: the preset's) of the value-function family
    (module docstring)."""
    if steps is not None:
        alg = dataclasses.replace(alg, tracker_steps=steps, phi_steps=steps if alg.phi_steps else 0)
    tracker = _with_lr(alg.tracker, 1.0 / c.lower)
    if alg.phi_steps:   # F2SA: phi to TOL at fixed theta; the lag feeds back as xi lambda M TOL / (1 - TOL)
        ramp = _ramp(1.0, PENALTY)
        upper = PenaltyStep(jnp.asarray(JOINT_STEP), jnp.maximum(c.upper_theta, c.upper), c.coupling * TOL / (1 - TOL),
                            ramp)
        lower = PenaltyStep(jnp.asarray(1.0), c.upper_phi, c.lower, ramp, every=alg.phi_steps)
        return dataclasses.replace(alg, upper=_with_lr(alg.upper, upper), lower=_with_lr(alg.lower, lower),
                                   tracker=tracker, multiplier=dataclasses.replace(alg.multiplier, ramp=ramp))
    lam, m, divided = jnp.asarray(JOINT_PENALTY), alg.multiplier, alg.scale_upper
    if isinstance(m, SmoothingControl):   # direction / rho, rho >= 1: curvature (a + rho b) / rho <= a + b
        m = dataclasses.replace(m, rho=jnp.asarray(1.0), rho_max=lam)
        ramp, divided = _ramp(1.0, 1.0), False
    elif isinstance(m, PenaltySchedule):   # vf_penalty, V-PBGD: a ramp to the cap (fast early steps)
        ramp = _ramp(1.0, JOINT_PENALTY)
        m = dataclasses.replace(m, ramp=ramp)
    else:
        ramp = _ramp(JOINT_PENALTY, JOINT_PENALTY)   # the steps for the largest lambda the multiplier reaches
        if isinstance(m, DualAscent):
            m = dataclasses.replace(m, start=lam, cap=lam)
        elif isinstance(m, Barrier):
            m = dataclasses.replace(m, eta=jnp.asarray(BOME_CONTROL_RATE))
    step = jnp.asarray(JOINT_STEP)
    upper = PenaltyStep(step, jnp.maximum(c.upper_theta, c.upper), c.coupling, ramp, times_penalty=divided)
    lower = PenaltyStep(step, c.upper_phi, c.lower, ramp, times_penalty=divided)
    return dataclasses.replace(alg, upper=_with_lr(alg.upper, upper), lower=_with_lr(alg.lower, lower),
                               tracker=tracker, multiplier=m)


def _pzobo(alg: PZOBO, c: Curvatures, steps: Optional[int], full_batch: bool, chosen) -> PZOBO:
    """N = K unrolled LL steps; Q = dim(theta) orthogonal directions (exact for an affine LL map) of
    size mu = sqrt(eps) (a forward difference's truncation against its rounding, theta of order 1)."""
    alg = dataclasses.replace(alg, lower_steps=alg.lower_steps if steps is None else steps)
    if chosen.get("directions") is None:   # the user's directions= / num_directions= are kept
        return alg
    return dataclasses.replace(alg, directions="orthogonal", num_directions=chosen["directions"],
                               mu=jnp.asarray(chosen["mu"]))


def _settings(name: str):
    """(what init chooses, what `tune` does) for preset `name`: the argument K stands for, and a
    function (alg, rescaled curvatures, K, full batch, choices) -> alg; (None, None) otherwise."""
    if name in ("stocbio", "bsa", "ttsa", "alset", "mrbo", "sustain", "vrbo", "vrbo_single_loop"):
        return "neumann_steps", _neumann
    if name == "f2sa":   # its inner loop of phi and the tracker's: lower_steps steps each
        return "lower_steps", _penalty
    if name in ("vf_penalty", "pdbo", "bome", "pbgd", "smoothing_pg"):
        return "tracker_steps", _penalty
    if name == "pzobo":
        return "lower_steps", _pzobo
    return None, None


# ----------------------------------------------------------------------------------- the wrapper

def _constant(rule: StepRule) -> StepRule:
    """A decaying step size c / (k + offset)^p made constant, its first value c / offset^p."""
    if isinstance(rule, StepRule) and isinstance(rule.learning_rate, InversePower):
        lr = rule.learning_rate
        return dataclasses.replace(rule, learning_rate=lr.c * lr.offset ** (-lr.p))
    return rule


def _full_batch(alg: Algorithm, data) -> Algorithm:
    """`alg` drawing the whole data when a batch size is at least the smaller level's sample
    count (`data` shapes are static), with constant step sizes; `alg` itself otherwise."""
    sizes = [] if data is None else [num_samples(d) for d in data]
    sizes = [n for n in sizes if n is not None]
    if not sizes:
        return alg
    n = min(sizes)
    batch = []
    replace_parts(alg, lambda q: q, lambda s: batch.append(s.batch_size) or s)
    if any(b is not None and b < n for b in batch):
        return alg
    alg = replace_parts(alg, lambda q: q, lambda s: full(s.shards))
    return jax.tree_util.tree_map(_constant, alg, is_leaf=lambda x: isinstance(x, StepRule))


def _is_full(alg: Algorithm) -> bool:
    kinds = []
    replace_parts(alg, lambda q: q, lambda s: kinds.append(isinstance(s, Full)) or s)
    return all(kinds)


class Chosen(eqx.Module):
    """What `init` chose from concrete curvature estimates: loop lengths and other static settings."""

    values: tuple = eqx.field(static=True, default=())

    def __getitem__(self, key):
        return dict(self.values)[key]

    def get(self, key, default=None):
        return dict(self.values).get(key, default)


class NormalizedState(State):
    """The wrapped algorithm's state (its header is this state's), the curvatures estimated at
    `init` and the static choices made from them."""

    inner: State
    curvatures: Curvatures
    chosen: Chosen = Chosen()

    header = property(lambda self: self.inner.header)
    v = property(lambda self: getattr(self.inner, "v", None))
    scales = property(lambda self: _scales(self.curvatures))


class Normalized(Wrapper):
    """A preset built with its default step sizes, run on the problem rescaled at `init` (the
    module docstring). `init` needs `data` unless the objectives take no data; `given` names the
    structural arguments the preset was built with (kept as given)."""

    default_batch: bool = eqx.field(static=True, default=True)
    preset: str = eqx.field(static=True, default="preset")
    given: frozenset = eqx.field(static=True, default=frozenset())

    def _base(self, c: Curvatures, data) -> Algorithm:
        """The preset drawing full batches where its default batch does not fit, on the rescaled problem."""
        if data is not None:
            check_data_pair(data)   # the preset's own message for data that is not an (upper, lower) pair
        alg = _full_batch(self.algorithm, data) if self.default_batch else self.algorithm
        return replace_parts(alg, lambda q: scaled_problem(q, _scales(c)), lambda s: s)

    def _at(self, c: Curvatures, chosen: Chosen, data) -> Algorithm:
        alg = self._base(c, data)
        argument, tune = _settings(self.preset)
        if tune is None:
            return alg
        steps = None if argument in self.given else chosen["steps"]
        return tune(alg, rescaled(c), steps, _is_full(alg), chosen)

    def _choose(self, c: Curvatures, theta0) -> Chosen:
        """The static settings of `_settings(preset)` from concrete estimates (errors name the argument)."""
        argument, _ = _settings(self.preset)
        values = {}
        if argument is not None and argument not in self.given:
            values["steps"] = loop_length(self.preset, c, argument)
        if self.preset == "pzobo" and not {"directions", "num_directions"} & self.given:
            flat = ravel_pytree(oracles.differentiable(theta0))[0]
            if flat.shape[0] > self.algorithm.num_directions:
                raise ValueError(f"pzobo: built without step sizes, it estimates the LL Jacobian with dim(theta) "
                                 f"orthogonal directions (exact for an affine LL map), at most num_directions = "
                                 f"{self.algorithm.num_directions}, but dim(theta) = {flat.shape[0]}: pass "
                                 "num_directions= (>= dim(theta)), or upper_lr= with upper_decay= > 0 to average "
                                 "the Gaussian estimate's noise.")
            values.update(directions=int(flat.shape[0]), mu=math.sqrt(float(jnp.finfo(flat.dtype).eps)))
        return Chosen(tuple(sorted(values.items())))

    def init(self, theta0, phi0, key, data=None) -> NormalizedState:
        # the preset's own checks of the key, the data and the objectives first (errors before any estimate)
        unit = Curvatures(*(jnp.ones(()) for _ in Curvatures._fields))
        eqx.filter_eval_shape(lambda: self._base(unit, data).init(theta0, phi0, key, data))
        if data is None:
            try:
                eqx.filter_eval_shape(self.algorithm.problem.f_lower, theta0, phi0, None)
            except Exception as e:   # noqa: BLE001 - the objectives need data
                raise ValueError(f"{self.preset}: built without step sizes, init estimates them on the data: "
                                 "pass `data` to init (or upper_lr= and lower_lr= to the preset).") from e
        c = curvatures(self.algorithm.problem, self.algorithm.problem.project(theta0), phi0, data)
        check_curvatures(self.preset, c)
        chosen = self._choose(c, theta0)
        return NormalizedState(self._at(c, chosen, data).init(theta0, phi0, key, data), c, chosen)

    def update(self, state: NormalizedState, data):
        inner, info = self._at(state.curvatures, state.chosen, data).update(state.inner, data)
        return NormalizedState(inner, state.curvatures, state.chosen), info


def _when_built_without_steps(build, wrap):
    """`build` whose result is `wrap(alg, kwargs)` when called without any argument outside
    `STRUCTURAL` (no step size, penalty or solver-step argument), and as built otherwise."""
    @functools.wraps(build)
    def preset(problem, *args, **kwargs):
        alg = build(problem, *args, **kwargs)
        if args or set(kwargs) - STRUCTURAL:
            return alg
        return wrap(alg, kwargs)

    return preset


def auto_scaled(build):
    """Preset decorator: called without any argument outside `STRUCTURAL`, the preset is wrapped
    in `Normalized` (step sizes, loop lengths and penalties from the curvatures estimated at
    `init`), or, for the presets of `NO_DEFAULTS`, raises naming the arguments to pass."""
    name = build.__name__

    def without_steps(alg, kwargs):
        if name in NO_DEFAULTS:
            raise ValueError(f"{name}: built without step sizes, but {NO_DEFAULTS[name]}.")
        return Normalized(alg, "batch_size" not in kwargs, name, frozenset(kwargs))

    preset = _when_built_without_steps(build, without_steps)

    argument, _ = _settings(name)
    chooses = (f"\n    `{argument}` (unless given) is chosen at `init` so that (1 - mu_g / L_g)^K <= {TOL:g}"
               "\n    (`bj.algorithms.defaults.loop_length`).") if argument else ""
    preset.__doc__ = (build.__doc__ or "") + (
        f"\n\n    Defaults: called without step sizes, {name} raises: {NO_DEFAULTS[name]}." if name in NO_DEFAULTS else
        "\n\n    Defaults: called without step sizes (no `*_lr`, `*_opt`, penalty or solver-step argument),"
        "\n    the preset runs on the problem rescaled at `init` so that the default `lower_lr` acts as"
        "\n    1 / L_g and `upper_lr` as 0.02 / L_F, curvatures estimated from HVPs at (theta0, phi0) on the"
        "\n    full data (`bj.algorithms.defaults`); `init` then needs `data`. Passing any step size uses"
        "\n    every value as given." + chooses)
    preset.__signature__ = inspect.signature(build)
    return preset


class StepCheck(Wrapper):
    """A preset with its own default steps (optimality_penalty, ebsa, cdb), whose LL step on the
    penalty (rho / 2) ||grad_phi f_lower||^2 needs lower_lr rho L_g^2 < 2: `init` estimates L_g at
    (theta0, phi0) (power iteration on HVPs) and raises, naming the arguments, when it fails
    (nothing is estimated when `init` is traced, or without the data the objectives need). The
    state and every step are the preset's own."""

    preset: str = eqx.field(static=True, default="preset")

    def init(self, theta0, phi0, key, data=None):
        state = self.algorithm.init(theta0, phi0, key, data)   # the preset's own checks first
        lower = None if data is None else data[1]
        try:
            eqx.filter_eval_shape(self.algorithm.problem.f_lower, theta0, phi0, lower)
        except Exception:   # noqa: BLE001 - the objectives need data: nothing to estimate
            return state
        t, p = oracles.differentiable(theta0), oracles.differentiable(phi0)
        l_g = _power(lambda u: oracles.hvp(self.algorithm.problem, t, p, u, lower), p)
        penalty = getattr(self.algorithm, "beta", None)
        penalty = self.algorithm.penalty.start if penalty is None else penalty
        try:
            lr, rho, l_g = float(self.algorithm.lower.learning_rate), float(penalty), float(l_g)
        except jax.errors.ConcretizationTypeError:
            return state
        if not lr * rho * l_g ** 2 < 2:
            raise ValueError(f"{self.preset}: built without step sizes, its default LL step needs lower_lr * penalty * "
                             f"L_g^2 < 2 (the gradient of the penalty (penalty / 2) ||grad_phi f_lower||^2), but L_g = "
                             f"{l_g:.3g} (estimated at (theta0, phi0)) gives {lr * rho * l_g ** 2:.3g}: pass lower_lr= and "
                             f"upper_lr= (e.g. {1.0 / (rho * l_g ** 2):.2g}) or a smaller penalty=.")
        return state

    def update(self, state, data):
        return self.algorithm.update(state, data)


def own_defaults(build):
    """Preset decorator of the augmented-Lagrangian reformulations (optimality_penalty, ebsa, cdb):
    called without any argument outside `STRUCTURAL`, the preset keeps its own default steps and
    is wrapped in `StepCheck` (an error at `init` where they are unstable for the problem)."""
    name = build.__name__
    preset = _when_built_without_steps(build, lambda alg, kwargs: StepCheck(alg, name))

    preset.__doc__ = (build.__doc__ or "") + (
        "\n\n    Defaults: called without step sizes, the preset keeps its own defaults, and `init` raises"
        "\n    (naming lower_lr and penalty) where lower_lr * penalty * L_g^2 >= 2, L_g estimated at (theta0, phi0)"
        "\n    (`bj.algorithms.defaults.StepCheck`).")
    preset.__signature__ = inspect.signature(build)
    return preset


__all__ = ["BOME_CONTROL_RATE", "Chosen", "Curvatures", "JOINT_PENALTY", "LOWER_SCALE", "MAX_STEPS", "MIN_STEPS", "NO_DEFAULTS",
           "Normalized", "NormalizedState", "PENALTY", "PenaltyStep", "STRUCTURAL", "Scales", "StepCheck", "TOL", "UPPER_SCALE",
           "auto_scaled", "check_curvatures", "curvatures", "loop_length", "own_defaults", "rescaled", "scaled_problem", "scales_at"]

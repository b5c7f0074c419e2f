"""Defaults that converge: a preset called without step sizes runs on the problem rescaled at `init`.

The bilevel solution does not change when either objective is multiplied by a positive constant:

    argmin_phi s_g f_lower(theta, phi) = phi*(theta),     argmin_theta s_f F(theta) = theta*,

so a preset built with its default step sizes (numbers tuned for unit curvature) and no step-size
argument (`upper_lr`, `lower_lr`, `v_lr`, `tracker_lr`, `dual_lr`, `*_opt`, `neumann_eta`, `subspace_eta`,
penalties, ...: every float argument but the structural ones of `STRUCTURAL`) is wrapped in
`Normalized`: `init(theta0, phi0, key, data)` estimates, on the full data at (theta0, phi0),

    L_g = lambda_max(grad^2_{phi phi} f_lower)                  (power iteration on HVPs)
    L_F = |lambda_max(grad^2 F)|,  grad^2 F u = d/de G(theta + e u, phi + e w),  w = -A^{-1} (d_theta grad_phi f_lower) u

at phi ~ phi*(theta0) (`NEWTON_STEPS` Newton-CG steps)
(G(theta, phi) = grad_theta f_upper - J A^{-1} grad_phi f_upper, the implicit hypergradient, A
solved by CG; Ghadimi & Wang, "Approximation Methods for Bilevel Programming", 2018,
arXiv:1802.02246, eq. (2.3)), and every step runs the preset on f_lower * `LOWER_SCALE` / L_g and
f_upper * `UPPER_SCALE` / L_F: the default `lower_lr = 0.1` becomes 1 / L_g (gradient descent at
1/L, linear rate 1 - mu_g / L_g on a strongly convex LL; Nesterov, "Introductory Lectures on
Convex Optimization", 2004, Thm. 2.1.15), `upper_lr = 0.1` becomes 0.02 / L_F (L_F is taken at theta0 only, and the UL curvature
changes along the path: 0.1 / L_F diverged on a logistic HPO). With full batches
(`batch_size` None, or a default `batch_size` at least the smaller level's number of samples:
then the preset draws the whole data) decaying step sizes, whose purpose is to average out sampling noise, are constant.
Step sizes passed explicitly are used as given on the problem as given (no wrapper).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
import inspect
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax.algorithms.base import Algorithm, State, Wrapper
from bilevel_jax.algorithms.parallel import replace_parts
from bilevel_jax.algorithms.steps import StepRule
from bilevel_jax.sampling import full, num_samples
from bilevel_jax.schedules import InversePower
from bilevel_jax.problem import check_data_pair

PyTree = Any

LOWER_SCALE = 10.0     # the LL objective's curvature after rescaling: lower_lr = 0.1 acts as 1 / L_g
UPPER_SCALE = 0.2      # the UL value's curvature after rescaling: upper_lr = 0.1 acts as 0.02 / L_F
POWER_STEPS = 20       # power iterations for each curvature
NEWTON_STEPS = 5      # Newton-CG steps towards phi*(theta0) before the UL curvature
CG_STEPS = 50          # CG steps of the implicit system inside the UL curvature estimate

# arguments that do not carry the objectives' units: passing them keeps the rescaling
STRUCTURAL = frozenset({
    "batch_size", "sampler", "mode", "check", "mesh", "shards", "precision", "lower_steps", "tracker_steps", "neumann_steps",
    "linear_solver", "warm_start", "lower_set", "saga_init", "period", "shared_batch", "control", "directions",
    "num_directions", "correction", "exact_residual", "hinge", "upper_decay", "lower_decay", "tracker_decay",
    "strongly_convex", "horizon", "hessian_tracking", "m_start", "inc", "every", "m_max", "m0", "momentum",
    "upper_momentum", "lower_momentum", "hessian_momentum", "restart_lower_decay", "variant", "penalty_power"})


def _unit(tree):
    norm = otu.tree_norm(tree)
    return otu.tree_scale(1.0 / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny), tree)


def _power(matvec, x0, steps: int):
    """lambda_max of a symmetric PSD operator by `steps` power iterations from x0: the Rayleigh quotient."""
    x = jax.lax.fori_loop(0, steps, lambda _, x: _unit(matvec(x)), _unit(x0))
    return otu.tree_vdot(x, matvec(x))


def _ones(tree):
    return jax.tree_util.tree_map(lambda x: None if x is None else jnp.ones_like(x), tree)


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


def curvatures(problem, theta, phi, data):
    """(L_g, L_F) at (theta, phi) on the full data (the module docstring)."""
    upper, lower = (None, None) if data is None else data
    t, p = oracles.differentiable(theta), oracles.differentiable(phi)

    def hvp(u, t=t, p=p):
        return oracles.hvp(problem, t, p, u, lower)

    l_g = _power(hvp, _ones(p), POWER_STEPS)
    p = _newton(problem, t, p, lower)

    def hypergrad(t, p):
        g_t, g_p = oracles.upper_grads(problem, t, p, upper)
        v = _cg(lambda u: oracles.hvp(problem, t, p, u, lower), g_p, CG_STEPS)
        return otu.tree_sub(g_t, oracles.cross(problem, t, p, v, lower))

    def hess_f(u):
        d_theta = jax.jvp(lambda s: oracles.lower_grad_phi(problem, s, p, lower), (t,), (u,))[1]
        w = otu.tree_scale(-1.0, _cg(hvp, d_theta, CG_STEPS))
        return jax.jvp(hypergrad, (t, p), (u, w))[1]

    l_f = jnp.abs(_power(hess_f, _ones(t), POWER_STEPS))
    return l_g, l_f


class Scales(NamedTuple):
    """The positive factors of f_upper and f_lower."""

    upper: jax.Array
    lower: jax.Array


def scales_at(problem, theta, phi, data) -> Scales:
    """`Scales` from `curvatures` (a curvature that is zero or not finite gives factor 1)."""
    l_g, l_f = curvatures(problem, theta, phi, data)

    def factor(c, target):
        good = jnp.isfinite(c) & (c > 0)
        return jnp.where(good, target / jnp.where(good, c, 1.0), 1.0)

    return Scales(factor(l_f, UPPER_SCALE), factor(l_g, LOWER_SCALE))


def scaled_problem(problem, scales: Scales):
    """`problem` with f_upper * scales.upper and f_lower * scales.lower (same solution set)."""
    def times(fn, s):
        return lambda theta, phi, batch: s * fn(theta, phi, batch)

    return dataclasses.replace(problem, f_upper=times(problem.f_upper, scales.upper),
                               f_lower=times(problem.f_lower, scales.lower))


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


class NormalizedState(State):
    """The wrapped algorithm's state (its header is this state's) and the objectives' factors found
    at `init`."""

    inner: State
    scales: Scales

    header = property(lambda self: self.inner.header)
    v = property(lambda self: getattr(self.inner, "v", None))


class Normalized(Wrapper):
    """A preset built with its default step sizes, run on the problem rescaled at `init` (the
    module docstring). `init` needs `data` unless the objectives take no data."""

    default_batch: bool = eqx.field(static=True, default=True)
    preset: str = eqx.field(static=True, default="preset")

    def _at(self, scales: Scales, data) -> Algorithm:
        if data is not None:
            check_data_pair(data)   # the preset's own message for data that is not an (upper, lower) pair
        alg = _full_batch(self.algorithm, data) if self.default_batch else self.algorithm
        return replace_parts(alg, lambda q: scaled_problem(q, scales), lambda s: s)

    def init(self, theta0, phi0, key, data=None) -> NormalizedState:
        # the preset's own checks of the key, the data and the objectives first (errors before any estimate)
        unit = Scales(jnp.ones(()), jnp.ones(()))
        eqx.filter_eval_shape(lambda: self._at(unit, data).init(theta0, phi0, key, data))
        if data is None:
            try:
                eqx.filter_eval_shape(self.algorithm.problem.f_lower, theta0, phi0, None)
            except Exception as e:   # noqa: BLE001 - the objectives need data
                raise ValueError(f"{self.preset}: built without step sizes, init estimates them on the data: "
                                 "pass `data` to init (or upper_lr= and lower_lr= to the preset).") from e
        scales = scales_at(self.algorithm.problem, self.algorithm.problem.project(theta0), phi0, data)
        return NormalizedState(self._at(scales, data).init(theta0, phi0, key, data), scales)

    def update(self, state: NormalizedState, data):
        inner, info = self._at(state.scales, data).update(state.inner, data)
        return NormalizedState(inner, state.scales), info


def auto_scaled(build):
    """Preset decorator: called without any argument outside `STRUCTURAL`, the preset is wrapped
    in `Normalized` (step sizes relative to the curvatures estimated at `init`)."""
    neumann = "neumann_steps" in inspect.signature(build).parameters

    @functools.wraps(build)
    def preset(problem, *args, **kwargs):
        alg = build(problem, *args, **kwargs)
        if args or set(kwargs) - STRUCTURAL:
            return alg
        if neumann and "neumann_steps" not in kwargs:
            warnings.warn(
                f"{build.__name__}: without step sizes the Neumann series of v runs at eta = 1 / L_g, and its default "
                "N = 10 terms keep a relative bias (1 - mu_g / L_g)^N on v (0.90 at condition number 100; Ji, Yang "
                "& Liang 2021, arXiv:2010.07962, Lemma 3): pass neumann_steps= (about 3 L_g / mu_g for 5% bias) "
                "or the step sizes (upper_lr=, lower_lr=, neumann_eta=).", stacklevel=3)
        return Normalized(alg, "batch_size" not in kwargs, build.__name__)

    preset.__doc__ = (build.__doc__ or "") + (
        "\n\n    Defaults: called without step sizes (no `*_lr`, `*_opt`, penalty or solver-step argument),"
        "\n    the preset runs on the problem rescaled at `init` so that the default `lower_lr` acts as"
        "\n    1 / L_g and `upper_lr` as 0.02 / L_F, curvatures estimated from HVPs at (theta0, phi0) on the"
        "\n    full data (`bj.algorithms.defaults`); `init` then needs `data`. Passing any step size uses"
        "\n    every value as given." + ("\n    Without step sizes and `neumann_steps`, a warning names the truncation bias"
                                  "\n    (1 - mu_g / L_g)^N of v at eta = 1 / L_g." if neumann else ""))
    preset.__signature__ = inspect.signature(build)
    return preset


__all__ = ["LOWER_SCALE", "Normalized", "NormalizedState", "STRUCTURAL", "Scales", "UPPER_SCALE", "auto_scaled",
           "curvatures", "scaled_problem", "scales_at"]

"""The generic bilevel loop every preset of `bj.algorithms` is built from.

One outer iteration k (a `lax.scan` body; the whole run is a nested scan, see `bj.run`):

    1. LL phase     phi <- `lower_steps` steps of `lower_opt` on grad_phi f_lower(theta_k, ., xi_t)
                    (0 steps: single loop; T steps: double loop, warm-started at phi_k)
    2. directions   raw oracles at (theta_k, phi, v_k) on fresh UL/LL minibatches, passed through
                    an `estimator` (SGD, STORM, SAGA, SARAH), combined by the direction rule into
                    D_theta [, D_phi, D_v]
    3. steps        theta_{k+1} = P_Theta(theta_k + upper_opt(D_theta))
                    phi  <- phi + lower_opt(D_phi)     (rules that move phi with theta)
                    v    <- v + v_opt(D_v)             (amortized v, SOBA-type)

Step rules are optax transforms (so schedules, momentum, clipping come from optax); a swept step
size (an array under `vmap`) goes straight into `optax.sgd`.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms import estimators as est
from bilevel_jax.algorithms.base import (Algorithm, BilevelState, OracleCounts, StepInfo, check_key, guard_finite,
                                         step_key)
from bilevel_jax.algorithms.directions import DirectionRule, Point
from bilevel_jax.hypergrad.inner import lower_steps as run_lower_steps
from bilevel_jax.problem import BilevelProblem, check_data_pair
from bilevel_jax.sampling import Sampler, check_fits, make_sampler, num_batches, num_samples

UPPER_STREAM, LOWER_STREAM, SOLVER_STREAM = 0, 1, 2

BatchSize = Union[None, int, Tuple[Optional[int], Optional[int]]]


def make_samplers(batch_size: BatchSize, sampler: str) -> Tuple[Sampler, Sampler]:
    """(upper, lower) samplers; `batch_size` is one size for both levels or a pair."""
    sizes = batch_size if isinstance(batch_size, tuple) else (batch_size, batch_size)
    if len(sizes) != 2:
        raise ValueError(f"batch_size must be None, an int or an (upper, lower) pair, got {batch_size!r}.")
    return make_sampler(sizes[0], sampler), make_sampler(sizes[1], sampler)


def _check_data(data, samplers):
    check_data_pair(data)
    for name, d, s in zip(("upper data", "lower data"), data, samplers):
        check_fits(s, d, name)


def _apply(opt, direction, opt_state, params):
    updates, opt_state = opt.update(direction, opt_state, oracles.differentiable(params))
    return eqx.apply_updates(params, updates), opt_state


def bilevel_loop(problem: BilevelProblem, *, direction: DirectionRule,
                 upper_opt: optax.GradientTransformation,
                 lower_opt: Optional[optax.GradientTransformation] = None, lower_steps: int = 0,
                 v_opt: Optional[optax.GradientTransformation] = None,
                 estimator: Optional[est.Estimator] = None, batch_size: BatchSize = None,
                 sampler: str = "iid", mode: str = "rev", check_finite: bool = False) -> Algorithm:
    """Compose an `Algorithm` from a direction rule, step rules, LL steps and an estimator.

    Args:
      problem: the `BilevelProblem`.
      direction: `directions.partial()`, `implicit(solver, warm_start)` or `amortized()`.
      upper_opt / lower_opt / v_opt: optax transforms for theta, phi and v.
      lower_steps: LL steps per outer step before the directions (0 = single loop).
      estimator: `estimators.sgd()` (default), `storm`, `saga`, `sarah`.
      batch_size: None (full batch), an int, or an (upper, lower) pair.
      sampler: "iid", "shuffled" or "partition" (SAGA memories need "partition").
      mode: "rev" or "fwd" second-order products.
      check_finite: raise (`eqx.error_if`) when an iterate becomes non-finite; the finiteness is
        always reported in `step_info.finite`.
    """
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem must be a bj.BilevelProblem, got {type(problem).__name__}.")
    if not isinstance(direction, DirectionRule):
        raise TypeError(f"direction must be a DirectionRule, got {direction!r}.")
    check_positive_int("lower_steps", lower_steps, minimum=0)
    estimator = est.sgd() if estimator is None else estimator
    if estimator.needs_separable and not direction.separable:
        raise ValueError(f"the {estimator.name} estimator needs per-level raw oracles; "
                         f"the {direction.name} direction rule does not provide them.")
    if estimator.needs_separable and sampler != "partition":
        raise ValueError(f"the {estimator.name} estimator indexes memories by batch id: use sampler='partition'.")
    if (lower_steps > 0 or direction.name == "amortized") and lower_opt is None:
        raise ValueError("lower_opt is required when phi is updated.")
    if direction.name == "amortized" and v_opt is None:
        raise ValueError("the amortized direction rule needs v_opt (the step rule of v).")
    samplers = make_samplers(batch_size, sampler)
    upper_sampler, lower_sampler = samplers
    draws = lower_steps + 1

    def evaluate(point, batches, data, state):
        lower_data = data[1]
        sample_lower = lambda key: lower_sampler.sample(lower_data, key, 0)[0]
        return direction.evaluate(problem, point, batches[0], batches[1], step_key(state, SOLVER_STREAM),
                                  sample_lower, mode)

    def init(theta0, phi0, key, data=None) -> BilevelState:
        check_key(key)
        theta0 = problem.project(theta0)
        if data is not None:
            _check_data(data, samplers)
            problem.validate(theta0, phi0, data)
        v, aux = direction.init(theta0, phi0)
        phi_d = oracles.differentiable(phi0)
        state = BilevelState(
            theta=theta0, phi=phi0, count=jnp.zeros((), jnp.int32), key=key, v=v,
            lower_opt_state=None if lower_opt is None else lower_opt.init(phi_d),
            upper_opt_state=upper_opt.init(oracles.differentiable(theta0)),
            v_opt_state=None if (v_opt is None or v is None) else v_opt.init(v),
            aux=aux, estimator=None)
        if estimator.name == "sgd":
            return state
        if data is None:
            raise ValueError(f"init needs `data` to size the {estimator.name} estimator's state.")
        point = Point(theta0, phi0, v, aux)
        batches = (upper_sampler.sample(data[0], key, 0)[0], lower_sampler.sample(data[1], key, 0)[0])
        raw_like = jax.eval_shape(lambda: evaluate(point, batches, data, state).raw)
        raw_like = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), raw_like)
        n_batches = (num_batches(upper_sampler, data[0]), num_batches(lower_sampler, data[1]))
        return state._replace(estimator=estimator.init(raw_like, point, n_batches))

    def update(state: BilevelState, data):
        _check_data(data, samplers)
        upper_data, lower_data = data
        key_up = jax.random.fold_in(state.key, UPPER_STREAM)
        key_low = jax.random.fold_in(state.key, LOWER_STREAM)
        first_draw = state.count * draws
        phi, lower_state = state.phi, state.lower_opt_state
        if lower_steps > 0:
            batch_fn = lambda t: lower_sampler.sample(lower_data, key_low, first_draw + t)[0]
            phi, lower_state = run_lower_steps(problem, lower_opt, state.theta, phi, lower_state,
                                               lower_steps, batch_fn)
        upper_batch, up_id = upper_sampler.sample(upper_data, key_up, state.count)
        lower_batch, low_id = lower_sampler.sample(lower_data, key_low, first_draw + lower_steps)
        point = Point(state.theta, phi, state.v, state.aux)
        raw_fn = lambda pt, batches: evaluate(pt, batches, data, state)
        raw, ev, est_state, mult = estimator.estimate(raw_fn, point, state.estimator, state.count,
                                                      (upper_batch, lower_batch), data, (up_id, low_id))
        dirs = direction.combine(raw)

        theta, upper_state = _apply(upper_opt, dirs.theta, state.upper_opt_state, state.theta)
        theta = problem.project(theta)
        if dirs.phi is not None:
            phi, lower_state = _apply(lower_opt, dirs.phi, lower_state, phi)
        v, v_state = ev.v, state.v_opt_state
        if dirs.v is not None:
            v, v_state = _apply(v_opt, dirs.v, v_state, state.v)

        theta, finite = guard_finite(theta, phi, v, check_finite)
        counts = OracleCounts.of(lower_grads=lower_steps) + _scale_counts(ev.counts, mult, data, samplers)
        new_state = BilevelState(theta, phi, state.count + 1, state.key, v, lower_state, upper_state,
                                 v_state, ev.aux, est_state)
        return new_state, StepInfo(counts, jnp.asarray(ev.residual_norm, jnp.result_type(float)), finite)

    return Algorithm(init, update)


def _scale_counts(counts: OracleCounts, mult, data, samplers) -> OracleCounts:
    """Oracle counts times the estimator's evaluations; mult == -1 is one full pass over the data
    (SARAH refresh), i.e. n / batch_size minibatch oracles per level."""
    def passes(d, s):
        n = num_samples(d)
        return 1 if (s.batch_size is None or n is None) else n // s.batch_size

    up, low = passes(data[0], samplers[0]), passes(data[1], samplers[1])
    m_up = jnp.where(mult < 0, up, mult)
    m_low = jnp.where(mult < 0, low, mult)
    return OracleCounts(counts.lower_grads * m_low, counts.upper_grads * m_up, counts.hvps * m_low,
                        counts.cross * m_low)

"""The generic bilevel loop every implicit-gradient preset of `bj.algorithms` is built from.

One outer iteration k (a `lax.scan` body; the whole run is a nested scan, see `bj.run`), written
with the public primitives of `bj.algorithms.steps`:

    1. LL phase     phi <- `lower_steps` steps of the LL rule on grad_phi f_lower(theta_k, ., xi_t)
                    (0 steps: single loop; T steps: double loop, warm-started at phi_k); or, with
                    `lower_recursion`, on the estimator's recursive estimate of D_phi (VRBO's inner
                    SARAH loop: the rule's other variables and the UL estimate recurse with it)
    2. directions   the direction rule's oracles at (theta_k, phi, rule state) on fresh UL/LL
                    minibatches, through an estimator (SGD, STORM, SAGA, SARAH), into
                    D_theta [, D_phi]; the rule moves its own variables (SOBA's v)
    3. steps        theta_{k+1} = P_Theta(theta_k + upper rule(D_theta))
                    phi  <- phi + lower rule(D_phi)     (rules that move phi with theta; a projected
                                                         LL rule projects onto Phi(theta_{k+1}))
    4. finish       status (solver breakdown, non-finite, invalid step) and the oracle counts, from the
                    oracle functions the step called (`bj.oracles.counting`)
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms import estimators as est
from bilevel_jax.algorithms.base import Header, State, step_key
from bilevel_jax.algorithms.directions import DirectionRule, Point
from bilevel_jax.algorithms.steps import (SOLVER_STREAM, Batches, Composed, Rule, apply_step, as_rule, check_data,
                                          draw_batches, lower_phase)
from bilevel_jax.problem import BilevelProblem, check_problem
from bilevel_jax.sampling import BLOCK_SAMPLERS, Sampler, make_sampler, num_batches

PyTree = Any
BatchSize = Union[None, int, Tuple[Optional[int], Optional[int]]]


def make_samplers(batch_size: BatchSize, sampler: str) -> Tuple[Sampler, Sampler]:
    """(upper, lower) samplers; `batch_size` is one size for both levels or a pair."""
    sizes = batch_size if isinstance(batch_size, tuple) else (batch_size, batch_size)
    if len(sizes) != 2:
        raise ValueError(f"batch_size must be None, an int or an (upper, lower) pair, got {batch_size!r}.")
    return make_sampler(sizes[0], sampler), make_sampler(sizes[1], sampler)


def full_batches(data) -> Batches:
    """The whole data as the batches of a step (a SARAH refresh)."""
    zero = jnp.zeros((), jnp.int32)
    return Batches(data[0], data[1], zero, zero, lambda t: data[1], lambda key: data[1])


def passes(samplers: Tuple[Sampler, Sampler], data) -> Tuple[int, int]:
    """How many minibatch oracles one full pass over each level's data counts as."""
    def one(s, d):
        n = s.shard_size(d)
        return 1 if (s.batch_size is None or n is None) else n // s.local_batch_size

    return one(samplers[0], data[0]), one(samplers[1], data[1])


class LoopState(State):
    """The state of `bilevel_loop` algorithms.

    direction: the direction rule's state (a linear solver's state, SOBA's v and its optax state);
    estimator: the estimator's state (momentum, SAGA memories, previous point).
    """

    header: Header
    direction: Any
    estimator: Any = None

    @property
    def v(self):
        """The linear-system variable v ~ A^{-1} grad_phi f_upper (None for IG-free rules)."""
        return getattr(self.direction, "v", None)


class BilevelLoop(Composed):
    """See the module docstring; build with `bilevel_loop` or a preset."""

    direction: DirectionRule
    estimator: est.Estimator
    lower_steps: int = eqx.field(static=True, default=0)
    mode: str = eqx.field(static=True, default="rev")
    lower_recursion: bool = eqx.field(static=True, default=False)
    name: str = eqx.field(static=True, default="bilevel_loop", kw_only=True)

    def _evaluate(self, key):
        return lambda point, batches: self.direction.evaluate(self.problem, point, batches, key, self.mode)

    def init(self, theta0, phi0, key, data=None) -> LoopState:
        head = self.start(theta0, phi0, key, data)
        theta0 = head.theta
        state = LoopState(head, self.direction.init(theta0, phi0))
        if isinstance(self.estimator, est.SGD):
            return state
        if data is None:
            raise ValueError(f"{self.name}: init needs `data` to size the estimator's state.")
        point = Point(theta0, phi0, state.direction)
        batches = draw_batches(self.samplers, data, key, 0)
        like = eqx.filter_eval_shape(lambda: self._evaluate(key)(point, batches).oracles)
        like = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
        n_batches = (num_batches(self.samplers[0], data[0]), num_batches(self.samplers[1], data[1]))
        evaluate = self._evaluate(step_key(key, 0, SOLVER_STREAM))

        def oracles_at(i, j):
            upper, lower = self.samplers[0].block(data[0], i), self.samplers[1].block(data[1], j)
            return evaluate(point, Batches(upper, lower, i, j, lambda t: lower, lambda k: lower)).oracles

        return LoopState(head, state.direction, self.estimator.init(like, point, n_batches, oracles_at))

    def update(self, state: LoopState, data):
        count = state.count
        batches = self.batches(state, data, self.lower_steps)
        rule_state, est_state = state.direction, state.estimator
        with oracles.counting() as tally:
            if self.lower_recursion:
                phi, lower_state, rule_state, est_state, ll_status = self._recursive_phase(state, batches)
            else:
                phi, lower_state, ll_status = lower_phase(
                    self.problem, self.lower, state.theta, state.phi, state.lower_opt_state, self.lower_steps,
                    batches.lower_at, count)
            point = Point(state.theta, phi, rule_state)
            estimate, ev, est_state = self.estimator.estimate(
                self._evaluate(step_key(state.key, count, SOLVER_STREAM)), point, est_state, count, batches,
                full_batches(data), passes(self.samplers, data))
        dirs = self.direction.directions(estimate)

        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, dirs.theta, count,
                                                   self.problem.project)
        low_status = st.ok()
        if dirs.phi is not None and not self.lower_recursion:   # (projected onto Phi(theta_{k+1}))
            phi, lower_state, low_status = apply_step(self.lower, phi, lower_state, dirs.phi, count, theta=theta)
        rule_state, rule_status = self.direction.advance(ev.rule_state, estimate, count)

        (theta, phi, rule_state), info = self.finish(
            (theta, phi, rule_state), tally.counts, ev.residual_norm,
            (ll_status, ev.status, up_status, low_status, rule_status))
        return LoopState(state.header.next(theta, phi, upper_state, lower_state), rule_state, est_state), info

    def _recursive_phase(self, state: LoopState, batches: Batches):
        """The recursive LL phase at theta_k (VRBO's inner loop, Yang, Ji & Liang 2021,
        arXiv:2106.04692, Algorithm 2): for t < T, on fresh UL and LL batches xi_t,

            d_t = o(theta_k, phi_t; xi_t) + d_{t-1} - o(z_prev; xi_t)      (`Recursive.recurse`)
            phi_{t+1} = phi_t + lower rule(D_phi(d_t)),   the rule's own variables advance on d_t

        where z_prev is the previous evaluation point (at t = 0: theta_{k-1} and the phi of the
        last direction, so the first difference carries the change of theta). Outer step 0 has no
        LL phase: the recursion starts from the first direction estimate (a refresh).
        Returns `(phi, lower_state, rule_state, estimator_state, status)`."""
        count = state.count
        key = step_key(state.key, count, SOLVER_STREAM)
        zero = jnp.zeros((), jnp.int32)
        # the carry's array leaves go through scan and cond; static leaves (a Module's functions) are closed over
        dyn0, static = eqx.partition((state.phi, state.lower_opt_state, state.direction, state.estimator, st.ok()),
                                     eqx.is_array)

        def step(dyn, t):
            phi, lower_state, rule_state, est_state, status = eqx.combine(dyn, static)
            phase = Batches(batches.upper_at(t), batches.lower_at(t), zero, zero, batches.lower_at,
                            batches.fresh_lower)
            evaluate = self._evaluate(jax.random.fold_in(key, t + 1))
            estimate, ev, est_state = self.estimator.recurse(
                evaluate, Point(state.theta, phi, rule_state), est_state, count, phase)
            phi, lower_state, low_status = apply_step(self.lower, phi, lower_state,
                                                      self.direction.directions(estimate).phi, count,
                                                      theta=state.theta)
            rule_state, rule_status = self.direction.advance(ev.rule_state, estimate, count)
            status = st.merge(status, ev.status, low_status, rule_status)
            return eqx.filter((phi, lower_state, rule_state, est_state, status), eqx.is_array), None

        def run():
            with oracles.counting(times=self.lower_steps):
                return jax.lax.scan(step, dyn0, jnp.arange(self.lower_steps))[0]

        with oracles.uncounted() as phase:
            dyn = jax.lax.cond(count > 0, run, lambda: dyn0)
        oracles.record(jax.tree_util.tree_map(lambda c: jnp.where(count > 0, c, 0), phase.counts))
        phi, lower_state, rule_state, est_state, status = eqx.combine(dyn, static)
        return phi, lower_state, rule_state, est_state, status


def bilevel_loop(problem: BilevelProblem, *, direction: DirectionRule, upper_opt: Rule,
                 lower_opt: Optional[Rule] = None, lower_steps: int = 0,
                 estimator: Optional[est.Estimator] = None, batch_size: BatchSize = None,
                 sampler: str = "iid", mode: str = "rev", check: bool = False,
                 name: str = "bilevel_loop", lower_recursion: bool = False) -> BilevelLoop:
    """Compose an `Algorithm` from a direction rule, step rules, LL steps and an estimator.

    Args:
      problem: the `BilevelProblem`.
      direction: `directions.partial()`, `implicit(solver)` or `amortized(v_rule)`.
      upper_opt / lower_opt: the step rules of theta and phi: optax transforms (`optax.sgd(0.1)`)
        or `StepRule`s (`bj.algorithms.steps.step_rule`, whose step sizes are sweepable fields).
      lower_steps: LL steps per outer step before the directions (0 = single loop).
      lower_recursion: the LL steps move phi along the estimator's recursive estimate of D_phi
        instead of plain LL gradients, and the rule's own variables and the UL estimate recurse
        with them (`_recursive_phase`; VRBO's inner loop); needs a `Recursive` estimator (STORM,
        SARAH), a rule with D_phi (e.g. `implicit(solver, simultaneous=True)`) and `lower_steps`
        >= 1; phi is not moved again after the theta step.
      estimator: `estimators.sgd()` (default), `storm`, `saga`, `sarah`.
      batch_size: None (full batch), an int, or an (upper, lower) pair.
      sampler: "iid" (gathers b random samples: the theorems' sampling, slowest on CPU),
        "shuffled" (random reshuffling of contiguous blocks, read in place) or "partition"
        (uniformly drawn contiguous blocks, read in place); SAGA memories need a block sampler.
      mode: "rev" or "fwd" second-order products.
      check: raise (under jit, `bj.status.raise_if`) when a step's status is not OK; the status
        is always reported in `step_info.status`.
      name: the preset's name, used in error messages.
    """
    check_problem(problem, name)
    if not isinstance(direction, DirectionRule):
        raise TypeError(f"{name}: direction must be a DirectionRule, got {direction!r}.")
    check_positive_int("lower_steps", lower_steps, minimum=0)
    oracles.check_mode(mode)
    estimator = est.sgd() if estimator is None else estimator
    if estimator.needs_separable and not direction.separable:
        raise ValueError(f"{name}: the {type(estimator).__name__} estimator needs per-level oracles; "
                         f"the {type(direction).__name__} direction rule does not provide them.")
    if estimator.needs_separable and sampler not in BLOCK_SAMPLERS:
        raise ValueError(f"{name}: the {type(estimator).__name__} estimator indexes memories by batch id: "
                         "use sampler='partition' or sampler='shuffled'.")
    if lower_recursion and not (isinstance(estimator, est.Recursive) and direction.moves_phi and lower_steps >= 1):
        raise ValueError(f"{name}: lower_recursion needs a recursive estimator (estimators.sarah / storm), a direction "
                         "rule with an LL direction (implicit(..., simultaneous=True), amortized) and lower_steps >= 1.")
    if (lower_steps > 0 or direction.moves_phi) and lower_opt is None:
        raise ValueError(f"{name}: lower_opt (the step rule of phi) is required when phi is updated.")
    upper = as_rule("upper_opt", upper_opt)
    lower = None if lower_opt is None else as_rule("lower_opt", lower_opt)
    return BilevelLoop(problem, upper, lower, make_samplers(batch_size, sampler), direction, estimator, lower_steps,
                       mode, bool(lower_recursion), check=check, name=name)


__all__ = ["BilevelLoop", "LoopState", "bilevel_loop", "check_data", "full_batches", "make_samplers", "passes"]

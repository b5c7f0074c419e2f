"""Public step primitives: the pieces an outer iteration is composed of.

    header = start(problem, samplers, theta0, phi0, key, data, upper=rule, lower=rule)  # init: the state's Header
    batches = draw_batches(samplers, data, key, count, lower_steps)      # draw batches
    with bj.oracles.counting() as tally:                                  # count the oracle calls
        phi, s, status = lower_phase(problem, rule, theta, phi, s, T, batches.lower_at, count)  # LL phase
        ... evaluate a direction rule or `bj.hypergrad.implicit_direction` ...   # evaluate
    theta, s, status = apply_step(rule, theta, s, direction, count, project)  # apply a step, project
    trees, info = finish((theta, phi, v), tally.counts, residual, statuses, check=...)  # counts, finiteness

`bilevel_loop` (every implicit-gradient preset) and `stable` are written with these and nothing
private; a new method (extra variables, another order of steps) is another composition of them:
a `Composed` subclass whose state is a `bj.algorithms.State` (its `Header` from `start`, then the
method's own variables) and whose oracle counts are those the oracle functions record in the
step's `bj.oracles.counting` block (no count is written by hand).

A `StepRule` is how one variable moves: an optax transform, built inside the step from an array
step size or a schedule Module (so the step size is a sweepable array field), or a whole optax
rule given by the user (`optax.adam(1e-3)`), kept as a static field.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_step_size
from bilevel_jax.algorithms.base import Algorithm, Header, OracleCounts, StepInfo, check_key
from bilevel_jax.constraints import projected
from bilevel_jax.lower import lower_steps as run_lower_steps
from bilevel_jax.problem import BilevelProblem, check_data_pair
from bilevel_jax.sampling import Sampler, check_fits
from bilevel_jax.schedules import InversePower, inverse_power

PyTree = Any
UPPER_STREAM, LOWER_STREAM, SOLVER_STREAM, PHASE_UPPER_STREAM = 0, 1, 2, 3


class StepRule(eqx.Module):
    """The step rule of one variable.

    learning_rate: an array or a schedule Module (sweepable), None when `optimizer` is given.
    schedule: a plain-function schedule (e.g. an optax schedule), kept static.
    optimizer: a whole optax rule given by the user, kept static (step-size validity unknown).
    transform: `learning_rate -> optax rule` (default `optax.sgd`).
    projection: `(theta, params) -> params`, a Euclidean projection applied after every step
      (projected steps onto a feasible set Phi(theta), `bj.constraints.ProjectionAt`), kept
      static; None for plain steps.
    """

    learning_rate: Any = None
    schedule: Optional[Callable] = eqx.field(static=True, default=None)
    optimizer: Optional[optax.GradientTransformation] = eqx.field(static=True, default=None)
    transform: Callable = eqx.field(static=True, default=optax.sgd)
    projection: Optional[Callable] = eqx.field(static=True, default=None)

    def build(self, theta=None) -> optax.GradientTransformationExtraArgs:
        """The optax rule (accepting `value`, `grad`, `value_fn` extra arguments); with a
        `projection`, its steps projected onto the feasible set at `theta`
        (`bj.constraints.projected`): the rule of an LL variable at the current UL point. The
        optax state does not depend on theta (`init_rule` builds without it)."""
        if self.optimizer is not None:
            rule = self.optimizer
        else:
            rule = self.transform(self.schedule if self.schedule is not None else self.learning_rate)
        if self.projection is not None:
            rule = projected(rule, functools.partial(self.projection, theta))
        return optax.with_extra_args_support(rule)

    def status(self, count) -> jax.Array:
        """INVALID_STEP when the step size is not a positive finite number (a traced sweep value
        included); OK for a user's optax rule, whose step size is its own."""
        if self.optimizer is not None:
            return st.ok()
        if self.schedule is not None:
            values = (self.schedule(count),)
        elif isinstance(self.learning_rate, InversePower):
            values = (self.learning_rate.c, self.learning_rate.offset)
        elif callable(self.learning_rate):
            values = (self.learning_rate(count),)
        else:
            values = (self.learning_rate,)
        good = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v) & (v > 0)) for v in map(jnp.asarray, values)]))
        return st.flag(~good, st.INVALID_STEP)


def step_rule(name: str, value=None, *, optimizer: Optional[optax.GradientTransformation] = None,
              exponent: float = 0.0, every: int = 1, transform: Callable = optax.sgd) -> StepRule:
    """A `StepRule` from a preset's arguments.

    `optimizer` (a whole optax rule) wins over `value`. Otherwise `value` is a float/array (made
    into `value / (k // every + 1)^exponent` when `exponent` > 0, k the optimiser's step count) or
    a schedule used as given. Bad values raise naming `name`.
    """
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"{name.replace('_lr', '_opt')} must be an optax GradientTransformation "
                            f"(e.g. optax.adam(1e-3)), got {type(optimizer).__name__}.")
        return StepRule(optimizer=optimizer, transform=transform)
    check_step_size(name, value)
    if isinstance(value, eqx.Module):
        return StepRule(learning_rate=value, transform=transform)
    if callable(value):
        return StepRule(schedule=value, transform=transform)
    if isinstance(exponent, numbers.Number) and exponent == 0:
        return StepRule(learning_rate=as_array(value), transform=transform)
    return StepRule(learning_rate=inverse_power(value, exponent, every=every), transform=transform)


Rule = Union[StepRule, optax.GradientTransformation]


def as_rule(name: str, rule: Rule) -> StepRule:
    """A `StepRule`, or an optax transform wrapped as one (named `name` in errors)."""
    if isinstance(rule, StepRule):
        return rule
    if isinstance(rule, optax.GradientTransformation):
        return StepRule(optimizer=rule)
    raise TypeError(f"{name} must be an optax GradientTransformation or a StepRule, got {type(rule).__name__}.")


def apply_step(rule: StepRule, params: PyTree, opt_state, direction: PyTree, count,
               project: Optional[Callable] = None, theta=None) -> Tuple[PyTree, Any, jax.Array]:
    """params <- project(params + rule(direction)); only the inexact-array leaves move. `theta`:
    the UL point whose feasible set Phi(theta) the rule's own projection (an LL variable's
    projected steps, `StepRule.projection`) projects onto.

    Returns `(params, opt_state, status)`, status INVALID_STEP when the step size is invalid."""
    updates, opt_state = rule.build(theta).update(direction, opt_state, oracles.differentiable(params))
    params = eqx.apply_updates(params, updates)
    if project is not None:
        params = project(params)
    return params, opt_state, rule.status(count)


def init_rule(rule: Optional[StepRule], params: PyTree):
    """The optax state of `rule` for `params` (None without a rule)."""
    return None if rule is None else rule.build().init(oracles.differentiable(params))


class Batches(NamedTuple):
    """The batches of one outer iteration and how to draw more."""

    upper: PyTree
    lower: PyTree
    upper_id: jax.Array
    lower_id: jax.Array
    lower_at: Callable   # t -> the LL batch of LL-phase step t
    fresh_lower: Callable  # key -> an independent LL batch (a stochastic solver's factors)
    upper_at: Optional[Callable] = None  # t -> a UL batch for LL-phase step t (a recursive LL phase)


def draw_batches(samplers: Tuple[Sampler, Sampler], data, key: jax.Array, count, lower_steps: int = 0,
                 rows: bool = False) -> Batches:
    """The batches of outer iteration `count`: `lower_steps` LL-phase batches, then one UL and
    one LL batch for the directions. Draws are numbered per level from the root `key`, so a run
    is reproducible and the samplers need no state. `upper_at(t)` draws UL batches for the
    LL-phase steps from a stream of their own (only a recursive LL phase, whose steps evaluate
    the hypergradient, draws them). `rows=True`: contiguous blocks as `sampling.Rows`, cut by the
    oracles sub-batch by sub-batch (a problem with `sample_chunk`)."""
    upper_sampler, lower_sampler = samplers
    upper_data, lower_data = data
    key_up = jax.random.fold_in(key, UPPER_STREAM)
    key_low = jax.random.fold_in(key, LOWER_STREAM)
    key_phase = jax.random.fold_in(key, PHASE_UPPER_STREAM)
    first = count * (lower_steps + 1)
    upper, up_id = upper_sampler.sample(upper_data, key_up, count, rows)
    lower, low_id = lower_sampler.sample(lower_data, key_low, first + lower_steps, rows)
    return Batches(upper, lower, up_id, low_id,
                   lambda t: lower_sampler.sample(lower_data, key_low, first + t, rows)[0],
                   lambda k: lower_sampler.sample(lower_data, k, 0, rows)[0],
                   lambda t: upper_sampler.sample(upper_data, key_phase, count * lower_steps + t, rows)[0])


def lower_phase(problem: BilevelProblem, rule: StepRule, theta, phi, opt_state, steps: int,
                batch_at: Callable, count) -> Tuple[PyTree, Any, jax.Array]:
    """`steps` LL steps of `rule` at fixed theta (projected onto Phi(theta) when the rule is):
    `(phi, opt_state, status)`; its oracle calls (`steps` LL gradients) go to the open
    `bj.oracles.counting` block."""
    if steps == 0:
        return phi, opt_state, st.ok()
    phi, opt_state = run_lower_steps(problem, rule.build(theta), theta, phi, opt_state, steps, batch_at)
    return phi, opt_state, rule.status(count)


def check_data(data, samplers: Tuple[Sampler, Sampler]) -> None:
    """`data` is an (upper, lower) pair that the samplers can draw from (clear errors otherwise)."""
    check_data_pair(data)
    for name, d, s in zip(("upper data", "lower data"), data, samplers):
        check_fits(s, d, name)


def start(problem: BilevelProblem, samplers: Tuple[Sampler, Sampler], theta0, phi0, key, data=None, *,
          upper: Optional[StepRule], lower: Optional[StepRule]) -> Header:
    """The checks every `init` makes before building a state (a PRNG key, data the samplers fit
    and the objectives accept, when `data` is given) and the state's `Header`: P_Theta(theta0),
    phi0, count 0, the key and the optax states of the step rules `upper` (theta) and `lower`
    (phi; None when phi has no rule)."""
    check_key(key)
    theta0 = problem.project(theta0)
    if data is not None:
        check_data(data, samplers)
        problem.validate(theta0, phi0, data)
    return Header(theta0, phi0, jnp.zeros((), jnp.int32), key, init_rule(upper, theta0), init_rule(lower, phi0))


class Composed(Algorithm):
    """Base of the algorithms composed of these primitives: their problem, the step rules of theta
    (`upper`) and phi (`lower`; None when phi has no rule), the (upper, lower) samplers, and as
    keywords `check` (raise under jit when a step's status is not OK) and `name` (the method, in
    error messages). `start`, `batches` and `finish` are `start`, `check_data` + `draw_batches`
    and `finish` with these."""

    problem: BilevelProblem = eqx.field(static=True)
    upper: StepRule
    lower: Optional[StepRule]
    samplers: Tuple[Sampler, Sampler] = eqx.field(static=True)
    check: bool = eqx.field(static=True, default=False, kw_only=True)
    name: str = eqx.field(static=True, default="algorithm", kw_only=True)

    def start(self, theta0, phi0, key, data=None) -> Header:
        """The init checks and the state's `Header` (`start`)."""
        return start(self.problem, self.samplers, theta0, phi0, key, data, upper=self.upper, lower=self.lower)

    def batches(self, state, data, lower_steps: int = 0) -> Batches:
        """The batches of the outer iteration at `state.count`, after checking `data`."""
        check_data(data, self.samplers)
        return draw_batches(self.samplers, data, state.key, state.count, lower_steps,
                            rows=getattr(self.problem, "sample_chunk", None) is not None)

    def finish(self, trees: Tuple, counts: OracleCounts, residual_norm, statuses=()) -> Tuple[Tuple, StepInfo]:
        """`finish` of an outer step of this algorithm."""
        return finish(trees, counts, residual_norm, statuses, check=self.check, where=f"{self.name} outer step",
                      nonfinite=self.nonfinite_every_step)


def finish(trees: Tuple, counts: OracleCounts, residual_norm, statuses=(), *, check: bool = False,
           where: str = "outer step", nonfinite: bool = True) -> Tuple[Tuple, StepInfo]:
    """The end of an outer iteration: its status (the given ones, and NONFINITE when a leaf of
    `trees` is not finite) and its `StepInfo`. With `check`, the first tree carries a runtime
    error (`bj.status.raise_if`) naming the cause when the status is not OK.

    With `nonfinite=False` (an algorithm's `nonfinite_every_step`, False in `bj.run`'s scan) and
    without `check`, the NONFINITE test of `trees` is not made here: `bj.run` tests the whole state
    at its evaluation points instead, so the scan body makes no reduction over the iterates. The
    given statuses (a solver's BREAKDOWN, an INVALID_STEP) are scalars the step computes anyway and
    are always reported."""
    if not nonfinite and not check:
        status = st.merge(*statuses)
    else:
        status = st.merge(*statuses, st.nonfinite(*trees))
    if check:
        trees = (st.raise_if(trees[0], status, where),) + tuple(trees[1:])
    return trees, StepInfo(counts, jnp.asarray(residual_norm, float_dtype(trees)), status)


def float_dtype(trees):
    """The dtype of the iterates' first floating leaf (the run's precision: a float32 run reports
    float32 residuals under x64 too); the default float when there is none."""
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(trees) if eqx.is_inexact_array(leaf)]
    return leaves[0].dtype if leaves else jnp.result_type(float)


__all__ = ["check_data", "float_dtype", "start", "Batches", "Composed", "Rule", "StepRule", "apply_step", "as_rule", "draw_batches", "finish", "init_rule", "lower_phase",
           "step_rule",
           "LOWER_STREAM", "PHASE_UPPER_STREAM", "SOLVER_STREAM", "UPPER_STREAM"]

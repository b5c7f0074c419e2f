"""`Algorithm`: the interface of every bilevel algorithm (optax-style init/update, as a Module).

    state = alg.init(theta0, phi0, key, data=None)      # data only to size memories/check shapes
    state, step_info = alg.update(state, data)           # one outer iteration; pure, jittable

An algorithm is an equinox Module: its array hyperparameters (step sizes, momentum weights,
schedule constants) are fields, its configuration (loop lengths, samplers, the problem) static
fields. So `jax.jit(lambda alg, s, d: alg.update(s, d))` and `eqx.filter_jit(alg.update)` compile
once for two equal configurations, and a sweep can `vmap` over the array fields
(`eqx.partition(alg, eqx.is_array)`). (`jax.jit(alg.update)` itself does not work: a bound method
with array fields is not hashable; use `eqx.filter_jit`.)

Every state is a `State`: its `header` (a `Header`: `theta`, `phi`, `count` (outer iterations
done), `key` (the run's root PRNG key: per-step keys are derived with `fold_in(key, count)`, so the
key never changes) and the optax states of theta's and phi's step rules) comes first, the
algorithm's own variables after it; `state.theta`, `state.phi`, `state.count`, `state.key` read the
header. `bj.run`, checkpoints and the wrappers read states through it (`header`). `step_info`
carries the oracle calls of the step, the residual of its linear solve and its `bj.status` code.
"""

import abc
import dataclasses
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
from equinox import AbstractVar
import jax
import jax.numpy as jnp

from bilevel_jax import status as st
from bilevel_jax.algorithms.capabilities import presets_with
from bilevel_jax.oracles import OracleCounts
from bilevel_jax.problem import check_optimistic
from bilevel_jax.rebuild import rebuild

PyTree = Any


class Algorithm(eqx.Module):
    """Base class of the bilevel algorithms.

    An algorithm built on a constrained problem (`BilevelProblem.lower_inequality` /
    `lower_equality`) must honour the constraints, by its own account (`handles_constraints`) or
    its direction rule's (a `handles_constraints` class attribute, as the KKT rules of
    `bj.algorithms.constrained` have); otherwise construction raises instead of silently solving
    the unconstrained problem. Likewise a pessimistic problem (`BilevelProblem(..., pessimistic=True)`)
    is refused by every algorithm but those that solve it (`handles_pessimistic`, as
    `bj.algorithms.pessimistic_penalty` has). The refusals name the presets tagged "constrained" or
    "pessimistic" in `bj.algorithms.CAPABILITIES`, which the tests hold to these attributes.

    `nonfinite_every_step` (static, default True): every `update` tests its iterates for NaN/inf
    and reports NONFINITE in its status. `bj.run` builds its scan with False (`without_nonfinite_test`)
    and tests the whole state at its evaluation points instead (a non-finite iterate persists, so
    the per-step reduction over every leaf is not needed to report it); `check=True` steps always
    test (they must raise at the failing step)."""

    handles_constraints: ClassVar[bool] = False
    handles_pessimistic: ClassVar[bool] = False
    nonfinite_every_step: bool = eqx.field(static=True, default=True, kw_only=True)

    def __check_init__(self):
        problem = getattr(self, "problem", None)
        rule = getattr(self, "direction", None)
        if getattr(problem, "constrained", False) and not (self.handles_constraints
                                                           or getattr(rule, "handles_constraints", False)):
            name = getattr(self, "name", None)
            raise ValueError(f"{name + ': ' if isinstance(name, str) else ''}the problem's lower level is constrained "
                             "(lower_inequality / lower_equality) and this algorithm would ignore the constraints. "
                             f"Constrained lower levels: {', '.join(presets_with('constrained'))} "
                             "(bj.algorithms.CAPABILITIES), or bilevel_loop(direction=bj.algorithms.kkt(problem)).")
        if not self.handles_pessimistic:
            name = getattr(self, "name", None)
            check_optimistic(problem, name if isinstance(name, str) else type(self).__name__)

    @abc.abstractmethod
    def init(self, theta0: PyTree, phi0: PyTree, key: jax.Array, data: Any = None):
        """The state before the first outer iteration."""

    @abc.abstractmethod
    def update(self, state, data):
        """One outer iteration: `(new_state, StepInfo)`."""


def without_nonfinite_test(alg: "Algorithm") -> "Algorithm":
    """`alg` with `nonfinite_every_step=False` in itself and every algorithm it wraps."""
    def off(x):
        if isinstance(x, Algorithm) and x.nonfinite_every_step:
            return rebuild(dataclasses.replace(x, nonfinite_every_step=False), off)
        return x

    return rebuild(alg, off)


class Wrapper(Algorithm):
    """An algorithm that runs another one (`algorithm`) in another way (data-parallel, rescaled
    defaults): its configuration (problem, name, lower_steps, ...) is the wrapped algorithm's, and
    the wrapped algorithm made its own checks of a constrained or pessimistic problem when built."""

    algorithm: Algorithm
    handles_constraints: ClassVar[bool] = True
    handles_pessimistic: ClassVar[bool] = True

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.algorithm, name)


class Header(NamedTuple):
    """What every algorithm state starts with (`State.header`).

    theta, phi: the iterates; count: outer iterations done (int32); key: the run's root PRNG key;
    upper_opt_state, lower_opt_state: the optax states of theta's and phi's step rules (None for a
    variable without a rule).
    """

    theta: PyTree
    phi: PyTree
    count: Any
    key: Any
    upper_opt_state: Any
    lower_opt_state: Any

    def next(self, theta, phi, upper_opt_state, lower_opt_state) -> "Header":
        """The header after an outer iteration that moved the iterates to (theta, phi): count + 1,
        the same key."""
        return Header(theta, phi, self.count + 1, self.key, upper_opt_state, lower_opt_state)


class State(eqx.Module):
    """Base of the algorithm states: the `Header` first (a field `header: Header` of the concrete
    state; a wrapper's state, such as `defaults.NormalizedState`, gives its inner state's as a
    property), then the algorithm's own variables (a linear solver's state, momenta, a tracker).
    A pytree: states go through `lax.scan`, `vmap`, `shard_map` and `eqx.tree_serialise_leaves`."""

    header: AbstractVar[Header]

    theta = property(lambda self: self.header.theta)
    phi = property(lambda self: self.header.phi)
    count = property(lambda self: self.header.count)
    key = property(lambda self: self.header.key)
    upper_opt_state = property(lambda self: self.header.upper_opt_state)
    lower_opt_state = property(lambda self: self.header.lower_opt_state)


def header(state: State) -> Header:
    """The `Header` of an algorithm state (what `bj.run` and checkpoints read)."""
    return state.header


class StepInfo(NamedTuple):
    """What an outer iteration reports.

    oracles: its `OracleCounts`.
    residual_norm: ||b - A v|| of its linear solve (NaN when not computed, or stochastic).
    status: a `bj.status` code (OK, BREAKDOWN, NONFINITE, INVALID_STEP, OR-ed).
    """

    oracles: OracleCounts
    residual_norm: jax.Array
    status: jax.Array

    @property
    def finite(self) -> jax.Array:
        """No NONFINITE flag: all iterates (and oracles) finite after the step."""
        return (self.status & st.NONFINITE) == 0


def check_key(key) -> None:
    """A PRNG key (`jax.random.key` / `jax.random.PRNGKey`, or a batch of them under `vmap`)."""
    ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                         or (key.dtype == jnp.uint32 and key.shape == (2,)))
    if not ok:
        raise TypeError(f"key must be a PRNG key (jax.random.PRNGKey / jax.random.key), got {key!r}.")


def step_key(key: jax.Array, count, stream: int) -> jax.Array:
    """The PRNG key of `stream` at outer iteration `count` (sampler keys use the root key and a
    draw counter instead, see `bj.sampling`)."""
    return jax.random.fold_in(jax.random.fold_in(key, stream), count)


__all__ = ["Algorithm", "Header", "OracleCounts", "State", "StepInfo", "Wrapper", "check_key", "header",
           "step_key"]

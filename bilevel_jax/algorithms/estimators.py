"""Estimators of a direction rule's oracles: plain minibatch (SGD), STORM momentum, SAGA memories
and SARAH recursions. An estimator only sees `evaluate(point, batches) -> Evaluation`.

- `sgd()`      : d_k = o(z_k; xi_k).
- `storm(a)`   : d_k = o(z_k; xi_k) + a_k (d_{k-1} - o(z_{k-1}; xi_k)), the same sample at the
                 current and previous point (Cutkosky & Orabona 2019, arXiv:1905.10018). MRBO (Yang,
                 Ji, Liang 2021, arXiv:2106.04692) and SUSTAIN (Khanduri et al. 2021,
                 arXiv:2102.07367) use a_k = 1 - eta_k; the bilevel momentum h_k = grad_k +
                 eta (h_{k-1} - grad_{k-1}) is a = eta. FSLA (Li, Gu, Huang 2022, arXiv:2112.04660)
                 applies it to its hypergradient estimate only (`bj.algorithms.fsla`; a rule's other
                 oracles are left out with `mask=`).
- `saga()`     : per batch id, d = new - mem[id] + mean(mem); mean += (new - mem[id]) / n;
                 mem[id] = new (Defazio, Bach, Lacoste-Julien 2014, arXiv:1407.0202), one table per
                 level with its own batch ids: SABA (Dagreou et al. 2022, arXiv:2201.13409).
- `sarah(q)`   : every q steps d = o(z_k; full data); else d = d_{k-1} + o(z_k; xi) - o(z_{k-1}; xi)
                 (Nguyen et al. 2017, arXiv:1703.00102): SRBA (Dagreou et al. 2023,
                 arXiv:2302.08766), VRBO (Yang, Ji, Liang 2021).

`mask` and per-leaf weights are pytree prefixes of the rule's typed oracles (e.g.
`directions.Joint(hypergrad=0.5, grad_phi=0.9)`), as in `optax.masked`; a leaf with no weight
(False in the mask, None as weight) is the plain minibatch estimate. Each estimator owns its state
type; its oracle calls are counted by the oracle functions the evaluations call
(`bj.oracles.counting`), a vmapped pair of evaluations twice, a refresh as one pass over the data.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.directions import Evaluation, Point
from bilevel_jax.algorithms.steps import Batches
from bilevel_jax.schedules import as_schedule

PyTree = Any


class Estimator(eqx.Module):
    """Base class of the estimators.

    `estimate(evaluate, point, state, count, batches, full, passes)` returns `(estimate,
    evaluation at point, new state)`; `full` are the whole-data batches and `passes` =
    (n_upper // b_upper, n_lower // b_lower), the minibatch oracles one full pass counts as.
    """

    needs_separable: ClassVar[bool] = False

    def init(self, oracles_like: PyTree, point: Point, n_batches: Tuple[int, int], oracles_at: Callable):
        """The estimator's state. `oracles_like`: zeros shaped like the oracles; `n_batches`: the
        batch ids per level; `oracles_at(i, j)`: the oracles at `point` on UL batch i and LL
        batch j (only memories that start filled call it)."""
        return None

    @abc.abstractmethod
    def estimate(self, evaluate: Callable, point: Point, state, count, batches: Batches, full: Batches,
                 passes: Tuple[int, int]):
        """See the class docstring."""


class SGD(Estimator):
    """The plain minibatch estimate."""

    def estimate(self, evaluate, point, state, count, batches, full, passes):
        ev = evaluate(point, batches)
        return ev.oracles, ev, state


def _both_points(evaluate, point, prev, batches) -> Tuple[Evaluation, PyTree]:
    """`evaluate` at z_k and z_{k-1} as one vmapped call over the two points: what depends only on
    the batches and keys (minibatch draws, e.g. a stochastic solver's fresh batch per factor) is
    computed once (and the oracle calls counted twice)."""
    dyn, static = eqx.partition(point, eqx.is_array)
    dyn_prev, _ = eqx.partition(prev, eqx.is_array)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), dyn, dyn_prev)
    with oracles.counting(times=2):
        both = jax.vmap(lambda d: evaluate(eqx.combine(d, static), batches))(stacked)
    return jax.tree_util.tree_map(lambda x: x[0], both), jax.tree_util.tree_map(lambda x: x[1], both.oracles)


class RecursiveState(NamedTuple):
    d: PyTree       # the last estimate d_{k-1}
    prev: Point     # z_{k-1}


def _is_weight(x) -> bool:
    return x is None or callable(x)


class Recursive(Estimator):
    """d_k = o(z_k) + w_k (d_{k-1} - o(z_{k-1})) on the leaves with a weight (STORM: w = a_k;
    SARAH: w = 1), d_0 = o(z_0); with `refresh_period`, d = o(z_k; full data) every period steps.

    weights: one schedule for every leaf, or a pytree prefix of the oracles with a schedule or
      None (no recursion) per subtree.
    mask: a pytree prefix of bools selecting the leaves that recurse (None: all).
    joint: evaluate both points in one vmapped call (see `_both_points`).
    """

    weights: Any
    mask: Any = eqx.field(static=True, default=None)
    refresh_period: Optional[int] = eqx.field(static=True, default=None)
    joint: bool = eqx.field(static=True, default=False)

    def init(self, oracles_like, point, n_batches, oracles_at):
        return RecursiveState(otu.tree_zeros_like(oracles_like), point)

    def _weights(self, oracles):
        weights = self.weights
        if callable(weights) and self.mask is not None:
            mask = self.mask(oracles) if callable(self.mask) else self.mask
            weights = jax.tree_util.tree_map(lambda m: weights if m else None, mask)
        return weights

    def recurse(self, evaluate, point, state, count, batches, current: Optional[Evaluation] = None):
        """One recursion d = o(z; xi) + w_k (d_prev - o(z_prev; xi)) on `batches`, the same sample
        at z = `point` and z_prev = `state.prev`, without the refresh: `(estimate, evaluation at
        point, new state)`. `estimate` is this plus the periodic refresh; a
        recursive LL phase (VRBO's inner loop, `bilevel_loop(lower_recursion=True)`) calls it
        once per LL step. `current`: the evaluation at `point` when the caller has made it (FSLA's
        hypergradient shares the linearization of its v step); only z_prev is evaluated then."""
        if current is not None:
            ev, old = current, evaluate(state.prev, batches).oracles
        elif self.joint:
            ev, old = _both_points(evaluate, point, state.prev, batches)
        else:
            ev = evaluate(point, batches)
            old = evaluate(state.prev, batches).oracles

        def one(schedule, new, d, o):
            if schedule is None:
                return new
            w = jnp.where(count > 0, schedule(count), 0.0)
            return otu.tree_add_scale(new, w, otu.tree_sub(d, o))

        weights = self._weights(ev.oracles)
        out = jax.tree_util.tree_map(one, weights, ev.oracles, state.d, old, is_leaf=_is_weight)
        return out, ev, RecursiveState(out, point)

    def estimate(self, evaluate, point, state, count, batches, full, passes):
        if self.refresh_period is None:
            return self.recurse(evaluate, point, state, count, batches)
        # a refresh step counts one pass over the data (`passes` minibatch oracles), a recursion its two evaluations
        refresh = (count % self.refresh_period) == 0
        with oracles.uncounted() as recursion:
            out, ev, _ = self.recurse(evaluate, point, state, count, batches)
        with oracles.uncounted() as refreshed:
            fresh = jax.lax.cond(refresh, lambda: evaluate(point, full).oracles, lambda: out)
        out = jax.tree_util.tree_map(lambda w, f, r: r if w is None else f, self._weights(ev.oracles), fresh, out,
                                     is_leaf=_is_weight)
        oracles.record(jax.tree_util.tree_map(lambda a, b: jnp.where(refresh, a, b),
                                              refreshed.counts.scaled(*passes), recursion.counts))
        return out, ev, RecursiveState(out, point)


class Memory(NamedTuple):
    table: PyTree   # one row per batch id
    mean: PyTree    # the mean of the rows


class SagaState(NamedTuple):
    upper: Memory
    lower: Memory


class SAGA(Estimator):
    """SAGA memories indexed by batch id, one table per level.

    init="point" (default): every row is the oracle at the initial point on its batch and the
    mean is their mean (the SAGA initialisation of Dagreou et al. 2022, Sec. 3; costs one pass
    over each level's batches at `init`, not counted in the steps' oracle calls); init="zero":
    zero rows and mean (benchmark_bilevel's default), so the first steps are biased towards 0.
    """

    init_rows: str = eqx.field(static=True, default="point")
    needs_separable: ClassVar[bool] = True

    def __check_init__(self):
        if self.init_rows not in ("point", "zero"):
            raise ValueError(f"saga init must be 'point' or 'zero', got {self.init_rows!r}.")

    def init(self, oracles_like, point, n_batches, oracles_at):
        if self.init_rows == "zero":
            def memory(part, n):
                table = jax.tree_util.tree_map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)), part)
                return Memory(table, otu.tree_zeros_like(part))

            return SagaState(memory(oracles_like.upper, n_batches[0]), memory(oracles_like.lower, n_batches[1]))
        zero = jnp.zeros((), jnp.int32)
        upper = jax.lax.map(lambda i: oracles_at(i, zero).upper, jnp.arange(n_batches[0]))
        lower = jax.lax.map(lambda j: oracles_at(zero, j).lower, jnp.arange(n_batches[1]))
        mean = lambda table: jax.tree_util.tree_map(lambda t: t.mean(0), table)
        return SagaState(Memory(upper, mean(upper)), Memory(lower, mean(lower)))

    def estimate(self, evaluate, point, state, count, batches, full, passes):
        ev = evaluate(point, batches)

        def level(memory, new, idx):
            leaves = jax.tree_util.tree_leaves(memory.table)
            n = leaves[0].shape[0] if leaves else 1
            old = jax.tree_util.tree_map(lambda m: m[idx], memory.table)
            out = jax.tree_util.tree_map(lambda a, o, mu: a - o + mu, new, old, memory.mean)
            table = jax.tree_util.tree_map(lambda m, a: m.at[idx].set(a), memory.table, new)
            mean = jax.tree_util.tree_map(lambda mu, a, o: mu + (a - o) / n, memory.mean, new, old)
            return out, Memory(table, mean)

        up, mem_up = level(state.upper, ev.oracles.upper, batches.upper_id)
        low, mem_low = level(state.lower, ev.oracles.lower, batches.lower_id)
        return type(ev.oracles)(up, low), ev, SagaState(mem_up, mem_low)


def sgd() -> SGD:
    return SGD()


def storm(momentum=0.9, mask=None, joint: bool = False) -> Recursive:
    """STORM with weight `momentum` = a_k (float, array or schedule) on the leaves selected by
    `mask` (all by default), or per-subtree weights as a pytree prefix of the oracles.
    `joint=True` evaluates the current and previous points in one vmapped call, so minibatches
    drawn inside the direction rule (a stochastic solver's factors) are drawn once, not twice."""
    if callable(momentum) or not isinstance(momentum, tuple):
        weights = as_schedule(momentum)
    else:
        weights = jax.tree_util.tree_map(lambda w: None if w is None else as_schedule(w), momentum,
                                         is_leaf=lambda x: x is None)
    return Recursive(weights, mask, None, joint)


class _One(eqx.Module):
    def __call__(self, count):
        return 1.0


def sarah(period: int, mask=None) -> Recursive:
    """SARAH recursion, refreshed with the full data every `period` outer steps."""
    check_positive_int("period", period)
    return Recursive(_One(), mask, period, False)


def saga(init: str = "point") -> SAGA:
    """SAGA memories; `init` = "point" (oracles at the initial point) or "zero"."""
    return SAGA(init)


__all__ = ["Estimator", "Memory", "Recursive", "RecursiveState", "SAGA", "SGD", "SagaState", "saga", "sarah", "sgd",
           "storm"]

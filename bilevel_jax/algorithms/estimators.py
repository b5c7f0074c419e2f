"""Estimators of the raw oracle outputs of a direction rule: plain minibatch (SGD), STORM
momentum, SAGA memories and SARAH recursions. An estimator only sees `raw_fn(point, batches)`.

- `sgd()`      : d_k = raw(z_k; xi_k).
- `storm(a)`   : d_k = raw(z_k; xi_k) + a_k (d_{k-1} - raw(z_{k-1}; xi_k)), the same sample at
                 the current and previous point (Cutkosky & Orabona 2019). MRBO (Yang et al. 2021)
                 and SUSTAIN (Khanduri et al. 2021) use a_k = 1 - eta_k; the bi-level momentum of
                 seeds 001/002 eq. 21-22 is a = eta (h_k = grad_k + eta (h_{k-1} - grad_{k-1})).
                 FSLA (Li et al. 2022) applies it to the UL direction only (`keys=`).
- `saga()`     : per batch id, d = new - mem[id] + mean(mem); mean += (new - mem[id]) / n;
                 mem[id] = new (Defazio et al. 2014), separately for the "upper" and "lower" raw
                 parts with their own batch ids: SABA (Dagreou et al. 2022, seed 003).
- `sarah(q)`   : every q steps d = raw(z_k; full data); else d = d_{k-1} + raw(z_k; xi) - raw(z_{k-1}; xi)
                 (Nguyen et al. 2017): SRBA (Dagreou et al. 2023), VRBO (Yang et al. 2021).

`estimate(raw_fn, point, prev_state, count, batches, full_data, ids, n_batches)` returns
(raw estimate, the current point's Evaluation, new state, oracle-count multiplier).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax._checks import check_positive_int
from bilevel_jax.schedules import as_schedule

PyTree = Any


class Estimator(NamedTuple):
    init: Callable       # (raw_like, point, n_batches: (int, int)) -> state
    estimate: Callable
    needs_separable: bool
    name: str


def _weights(raw: dict, weights: dict):
    """Per raw leaf (by second-level key): its recursion weight schedule, or None (plain estimate)."""
    return {lvl: {k: weights.get(k, weights.get(None)) for k in part} for lvl, part in raw.items()}


def sgd() -> Estimator:
    def init(raw_like, point, n_batches):
        return None

    def estimate(raw_fn, point, state, count, batches, full_data, ids):
        ev = raw_fn(point, batches)
        return ev.raw, ev, state, jnp.asarray(1, jnp.int32)

    return Estimator(init, estimate, False, "sgd")


def _joint_raw(raw_fn, point, prev, batches):
    """raw_fn at z_k and z_{k-1} as one vmapped evaluation over the two points: what depends only on
    the batches and keys (minibatch draws, e.g. the fresh batch of every HIA factor) is computed once."""
    dyn, static = eqx.partition(point, eqx.is_array)
    dyn_prev, _ = eqx.partition(prev, eqx.is_array)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), dyn, dyn_prev)
    both = jax.vmap(lambda d: raw_fn(eqx.combine(d, static), batches))(stacked)
    return jax.tree_util.tree_map(lambda x: x[0], both), jax.tree_util.tree_map(lambda x: x[1], both.raw)


def _recursive(weights: dict, refresh_period: Optional[int], joint: bool = False):
    """d_k = raw(z_k) + w_k (d_{k-1} - raw(z_{k-1})) on the leaves with a weight (STORM: w = a_k;
    SARAH: w = 1), d_0 = raw(z_0); with `refresh_period`, a full-data raw every period.
    `weights` maps raw keys (None: every key) to schedules; `joint`: see `_joint_raw`."""

    def init(raw_like, point, n_batches):
        return {"d": otu.tree_zeros_like(raw_like), "prev": point}

    def estimate(raw_fn, point, state, count, batches, full_data, ids):
        if joint:
            ev, old = _joint_raw(raw_fn, point, state["prev"], batches)
        else:
            ev = raw_fn(point, batches)
            old = raw_fn(state["prev"], batches).raw

        def recurse(schedule, new, d, o):
            if schedule is None:
                return new
            w = jnp.where(count > 0, schedule(count), 0.0)
            return otu.tree_add_scale(new, w, otu.tree_sub(d, o))

        sched = _weights(ev.raw, weights)
        rec = jax.tree_util.tree_map(recurse, sched, ev.raw, state["d"], old,
                                     is_leaf=lambda x: x is None or callable(x))
        mult = jnp.asarray(2, jnp.int32)
        if refresh_period is not None:
            refresh = (count % refresh_period) == 0
            full = jax.lax.cond(refresh, lambda: raw_fn(point, full_data).raw, lambda: rec)
            rec = jax.tree_util.tree_map(lambda s, f, r: r if s is None else f, sched, full, rec,
                                         is_leaf=lambda x: x is None or callable(x))
            mult = jnp.where(refresh, -1, mult)  # -1: "one full pass", resolved by the loop
        return rec, ev, {"d": rec, "prev": point}, mult

    return init, estimate


def storm(momentum=0.9, keys: Optional[Sequence[str]] = None, joint: bool = False) -> Estimator:
    """STORM with weight `momentum` = a_k (float, array or schedule) on the raw leaves `keys`
    (all by default; e.g. ("g_theta", "cross") for the UL direction only), or a dict
    {raw key: weight} for per-direction weights (the bi-level momentum's eta_u, eta_l).
    `joint=True` evaluates the current and previous points in one vmapped call, so that minibatches
    drawn inside the direction rule (a stochastic linear solver's factors) are drawn once, not twice."""
    if isinstance(momentum, dict):
        weights = {k: as_schedule(w) for k, w in momentum.items()}
    else:
        weights = {k: as_schedule(momentum) for k in (keys if keys is not None else [None])}
    init, estimate = _recursive(weights, None, joint)
    return Estimator(init, estimate, False, "storm")


def sarah(period: int, keys: Optional[Sequence[str]] = None) -> Estimator:
    """SARAH recursion, refreshed with the full data every `period` outer steps."""
    check_positive_int("period", period)
    one = lambda count: 1.0
    init, estimate = _recursive({k: one for k in (keys if keys is not None else [None])}, period)
    return Estimator(init, estimate, False, "sarah")


def saga() -> Estimator:
    """SAGA memories indexed by batch id, one table per level ("zero" initialisation)."""

    def init(raw_like, point, n_batches):
        tables = {}
        for lvl, n in zip(("upper", "lower"), n_batches):
            part = raw_like.get(lvl, {})
            tables[lvl] = {"mem": jax.tree_util.tree_map(lambda x: jnp.zeros((n,) + jnp.shape(x), jnp.result_type(x)), part),
                           "mean": otu.tree_zeros_like(part)}
        return tables

    def estimate(raw_fn, point, state, count, batches, full_data, ids):
        ev = raw_fn(point, batches)
        out, new_state = {}, {}
        for lvl, idx in zip(("upper", "lower"), ids):
            mem, mean = state[lvl]["mem"], state[lvl]["mean"]
            n = jax.tree_util.tree_leaves(mem)[0].shape[0] if jax.tree_util.tree_leaves(mem) else 1
            old = jax.tree_util.tree_map(lambda m: m[idx], mem)
            out[lvl] = jax.tree_util.tree_map(lambda new, o, mu: new - o + mu, ev.raw[lvl], old, mean)
            new_state[lvl] = {
                "mem": jax.tree_util.tree_map(lambda m, new: m.at[idx].set(new), mem, ev.raw[lvl]),
                "mean": jax.tree_util.tree_map(lambda mu, new, o: mu + (new - o) / n, mean, ev.raw[lvl], old),
            }
        return out, ev, new_state, jnp.asarray(1, jnp.int32)

    return Estimator(init, estimate, True, "saga")

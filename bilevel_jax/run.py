"""`bj.run`: an algorithm's iterations as a nested `lax.scan`, with metrics inside the scan.

    state, history = bj.run(alg, state, data, num_steps=1000, eval_every=100, eval_fn=fn)

The inner scan makes `eval_every` outer iterations; the outer scan records, after each block,
`eval_fn(state, data)` (a dict of scalars), the cumulative oracle counts, the last residual norm
and whether all iterates stayed finite. History arrays have `num_steps // eval_every + 1` rows
(row 0: the initial state). No host round-trip happens inside, so `jax.jit` and `jax.vmap` over
seeds (a batch of states), hyperparameters (build the algorithm inside the vmapped function) or
tasks (data with an extra leading axis) apply to the whole run.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.base import Algorithm, OracleCounts


def _record(state, data, eval_fn, totals: OracleCounts, residual, finite):
    metrics = dict(eval_fn(state, data)) if eval_fn is not None else {}
    rec = {"step": state.count, "residual_norm": residual, "finite": finite, **totals._asdict()}
    clash = set(metrics) & set(rec)
    if clash:
        raise ValueError(f"eval_fn metrics {sorted(clash)} clash with run's own history keys.")
    rec.update({k: jnp.asarray(v) for k, v in metrics.items()})
    return rec


def run(alg: Algorithm, state, data, num_steps: int, eval_every: Optional[int] = None,
        eval_fn: Optional[Callable] = None):
    """Run `num_steps` outer iterations of `alg` from `state` on `data`.

    Returns `(final_state, history)`; history is a dict of arrays (see module docstring).
    """
    if not isinstance(alg, Algorithm):
        raise TypeError(f"alg must be a bj.Algorithm, got {type(alg).__name__}.")
    check_positive_int("num_steps", num_steps)
    eval_every = num_steps if eval_every is None else check_positive_int("eval_every", eval_every)
    if num_steps % eval_every:
        raise ValueError(f"num_steps={num_steps} must be a multiple of eval_every={eval_every}.")

    def inner(state, _):
        state, info = alg.update(state, data)
        return state, info

    def block(carry, _):
        state, totals, finite = carry
        state, infos = jax.lax.scan(inner, state, None, length=eval_every)
        totals = totals + OracleCounts(*(c.sum(dtype=jnp.int32) for c in infos.oracles))
        finite = finite & jnp.all(infos.finite)
        return (state, totals, finite), _record(state, data, eval_fn, totals, infos.residual_norm[-1], finite)

    zero = OracleCounts.of()
    first = _record(state, data, eval_fn, zero, jnp.asarray(jnp.nan, jnp.result_type(float)), jnp.asarray(True))
    (state, _, _), history = jax.lax.scan(block, (state, zero, jnp.asarray(True)), None,
                                          length=num_steps // eval_every)
    history = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b]), first, history)
    return state, history

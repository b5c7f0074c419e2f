"""`bj.run`: an algorithm's iterations as a nested `lax.scan`, with metrics inside the scan.

    state, history = bj.run(alg, state, data, num_steps=1000, eval_every=100, eval_fn=fn)

The inner scan makes `eval_every` outer iterations; the outer scan records, after each block,
`eval_fn(state, data)` (a dict of scalars or arrays), the cumulative oracle counts, the last
residual norm, the OR of the steps' status codes so far (`status`, see `bj.status`) and `finite`
(no NONFINITE flag so far).

A projected theta (`BilevelProblem.project_upper`) or a non-smooth UL term: ||grad F|| need not
vanish at a solution there; `eval_fn=bj.stationarity.measure(problem, grad_fn)` records the
gradient mapping (`grad_mapping_norm`, `prox_grad_mapping_norm`) next to `grad_norm`.

Nothing is computed at every step beyond the step itself and these running sums: the NONFINITE
flag comes from one test of the whole state (iterates, solver and estimator states) at each
evaluation point, not from a reduction over every leaf at every step (a NaN or inf in an iterate
stays there; a step's solver BREAKDOWN and INVALID_STEP flags are scalars it computes anyway and
are OR-ed at every step; the DIVERGING test below is made at log2(num_steps) steps). What a
run does not return is not computed: XLA removes the unused
parts of the carry (a jitted run whose history is discarded costs what the bare steps cost). History arrays have `num_steps // eval_every + 1` rows (row 0: the
initial state). No host round-trip happens inside, so `jax.jit` and `jax.vmap` (or
`eqx.filter_vmap` when the state holds an equinox model) over seeds, hyperparameters or tasks apply
to the whole run. The state may hold equinox Modules (a neural network as phi): only its array
leaves travel through the scans.

Divergence (`bj.status.DIVERGING`): at every outer step count 2k that is a power of two (counted
from the algorithm's own step count, so a resumed run keeps the schedule), the norm of the
iterates ||(theta, phi)|| is compared with its value at step k (at the run's start for the first
power of two): more than `bj.status.GROWTH_LIMIT` = 1000 times larger (or not finite while the
other was) flags the step DIVERGING. A converging run, or one that grows from zero or a small
start to its solution (at most a few-fold per doubling of the step count), is never flagged; a
geometric divergence by a factor r per step is flagged at the first power of two 2k with
r^k > 1000 (SABA with step sizes above 2 / L_g on a quadratic: r = 1.4, at step 64 with a norm of
~1e9; r = 1.011, at step 2048 with a norm of ~1e8), long before it overflows.

With `check=True`, a run called outside any `jit` raises `bj.status.BilevelError` naming the
first outer step whose status was not OK and the cause; under a trace it raises the runtime error
of `bj.status.raise_if` (the cause, without the step).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.experimental import io_callback

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import check_positive_int
from bilevel_jax.cache import same_code
from bilevel_jax.algorithms.base import Algorithm, OracleCounts, header
from bilevel_jax.algorithms.parallel import data_parallel
from bilevel_jax.algorithms.base import without_nonfinite_test
from bilevel_jax.algorithms.steps import float_dtype

_OWN_KEYS = ("step", "residual_norm", "finite", "status", *OracleCounts._fields)


def _record(state, data, eval_fn, totals: OracleCounts, residual, status):
    metrics = eval_fn(state, data) if eval_fn is not None else {}
    if not isinstance(metrics, dict):
        raise TypeError(f"eval_fn must return a dict of metrics (name -> array), got {type(metrics).__name__}.")
    clash = set(metrics) & set(_OWN_KEYS)
    if clash:
        raise ValueError(f"eval_fn metrics {sorted(clash)} clash with run's own history keys.")
    rec = {"step": header(state).count, "residual_norm": residual, "finite": (status & st.NONFINITE) == 0, "status": status,
           **totals._asdict()}
    rec.update({k: jnp.asarray(v) for k, v in metrics.items()})
    return rec


def _name(alg) -> str:
    return getattr(alg, "name", type(alg).__name__)


def _is_traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def run(alg: Algorithm, state, data, num_steps: int, eval_every: Optional[int] = None,
        eval_fn: Optional[Callable] = None, check: bool = False, progress: Optional[Callable] = None,
        mesh=None):
    """Run `num_steps` outer iterations of `alg` from `state` on `data`.

    Returns `(final_state, history)`; history is a dict of arrays (see module docstring).
    `mesh=` (a `jax.sharding.Mesh` with a `"data"` axis) runs the steps data-parallel:
    `bj.data_parallel(alg, mesh=mesh)` (place `data` with `bj.shard`).

    `progress(row)`, if given, is called on the host at every evaluation point after row 0, in
    order, with that point's history row (a dict of NumPy values), through an unordered
    `io_callback`: no host round trip at the other steps (e.g. `lambda row: bar.update(...)` for a
    tqdm bar). Under `jax.vmap` (over seeds, step sizes, tasks) it is called once per evaluation
    point for the whole batch: every value of the row carries the batch axes in front
    (`row["step"][i]`, `row[metric][i]` belong to batch element i, e.g. seed i). An exception
    raised by `progress` stops the run; `bj.run` re-raises it with its own type when called outside
    a trace (it then waits for the run to finish) or under an eager `jax.vmap`; under the caller's
    `jit` it surfaces as JAX's runtime error (whose message holds the original traceback) when the
    results are read. `progress` is part of the compiled program's configuration, as `eval_fn` is:
    both compare by code and closure (`bj.cache.SameCode`), so a lambda written again in the next
    call reuses the program.
    """
    if not isinstance(alg, Algorithm):
        raise TypeError(f"alg must be a bj.Algorithm (e.g. bj.algorithms.soba(problem)), got {type(alg).__name__}.")
    if mesh is not None:
        alg = data_parallel(alg, mesh=mesh)
    check_positive_int("num_steps", num_steps)
    eval_every = num_steps if eval_every is None else check_positive_int("eval_every", eval_every)
    if num_steps % eval_every:
        raise ValueError(f"num_steps={num_steps} must be a multiple of eval_every={eval_every}.")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable (state, data) -> dict, got {type(eval_fn).__name__}.")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (row: dict) -> None, got {type(progress).__name__}.")
    # compared by code and closure: a lambda written again in the next call is the same program
    eval_fn, progress = same_code(eval_fn), same_code(progress)
    traced = _is_traced((alg, state, data))
    if check and not traced:
        return raise_callback_errors(progress, _checked_run, alg, state, data, num_steps, eval_every, eval_fn,
                                     progress)
    # outside a trace: run to completion, the callback's exception re-raised with its type; under an
    # eager vmap the batched program runs here too (the same), under jit it is only traced here
    scan = functools.partial(raise_callback_errors, progress, _jit_scan, wait=not traced)
    (state, _), history = scan(alg, state, data, num_steps, eval_every, eval_fn, progress=progress)
    if check:
        state = st.raise_if(state, history["status"][-1], f"bj.run of {_name(alg)}")
    return state, history


# The exception a progress callback raised, by callback (a SameCode), until bj.run re-raises it.
_FAILED: dict = {}


def _call_progress(progress: Callable, row: dict) -> None:
    """Host side of `_report`: `progress` on NumPy values; its exception is kept for
    `raise_callback_errors` (XLA turns an exception in a host callback into a runtime error
    without its type)."""
    try:
        progress({k: np.asarray(v) for k, v in row.items()})
    except BaseException as e:
        _FAILED[progress] = e
        raise


def _report(progress: Optional[Callable], row: dict) -> None:
    """`progress(row)` on the host, once per call of the compiled program: under `vmap` once for the
    whole batch (a `custom_vmap` rule broadcasts the row's unbatched values and emits the batched
    row), not once per batch element as a batched `jax.debug.callback` would."""
    if progress is None:
        return

    @jax.custom_batching.custom_vmap
    def emit(row):
        io_callback(functools.partial(_call_progress, progress), None, row, ordered=False)
        return jnp.zeros((), jnp.int32)

    @emit.def_vmap
    def emit_batched(axis_size, in_batched, row):
        row = jax.tree_util.tree_map(
            lambda x, batched: x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x))), row, in_batched[0])
        return emit(row), False

    emit(row)


def raise_callback_errors(callback: Optional[Callable], fn: Callable, /, *args, wait: bool = True, **kwargs):
    """`fn(*args, **kwargs)`, run to completion when `wait`; when `callback` raised in a host
    callback meanwhile, its own exception (type, message, traceback) instead of XLA's runtime error."""
    if callback is None:
        return fn(*args, **kwargs)
    callback = same_code(callback)
    _FAILED.pop(callback, None)
    try:
        out = fn(*args, **kwargs)
        return jax.block_until_ready(out) if wait else out
    except jax.errors.JaxRuntimeError:
        error = _FAILED.pop(callback, None)
        if error is None:
            raise
        raise error from None


def _size(state) -> jax.Array:
    """||(theta, phi)||: the norm of the iterates' inexact leaves."""
    head = header(state)
    return otu.tree_norm(oracles.differentiable((head.theta, head.phi)))


def _growth(state, size):
    """(DIVERGING or OK, the reference size) after an outer step (module docstring): at step counts
    that are powers of two the iterates' norm is taken and compared with the reference, which it
    then replaces; between them nothing is computed (a `lax.cond`)."""
    count = jnp.asarray(header(state).count)

    def measure(reference):
        now = _size(state).astype(reference.dtype)
        grew = (now > st.GROWTH_LIMIT * reference) | (~jnp.isfinite(now) & jnp.isfinite(reference))
        return st.flag(grew & (reference > 0), st.DIVERGING), now

    return jax.lax.cond((count > 0) & ((count & (count - 1)) == 0), measure, lambda r: (st.ok(), r), size)


def _scan(alg, state, data, num_steps, eval_every, eval_fn, first_failure: bool = False, progress=None):
    """The nested scan; returns ((final state, (first failing step, its status)), history).

    The scan body is `alg.update` and the running sums of what it reports (oracle counts, status
    bits, the last residual): the non-finite test of the iterates is made on the whole state at
    the evaluation points (the algorithm rebuilt with `nonfinite_every_step=False`), not at every
    step. With
    `first_failure`, every step is tested and the first failing one is tracked (`check=True`
    outside a trace, which names it); otherwise (-1, OK) is returned."""
    if not first_failure:
        alg = without_nonfinite_test(alg)
    dynamic, static = eqx.partition(state, eqx.is_array)
    head = header(state)
    float_nan = jnp.asarray(jnp.nan, float_dtype((head.theta, head.phi)))   # the run's precision
    no_bad = (jnp.asarray(-1, jnp.int32), st.ok())

    def inner(carry, _):
        dyn, totals, status, residual, first_bad, size = carry
        current = eqx.combine(dyn, static)
        new, info = alg.update(current, data)
        growth, size = _growth(new, size)
        step_status = info.status | growth
        if first_failure:
            bad_now = (first_bad[0] < 0) & (step_status != st.OK)
            first_bad = (jnp.where(bad_now, header(current).count, first_bad[0]),
                         jnp.where(bad_now, step_status, first_bad[1]))
        return (eqx.partition(new, eqx.is_array)[0], totals + info.oracles, status | step_status,
                info.residual_norm.astype(residual.dtype), first_bad, size), None

    def block(carry, _):
        carry, _ = jax.lax.scan(inner, carry, None, length=eval_every)
        dyn, totals, status, residual, first_bad, size = carry
        if not first_failure:
            status = status | st.nonfinite(dyn)   # sticky: a non-finite state stays reported
        carry = (dyn, totals, status, residual, first_bad, size)
        row = _record(eqx.combine(dyn, static), data, eval_fn, totals, residual, status)
        _report(progress, row)
        return carry, row

    zero = OracleCounts.of()
    first = _record(state, data, eval_fn, zero, float_nan, st.ok())
    carry0 = (dynamic, zero, st.ok(), float_nan, no_bad, _size(state))
    (dyn, _, _, _, first_bad, _), history = jax.lax.scan(block, carry0, None, length=num_steps // eval_every)
    history = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([jnp.asarray(a)[None], b]), first, history)
    return (eqx.combine(dyn, static), first_bad), history


# One compiled program per configuration: the static parts (the algorithm's configuration, the
# state's and data's structures and shapes, num_steps, eval_every, eval_fn, progress) are the cache
# key, so a second call with equal ones reuses it (eval_fn and progress compare by identity).
_jit_scan = eqx.filter_jit(_scan)


def _checked_run(alg, state, data, num_steps, eval_every, eval_fn, progress=None):
    (state, (bad_step, bad_status)), history = _jit_scan(
        alg, state, data, num_steps, eval_every, eval_fn, first_failure=True, progress=progress)
    bad_step, bad_status = np.asarray(bad_step), np.asarray(bad_status)
    if np.any(bad_step >= 0):
        flat_steps, flat_status = bad_step.reshape(-1), bad_status.reshape(-1)
        i = int(np.argmax(flat_steps >= 0))
        where = "" if bad_step.ndim == 0 else f" (batch element {np.unravel_index(i, bad_step.shape)})"
        raise st.BilevelError(
            f"bj.run: outer step {int(flat_steps[i])} of {num_steps}{where} of {_name(alg)} failed with "
            f"status '{st.describe(flat_status[i])}': {st.explain(flat_status[i])}.")
    return state, history


__all__ = ["raise_callback_errors", "run"]

"""Result codes: what went wrong in a solve or an outer step, as an int32 bit mask.

Like lineax's `RESULTS`, a status travels as an array (so it works under `jit`, `vmap` and inside
`lax.scan`), and several causes can be reported at once:

    OK            0   nothing to report
    BREAKDOWN     1   a linear solve met non-positive or non-finite curvature (a concave or
                      singular lower level), or diverged; its solution is returned as NaN
    NONFINITE     2   a non-finite value (NaN/inf) in an iterate, an oracle or the data
    INVALID_STEP  4   a step size that is not a positive finite number (e.g. a swept grid value)
    DEGENERATE    8   a constrained lower level breaks the assumptions of its KKT implicit gradient:
                      a weakly active constraint (strict complementarity fails), a multiplier of the
                      wrong sign, or a point that is not stationary for any multipliers (LICQ fails);
                      a loss of differentiability, not a failed solve: the KKT estimate is kept,
                      flagged (`bj.hypergrad.kkt`; `nan_if_degenerate=True` makes it NaN)
    DIVERGING    16   the iterates grew by orders of magnitude: in `bj.run`, ||(theta, phi)|| at outer
                      step 2k above GROWTH_LIMIT = 1000 times its value at step k (k a power of two,
                      `bj.run`'s module docstring); the run is diverging, long before it overflows
    PRECISION    32   under a `bj.Precision` policy, the compute dtype's range was exceeded: a value
                      or gradient overflowed or underflowed in float16/bfloat16 (`bj.precision`);
                      the faulty values are NaN, so a run reports NONFINITE as well

`describe(code)` spells a concrete code out; `raise_if(x, code, where)` attaches an
`eqx.error_if`-type check that raises, under `jit`, with the cause spelled out.
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

OK = 0
BREAKDOWN = 1
NONFINITE = 2
INVALID_STEP = 4
DEGENERATE = 8
DIVERGING = 16
PRECISION = 32

GROWTH_LIMIT = 1000.0   # DIVERGING: the iterates' norm grew more than this between outer steps k and 2k

NAMES = {BREAKDOWN: "breakdown", NONFINITE: "non-finite", INVALID_STEP: "invalid step size",
         DEGENERATE: "degenerate constraints", DIVERGING: "diverging", PRECISION: "compute-dtype range"}
CAUSES = {
    BREAKDOWN: "a linear solve broke down (non-positive or non-finite curvature: is the lower level "
               "strongly convex at this point?) or diverged (step size too large for its Hessian)",
    NONFINITE: "a non-finite value (NaN/inf) appeared in an iterate, an oracle or the data",
    INVALID_STEP: "a step size is not a positive finite number",
    DEGENERATE: "the constrained lower level is degenerate at this point (a weakly active constraint: strict "
                "complementarity fails; a multiplier of the wrong sign; or no multipliers make it stationary: "
                "LICQ fails or phi is not a KKT point), so its KKT implicit gradient is not defined",
    DIVERGING: f"the iterates are diverging (their norm grew more than {GROWTH_LIMIT:g}-fold between outer steps "
               "k and 2k): a step size too large for the problem's curvature (lower_lr, upper_lr, v_lr)",
    PRECISION: "a value or gradient overflowed or underflowed in the compute dtype of the bj.Precision policy "
               "(float16: set Precision(loss_scale=...) against underflow, or compute in bfloat16)",
}
_ALL = BREAKDOWN | NONFINITE | INVALID_STEP | DEGENERATE | DIVERGING | PRECISION


def ok() -> jax.Array:
    """The status OK as an int32 array."""
    return jnp.zeros((), jnp.int32)


def flag(condition, code: int) -> jax.Array:
    """`code` where `condition` holds, OK elsewhere (elementwise)."""
    return jnp.where(condition, jnp.int32(code), jnp.int32(OK))


def merge(*codes) -> jax.Array:
    """Bitwise OR of status codes (scalars or arrays that broadcast)."""
    out = ok()
    for c in codes:
        out = out | jnp.asarray(c, jnp.int32)
    return out


def nonfinite(*trees: Any) -> jax.Array:
    """NONFINITE if any inexact leaf of `trees` has a NaN or an inf, else OK."""
    leaves = [x for t in trees for x in jax.tree_util.tree_leaves(t) if eqx.is_inexact_array(x)]
    if not leaves:
        return ok()
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
    return flag(~finite, NONFINITE)


def describe(code) -> str:
    """'ok', or the names of the flagged causes, e.g. 'breakdown, non-finite'."""
    code = int(np.asarray(code))
    if code == OK:
        return "ok"
    return ", ".join(name for bit, name in NAMES.items() if code & bit) or f"unknown status {code}"


def explain(code) -> str:
    """A sentence per flagged cause of a concrete code."""
    code = int(np.asarray(code))
    return "; ".join(text for bit, text in CAUSES.items() if code & bit) or "ok"


def raise_if(x, code, where: str):
    """`x`, with a runtime error raised (under `jit` too) when `code` is not OK; the message names
    `where` and the causes. Readable under `eqx.filter_jit` (jax.jit wraps it in a callback error)."""
    code = jnp.asarray(code, jnp.int32)
    messages = [f"bilevel_jax: {where} failed: {explain(c)} (status {describe(c)})." for c in range(_ALL + 1)]
    messages[OK] = "bilevel_jax: unreachable"
    return eqx.branched_error_if(x, code != OK, jnp.clip(code, 0, _ALL), messages)


class BilevelError(RuntimeError):
    """Raised on the host when a checked run (`bj.run(..., check=True)`) met a non-ok status."""


__all__ = ["OK", "BREAKDOWN", "NONFINITE", "INVALID_STEP", "DEGENERATE", "DIVERGING", "GROWTH_LIMIT", "PRECISION", "BilevelError", "describe", "explain", "flag",
           "merge", "nonfinite", "ok", "raise_if"]

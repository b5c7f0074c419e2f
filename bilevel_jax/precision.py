"""Mixed precision as a policy: `bj.Precision(compute=jnp.bfloat16, state=jnp.float32)`.

The policy of mixed-precision training (Micikevicius et al., "Mixed Precision Training", ICLR 2018,
arXiv:1710.03740), applied to both levels of a bilevel problem:

- compute dtype (bfloat16, float16 or float32): every objective evaluation. theta, phi and the
  batch's floating leaves are cast to it on entry, so the forward pass, the gradients and the
  second-order products (A v, J v: derivatives of the gradient) run their arithmetic in it;
- state dtype (float32 or float64): everything that carries error from one step to the next. theta
  and phi are kept in it (master copies), and so are the algorithms' states sized from them (v,
  CG residuals and directions, Krylov bases, momenta, SAGA tables, optax states). An objective
  returns its value in the state dtype, and its gradients come back in the dtype of its inputs
  (the transpose of the entry cast), so every oracle output, and all the sums the algorithms make
  of them, are state-dtype arrays.

`wrap_problem(problem, precision)` is the whole mechanism: a `BilevelProblem` (or
`MultiObjectiveProblem`) whose objectives do this, so every estimator, linear solver and algorithm
runs under the policy unchanged. `with_precision(alg, precision)` rebuilds an algorithm on the
wrapped problem; `bj.hypergradient(..., precision=)` and `bj.argmin(..., precision=)` take it too.
Pass theta0 and phi0 in the state dtype (`precision.cast_state`): the states are sized from them.
Data may be cast once to the compute dtype (`precision.cast_compute(data)`, half the bytes). Arrays
an objective closes over are not cast (data is an argument, the toolkit's convention): a float32
constant promotes the arithmetic it enters back to float32.

Loss scaling: with `loss_scale=S` the backward pass starts from S (the cotangent of the value, in
the compute dtype) and the gradients are divided by S in the state dtype: float16's small exponent
range then holds gradients S times smaller (a power of two keeps the scaling exact).

Range faults, never silent: an objective evaluation under a policy is a *range fault* when
  (overflow)  a finite input (theta, phi or data leaf) or the seed S * cotangent is not finite in
              the compute dtype, or the compute-dtype value or gradient is not finite;
  (underflow) an input leaf, or the seed, is nonzero in the state dtype but its largest magnitude
              is below the compute dtype's smallest normal number (finfo.tiny: zero or subnormal);
              or, for a nonzero seed, the gradient w.r.t. (theta, phi), all leaves together, is
              nonzero with its largest magnitude below finfo.tiny (subnormal), or exactly zero
              while the compute-dtype value is not; or (checked by `precision_status` only, off
              the hot path) exactly zero in the compute dtype but not in the state dtype.
The value or gradient of a faulty evaluation is NaN (an overflow is non-finite already), so every
algorithm reports NONFINITE and stops under `check=True`; `bj.hypergradient(..., precision=)`
names the cause with the status flag PRECISION (`precision_status` evaluates the rule at a point).
The input checks are made only where the compute dtype's exponent range is narrower than the state
dtype's (float16 under float32; bfloat16 shares float32's range). The gradient is judged as a whole
(a leaf that does not enter the objective has a zero gradient; at a LL solution grad_phi f_lower is
rounding noise, subnormal in float16, while grad_theta f_lower is not). An exact zero gradient
with a zero value is what an exact stationary point of a homogeneous objective gives (a quadratic LL
at theta = phi = 0, a common initialisation): it is left alone inside the steps, and
`precision_status` tells it from an underflow by a second evaluation in the state dtype. An exact
zero gradient with a nonzero value is taken as underflow (an exact stationary point with a nonzero
value, a coincidence in floating point, is flagged too: start elsewhere).

The products A v and J v cast v to the compute dtype (the transpose of the gradient's cast back,
divided by `loss_scale`): in float16 a v, or a solver direction, below finfo.tiny underflows, and
CG then reports BREAKDOWN (p'Ap = 0); stop float16 solves at a relative tolerance near float16's
precision (`cg(rtol=1e-3)`) or compute in bfloat16.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax import status as st
from bilevel_jax.rebuild import rebuild

PyTree = Any
COMPUTE_DTYPES = ("bfloat16", "float16", "float32", "float64")
STATE_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class Precision:
    """A mixed-precision policy (see the module docstring).

    Args:
      compute: the dtype of every objective evaluation (data, parameters, oracle arithmetic):
        jnp.bfloat16 (default), jnp.float16, jnp.float32 (or jnp.float64).
      state: the dtype of theta, phi and every state that carries error across steps (v, solver
        residuals, momenta, SAGA tables, optimizer states): jnp.float32 (default) or jnp.float64;
        at least as wide as `compute`.
      loss_scale: a positive number S (static): gradients are computed from the seed S and divided
        by S in the state dtype (for float16: e.g. 2**10 when gradients underflow).
    """

    compute: Any = jnp.bfloat16
    state: Any = jnp.float32
    loss_scale: float = 1.0

    def __post_init__(self):
        for name, allowed in (("compute", COMPUTE_DTYPES), ("state", STATE_DTYPES)):
            try:
                dtype = jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise TypeError(f"Precision: {name} must be a dtype ({', '.join(allowed)}), "
                                f"got {getattr(self, name)!r}.") from e
            if dtype.name not in allowed:
                raise ValueError(f"Precision: {name} must be one of {', '.join(allowed)}, got {dtype.name}.")
            object.__setattr__(self, name, dtype)
        if jnp.finfo(self.state).bits < jnp.finfo(self.compute).bits:
            raise ValueError(f"Precision: the state dtype ({self.state.name}) must be at least as wide as the "
                             f"compute dtype ({self.compute.name}).")
        scale = self.loss_scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"Precision: loss_scale must be a positive finite number, got {scale!r}.")
        object.__setattr__(self, "loss_scale", float(scale))

    @property
    def narrower_range(self) -> bool:
        """Whether the compute dtype's exponent range is narrower than the state dtype's (float16
        under float32): only then can a cast to it overflow or underflow."""
        c, s = jnp.finfo(self.compute), jnp.finfo(self.state)
        return c.maxexp < s.maxexp or c.minexp > s.minexp

    def cast_compute(self, tree: PyTree) -> PyTree:
        """`tree` with its floating array leaves in the compute dtype (e.g. the data, cast once)."""
        return _cast(tree, self.compute)

    def cast_state(self, tree: PyTree) -> PyTree:
        """`tree` with its floating array leaves in the state dtype (theta0, phi0)."""
        return _cast(tree, self.state)


def _cast(tree: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def check_precision(precision: Any) -> Optional[Precision]:
    """`precision` if it is None or a `bj.Precision`, else a TypeError (before tracing)."""
    if precision is not None and not isinstance(precision, Precision):
        raise TypeError("precision must be None or a bj.Precision(compute=..., state=...), "
                        f"got {type(precision).__name__}.")
    return precision


# ------------------------------------------------------------------ the range-fault rule

def _max_abs(x) -> jax.Array:
    return jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)


def _input_fault(precision: Precision, xs: PyTree, xs_c: PyTree) -> jax.Array:
    """Overflow or underflow of the entry cast, leafwise (only where the range is narrower)."""
    faults = [jnp.zeros((), bool)]
    if precision.narrower_range:
        tiny = jnp.finfo(precision.compute).tiny
        for x, xc in zip(jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(xs_c)):
            if x.dtype == xc.dtype or not x.size:
                continue
            overflow = jnp.any(jnp.isfinite(x) & ~jnp.isfinite(xc))
            underflow = jnp.any(x != 0) & (_max_abs(xc) < tiny)
            faults.append(overflow | underflow)
    return jnp.any(jnp.stack(faults))


def _seed(precision: Precision, ct, out_dtype):
    """The backward pass's seed S * ct in the compute dtype, and whether the cast faulted."""
    seed = (ct * precision.loss_scale).astype(out_dtype)
    tiny = jnp.finfo(precision.compute).tiny
    fault = jnp.isfinite(ct) & (ct != 0) & ~(jnp.isfinite(seed) & (jnp.abs(seed) >= tiny))
    return seed, fault


def _peak(grads) -> jax.Array:
    """The largest magnitude over all leaves of `grads` (0 without leaves)."""
    leaves = [g for g in jax.tree_util.tree_leaves(grads) if g.size]
    return jnp.max(jnp.stack([_max_abs(g) for g in leaves])) if leaves else jnp.zeros(())


def _gradient_fault(precision: Precision, seed, grads, value) -> jax.Array:
    """For a nonzero finite seed: the gradient (all leaves together) non-finite, nonzero with its
    largest magnitude below finfo.tiny (subnormal), or exactly zero while the value is not."""
    peak = _peak(grads)
    out_of_range = (~jnp.isfinite(peak) | ((peak > 0) & (peak < jnp.finfo(precision.compute).tiny))
                    | ((peak == 0) & (value != 0)))
    return jnp.isfinite(seed) & (seed != 0) & out_of_range


def _poison(tree: PyTree, fault) -> PyTree:
    """NaN in every leaf where `fault` (a multiplication, so derivatives of it are NaN too)."""
    return jax.tree_util.tree_map(lambda x: x * jnp.where(fault, jnp.nan, 1.0).astype(x.dtype), tree)


# ------------------------------------------------------------------ objectives under a policy

@dataclasses.dataclass(frozen=True)
class PolicyObjective:
    """`fn(theta, phi, batch)` evaluated under `precision` (equal for equal `fn` and policy, so
    algorithms built on it hash equal and cross `jit` without recompiling).

    A `jax.custom_vjp` of the inexact leaves of (theta, phi, batch): forward, the leaves cast to
    the compute dtype, `fn`'s value and pullback there, the value cast to the state dtype; backward,
    the pullback of the seed `loss_scale * cotangent` (compute dtype), the cotangents cast back to
    their inputs' dtypes and divided by `loss_scale`. Both are ordinary JAX code, so A v and J v
    (reverse-over-reverse or forward-over-reverse) differentiate through them in the compute dtype.
    A range fault (the module docstring) makes the value or the cotangents NaN."""

    fn: Callable
    precision: Precision

    def __call__(self, theta, phi, batch):
        precision = self.precision
        xs, static = eqx.partition((theta, phi, batch), eqx.is_inexact_array)

        def compute(xs_c):
            return self.fn(*eqx.combine(xs_c, static))

        @jax.custom_vjp
        def value(xs):
            xs_c = precision.cast_compute(xs)
            return _poison(compute(xs_c).astype(precision.state), _input_fault(precision, xs, xs_c))

        def forward(xs):
            xs_c = precision.cast_compute(xs)
            out, pullback = jax.vjp(compute, xs_c)
            fault = _input_fault(precision, xs, xs_c)
            return _poison(out.astype(precision.state), fault), (pullback, fault, out)

        def backward(residuals, ct):
            pullback, fault, out = residuals
            seed, seed_fault = _seed(precision, ct, out.dtype)
            (grads,) = pullback(seed)
            fault = fault | seed_fault | _gradient_fault(precision, seed, grads[:2], out)
            scaled = jax.tree_util.tree_map(lambda g, x: g.astype(x.dtype) / precision.loss_scale, grads, xs)
            return (_poison(scaled, fault),)

        value.defvjp(forward, backward)
        return value(xs)


def policy_of(problem) -> Optional[Precision]:
    """The precision policy `problem`'s objectives run under (None for a plain problem)."""
    fn = problem.f_upper[0] if isinstance(problem.f_upper, tuple) else problem.f_upper
    return fn.precision if isinstance(fn, PolicyObjective) else None


def wrap_problem(problem, precision: Optional[Precision]):
    """`problem` (a `BilevelProblem` or `MultiObjectiveProblem`) with its objectives evaluated
    under `precision` (the module docstring); the problem itself for `precision=None`. Its LL
    constraints and UL projection stay in the state dtype. Wrapping a wrapped problem raises."""
    if check_precision(precision) is None:
        return problem
    if policy_of(problem) is not None:
        raise ValueError(f"this problem already runs under {policy_of(problem)}; wrap the original problem.")

    def wrap(fn):
        if isinstance(fn, tuple):
            return tuple(PolicyObjective(f, precision) for f in fn)
        return PolicyObjective(fn, precision)

    return dataclasses.replace(problem, f_upper=wrap(problem.f_upper), f_lower=wrap(problem.f_lower))


def with_precision(alg, precision: Optional[Precision]):
    """`alg` (any `bj.Algorithm` with a `problem` field: every preset, multi-objective ones
    included) rebuilt on `wrap_problem(alg.problem, precision)`: the same step rules and
    configuration, its problem everywhere in it (a direction rule's copy too) evaluated under the
    policy. `alg` itself for `precision=None`. Pass theta0, phi0 to `init` in the state dtype."""
    if check_precision(precision) is None:
        return alg
    problem = getattr(alg, "problem", None)
    if problem is None:
        raise TypeError(f"with_precision: {type(alg).__name__} has no `problem` field to evaluate under a policy.")
    wrapped = wrap_problem(problem, precision)
    return rebuild(alg, lambda x: wrapped if x is problem else x)


def precision_status(problem, theta, phi, data) -> jax.Array:
    """PRECISION when evaluating f_upper or f_lower of a wrapped `BilevelProblem` (values and gradients
    w.r.t. theta and phi, from the seed `loss_scale`) at (theta, phi, data) is a range fault (the
    module docstring's rule; a non-finite value or gradient counts only where theta, phi and the
    data are finite: NaN data is NONFINITE, not a range fault), OK otherwise (and for a problem
    without a policy). Two evaluations of each objective and its gradient: in the compute dtype,
    and in the state dtype (an exact zero gradient is a fault only where the latter is nonzero)."""
    precision = policy_of(problem)
    if precision is None:
        return st.ok()
    faults = []
    for objective, batch in ((problem.f_upper, data[0]), (problem.f_lower, data[1])):
        xs, static = eqx.partition((theta, phi, batch), eqx.is_inexact_array)
        xs_c = precision.cast_compute(xs)
        out, pullback = jax.vjp(lambda ys: objective.fn(*eqx.combine(ys, static)), xs_c)
        seed, seed_fault = _seed(precision, jnp.ones((), precision.state), out.dtype)
        (grads,) = pullback(seed)
        value, exact = jax.vjp(lambda ys: objective.fn(*eqx.combine(ys, static)), xs)   # in the state dtype
        (exact_grads,) = exact(jnp.ones_like(value))
        underflow_to_zero = (_peak(grads[:2]) == 0) & (_peak(exact_grads[:2]) > 0)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(xs)]))
        faults += [_input_fault(precision, xs, xs_c), finite & (~jnp.isfinite(out) | seed_fault | underflow_to_zero
                                                                | _gradient_fault(precision, seed, grads[:2], out))]
    return st.flag(jnp.any(jnp.stack(faults)), st.PRECISION)


def diagnose(problem, theta, phi, data, status) -> jax.Array:
    """`status`, with PRECISION added when it is not OK, `problem` runs under a policy and
    `precision_status` finds a range fault at (theta, phi, data): the cause of a failed result,
    looked for only after a failure (`lax.cond`; under `vmap` both branches run)."""
    if policy_of(problem) is None:
        return status
    return st.merge(status, jax.lax.cond(status != st.OK, lambda: precision_status(problem, theta, phi, data), st.ok))


__all__ = ["Precision", "PolicyObjective", "check_precision", "diagnose", "policy_of", "precision_status",
           "with_precision", "wrap_problem"]

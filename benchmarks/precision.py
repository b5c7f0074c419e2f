"""Measure: a `bj.Precision` policy (bfloat16 / float16 compute, float32 states) against float32.

Three computations, each compiled once per precision and timed interleaved (float32, bfloat16,
float16, float32, ...):
  hypergradient/logistic   `bj.hypergradient` on the logistic HPO (the bench's full-batch logistic
                           data) at (theta0, phi0) with cg(maxiter=k): one linearization, k A v, one J v
  hypergradient/mlp        the same on MLP hyper-cleaning (`second_order.mlp_hyper_cleaning`: 65 ->
                           width -> width -> 10, theta one weight per training sample) with
                           damped(cg(k), 0.1) (a random network's LL is indefinite)
  soba/logistic            K full-batch SOBA steps (`bj.run`) from (theta0, phi0)
Under a policy the data are cast once to the compute dtype (`precision.cast_compute`: half the
bytes), theta0 and phi0 to float32. The error of a result is relative to the float32 run's
(||x - x_f32|| / ||x_f32||; for SOBA, of the K-step displacement of theta), float32 being far more
accurate (eps 1.2e-7) than bfloat16 (eps 7.8e-3) or float16 (9.8e-4). float16 is run without loss
scaling; a range fault shows as a non-OK status (NaN result).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

import bilevel_jax as bj
from benchmarks import timing
from benchmarks.second_order import mlp_hyper_cleaning, n_params

POLICIES = {"float32": None, "bfloat16": bj.Precision(jnp.bfloat16), "float16": bj.Precision(jnp.float16)}
DAMPING = 0.1


def _flat(tree):
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.concatenate(leaves)


def _hypergradient_program(problem, theta, phi, data, solver, policy):
    """A jitted `data -> (g, status)` with theta, phi (float32) and the solver closed over."""
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)

    def fn(theta, p, data):
        g, info = bj.hypergradient(problem, theta, eqx.combine(p, phi_s), data, solver, precision=policy)
        return g, info.status

    data = data if policy is None else policy.cast_compute(data)
    return jax.jit(fn), (theta, phi_d, data)


def _soba_program(setup, steps: int, policy):
    alg = bj.precision.with_precision(bj.algorithms.soba(setup.problem, batch_size=None), policy)
    theta0, phi0 = (jnp.asarray(x, jnp.float32) for x in (setup.theta0, setup.phi0))
    data = setup.data if policy is None else policy.cast_compute(setup.data)
    state = alg.init(theta0, phi0, jax.random.PRNGKey(0))

    def fn(state, data):
        out, hist = bj.run(alg, state, data, num_steps=steps)
        return out.theta - theta0, hist["status"][-1]

    return jax.jit(fn), (state, data)


def _row(programs, repeats: int, scale: float = 1.0) -> dict:
    compiled, args, outs = {}, {}, {}
    for name, (fn, a) in programs.items():
        compiled[name] = fn.lower(*a).compile()
        args[name] = a
        outs[name] = compiled[name](*a)
    t = timing.interleaved(compiled, args, repeats=repeats, scale=scale)
    ref = _flat(outs["float32"][0])
    row = {}
    for name in programs:
        x = _flat(outs[name][0])
        row[name] = {"time": {k: v for k, v in t[name].items() if not k.endswith("samples")},
                     "rel_error": float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref)),
                     "status": bj.status.describe(outs[name][1])}
        if name != "float32":
            row[name]["over_float32"] = timing.ratios(t, name, "float32")
    return row


def measure(setup, width: int, n: int, cg_iterations: int, soba_steps: int, repeats: int) -> dict:
    """{rows: {computation: {precision: {time, rel_error, status, over_float32}}}, problem descriptions}."""
    theta0, phi0 = (jnp.asarray(x, jnp.float32) for x in (setup.theta0, setup.phi0))
    solver = bj.linear_solvers.cg(maxiter=cg_iterations)
    rows = {"hypergradient/logistic": _row({k: _hypergradient_program(setup.problem, theta0, phi0, setup.data, solver, p)
                                            for k, p in POLICIES.items()}, repeats)}
    inst = mlp_hyper_cleaning(width, n)
    damped = bj.linear_solvers.damped(solver, DAMPING)
    rows[f"hypergradient/mlp width={width}"] = _row(
        {k: _hypergradient_program(inst.problem, inst.theta0, inst.phi0, inst.data, damped, p) for k, p in POLICIES.items()},
        repeats)
    rows["soba/logistic"] = _row({k: _soba_program(setup, soba_steps, p) for k, p in POLICIES.items()}, repeats,
                                 scale=soba_steps)
    return {"problems": {"logistic": setup.description,
                         "mlp": f"{inst.description.split(':')[0]}: MLP 65 -> {width} -> {width} -> 10 "
                                f"({n_params(inst.phi0)} parameters), n = {n}, damped(cg({cg_iterations}), {DAMPING})"},
            "cg_iterations": cg_iterations, "soba_steps": soba_steps, "rows": rows}

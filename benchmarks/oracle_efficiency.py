"""Measure 2: oracle efficiency = time per step / the sum of its oracle calls, each timed alone.

Unit costs, on one batch of the setup's size (drawn once, outside the timed loop), each a scan of
K calls (to amortise dispatch) in which the inputs theta, phi, v are shifted by a scalar carried
from the previous call's output and the batch passes through `lax.optimization_barrier` with that
scalar, so that XLA cannot hoist any batch-only part of the oracle (e.g. the sum of the batch's
Hessians, which a quadratic's gradient reduces to) out of the loop:
  lower_grads: grad_phi f_lower                     (`bj.oracles.lower_grad_phi`)
  upper_grads: (grad_theta, grad_phi) f_upper        (`bj.oracles.upper_grads`, one reverse pass)
  hvps:        A v, standalone (linearize + pullback) (`bj.oracles.hvp`)
  cross:       J v, standalone                       (`bj.oracles.cross`)
  gather:      one minibatch draw of each level      (`bj.sampling.iid`; reported, not in the sum)
The predicted step time is sum_k count_k * unit_k with the counts of `step_info.oracles` (measure 1,
averaged over the run: STORM's two evaluations, SARAH's full refreshes included). The compiled K-step
runs of measure 1 and the units are timed round-robin (one call of each per round), and a ratio is
the median over rounds, so that a change of machine load between measurements does not bias it. A ratio above 1
means time spent outside the oracles (sampling, optimizer and estimator arithmetic, linear-solver
algebra) or duplicated passes; a ratio below 1 means the step shares work between oracles (one
fused vjp for grad + A v + J v; a linear solver's matvecs reuse one linearization).
`ratio_with_gathers` adds the minibatch draws of the step (`DRAWS`, counted from the presets'
structure) to the prediction: on small problems the draws (threefry index generation, which XLA:CPU
runs as rolled loops, and the gather) cost more than the oracles themselves.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import oracles, sampling
from benchmarks import timing
from benchmarks.setups import Benchmark
from benchmarks.steps import ORACLE_KEYS

# Single-loop methods, for which the goal is a ratio <= GOAL.
SINGLE_LOOP = ("soba", "saba", "srba", "fsla", "ttsa", "alset", "stable", "mrbo", "sustain", "vrbo_single_loop", "momentum")
GOAL = 1.2


def _shift(tree, s):
    return jax.tree_util.tree_map(lambda x: x + s.astype(x.dtype), tree)


def _total(tree):
    return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree))


def _chained(call, num_calls):
    """jit(run(s, theta, phi, v, ub, lb)): `num_calls` calls of `call`, chained through s."""

    def run(s, theta, phi, v, ub, lb):
        def body(s, _):
            ub_, lb_, s_ = jax.lax.optimization_barrier((ub, lb, s))
            out = call(_shift(theta, s_), _shift(phi, s_), _shift(v, s_), ub_, lb_)
            return s + 1e-12 * _total(out), None

        return jax.lax.scan(body, s, None, length=num_calls)[0]

    return jax.jit(run)


def unit_calls(problem):
    return {
        "lower_grads": lambda t, p, v, ub, lb: oracles.lower_grad_phi(problem, t, p, lb),
        "upper_grads": lambda t, p, v, ub, lb: oracles.upper_grads(problem, t, p, ub),
        "hvps": lambda t, p, v, ub, lb: oracles.hvp(problem, t, p, v, lb),
        "cross": lambda t, p, v, ub, lb: oracles.cross(problem, t, p, v, lb),
    }


def unit_functions(setup: Benchmark, num_calls: int):
    """{name: (jitted K-call scan, args)} of the oracle units (and of one minibatch draw per level)."""
    upper, lower = setup.data
    sampler = sampling.make_sampler(setup.batch_size, "iid")
    key = jax.random.PRNGKey(1)
    ub, lb = sampler.sample(upper, key, 0)[0], sampler.sample(lower, key, 1)[0]
    v = jax.random.normal(jax.random.PRNGKey(2), jnp.shape(setup.phi0), setup.phi0.dtype)
    s0 = jnp.zeros((), setup.phi0.dtype)
    out = {name: (_chained(call, num_calls), (s0, setup.theta0, setup.phi0, v, ub, lb))
           for name, call in unit_calls(setup.problem).items()}
    if setup.batch_size is not None:
        def draws(s, data):
            def body(s, i):
                return s + 1e-12 * _total(sampler.sample(data, key, i)[0]), None
            return jax.lax.scan(body, s, jnp.arange(num_calls))[0]

        for level, data in (("upper", upper), ("lower", lower)):
            out[f"gather_{level}"] = (jax.jit(draws), (s0, data))
    return out


# Minibatch draws per outer step of each preset at its defaults, (upper, lower): one UL batch; LL
# batches for the `lower_steps` LL steps and the direction (none for the partial direction, whose
# LL batch is dead code), plus one per factor of the stochastic Neumann (HIA) solvers (N - 1 = 9).
# STORM/SARAH estimators re-evaluate the same batches at the previous point (no new draw; SUSTAIN's
# HIA factors are shared by the two points through `storm(joint=True)`); SARAH's refresh uses the
# full data (no draw).
DRAWS = {"alternating": (1, 1), "signsgd_ul": (1, 10), "ba": (1, 11), "aid_bio": (1, 11), "stocbio": (1, 11),
         "amigo": (1, 11), "bsa": (1, 20), "ttsa": (1, 11), "alset": (1, 11), "sustain": (1, 10),
         "soba": (1, 1), "saba": (1, 1), "srba": (1, 1), "fsla": (1, 1), "mrbo": (1, 1), "momentum": (1, 1),
         "vrbo_single_loop": (1, 1), "stable": (1, 1),
         "vrbo": (11, 11)}   # the double loop: T = 10 inner steps, each on its own UL and LL batch, + the directions


def efficiency(step_results: dict, timings: Dict[str, dict]) -> Dict[str, dict]:
    """Per preset: measured / predicted step time, and the same with the minibatch draws added to the
    prediction (`ratio_with_gathers`). Steps and units were timed round-robin: each ratio is the
    median over rounds of (step time in the round) / (sum of unit times in the same round)."""
    units = {k[len("unit:"):]: np.asarray(v["samples"]) for k, v in timings.items() if k.startswith("unit:")}
    out = {}
    for name, r in step_results.items():
        key = f"step:{name}"
        if "error" in r or key not in timings:
            continue
        counts = r["oracles_per_step"]
        measured = np.asarray(timings[key]["samples"])
        predicted = sum(counts[k] * units[k] for k in ORACLE_KEYS)
        gathers = np.zeros_like(predicted)
        if "gather_upper" in units and name in DRAWS:
            up, low = DRAWS[name]
            gathers = up * units["gather_upper"] + low * units["gather_lower"]
        ratio = float(np.median(measured / predicted))
        out[name] = {"ratio": ratio, "ratio_with_gathers": float(np.median(measured / (predicted + gathers))),
                     "measured_s": float(np.median(measured)), "predicted_s": float(np.median(predicted)),
                     "gathers_s": float(np.median(gathers)),
                     "terms_s": {k: counts[k] * float(np.median(units[k])) for k in ORACLE_KEYS},
                     "counts": counts, "single_loop": name in SINGLE_LOOP,
                     "above_goal": bool(name in SINGLE_LOOP and ratio > GOAL)}
    return out


def measure(setup: Benchmark, step_results: dict, num_calls: int, repeats: int) -> dict:
    """Re-time every compiled K-step run of measure 1 round-robin with the unit oracles."""
    fns, args, scales = {}, {}, {}
    for name, (fn, a) in unit_functions(setup, num_calls).items():
        fns[f"unit:{name}"], args[f"unit:{name}"], scales[f"unit:{name}"] = fn, a, num_calls
    for name, r in step_results.items():
        if "_compiled" in r:
            key = f"step:{name}"
            fns[key], args[key], scales[key] = r["_compiled"], (r["_state"], setup.data), r["steps_per_call"]
    timings = timing.interleaved(fns, args, repeats=repeats, scale=scales)
    units = {k[len("unit:"):]: v for k, v in timings.items() if k.startswith("unit:")}
    steps = {k[len("step:"):]: v for k, v in timings.items() if k.startswith("step:")}
    return {"units": units, "steps_interleaved": steps, "presets": efficiency(step_results, timings),
            "goal": GOAL, "rounds": repeats}

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
averaged over the run: STORM's two evaluations, SARAH's full refreshes included). A ratio above 1
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

from bilevel_jax import oracles, sampling
from benchmarks import timing
from benchmarks.setups import Setup
from benchmarks.steps import ORACLE_KEYS

# Single-loop methods, for which the goal is a ratio <= GOAL.
SINGLE_LOOP = ("soba", "saba", "srba", "fsla", "ttsa", "alset", "stable", "mrbo", "sustain", "vrbo", "momentum")
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


def units(setup: Setup, num_calls: int, repeats: int) -> Dict[str, dict]:
    """Seconds per call of each oracle (and of one minibatch draw per level)."""
    upper, lower = setup.data
    sampler = sampling.make_sampler(setup.batch_size, "iid")
    key = jax.random.PRNGKey(1)
    ub, lb = sampler.sample(upper, key, 0)[0], sampler.sample(lower, key, 1)[0]
    v = jax.random.normal(jax.random.PRNGKey(2), jnp.shape(setup.phi0), setup.phi0.dtype)
    s0 = jnp.zeros((), setup.phi0.dtype)
    out = {}
    for name, call in unit_calls(setup.problem).items():
        out[name] = timing.timeit(_chained(call, num_calls), s0, setup.theta0, setup.phi0, v, ub, lb,
                                  repeats=3 * repeats, scale=num_calls, budget_s=0.5, min_repeats=repeats)
    if setup.batch_size is not None:
        for level, data in (("upper", upper), ("lower", lower)):
            def draws(s, data):
                def body(s, i):
                    return s + 1e-12 * _total(sampler.sample(data, key, i)[0]), None
                return jax.lax.scan(body, s, jnp.arange(num_calls))[0]
            out[f"gather_{level}"] = timing.timeit(jax.jit(draws), s0, data, repeats=3 * repeats, scale=num_calls,
                                                   budget_s=0.5, min_repeats=repeats)
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
         "vrbo": (1, 1), "stable": (1, 1)}


def efficiency(step_results: dict, unit_results: Dict[str, dict]) -> Dict[str, dict]:
    """Per preset: measured / predicted step time, with the prediction's terms; and the same ratio
    with the minibatch draws added to the prediction (`ratio_with_gathers`)."""
    out = {}
    for name, r in step_results.items():
        if "error" in r:
            continue
        counts = r["oracles_per_step"]
        terms = {k: counts[k] * unit_results[k]["median"] for k in ORACLE_KEYS}
        predicted = sum(terms.values())
        measured = r["per_step"]["median"]
        gathers = 0.0
        if "gather_upper" in unit_results and name in DRAWS:
            up, low = DRAWS[name]
            gathers = up * unit_results["gather_upper"]["median"] + low * unit_results["gather_lower"]["median"]
        out[name] = {"ratio": measured / predicted if predicted > 0 else float("nan"),
                     "ratio_with_gathers": measured / (predicted + gathers) if predicted > 0 else float("nan"),
                     "gathers_s": gathers,
                     "measured_s": measured, "predicted_s": predicted, "terms_s": terms, "counts": counts,
                     "single_loop": name in SINGLE_LOOP,
                     "above_goal": bool(name in SINGLE_LOOP and measured / predicted > GOAL)}
    return out


def measure(setup: Setup, step_results: dict, num_calls: int, repeats: int) -> dict:
    u = units(setup, num_calls, repeats)
    return {"units": u, "presets": efficiency(step_results, u), "goal": GOAL}

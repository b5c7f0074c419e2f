"""Measure 1: time per outer iteration of every preset of `bj.algorithms.ALGORITHMS`.

A jitted `bj.run` of K steps (one scan block, no eval_fn) is compiled ahead of time (trace+lower and
XLA compile timed separately: the first-call cost), then called `repeats` times; the time per
step is the call time / K. One call's history gives the oracle calls per step
(`step_info.oracles` summed over the run / K) for measure 2.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Optional

import jax
import numpy as np

import bilevel_jax as bj
from benchmarks import timing
from benchmarks.setups import Benchmark, make_algorithm

ORACLE_KEYS = ("lower_grads", "upper_grads", "hvps", "cross")


def build_runner(setup: Benchmark, name: str, num_steps: int):
    """(jitted run of `num_steps` steps, initial state) for the preset `name` on `setup`."""
    alg = make_algorithm(name, setup)
    state = alg.init(setup.theta0, setup.phi0, jax.random.PRNGKey(0), setup.data)

    def run(state, data):
        return bj.run(alg, state, data, num_steps=num_steps)

    return jax.jit(run), state


def compile_runner(fn, state, data):
    """AOT-compile: (compiled, {"trace_lower_s", "compile_s", "first_call_s"})."""
    t0 = time.perf_counter()
    lowered = fn.lower(state, data)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t2 - t0}


def measure_preset(setup: Benchmark, name: str, num_steps: int, repeats: int, budget_s: float = 1.0) -> dict:
    fn, state = build_runner(setup, name, num_steps)
    compiled, compile_times = compile_runner(fn, state, setup.data)
    # `repeats` calls at least; short calls are repeated up to 3x as often within `budget_s`
    t = timing.timeit(compiled, state, setup.data, repeats=3 * repeats, scale=num_steps, budget_s=budget_s,
                      min_repeats=repeats)
    t["first_run_s"] = t.pop("first_call_s")      # the first (already compiled) call
    final, history = compiled(state, setup.data)
    per_step = {k: float(np.asarray(history[k])[-1]) / num_steps for k in ORACLE_KEYS}
    return {"per_step": t, "compile": compile_times, "oracles_per_step": per_step,
            "finite": bool(np.asarray(history["finite"])[-1]), "steps_per_call": num_steps,
            "_compiled": compiled, "_state": state}


def measure(setups: Iterable[Benchmark], presets: Iterable[str], num_steps: Dict[str, int], repeats: int,
            log=print, only: Optional[Dict[str, Iterable[str]]] = None) -> dict:
    """Every preset on every setup; `only` restricts a setup (by name) to some presets."""
    out = {}
    for setup in setups:
        res = {}
        for name in presets:
            if only is not None and setup.name in only and name not in only[setup.name]:
                continue
            t0 = time.perf_counter()
            try:
                res[name] = measure_preset(setup, name, num_steps[setup.name], repeats)
            except Exception as e:  # noqa: BLE001 - one failing preset must not stop the bench
                res[name] = timing.error_row(e)
            r = res[name]
            if "error" in r:
                log(f"  {setup.name:14s} {name:12s} ERROR {r['error']}")
            else:
                log(f"  {setup.name:14s} {name:12s} {r['per_step']['median'] * 1e3:9.4f} ms/step "
                    f"(compile {r['compile']['first_call_s']:.2f} s, total {time.perf_counter() - t0:.1f} s)")
        out[setup.name] = {"problem": setup.description, "presets": res}
    return out

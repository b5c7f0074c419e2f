"""Measure 5: unrolled differentiation (`bj.unrolled_hypergradient`) against the number of LL
steps T: reverse mode, reverse with `checkpoint=True`, and forward mode. Peak memory is XLA's
buffer assignment of the compiled program (`.lower(...).compile().memory_analysis()`:
temp_size_in_bytes, the scratch memory beyond arguments and outputs), time per hypergradient as
usual. Problem: the logistic HPO objective on the first `n` training and validation rows
(full-batch LL gradient descent, step 0.5)."""
from __future__ import annotations

import time

import jax
import numpy as np
import optax

import bilevel_jax as bj
from benchmarks import timing
from benchmarks.setups import Setup

VARIANTS = {"reverse": {"mode": "reverse"}, "reverse_checkpoint": {"mode": "reverse", "checkpoint": True},
            "forward": {"mode": "forward"}}
LR = 0.5


def subset(setup: Setup, n: int):
    return jax.tree_util.tree_map(lambda x: x[:n], setup.data)


def measure(setup: Setup, n: int, steps_list, repeats: int) -> dict:
    data = subset(setup, n)
    opt = optax.sgd(LR)
    rows, grads = {}, {}
    for T in steps_list:
        for variant, kw in VARIANTS.items():
            def hypergrad(theta, phi0, data, kw=kw, T=T):
                return bj.unrolled_hypergradient(setup.problem, theta, phi0, data, optimizer=opt, steps=T, **kw)[0]

            fn = jax.jit(hypergrad)
            t0 = time.perf_counter()
            compiled = fn.lower(setup.theta0, setup.phi0, data).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            t = timing.timeit(compiled, setup.theta0, setup.phi0, data, repeats=repeats, budget_s=1.5)
            t.pop("first_call_s")
            grads[(variant, T)] = np.asarray(compiled(setup.theta0, setup.phi0, data))
            rows[f"{variant}/T={T}"] = {
                "variant": variant, "T": T, "time": t, "compile_s": compile_s,
                "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
                "argument_bytes": None if mem is None else int(mem.argument_size_in_bytes),
                "output_bytes": None if mem is None else int(mem.output_size_in_bytes),
            }
    agreement = {f"T={T}": max(float(np.max(np.abs(grads[(v, T)] - grads[("reverse", T)]))) for v in VARIANTS)
                 for T in steps_list}
    return {"problem": f"{setup.description}; first {n} rows of each split, GD step {LR}", "rows": rows,
            "max_abs_diff_between_variants": agreement}

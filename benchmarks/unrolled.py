"""Measure 5: unrolled differentiation (`bj.unrolled_hypergradient`) against the number of LL
steps T: reverse mode, reverse with `checkpoint=True`, and forward mode. Peak memory is XLA's
buffer assignment of the compiled program (`.lower(...).compile().memory_analysis()`:
temp_size_in_bytes, the scratch memory beyond arguments and outputs), time per hypergradient as
usual. Problem: the logistic HPO objective on the first `n` training and validation rows
(full-batch LL gradient descent, step 0.5).

`measure_mlp`: reverse (plain and with `checkpoint=True`) against mixed mode (`mode="mixed"`,
forward-over-reverse products in a reverse scan; sqrt(T) checkpoints by default, all T iterates
with `checkpoint=False`) on an MLP lower level (hyper-cleaning of a two-hidden-
layer MLP, `second_order.mlp_hyper_cleaning`, full batch, GD step 0.1): the temporary memory at
every T (compiled only), the time where T <= `time_max_T` (reverse mode at T = 1000 would
allocate its whole tape on the 2-core CI machine)."""
from __future__ import annotations

import time

import equinox as eqx
import jax
import numpy as np
import optax

import bilevel_jax as bj
from benchmarks import second_order, timing
from benchmarks.setups import Benchmark

VARIANTS = {"reverse": {"mode": "reverse"}, "reverse_checkpoint": {"mode": "reverse", "checkpoint": True},
            "forward": {"mode": "forward"}, "mixed": {"mode": "mixed"},
            "mixed_all_iterates": {"mode": "mixed", "checkpoint": False}}
MLP_LR = 0.1
MLP_VARIANTS = ("reverse", "reverse_checkpoint", "mixed", "mixed_all_iterates")
LR = 0.5


def subset(setup: Benchmark, n: int):
    return jax.tree_util.tree_map(lambda x: x[:n], setup.data)


def measure(setup: Benchmark, n: int, steps_list, repeats: int) -> dict:
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


def measure_mlp(width: int, n: int, steps_list, time_max_T: int, repeats: int) -> dict:
    inst = second_order.mlp_hyper_cleaning(width, n)
    phi_d, phi_s = eqx.partition(inst.phi0, eqx.is_inexact_array)
    opt, rows, grads = optax.sgd(MLP_LR), {}, {}
    for T in steps_list:
        compiled, args = {}, (inst.theta0, phi_d, inst.data)
        for mode in MLP_VARIANTS:
            def hypergrad(theta, p, data, kw=VARIANTS[mode], T=T):
                return bj.unrolled_hypergradient(inst.problem, theta, eqx.combine(p, phi_s), data, optimizer=opt,
                                                 steps=T, **kw)[0]

            t0 = time.perf_counter()
            compiled[mode] = jax.jit(hypergrad).lower(*args).compile()
            rows[f"{mode}/T={T}"] = {"variant": mode, "T": T, "compile_s": time.perf_counter() - t0,
                                     "temp_bytes": int(compiled[mode].memory_analysis().temp_size_in_bytes)}
        if T <= time_max_T:
            t = timing.interleaved(compiled, {m: args for m in compiled}, repeats=repeats)
            for mode in compiled:
                rows[f"{mode}/T={T}"]["time"] = {k: v for k, v in t[mode].items() if not k.endswith("samples")}
                grads[(mode, T)] = np.asarray(compiled[mode](*args))
            for mode in MLP_VARIANTS[1:]:
                rows[f"{mode}/T={T}"]["time_vs_reverse"] = timing.ratios(t, mode, "reverse")
        for mode in MLP_VARIANTS[1:]:
            rows[f"{mode}/T={T}"]["temp_reverse_over"] = rows[f"reverse/T={T}"]["temp_bytes"] / rows[f"{mode}/T={T}"]["temp_bytes"]
    agreement = {f"T={T}": float(np.max(np.abs(grads[("mixed", T)] - grads[("reverse", T)]))
                              / np.max(np.abs(grads[("reverse", T)])))
                 for T in steps_list if T <= time_max_T}
    return {"problem": f"{inst.description.split(':')[0]}: MLP 65 -> {width} -> {width} -> 10 "
                       f"({second_order.n_params(inst.phi0)} parameters), n = {n}, full-batch GD step {MLP_LR}, "
                       "float32", "rows": rows, "max_rel_diff_mixed_reverse": agreement}

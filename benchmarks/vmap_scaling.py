"""Measure 4: `vmap` over seeds. S seeds run in one call of `jit(vmap(run))` (the data shared,
in_axes=None), against one seed without vmap; the figure of merit is the time per step per seed
and its ratio to the single-seed run (below 1: batching pays). For SOBA, the plain-JAX reference
step of `reference.py` is run the same way (one seed and `reference_seeds` seeds), to tell the
toolkit's share from what XLA does with the vmapped problem itself."""
from __future__ import annotations

import jax

import bilevel_jax as bj
from benchmarks import reference, timing
from benchmarks.setups import Benchmark, make_algorithm


def _reference_rows(setup: Benchmark, seeds, num_steps: int, repeats: int) -> dict:
    ref = reference.reference_soba_run(setup.problem.f_upper, setup.problem.f_lower, setup.batch_size, num_steps)
    args = (setup.theta0, setup.phi0)
    base = timing.timeit(jax.jit(ref), *args, jax.random.PRNGKey(0), setup.data, repeats=repeats,
                         scale=num_steps, budget_s=2.0)
    rows = {"1 (no vmap)": {**base, "per_step_per_seed_s": base["median"], "vs_one_seed": 1.0}}
    batched = jax.jit(jax.vmap(ref, in_axes=(None, None, 0, None)))
    for s in seeds:
        t = timing.timeit(batched, *args, jax.random.split(jax.random.PRNGKey(0), s), setup.data, repeats=repeats,
                          scale=num_steps, budget_s=2.0)
        rows[str(s)] = {**t, "per_step_per_seed_s": t["median"] / s, "vs_one_seed": t["median"] / s / base["median"]}
    return rows


def measure(setup: Benchmark, preset: str, seeds, num_steps: int, repeats: int, reference_seeds=()) -> dict:
    alg = make_algorithm(preset, setup)

    def one(key, theta0, phi0, data):
        state, _ = bj.run(alg, alg.init(theta0, phi0, key, data), data, num_steps=num_steps)
        return state.theta, state.phi

    args = (setup.theta0, setup.phi0, setup.data)
    base = timing.timeit(jax.jit(one), jax.random.PRNGKey(0), *args, repeats=repeats, scale=num_steps, budget_s=2.0)
    rows = {"1 (no vmap)": {**base, "per_step_per_seed_s": base["median"], "vs_one_seed": 1.0}}
    batched = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))
    for s in seeds:
        keys = jax.random.split(jax.random.PRNGKey(0), s)
        t = timing.timeit(batched, keys, *args, repeats=repeats, scale=num_steps, budget_s=2.0)
        per_seed = t["median"] / s
        rows[str(s)] = {**t, "per_step_per_seed_s": per_seed, "vs_one_seed": per_seed / base["median"]}
    out = {"problem": setup.description, "preset": preset, "steps_per_call": num_steps, "seeds": rows}
    if preset == "soba" and reference_seeds:
        out["reference_seeds"] = _reference_rows(setup, reference_seeds, num_steps, repeats)
    return out

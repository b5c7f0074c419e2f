"""Measure: data-parallel scaling over 1, 2 and 4 devices (`mesh=`, `bj.sharding`).

Each device count D runs in its own process (`python -m benchmarks.scaling D`): on a CPU with
`XLA_FLAGS=--xla_force_host_platform_device_count=D` (forced host devices share the machine's
cores, so the step time measures the overhead of the sharded program, not a speed-up), on a GPU
machine the first D GPUs. Per preset: the median time of one outer step, the bytes its compiled
program moves by collectives (`bj.collectives`, read from the optimised HLO) and the ideal: one
all-reduce of every oracle output the step computes (its `OracleCounts` times the size of each
oracle's result: (d_theta + d_phi) per UL gradient, d_phi per LL gradient and HVP, d_theta per
cross product, 1 per value). Moved / ideal below 1 means XLA fused or skipped reductions; above
1, something beyond the oracles' results crossed the devices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = (("soba", "iid"), ("soba", "shuffled"), ("saba", "partition"), ("amigo", "iid"), ("stocbio", "shuffled"))


def _worker(devices: int, quick: bool, repeats: int) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import bilevel_jax as bj
    from benchmarks import timing

    d_theta, d_phi, n, batch, steps = (8, 8, 256, 32, 4) if quick else (100, 100, 4096, 256, 20)
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), d_theta, d_phi, n_samples=n,
                                         lower_spectrum=(0.1, 1.0), dtype=jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    placed = bj.shard(inst.data, mesh)
    itemsize = jnp.dtype(jnp.float32).itemsize
    rows = {}
    for name, sampler in CASES:
        alg = bj.algorithms.get(name)(inst.problem, batch_size=batch, sampler=sampler, mesh=mesh)
        state = alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(1), placed)
        update = eqx.filter_jit(alg.update)
        ops = bj.collectives.of(update.lower(state, placed).compile())
        _, info = update(state, placed)
        c = info.oracles
        ideal = itemsize * (int(c.upper_grads) * (d_theta + d_phi) + int(c.lower_grads) * d_phi
                            + int(c.hvps) * d_phi + int(c.cross) * d_theta + int(c.values))
        run = eqx.filter_jit(lambda s, d: bj.run(alg, s, d, steps)[0].theta)
        t = timing.timeit(run, state, placed, repeats=repeats, scale=steps, budget_s=5.0)
        moved = sum(op.bytes for op in ops)
        rows[f"{name} ({sampler})"] = {
            "step": t, "collectives": len(ops), "bytes_moved": moved,
            "bytes_ideal": ideal if devices > 1 else 0, "moved_vs_ideal": moved / ideal if devices > 1 else None,
            "largest_operand": max((op.largest for op in ops), default=0)}
    return {"devices": devices, "platform": jax.devices()[0].platform, "problem": (
        f"finite-sum quadratic, d_theta = d_phi = {d_theta}, n = {n}, batch {batch} ({batch // devices} per device), "
        "float32"), "presets": rows}


def measure(quick: bool, repeats: int, counts=(1, 2, 4), log=print) -> dict:
    """One subprocess per device count; CPU: forced host devices (`counts`), GPU: the first D
    GPUs for D = 1, 2, 4, ... up to the machine's count."""
    import jax

    gpus = len(jax.devices()) if jax.default_backend() != "cpu" else 0
    if gpus:   # every power of two up to the machine's accelerators
        counts = tuple(2 ** k for k in range(gpus.bit_length()) if 2 ** k <= gpus)
    out = {}
    for d in counts:
        env = dict(os.environ)
        if not gpus:
            flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--ignored")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={d}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, "-m", "benchmarks.scaling", str(d), str(int(quick)), str(repeats)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            raise RuntimeError(f"scaling worker with {d} devices failed:\n{proc.stderr[-3000:]}")
        out[str(d)] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  {d} device(s) done")
    base = out.get("1", {}).get("presets", {})
    for row in out.values():
        for name, r in row["presets"].items():
            if name in base:
                r["vs_one_device"] = r["step"]["median"] / base[name]["step"]["median"]
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(int(sys.argv[1]), bool(int(sys.argv[2])), int(sys.argv[3]))))

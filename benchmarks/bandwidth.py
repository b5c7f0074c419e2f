"""Measure 9: the fraction of the device's memory bandwidth a step achieves.

The device's rate: a copy in place, a jitted `x + 1` over a float32 array of `size_mib` MiB with
the input donated (each element read once and written once into the same buffer: no allocation
nor page faults in the timed calls; larger than the last-level cache), `copy_read_GBps` = bytes
read / time, the median of repeated calls (`copy_GBps` counts the written bytes too); and a
streaming read alone (`jnp.sum` over the same array, `read_GBps`).

A step's rate: the bytes it must read (every minibatch it draws, each read once: its UL batch and
its LL batches, whole samples of the leaves its oracles use) / its time per step. The fraction is
step rate / copy read rate: 1 means the step streams its minibatches as fast as the device copies
memory (the bound for a memory-bound step: the quadratic's dense per-sample matrices); the logistic
problem's 64 x 23 floats per batch are far below it (its steps are bound by latency, not bytes).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing


def copy_bandwidth(size_mib: int = 256, repeats: int = 7) -> dict:
    n = size_mib * 2 ** 20 // 4
    nbytes = n * 4
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = add(jnp.zeros((n,), jnp.float32))   # compiled; x is a buffer the calls update in place
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = add(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    copy = timing.stats(times)
    read = timing.timeit(jax.jit(jnp.sum), x, repeats=repeats)
    del x
    return {"size_mib": size_mib, "copy_time": copy, "read_time": read, "bytes": nbytes,
            "copy_read_GBps": nbytes / copy["median"] / 1e9, "copy_GBps": 2 * nbytes / copy["median"] / 1e9,
            "best_copy_read_GBps": nbytes / copy["min"] / 1e9, "read_GBps": nbytes / read["median"] / 1e9}


def copy_rate(nbytes: int, passes: int = 1, repeats: int = 7) -> dict:
    """The copy rate of a float32 array of `nbytes`: `passes` in-place `x + 1` passes per call (a
    traced trip count, so XLA neither unrolls nor fuses them; many passes over an array that stays
    in cache, e.g. one minibatch matrix, give the cache's rate), the median of `repeats` calls;
    `copy_read_GBps` = bytes read / wall time, as `copy_bandwidth`, and `copy_read_GBps_cpu` = bytes
    read / process CPU time (the rate per CPU-second: on a shared machine it leaves out the time
    the calls waited for a core)."""
    add = jax.jit(lambda x, k: jax.lax.fori_loop(0, k, lambda _, y: y + 1.0, x), donate_argnums=0)
    k = jnp.asarray(passes, jnp.int32)
    x = add(jnp.zeros((nbytes // 4,), jnp.float32), k)   # compiled; the calls update x in place
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        x = add(x, k)
        x.block_until_ready()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    del x
    copy, copy_cpu = timing.stats(wall, passes), timing.stats(cpu, passes)
    return {"bytes": nbytes, "passes": passes, "copy_time": copy, "copy_cpu_time": copy_cpu,
            "copy_read_GBps": nbytes / copy["median"] / 1e9, "copy_read_GBps_cpu": nbytes / copy_cpu["median"] / 1e9}


def batch_bytes(level_data, batch_size: int, leaves: Optional[Sequence[str]] = None) -> int:
    """Bytes of `batch_size` samples of `level_data` (a pytree with a leading sample axis; `leaves`
    restricts a dict to those keys)."""
    if isinstance(level_data, dict) and leaves is not None:
        level_data = {k: level_data[k] for k in leaves}
    total = 0
    for x in jax.tree_util.tree_leaves(level_data):
        total += int(np.prod(jnp.shape(x)[1:])) * jnp.result_type(x).itemsize
    return batch_size * total


def fraction(bytes_per_step: float, seconds_per_step: float, copy: dict) -> dict:
    rate = bytes_per_step / seconds_per_step / 1e9
    return {"bytes_per_step": bytes_per_step, "GBps": rate, "fraction_of_copy": rate / copy["copy_read_GBps"]}


def measure(results: dict, size_mib: int, repeats: int) -> dict:
    """The copy rate, and the fraction of it achieved by every timed row of the `reference` and
    `bilevel` sections already in `results` (each row's median time per step)."""
    copy = copy_bandwidth(size_mib, max(repeats, 3))
    rows = {}
    for setup, sec in (results.get("reference") or {}).items():
        for label, r in (sec.get("rows") or {}).items() if isinstance(sec, dict) else ():
            if "bytes_per_step" not in r:
                continue
            for who in ("bilevel_jax", "reference"):
                rows[f"reference/{setup}/{label}/{who}"] = fraction(r["bytes_per_step"], r[who]["median"], copy)
    bilevel = results.get("bilevel") or {}
    for name, r in (bilevel.get("methods") or {}).items():
        if "bytes_per_step" not in r:
            continue
        for label in ("peer:peer", "peer:einsum", "bilevel_jax", "bilevel_jax:peer"):
            who = label.split(":")[0]
            rows[f"bilevel/{name}/{label}"] = fraction(r["bytes_per_step"][who], r[label]["median"], copy)
    return {"copy": copy, "rows": rows}

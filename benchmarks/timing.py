"""A small timing utility: a warm-up call (compilation + first run), then `repeats` calls, each
wrapped in `jax.block_until_ready`; medians with the inter-quartile range and min/max.

Ratios between two functions are taken in the same run with interleaved calls (A, B, A, B, ...)
so that a change in machine load hits both; `ratio` reports the median of the per-pair ratios.
`interleaved` also records the process CPU time of every call (`cpu`, `cpu_samples`): on a shared
machine (other processes on the same cores) the wall time of a call includes the time it waited
for a core, its CPU time does not, so CPU-time ratios are the steadier comparison there (for
XLA:CPU programs that run on one thread; a multi-threaded call counts the time of all its threads).
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, List, Sequence

import jax
import numpy as np


def stats(samples: Sequence[float], scale: float = 1.0) -> Dict[str, float]:
    """Median, quartiles, min and max of `samples` divided by `scale` (e.g. K steps per call)."""
    a = np.asarray(samples, dtype=float) / scale
    q25, med, q75 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _once(fn: Callable, args) -> float:
    return _once_both(fn, args)[0]


def _once_both(fn: Callable, args):
    """(wall seconds, process CPU seconds) of one blocking call."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def timeit(fn: Callable, *args, repeats: int = 5, scale: float = 1.0, budget_s: float = float("inf"),
           min_repeats: int = 3) -> Dict[str, object]:
    """Time `fn(*args)`: `first_call_s` (compile + run), then `repeats` timed calls (fewer, but at
    least `min_repeats`, once the timed calls have used `budget_s` seconds)."""
    first = _once(fn, args)
    times: List[float] = []
    while len(times) < repeats and (len(times) < min_repeats or sum(times) < budget_s):
        times.append(_once(fn, args))
    out = stats(times, scale)
    out["first_call_s"] = first
    return out


def interleaved(fns: Dict[str, Callable], args: Dict[str, tuple], repeats: int = 5,
                scale=1.0) -> Dict[str, dict]:
    """Warm every function up, then time them round-robin `repeats` times; per-function stats
    (first_call_s included) and the raw samples, round by round (for per-round ratios), of the wall
    time and (`cpu`, `cpu_samples`) of the process CPU time.
    `scale`: one divisor for all, or a dict of divisors by function name."""
    scales = scale if isinstance(scale, dict) else {k: scale for k in fns}
    first = {k: _once(f, args[k]) for k, f in fns.items()}
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            w, c = _once_both(f, args[k])
            samples[k].append(w)
            cpu[k].append(c)
    out = {}
    for k in fns:
        out[k] = stats(samples[k], scales[k])
        out[k]["first_call_s"] = first[k]
        out[k]["samples"] = [t / scales[k] for t in samples[k]]
        out[k]["cpu"] = stats(cpu[k], scales[k])
        out[k]["cpu_samples"] = [t / scales[k] for t in cpu[k]]
    return out


def ratio(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Stats of the per-pair ratios a_i / b_i (same-run, interleaved samples)."""
    return stats(np.asarray(a, float) / np.asarray(b, float))


def ratios(res: Dict[str, dict], a: str, b: str) -> Dict[str, object]:
    """Wall-time ratio stats of `interleaved` results a / b, with the CPU-time ratio stats (`cpu`)."""
    out = ratio(res[a]["samples"], res[b]["samples"])
    out["cpu"] = ratio(res[a]["cpu_samples"], res[b]["cpu_samples"])
    return out


def wall(fn: Callable, *args) -> float:
    """Seconds of one blocking call (no warm-up): compile times, process starts."""
    return _once(fn, args)


def error_row(error: Exception) -> Dict[str, str]:
    """The row of a measurement that raised (inside its `except`): the error and its traceback, so
    one failing preset or section is reported and the bench goes on."""
    return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}

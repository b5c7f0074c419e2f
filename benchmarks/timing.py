"""A small timing utility: a warm-up call (compilation + first run), then `repeats` calls, each
wrapped in `jax.block_until_ready`; medians with the inter-quartile range and min/max.

Ratios between two functions are taken in the same run with interleaved calls (A, B, A, B, ...)
so that a change in machine load hits both; `ratio` reports the median of the per-pair ratios.
"""
from __future__ import annotations

import time
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
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


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
    (first_call_s included) and the raw samples, round by round (for per-round ratios).
    `scale`: one divisor for all, or a dict of divisors by function name."""
    scales = scale if isinstance(scale, dict) else {k: scale for k in fns}
    first = {k: _once(f, args[k]) for k, f in fns.items()}
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            samples[k].append(_once(f, args[k]))
    out = {}
    for k in fns:
        out[k] = stats(samples[k], scales[k])
        out[k]["first_call_s"] = first[k]
        out[k]["samples"] = [t / scales[k] for t in samples[k]]
    return out


def ratio(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Stats of the per-pair ratios a_i / b_i (same-run, interleaved samples)."""
    return stats(np.asarray(a, float) / np.asarray(b, float))


def wall(fn: Callable, *args) -> float:
    """Seconds of one blocking call (no warm-up): compile times, process starts."""
    return _once(fn, args)

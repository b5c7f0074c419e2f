"""Measure 3: compile time per preset, and a second process start with the persistent
compilation cache enabled by `bj.enable_compilation_cache`.

The main bench process enables the cache in a fresh (empty) directory before compiling anything,
so its first calls (measure 1: trace+lower and XLA compile, timed ahead of time) are cold
compilations that also write the cache. This module then starts a second Python process on the
same directory that builds the same quadratic setup and the same K-step runs of every preset, and
reports, per preset, the time from `jit(...).lower` to a loaded executable (a cache hit), with
JAX's own cache-hit/miss events as evidence, plus the process's wall time (interpreter start,
imports, problem setup and all loads).

    python -m benchmarks.compile_cache --cache-dir DIR --out FILE [--quick] [--presets a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_T_START = time.perf_counter()


def child(cache_dir: str, out: str, quick: bool, presets, num_steps: int) -> None:
    t_import0 = time.perf_counter()
    import jax

    import bilevel_jax as bj
    from benchmarks import setups, steps

    events = {"hits": 0, "misses": 0}

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            events["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            events["misses"] += 1

    jax.monitoring.register_event_listener(listener)
    bj.enable_compilation_cache(cache_dir)
    t_import1 = time.perf_counter()
    setup = setups.quadratic(quick)
    t_setup = time.perf_counter()
    per_preset = {}
    for name in presets:
        before = dict(events)
        fn, state = steps.build_runner(setup, name, num_steps)
        _, t = steps.compile_runner(fn, state, setup.data)
        t["cache_hits"] = events["hits"] - before["hits"]
        t["cache_misses"] = events["misses"] - before["misses"]
        per_preset[name] = t
    t_end = time.perf_counter()
    json.dump({"imports_s": t_import1 - t_import0, "setup_s": t_setup - t_import1,
               "compile_total_s": t_end - t_setup, "in_process_s": t_end - _T_START,
               "events": events, "presets": per_preset}, open(out, "w"))


def measure(cache_dir: str, quick: bool, presets, num_steps: int, cold: dict, cold_setup_s: float,
            tmp_out: str) -> dict:
    """Run the warm child and put its numbers next to the cold (main-process) ones."""
    cmd = [sys.executable, "-m", "benchmarks.compile_cache", "--cache-dir", cache_dir, "--out", tmp_out,
           "--steps", str(num_steps), "--presets", ",".join(presets)] + (["--quick"] if quick else [])
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    warm = json.load(open(tmp_out))
    rows = {}
    for name in presets:
        c = cold.get(name, {})
        w = warm["presets"].get(name, {})
        rows[name] = {"cold_first_call_s": c.get("first_call_s"), "cold_compile_s": c.get("compile_s"),
                      "warm_first_call_s": w.get("first_call_s"), "warm_compile_s": w.get("compile_s"),
                      "warm_cache_hits": w.get("cache_hits"), "warm_cache_misses": w.get("cache_misses")}
    cold_total = sum(r["cold_first_call_s"] or 0.0 for r in rows.values())
    return {"cache_dir": cache_dir, "presets": rows,
            "second_process": {"wall_s": wall, **{k: v for k, v in warm.items() if k != "presets"}},
            "cold_setup_s": cold_setup_s, "cold_compile_total_s": cold_total,
            "warm_compile_total_s": warm["compile_total_s"]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--presets", required=True)
    a = p.parse_args(argv)
    child(a.cache_dir, a.out, a.quick, a.presets.split(","), a.steps)


if __name__ == "__main__":
    main()

"""`python -m benchmarks [--quick] [--out results/bench/bench.json] [--only a,b] [--presets a,b]`

Runs the measurements of the bench (one module each), writes one JSON file and prints markdown
tables (device, versions, medians with their spread). `make bench` runs it; `--quick` uses tiny
problems, two presets and few repeats (the smoke test), so its numbers mean nothing.

  steps      (steps.py)              time per outer iteration of every preset, 3 setups
  oracles    (oracle_efficiency.py)  step time / sum of its separately timed oracle calls
  compile    (compile_cache.py)      cold compile per preset; a second process with the cache
  reference  (reference.py)          SOBA, SABA, AmIGO, StocBiO, MRBO against plain-JAX steps
                                     (same sampling, same iterates), on quadratic and logistic
  bilevel    (peer_bilevel.py)       against benchmark_bilevel (re-implemented) on its own quadratic
                                     and sampling scheme: SOBA, SABA, AmIGO, StocBiO
  bandwidth  (bandwidth.py)          device copy rate; the fraction of it each step of the two
                                     sections above achieves (bytes it must read / time)
  vmap       (vmap_scaling.py)       S seeds in one vmapped call against one seed
  unrolled   (unrolled.py)           reverse / checkpointed / forward / mixed unrolling against T;
                                     reverse against mixed on an MLP lower level (memory, time)
  second_order (second_order.py)     mode="fwd" against "rev" for (A v, J v) and an implicit
                                     hypergradient, MLP phi at three widths (memory, time)
  peer       (peer.py)               jaxopt implicit differentiation against bj.hypergradient
  precision  (precision.py)          bj.Precision (bfloat16, float16 compute; float32 states) against
                                     float32: hypergradient (logistic, MLP) and SOBA step time, error
  scaling    (scaling.py)            data-parallel steps (mesh=) on 1, 2, 4 devices (forced host devices
                                     on a CPU, one process each): step time, collective bytes per step
                                     read from the compiled HLO, against the ideal
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

MEASURES = ("steps", "oracles", "compile", "reference", "bilevel", "bandwidth", "vmap", "unrolled", "second_order",
            "peer", "scaling", "precision")

FULL = dict(
    repeats=3,
    steps={"quadratic": 20, "logistic": 500, "logistic_full": 10},
    unit_calls={"quadratic": 100, "logistic": 2000, "logistic_full": 50}, oracle_rounds=3,
    reference_steps={"quadratic": {"soba": 20, "saba": 20, "amigo": 4, "stocbio": 4, "mrbo": 4},
                     "logistic": {"soba": 2000, "saba": 500, "amigo": 50, "stocbio": 50, "mrbo": 50}},
    reference_repeats=7, reference_methods=("soba", "saba", "amigo", "stocbio", "mrbo"),
    bilevel_steps={"soba": 20, "saba": 20, "amigo": 2, "stocbio": 2}, bilevel_repeats=9,
    bilevel_methods=("soba", "saba", "amigo", "stocbio"), copy_mib=256,
    vmap_preset="soba", vmap_seeds=(4, 16), vmap_reference_seeds=(16,), vmap_steps={"quadratic": 5, "logistic": 100},
    unrolled_n=4096, unrolled_T=(10, 100, 1000), peer_maxiter=20, presets=None,
    unrolled_mlp_width=256, unrolled_mlp_n=512, unrolled_mlp_time_max_T=100,
    second_order_widths=(64, 256, 1024), second_order_n=512, second_order_cg=10,
    precision_width=512, precision_n=2048, precision_cg=10, precision_soba_steps=200,
    full_batch_only="defaults",   # logistic_full: the presets whose default is full batch, and soba
)
QUICK = dict(
    repeats=2,
    steps={"quadratic": 4, "logistic": 4, "logistic_full": 4},
    unit_calls={"quadratic": 4, "logistic": 4, "logistic_full": 4}, oracle_rounds=2,
    reference_steps={"quadratic": {"soba": 4, "saba": 4}, "logistic": {"soba": 4, "saba": 4}},
    reference_repeats=2, reference_methods=("soba", "saba"),
    bilevel_steps={"soba": 2}, bilevel_repeats=2, bilevel_methods=("soba",), copy_mib=16,
    vmap_preset="soba", vmap_seeds=(2,), vmap_reference_seeds=(2,), vmap_steps={"quadratic": 4, "logistic": 4},
    unrolled_n=64, unrolled_T=(2,), peer_maxiter=3, presets=("soba", "stocbio"), full_batch_only=None,
    unrolled_mlp_width=8, unrolled_mlp_n=16, unrolled_mlp_time_max_T=2,
    second_order_widths=(4, 8, 16), second_order_n=16, second_order_cg=2,
    precision_width=8, precision_n=16, precision_cg=2, precision_soba_steps=2,
)


def _meta(quick):
    import importlib.metadata as md

    import jax

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {dev.device_kind}" + (f" ({cpu}, {os.cpu_count()} cores)" if dev.platform == "cpu" else ""),
        "platform": dev.platform, "n_devices": jax.device_count(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "os": platform.platform(),
        "versions": {p: version(p) for p in ("jax", "jaxlib", "optax", "equinox", "chex", "numpy", "jaxopt", "bilevel_jax")},
        "quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": os.getloadavg(),
        "x64": bool(jax.config.jax_enable_x64), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _clean(obj):
    """JSON-able copy: drops private keys (compiled executables, states)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return obj.item()
    return obj


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test)")
    p.add_argument("--out", default=os.path.join("results", "bench", "bench.json"))
    p.add_argument("--only", default=",".join(MEASURES), help=f"comma list of {MEASURES}")
    p.add_argument("--presets", default=None, help="comma list of presets (default: all; --quick: soba,stocbio)")
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    only = [m.strip() for m in a.only.split(",") if m.strip()]
    unknown = set(only) - set(MEASURES)
    if unknown:
        p.error(f"unknown measures {sorted(unknown)}; valid: {MEASURES}")
    if "oracles" in only and "steps" not in only:
        only.insert(0, "steps")
    cfg = dict(QUICK if a.quick else FULL)
    if a.repeats is not None:
        cfg["repeats"] = a.repeats

    t_start = time.perf_counter()
    import bilevel_jax as bj
    from benchmarks import report, setups

    presets = (a.presets.split(",") if a.presets else cfg["presets"]) or list(bj.algorithms.ALGORITHMS)
    for name in presets:
        bj.algorithms.get(name)   # a clear error for unknown names
    cache_dir = None
    if "compile" in only:
        # A fresh, empty cache: every compilation of this process is cold and fills it.
        cache_dir = tempfile.mkdtemp(prefix="bilevel_jax_bench_cache_")
        bj.enable_compilation_cache(cache_dir)

    results = {"meta": _meta(a.quick), "config": {k: v for k, v in cfg.items()}, "measures": only}
    results["config"]["presets"] = presets
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t = time.perf_counter()
    all_setups = setups.all_setups(a.quick)
    by_name = {s.name: s for s in all_setups}
    results["setup_s"] = {"all": time.perf_counter() - t}
    results["problems"] = {s.name: s.description for s in all_setups}
    log(f"setups built in {results['setup_s']['all']:.1f} s")
    repeats = cfg["repeats"]

    def section(name, fn):
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - report and go on with the other measures
            from benchmarks import timing
            results[name] = timing.error_row(e)
            log(results[name]["traceback"])
        results.setdefault("section_s", {})[name] = time.perf_counter() - t0
        log(f"[{name}] {time.perf_counter() - t0:.1f} s")

    if "steps" in only:
        from benchmarks import steps
        restrict = None
        if cfg.get("full_batch_only") == "defaults":
            import inspect
            full_batch = [n for n in presets if inspect.signature(bj.algorithms.get(n)).parameters.get("batch_size")
                          is not None and inspect.signature(bj.algorithms.get(n)).parameters["batch_size"].default is None]
            restrict = {"logistic_full": full_batch + [n for n in ("soba",) if n in presets]}
            results["config"]["logistic_full_presets"] = restrict["logistic_full"]
        section("steps", lambda: steps.measure(all_setups, presets, cfg["steps"], repeats, log, restrict))
    if "oracles" in only and isinstance(results.get("steps"), dict) and "error" not in results["steps"]:
        from benchmarks import oracle_efficiency
        section("oracles", lambda: {
            s.name: oracle_efficiency.measure(s, results["steps"][s.name]["presets"], cfg["unit_calls"][s.name],
                                              cfg["oracle_rounds"])
            for s in all_setups})
    if "compile" in only:
        from benchmarks import compile_cache, steps
        quad_steps = results.get("steps", {}).get("quadratic", {}).get("presets", {})

        def compile_measure():
            cold = {k: v["compile"] for k, v in quad_steps.items() if "compile" in v}
            if not cold:   # steps not run: compile cold here, in the same way
                q = by_name["quadratic"]
                for name in presets:
                    fn, st = steps.build_runner(q, name, cfg["steps"]["quadratic"])
                    cold[name] = steps.compile_runner(fn, st, q.data)[1]
            with tempfile.TemporaryDirectory() as tmp:
                return compile_cache.measure(cache_dir, a.quick, presets, cfg["steps"]["quadratic"], cold,
                                             results["setup_s"]["all"], os.path.join(tmp, "warm.json"))
        section("compile", compile_measure)
    if "reference" in only:
        from benchmarks import reference
        section("reference", lambda: {
            name: reference.measure(by_name[name], cfg["reference_steps"][name], cfg["reference_repeats"],
                                    cfg["reference_methods"], log, history_for=("soba",))
            for name in ("quadratic", "logistic")})
    if "bilevel" in only:
        from benchmarks import peer_bilevel
        section("bilevel", lambda: peer_bilevel.measure(a.quick, cfg["bilevel_steps"], cfg["bilevel_repeats"],
                                                        cfg["bilevel_methods"], log, cfg["copy_mib"]))
    if "bandwidth" in only:
        from benchmarks import bandwidth
        section("bandwidth", lambda: bandwidth.measure(results, cfg["copy_mib"], repeats))
    if "vmap" in only:
        from benchmarks import vmap_scaling
        section("vmap", lambda: {
            name: vmap_scaling.measure(by_name[name], cfg["vmap_preset"], cfg["vmap_seeds"], cfg["vmap_steps"][name], repeats,
                                       cfg["vmap_reference_seeds"])
            for name in ("quadratic", "logistic")})
    if "unrolled" in only:
        from benchmarks import unrolled
        section("unrolled", lambda: {
            **unrolled.measure(by_name["logistic_full"], cfg["unrolled_n"], cfg["unrolled_T"], repeats),
            "mlp": unrolled.measure_mlp(cfg["unrolled_mlp_width"], cfg["unrolled_mlp_n"], cfg["unrolled_T"],
                                        cfg["unrolled_mlp_time_max_T"], repeats)})
    if "second_order" in only:
        from benchmarks import second_order
        section("second_order", lambda: second_order.measure(cfg["second_order_widths"], cfg["second_order_n"],
                                                             cfg["second_order_cg"], repeats))
    if "peer" in only:
        from benchmarks import peer
        s = by_name["logistic_full"]
        section("peer", lambda: peer.measure(s, bj.problems.logistic_hpo(s.data, key=0), cfg["peer_maxiter"], repeats))

    if "precision" in only:
        from benchmarks import precision
        section("precision", lambda: precision.measure(by_name["logistic_full"], cfg["precision_width"], cfg["precision_n"],
                                                       cfg["precision_cg"], cfg["precision_soba_steps"], repeats))

    if "scaling" in only:
        from benchmarks import scaling
        section("scaling", lambda: scaling.measure(a.quick, repeats, log=log))

    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    results["meta"]["load_avg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_start
    out = _clean(results)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    md = report.markdown(out)
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {a.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""Markdown tables of a bench.json: device and versions, medians with their spread."""
from __future__ import annotations

from typing import List


def _t(s, unit="ms"):
    """'median [q25-q75]' of a stats dict, seconds shown in `unit`."""
    if not s or "median" not in s:
        return "-"
    k = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    return f"{s['median'] * k:.4g} [{s['q25'] * k:.3g}-{s['q75'] * k:.3g}] {unit}"


def _auto(s):
    if not s or "median" not in s:
        return "-"
    m = s["median"]
    return _t(s, "us" if m < 1e-3 else "ms" if m < 1 else "s")


def _n(x, fmt=".3g"):
    return "-" if x is None else format(x, fmt)


def _mib(b):
    return "-" if b is None else f"{b / 2 ** 20:.3g}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _bandwidth_account(acc: dict) -> List[str]:
    """The bandwidth account of the bilevel section (benchmarks/peer_bilevel.py, `bandwidth_account`)."""
    if not acc:
        return []
    if "error" in acc:
        return [f"Bandwidth account: ERROR {acc['error']}", ""]
    mb = lambda b: f"{b / 1e6:.3g}"
    mem, cache = acc["rates"]["memory"], acc["rates"]["cache"]
    rate = lambda r: f"{r['copy_read_GBps']:.3g} / {r['copy_read_GBps_cpu']:.3g}"
    lines = ["### Bandwidth account: the peer's objective code on both sides", "",
             "Passes over a minibatch one iteration needs (bilevel_jax's scheme) and the bytes they must move: every "
             "batch matrix read once a pass (the least any code reads: in brackets), and with the peer's objective code "
             "(each pass compiled alone by its cheaper differentiation: the reads of the matrices its derivative "
             "contracts, the copy XLA:CPU makes of a dynamically sliced operand before a dot, and its writes); the "
             "bytes each compiled step moves (batch-matrix reads + writes). Floor = the first read of each fresh batch "
             f"matrix at the memory copy rate ({mem['bytes'] / 2 ** 20:.0f} MiB: {rate(mem)} GB/s by wall / CPU time) + the "
             f"other bytes at the cache copy rate (one batch matrix, {acc['matrix_bytes'] / 1e6:.3g} MB: {rate(cache)} GB/s), "
             "both measured in this run; against the median time per iteration of the peer and of bj on the peer's "
             "objective, wall / CPU time (on a loaded machine the CPU-time columns are the steadier). The bytes are "
             "read from the compiled programs and do not depend on the load. MB = 1e6 bytes.", ""]
    rows = []
    for name, m in acc["methods"].items():
        c, w, u = m["compiled"], m["wall"], m["cpu"]
        ms = lambda key: f"{w[key] * 1e3:.3g} / {u[key] * 1e3:.3g}"
        x = lambda key: f"{w[key]:.2f} / {u[key]:.2f}"
        rows.append([name, " + ".join(f"{n} {p}" for p, n in m["passes"].items()),
                     f"{mb(m['code_bytes'])} ({mb(m['strict_bytes'])})",
                     f"{mb(c['peer']['bytes'])} ({c['peer']['matrix_reads']:.0f} + {c['peer']['matrix_writes']:.0f})",
                     f"{mb(c['bilevel_jax']['bytes'])} ({c['bilevel_jax']['matrix_reads']:.0f} + "
                     f"{c['bilevel_jax']['matrix_writes']:.0f})",
                     f"{m['code_over_peer_bytes']:.2f} ({m['strict_over_peer_bytes']:.2f}) / {m['bilevel_jax_over_peer_bytes']:.2f}",
                     f"{ms('floor_s')} ({w['strict_floor_s'] * 1e3:.2g} / {u['strict_floor_s'] * 1e3:.2g})", ms("peer_s"),
                     ms("bilevel_jax_s"), f"{x('floor_over_peer')} ({w['strict_floor_over_peer']:.2f} / "
                     f"{u['strict_floor_over_peer']:.2f})", x("bilevel_jax_over_peer")])
    return lines + _table(
        ["method", "passes / iteration", "must move MB, peer's code (each matrix once)",
         "compiled peer step MB (matrix reads + writes)", "compiled bj step MB (reads + writes)",
         "bytes / peer's: floor (each once) / bj", "floor ms (each once)", "peer ms", "bj ms",
         "floor / peer (each once)", "bj / peer"], rows) + [
        "", "(ms and ratios: wall / CPU time.)", ""]


def _scaling(sc: dict) -> List[str]:
    """The data-parallel scaling table (benchmarks/scaling.py)."""
    if not sc or "error" in sc:
        return []
    first = next(iter(sc.values()))
    lines = ["## Data-parallel scaling (`mesh=`)", "",
             f"{first['problem']}; one process per device count ({first['platform']}"
             + ("; forced host devices share the CPU's cores: the times show the sharded program's overhead, "
                "not a speed-up" if first["platform"] == "cpu" else "") + "). Bytes moved: the collectives of one "
             "compiled outer step (from its HLO); ideal: one all-reduce of every oracle result of the step.", ""]
    rows = []
    for d, row in sc.items():
        for name, r in row["presets"].items():
            ratio = r.get("moved_vs_ideal")
            rows.append([name, d, _auto(r["step"]), _n(r.get("vs_one_device")), str(r["collectives"]),
                         str(r["bytes_moved"]), str(r["bytes_ideal"]), "-" if ratio is None else _n(ratio),
                         str(r["largest_operand"])])
    rows.sort(key=lambda x: (x[0], int(x[1])))
    return lines + _table(["preset", "devices", "step", "vs 1 device", "collectives", "bytes moved", "ideal",
                           "moved / ideal", "largest operand (elements)"], rows) + [""]


def markdown(res: dict) -> str:
    m = res["meta"]
    v = m["versions"]
    lines = ["# bilevel_jax bench" + (" (--quick: sizes too small to mean anything)" if m.get("quick") else ""), "",
             f"- device: {m['device']}",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + f"; python {m['python']}"
             + (f"; XLA_FLAGS={m['xla_flags']}" if m.get("xla_flags") else ""),
             f"- load average (1/5/15 min) at start {tuple(round(x, 2) for x in m['load_avg_start'])}, "
             f"end {tuple(round(x, 2) for x in m.get('load_avg_end', ()))}; total {res.get('total_s', 0):.0f} s",
             "- times: median [inter-quartile range] over repeated calls, each call `jax.block_until_ready`-ed "
             "after a warm-up call", ""]
    for name, desc in res.get("problems", {}).items():
        lines.append(f"- `{name}`: {desc}")
    lines.append("")

    steps, orc, comp = res.get("steps", {}), res.get("oracles", {}), res.get("compile", {})
    if steps and "error" not in steps:
        names = list(steps)
        presets = list(next(iter(steps.values()))["presets"])
        lines += ["## Time per outer iteration, compile time, oracle efficiency", "",
                  "Time per step: a jitted `bj.run` of K steps / K (K = " +
                  ", ".join(f"{n}: {res['config']['steps'][n]}" for n in names) + "). Compile: first call "
                  "(trace + XLA compile) of that run on `quadratic` in a cold process, and in a second process "
                  "with `bj.enable_compilation_cache` (cache hits).", ""]
        header = ["preset"] + [f"{n} / step" for n in names]
        if comp and "presets" in comp:
            header += ["compile cold (s)", "2nd process (s)"]
        rows = []
        for p in presets:
            row = [p]
            for n in names:
                r = steps[n]["presets"].get(p, {})
                row.append("ERROR" if "error" in r else _auto(r.get("per_step")) + ("" if r.get("finite", True) else " (non-finite)"))
            if comp and "presets" in comp:
                c = comp["presets"].get(p, {})
                row += [_n(c.get("cold_first_call_s")), _n(c.get("warm_first_call_s"))]
            rows.append(row)
        lines += _table(header, rows) + [""]
        if orc and "error" not in orc:
            lines += ["Oracle efficiency: step time / sum of its oracle calls timed alone (the K-step runs above and "
                      "the oracle units re-timed round-robin; median over rounds of the per-round ratio), and in "
                      "brackets with the step's minibatch draws (index RNG + gather) added to the sum. Goal <= 1.2 "
                      "for single-loop methods; (!) marks those above; below 1: oracles share passes (fused vjp, one "
                      "linearization for all solver matvecs).", ""]
            onames = [n for n in names if n in orc and "presets" in orc[n]]
            rows = []
            for p in presets:
                row = [p]
                for n in onames:
                    e = orc[n]["presets"].get(p)
                    if e is None:
                        row.append("-")
                        continue
                    flag = " (!)" if e.get("above_goal") else ""
                    with_g = f" ({e['ratio_with_gathers']:.2f})" if e.get("gathers_s") else ""
                    row.append(f"{e['ratio']:.2f}{with_g}{flag}")
                rows.append(row)
            lines += _table(["preset"] + [f"eff. {n}" for n in onames], rows) + [""]
            for n in onames:
                u = orc[n]["units"]
                lines.append(f"- oracle units on `{n}`: " + ", ".join(f"{k} {_auto(s)}" for k, s in u.items()))
            above = [(n, p, e) for n in onames for p, e in orc[n]["presets"].items() if e.get("above_goal")]
            if above:
                lines += ["", "Single-loop presets above the goal (share of the step spent in minibatch draws, and the "
                          "ratio once they are counted):", ""]
                for n, p, e in above:
                    share = e["gathers_s"] / e["measured_s"] if e["measured_s"] else 0.0
                    verdict = ("draws explain it" if e["ratio_with_gathers"] <= orc[n]["goal"]
                               else "above the goal even with the draws")
                    lines.append(f"- `{p}` on `{n}`: {e['ratio']:.2f}; its draws, timed alone, {100 * share:.0f}% of the step time; "
                                 f"with draws {e['ratio_with_gathers']:.2f} ({verdict})")
            lines.append("")
    if comp and "second_process" in comp:
        sp = comp["second_process"]
        lines += [f"- compile: cold total {comp['cold_compile_total_s']:.1f} s for {len(comp['presets'])} runs "
                  f"(+ setup {comp['cold_setup_s']:.1f} s for all problems); second process: wall {sp['wall_s']:.1f} s "
                  f"(imports {sp['imports_s']:.1f} s, quadratic setup {sp['setup_s']:.1f} s, all runs loaded in "
                  f"{sp['compile_total_s']:.1f} s; cache hits {sp['events']['hits']}, misses {sp['events']['misses']})", ""]
    elif comp and "error" in comp:
        lines += [f"- compile: ERROR {comp['error'][:300]}", ""]

    ref = res.get("reference", {})
    if ref and "error" not in ref:
        lines += ["## Against plain-JAX steps (the limit)", "",
                  "Each method written directly in plain JAX with the preset's sampling and arithmetic (same iterates: "
                  "max |theta diff| after the run), timed interleaved with the preset run by `bj.run`, bare (history "
                  "discarded: XLA removes what the run does not return) and recording its default history (status, "
                  "oracle counts, residual). Ratio = median of the per-call ratios [IQR], by wall time and by process "
                  "CPU time (steadier on a shared machine). Bar for SOBA: <= 1.10.", ""]
        rows = []
        for problem, sec in ref.items():
            if not isinstance(sec, dict) or "rows" not in sec:
                continue
            for label, r in sec["rows"].items():
                if "error" in r:
                    rows.append([problem, label, "ERROR"] + ["-"] * 6)
                    continue
                q, h = r["ratio"], r.get("ratio_history")
                rows.append([problem, label, _auto(r["bilevel_jax"]), _auto(r.get("bilevel_jax_history")),
                             _auto(r["reference"]), f"{q['median']:.3f} [{q['q25']:.3f}-{q['q75']:.3f}]",
                             f"{q['cpu']['median']:.3f}",
                             f"{h['median']:.3f} / {h['cpu']['median']:.3f}" if h else "-",
                             f"{r['max_abs_diff_theta']:.2g}"])
        lines += _table(["problem", "method (sampler)", "bj / step", "bj + history", "reference / step", "ratio (wall)",
                         "ratio (cpu)", "with history (wall / cpu)", "max |theta diff|"], rows) + [""]

    bl = res.get("bilevel", {})
    if bl and "error" not in bl:
        lines += ["## Against benchmark_bilevel on its own quadratic and sampling scheme", "",
                  f"{bl['problem']}. Peer: {bl['peer']}. bilevel_jax: `sampler=\"shuffled\"` (the same random "
                  "reshuffling of contiguous blocks), the peer's step sizes, `bj.run` with its history; on the peer's objective "
                  "code, mode=\"fwd\" and `BilevelProblem(sample_chunk=1)` (each oracle pass a scan over the batch's samples). "
                  "Each side runs "
                  "the problem with its own code: bilevel_jax its finite-sum quadratic (`bj.problems.quadratic_problem`, "
                  "one batched einsum per term), the peer its per-sample quadratic vmapped over the batch. The last "
                  "columns swap the objective codes, to separate the toolkit from the objective's formulation. Time "
                  "per outer iteration, interleaved calls; ratios by wall / CPU time. Bar: bilevel_jax <= 0.5 x the peer.", ""]
        rows = []
        for name, r in bl.get("methods", {}).items():
            if "error" in r:
                rows.append([name, "ERROR"] + ["-"] * 9)
                continue
            f = lambda q: f"{q['median']:.3f} / {q['cpu']['median']:.3f}"
            d = r["ll_batches_per_step"]
            rows.append([name, f"{d['peer']} / {d['bilevel_jax']}", _auto(r["peer:peer"]), _auto(r["bilevel_jax"]),
                         f(r["ratio"]), _auto(r["peer:einsum"]), _auto(r["bilevel_jax:peer"]),
                         f(r["ratio_same_objective"]), f(r["ratio_same_objective_whole"]), f(r["ratio_same_objective_rev"]),
                         f(r["ratio_einsum_both"])])
        lines += _table(["method", "LL batches / step (peer / bj)", "peer (its objective)", "bj (its quadratic)",
                         "ratio (bar)", "peer (einsum formulation)", "bj (peer's objective, sample_chunk=1)",
                         "ratio, peer's objective on both", "same, bj whole batches", "same, bj whole batches, mode=\"rev\"",
                         "ratio, einsum on both"], rows) + [""]
        comp = {n: r["compile_s"] for n, r in bl.get("methods", {}).items() if "compile_s" in r}
        if comp:
            lines += ["Compile (s, XLA compile of the K-step call; the peer closes over its data, compile-time "
                      "constants): " + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.1f}" for k, v in c.items())
                                                 for n, c in comp.items()), ""]
        lines += _bandwidth_account(bl.get("account"))

    bw = res.get("bandwidth", {})
    if bw and "error" not in bw:
        c = bw["copy"]
        lines += ["## Memory bandwidth", "",
                  f"Device copy (`x + 1` in place over {c['size_mib']} MiB float32): {c['copy_read_GBps']:.3g} GB/s read "
                  f"({c['copy_GBps']:.3g} GB/s read + write; best call {c['best_copy_read_GBps']:.3g}; a streaming "
                  f"`jnp.sum` reads {c['read_GBps']:.3g} GB/s). A step's rate: "
                  "the minibatches it must read (UL batch + LL batches, each once) / its median time; fraction = "
                  "step rate / copy read rate.", ""]
        rows = [[k, f"{v['bytes_per_step'] / 2 ** 20:.3g}", f"{v['GBps']:.3g}", f"{v['fraction_of_copy']:.2f}"]
                for k, v in bw.get("rows", {}).items()]
        lines += _table(["run", "MiB / step", "GB/s", "fraction of copy"], rows) + [""]

    vm = res.get("vmap", {})
    if vm and "error" not in vm:
        lines += ["## vmap over seeds", ""]
        rows = []
        for n, r in vm.items():
            for who, table in ((r["preset"], r["seeds"]), ("plain-JAX reference", r.get("reference_seeds", {}))):
                for s, x in table.items():
                    rows.append([n, who, s, _auto(x), _auto({k: x[k] / (1 if s.startswith("1 ") else int(s))
                                                             for k in ("median", "q25", "q75")}),
                                 f"{x['vs_one_seed']:.3f}"])
        lines += _table(["problem", "preset", "seeds", "time / step (all seeds)", "per seed", "per seed vs 1 seed"], rows) + [""]

    un = res.get("unrolled", {})
    if un and "error" not in un:
        lines += ["## Unrolled differentiation against T", "", f"{un['problem']}", ""]
        rows = [[r["variant"], str(r["T"]), _auto(r["time"]), _mib(r["temp_bytes"]), f"{r['compile_s']:.2f}"]
                for r in un["rows"].values()]
        lines += _table(["variant", "T", "time / hypergradient", "XLA temp (MiB)", "compile (s)"], rows)
        lines += ["", "- max |difference| between variants: " +
                  ", ".join(f"{k} {d:.2g}" for k, d in un["max_abs_diff_between_variants"].items()), ""]
        mlp = un.get("mlp")
        if mlp:
            lines += ["### Reverse against mixed mode on an MLP lower level", "", mlp["problem"], ""]
            rows = [[r["variant"], str(r["T"]), _mib(r["temp_bytes"]), _n(r.get("temp_reverse_over"), ".3g"),
                     _auto(r.get("time")), _n(r.get("time_vs_reverse", {}).get("median")),
                     _n(r.get("time_vs_reverse", {}).get("cpu", {}).get("median")), f"{r['compile_s']:.2f}"]
                    for r in mlp["rows"].values()]
            lines += _table(["variant", "T", "XLA temp (MiB)", "reverse temp / this", "time / hypergradient",
                             "time / reverse's", "(CPU time)", "compile (s)"], rows)
            lines += ["", "- max relative |mixed - reverse|: " +
                      ", ".join(f"{k} {d:.2g}" for k, d in mlp["max_rel_diff_mixed_reverse"].items()), ""]

    so = res.get("second_order", {})
    if so and "error" not in so:
        lines += ["## Second-order products: mode=\"fwd\" against \"rev\"", "", so["problem"], ""]
        rows = [[r["computation"], str(r["width"]), str(r["params"]), _mib(r["temp_bytes"]["rev"]),
                 _mib(r["temp_bytes"]["fwd"]), _auto(r["time"]["rev"]), _auto(r["time"]["fwd"]),
                 _n(r["fwd_over_rev"]["median"]), _n(r["fwd_over_rev"]["cpu"]["median"]),
                 f"{r['max_abs_diff']:.2g}"]
                for r in so["rows"].values()]
        lines += _table(["computation", "width", "parameters", "rev temp (MiB)", "fwd temp (MiB)", "rev time",
                         "fwd time", "fwd / rev time", "(CPU time)", "max abs diff"], rows) + [""]

    pe = res.get("peer", {})
    if pe and "error" not in pe:
        lines += ["## Peer: implicit hypergradient", "", f"{pe['problem']}; {pe['cg_iterations']} CG iterations", ""]
        lines += _table(["implementation", "time / hypergradient", "max |g - dense|"], [
            ["bilevel_jax (bj.hypergradient, cg)", _auto(pe["bilevel_jax"]), f"{pe['error_vs_dense']['bilevel_jax']:.2g}"],
            [f"{pe['peer']} {pe['peer_version'] or ''}", _auto(pe["peer_timing"]), f"{pe['error_vs_dense']['peer']:.2g}"],
        ])
        lines += ["", f"- time ratio bilevel_jax / peer: {pe['ratio']['median']:.3f} "
                      f"[{pe['ratio']['q25']:.3f}-{pe['ratio']['q75']:.3f}]; max |bj - peer| = {pe['max_abs_diff']:.2g} "
                      f"(max |g| = {pe['max_abs_grad']:.2g})", ""]

    pr = res.get("precision", {})
    if pr and "error" not in pr:
        lines += ["## Mixed precision: bj.Precision(compute) with float32 states, against float32", "",
                  f"- logistic: {pr['problems']['logistic']}", f"- mlp: {pr['problems']['mlp']}",
                  f"- hypergradient: cg({pr['cg_iterations']}); soba: {pr['soba_steps']} full-batch steps (time per step)",
                  ""]
        rows = [[comp, name, _auto(r["time"]), _n(r.get("over_float32", {}).get("median")),
                 _n(r.get("over_float32", {}).get("cpu", {}).get("median")), f"{r['rel_error']:.2g}", r["status"]]
                for comp, by_precision in pr["rows"].items() for name, r in by_precision.items()]
        lines += _table(["computation", "compute dtype", "time", "time / float32's", "(CPU time)",
                         "relative error vs float32", "status"], rows) + [""]

    errors = [k for k in ("steps", "oracles", "compile", "reference", "bilevel", "bandwidth", "vmap", "unrolled",
                          "second_order", "peer", "precision")
              if isinstance(res.get(k), dict) and "error" in res[k]]
    if errors:
        lines += [f"- sections with errors: {errors} (see the JSON)", ""]
    lines += _scaling(res.get("scaling", {}))
    return "\n".join(lines)

"""Smoke test of the benchmark harness (`make bench`): `python -m benchmarks --quick` on tiny
problems writes the JSON with every section and key. No timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow   # ~1-2 min of compiles; `make bench` is the harness itself
def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--presets", "soba", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert (tmp_path / "bench.md").exists() and "| soba |" in proc.stdout

    assert {"device", "versions", "quick"} <= set(res["meta"]) and res["meta"]["quick"]
    for section in ("steps", "oracles", "compile", "reference", "bilevel", "bandwidth", "vmap", "unrolled",
                    "second_order", "peer"):
        assert section in res and "error" not in res[section], (section, res.get(section, {}).get("error"))
    for setup in ("quadratic", "logistic", "logistic_full"):
        soba = res["steps"][setup]["presets"]["soba"]
        assert {"per_step", "compile", "oracles_per_step", "finite"} <= set(soba)
        assert {"median", "q25", "q75", "min", "max"} <= set(soba["per_step"])
        eff = res["oracles"][setup]
        assert {"lower_grads", "upper_grads", "hvps", "cross"} <= set(eff["units"])
        assert {"ratio", "ratio_with_gathers", "above_goal"} <= set(eff["presets"]["soba"])
    assert {"cold_first_call_s", "warm_first_call_s", "warm_cache_hits"} <= set(res["compile"]["presets"]["soba"])
    assert "wall_s" in res["compile"]["second_process"]
    for problem in ("quadratic", "logistic"):
        rows = res["reference"][problem]["rows"]
        assert {"soba (iid)", "soba (partition)", "saba (partition)"} <= set(rows)
        for label, row in rows.items():
            assert {"bilevel_jax", "reference", "ratio", "max_abs_diff_theta", "bytes_per_step"} <= set(row), row.get("error")
            assert "cpu" in row["ratio"] and row["max_abs_diff_theta"] == 0.0   # the same iterates
            assert ("bilevel_jax_history" in row) == label.startswith("soba")
        assert "1 (no vmap)" in res["vmap"][problem]["seeds"]
    soba = res["bilevel"]["methods"]["soba"]
    assert {"peer:peer", "peer:einsum", "bilevel_jax", "bilevel_jax:peer", "ratio", "ratio_same_objective",
            "ratio_einsum_both", "bytes_per_step", "compile_s"} <= set(soba), soba.get("error")
    assert all(soba["finite"].values())
    assert {"ratio_same_objective_rev", "ratio_same_objective_whole", "compiled_per_step"} <= set(soba)
    account = res["bilevel"]["account"]
    assert "error" not in account, account.get("error")
    floor = account["methods"]["soba"]
    # the least bytes (each matrix once) <= the peer's code's least <= what either compiled step moves
    assert 0 < floor["strict_bytes"] <= floor["code_bytes"] <= min(c["bytes"] for c in floor["compiled"].values())
    assert res["bandwidth"]["copy"]["copy_read_GBps"] > 0
    assert any(k.startswith("bilevel/soba") for k in res["bandwidth"]["rows"])
    assert any(k.startswith("reference/quadratic") for k in res["bandwidth"]["rows"])
    row = next(iter(res["unrolled"]["rows"].values()))
    assert {"variant", "T", "time", "temp_bytes"} <= set(row)
    assert {"reverse/T=2", "mixed/T=2"} <= set(res["unrolled"]["mlp"]["rows"])
    assert res["unrolled"]["mlp"]["max_rel_diff_mixed_reverse"]["T=2"] < 1e-5       # float32
    for row in res["second_order"]["rows"].values():
        assert {"rev", "fwd"} <= set(row["temp_bytes"]) and row["max_abs_diff"] <= 1e-5 * max(1.0, row["max_abs"])
    assert {"bilevel_jax", "peer_timing", "max_abs_diff", "peer"} <= set(res["peer"])
    assert "error" not in res["precision"], res["precision"].get("error")
    for row in res["precision"]["rows"].values():    # float32 against itself; bf16 / f16 oracles, f32 states
        assert row["float32"]["rel_error"] == 0.0 and all(r["status"] == "ok" for r in row.values())
        assert row["bfloat16"]["rel_error"] < 5e-2 and row["float16"]["rel_error"] < 1e-2


def test_library_quadratic_is_the_peer_objective_on_converted_data():
    """The bench's bilevel_jax side runs `bj.problems.quadratic_problem` on benchmark_bilevel's data
    converted by `library_data`: the same function (value and both gradients) as the peer's
    vmapped per-sample quadratic, on both levels (float64, a tiny draw)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bilevel_jax as bj
    from benchmarks import peer_bilevel as pb

    level = jax.jit(pb._level, static_argnames=("n", "dz", "dx", "high_z", "high_x", "high_cross", "mu"))
    raw = level(jax.random.PRNGKey(0), n=6, dz=4, dx=3, high_z=1.0, high_x=1.0, high_cross=0.1, mu=0.1)
    raw = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), raw)
    problem = bj.problems.quadratic_problem()
    theta, phi = jnp.linspace(-1.0, 1.0, 3), jnp.linspace(0.5, -0.5, 4)
    peer = jax.value_and_grad(lambda t, p: pb.peer_objective(p, t, raw), argnums=(0, 1))(theta, phi)
    for upper, f in ((True, problem.f_upper), (False, problem.f_lower)):
        ours = jax.value_and_grad(f, argnums=(0, 1))(theta, phi, pb.library_data(raw, upper))
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(peer)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_hlo_bytes_counts_loops_by_their_trip_count():
    """`benchmarks.hlo_bytes` equals XLA's cost analysis on a program without loops, and counts a
    loop body once per iteration (XLA's cost analysis counts it once); slices read only the slice."""
    import jax
    import jax.numpy as jnp

    from benchmarks import hlo_bytes

    x = jnp.ones((64, 64), jnp.float32)
    flat = jax.jit(lambda x, i: jnp.sin(jax.lax.dynamic_slice_in_dim(x, i, 8)) @ x).lower(x, 3).compile()
    assert hlo_bytes.bytes_accessed(flat, 10 ** 9)["bytes"] == flat.cost_analysis()["bytes accessed"]
    loops = {}
    for n in (1, 5):
        compiled = jax.jit(lambda x: jax.lax.fori_loop(0, n, lambda _, y: jnp.sin(y) @ x, x)).lower(x).compile()
        loops[n] = hlo_bytes.bytes_accessed(compiled, x.nbytes)
    body = (loops[5]["bytes"] - loops[1]["bytes"]) / 4
    assert body >= 2 * x.nbytes                                         # the dot reads two matrices an iteration
    assert loops[5]["matrix_reads"] - loops[1]["matrix_reads"] >= 4 * 2

"""Data-parallel runs (`mesh=`, `shards=`, `bj.shard`, `bj.data_parallel`).

The contract: with D shards every step draws batch_size / D samples from each of D contiguous
shards; `shards=D` on one device is that sampling layout, `mesh=` with D devices runs it in
shard_map with the same iterates and only parameter-sized collectives."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=16, d=3):
    return {"x": jnp.arange(n * d, dtype=jnp.float64).reshape(n, d), "i": jnp.arange(n)}


@pytest.mark.parametrize("kind", ["iid", "shuffled", "partition"])
def test_shards_draw_each_shards_share(kind):
    """shards=2, batch 4: two samples from each half of the data, the halves' draws one after the other."""
    data, key = _data(), jax.random.PRNGKey(0)
    sampler = sampling.make_sampler(4, kind, shards=2)
    for draw in range(5):
        batch, batch_id = sampler.sample(data, key, draw)
        idx = np.asarray(batch["i"])
        assert idx.shape == (4,)
        assert np.all(idx[:2] < 8) and np.all(idx[2:] >= 8)
        if kind != "iid":   # the same block of every shard: a fixed global block per batch id
            assert int(batch_id) in range(sampler.num_blocks(data))
            np.testing.assert_array_equal(idx[2:] - 8, idx[:2])
            np.testing.assert_array_equal(np.asarray(sampler.block(data, batch_id)["i"]), idx)


def test_shards_block_samplers_keep_epochs():
    """shuffled with shards: every block once per epoch (n / b blocks, as without shards)."""
    data, key = _data(32), jax.random.PRNGKey(1)
    sampler = sampling.make_sampler(8, "shuffled", shards=4)
    assert sampler.num_blocks(data) == 4
    ids = [int(sampler.sample(data, key, t)[1]) for t in range(8)]
    assert sorted(ids[:4]) == [0, 1, 2, 3] and sorted(ids[4:]) == [0, 1, 2, 3]


def test_shards_one_is_the_unsharded_sampler():
    data, key = _data(), jax.random.PRNGKey(2)
    for kind in ("iid", "shuffled", "partition"):
        a, _ = sampling.make_sampler(4, kind).sample(data, key, 3)
        b, _ = sampling.make_sampler(4, kind, shards=1).sample(data, key, 3)
        np.testing.assert_array_equal(a["i"], b["i"])


def test_shards_errors(quad_stoch):
    with pytest.raises(ValueError, match="not divisible by shards=3"):
        sampling.make_sampler(16, "iid", shards=3)
    with pytest.raises(ValueError, match="not divisible by shards=3"):
        bj.algorithms.soba(quad_stoch.problem, batch_size=16, shards=3)
    alg = bj.algorithms.soba(quad_stoch.problem, batch_size=10, shards=5)   # n = 64 is not a multiple of 5
    with pytest.raises(ValueError, match="64 samples, not divisible by shards=5"):
        alg.init(quad_stoch.theta0, quad_stoch.phi0, jax.random.PRNGKey(0), quad_stoch.data)
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        bj.data_parallel(alg, mesh="data")
    with pytest.raises(ValueError, match="single-problem presets"):
        task = bj.problems.sinusoid_multitask(jax.random.PRNGKey(0), num_tasks=2) \
            if hasattr(bj.problems, "sinusoid_multitask") else None
        if task is None:
            pytest.skip("no multi-objective problem builder")
        bj.algorithms.morbit(task.problem, shards=2)


def test_shards_signature_and_saga_blocks(quad_stoch):
    """Every preset takes mesh= / shards=; SABA's memories with shards have n / b rows, as without."""
    import inspect
    for name, preset in bj.algorithms.ALGORITHMS.items():
        params = inspect.signature(preset).parameters
        assert "mesh" in params and "shards" in params, name
    alg = bj.algorithms.saba(quad_stoch.problem, upper_lr=0.05, lower_lr=0.2, batch_size=16, shards=4)
    state = alg.init(quad_stoch.theta0, quad_stoch.phi0, jax.random.PRNGKey(0), quad_stoch.data)
    rows = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(state.estimator) if leaf.ndim >= 1}
    assert 4 in rows   # 64 samples / 16 per batch
    state, hist = bj.run(alg, state, quad_stoch.data, 200)
    assert int(hist["status"][-1]) == bj.status.OK
    gap = jnp.linalg.norm(quad_stoch.grad(state.theta)) / jnp.linalg.norm(quad_stoch.grad(quad_stoch.theta0))
    assert gap < 0.2


# 2 seeds x 3 step sizes: 6 rows of the experiment runner's batch, padded to 8 over 4 devices
SWEEP = {"name": "shard", "seeds": 2, "steps": 20, "eval_every": 10, "metrics": ["grad_sq", "lower_gap"],
         "timing": False, "progress": False, "compile_cache": False,
         "problem": {"name": "quadratic", "dim_upper": 2, "dim_lower": 3, "n_samples": 16},
         "algorithms": {"soba": {"upper_lr": [0.05, 0.1, 0.2], "lower_lr": 0.2, "batch_size": 4}}}


def _worker(sweep_config: dict):
    """The JSON rows of tests/data_parallel_worker.py (all its sections in one process: one interpreter
    and JAX start, 5 s of CPU less than a process per section), run with 4 forced host devices."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")   # conftest's XLA_FLAGS: 79 s -> 42 s of CPU
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "data_parallel_worker.py"), "all",
                          json.dumps(sweep_config)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_mesh_equals_shards_fsdp_entry_points_and_the_runner_on_four_devices(tmp_path):
    """One worker process, four checks (each a section of the worker):

    presets: the bar: on 4 forced host devices, `mesh=` gives the iterates of `shards=4` on one device (1e-12,
    float64) for soba (iid, step sizes estimated at init), amigo and stocbio (shuffled) and saba (partition),
    and the compiled sharded run holds no collective with a sample-sized operand (the same collectives at 4x
    the samples and batch); also with `sample_chunk` (each device's oracle passes a scan over its own block).

    fsdp: an MLP phi split over a second mesh axis, the iterates of one device, and the
    per-device state bytes about halved on a model axis of 2 (small leaves stay replicated).

    entry points: bj.hypergradient, a grad through bj.argmin and bj.run with mesh= equal one device.

    sweep: the experiment runner's batch of seeds x grid points split over the 4 devices (6 rows padded
    to 8) saves the cells one device saves here (1e-12)."""
    from experiments import config, runner, sweep
    from experiments.results import ResultStore
    one, four = (dict(SWEEP, results_dir=str(tmp_path / d)) for d in ("one", "four"))
    rows = _worker(four)
    fsdp = [row for row in rows if row.get("fsdp")]
    entry = [row for row in rows if row.get("entry_points")]
    swept = [row for row in rows if row.get("sweep")]
    rows = [row for row in rows if "preset" in row]
    assert len(fsdp) == 1 and len(entry) == 1 and len(swept) == 1
    (fsdp,), (entry,), (swept,) = fsdp, entry, swept

    # presets
    assert len(rows) == 5 and rows[0]["defaults"] and rows[-1]["sample_chunk"] == 2
    for row in rows:
        assert row["devices"] == 4
        assert row["theta_diff"] < 1e-12 and row["phi_diff"] < 1e-12, row
        assert row["moved"] > 1e-3, row   # the runs did move
        assert row["status"] == [0, 0], row
        # parameter-sized only: the same collectives with 4x the samples and the batch, every operand
        # a vector of theta's (3) or phi's (5) size
        assert row["collectives"] > 0 and not row["collectives_grow_with_samples"], row
        assert row["largest_collective"] <= 5, row

    # FSDP
    assert fsdp["replicated_diff"] < 1e-12 and fsdp["fsdp_diff"] < 1e-12, fsdp
    assert fsdp["status"] == [0, 0, 0], fsdp
    replicated, split = fsdp["bytes"]
    assert split < 0.6 * replicated, fsdp

    # entry points
    assert entry["hypergradient"] < 1e-12 and entry["exact"] < 1e-10 and entry["status"] == 0, entry
    assert entry["argmin"] < 1e-12 and entry["run"] < 1e-12, entry

    # the runner's batch over 4 devices
    assert swept["devices"] == 4 and len(jax.devices()) == 1   # one device here, in the test's process
    one, four = config.from_dict(one), config.from_dict(four)
    store = ResultStore(config.experiment_dir(one))
    workload, reference = runner.prepare(one, store)
    runner.run_cells(one, workload, reference, store, sweep.expand(one), log=lambda *a: None)
    cells = sweep.expand(one)
    assert [c.cell_id for c in cells] == [c.cell_id for c in sweep.expand(four)]
    for cell in cells:
        a, b = store.load(cell.cell_id), ResultStore(config.experiment_dir(four)).load(cell.cell_id)
        assert b.meta["timings"]["n_devices"] == 4 and b.meta["timings"]["batch"] == 8   # 6 rows padded to 8
        assert a.meta["timings"]["n_devices"] == 1 and a.meta["timings"]["batch"] == 6
        for key in ("grad_sq", "lower_gap", "theta", "phi", "lower_grads", "hvps"):
            np.testing.assert_allclose(b.history[key], a.history[key], rtol=1e-12, atol=1e-14)

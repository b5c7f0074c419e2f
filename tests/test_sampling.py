"""Minibatch samplers (`bj.sampling`): shapes, coverage, batch ids, inside jit/scan, bad input.

Samplers run jitted (an eager draw compiles one program per operation) and their batches are
checked in NumPy.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj


def fast_jit(fun):
    """`jax.jit` without LLVM's optimisation passes: these problems run in milliseconds, compiling
    is what costs (the same XLA program, about 2-3x faster to compile)."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0})


S = bj.sampling
N = 12


@pytest.fixture(scope="module")
def data():
    """Leaves whose rows identify the sample: row i of every leaf encodes i."""
    i = np.arange(N)
    return jax.device_put({"x": np.stack([i, -i], axis=1).astype(float), "y": i, "z": {"w": i * 10.0}})


def _rows(batch):
    """The sample indices of a batch, checking every leaf is the same rows."""
    batch = jax.device_get(batch)
    idx = batch["y"]
    np.testing.assert_array_equal(batch["x"][:, 0], idx)
    np.testing.assert_array_equal(batch["x"][:, 1], -idx)
    np.testing.assert_array_equal(batch["z"]["w"], 10 * idx)
    return idx


def _flat(batches):
    """Stacked draws (num, b, ...) as one batch (num * b, ...), in NumPy."""
    return jax.tree_util.tree_map(lambda x: np.reshape(x, (-1,) + x.shape[2:]), jax.device_get(batches))


def _draws(sampler, data, key, num):
    """`num` consecutive draws inside one jitted lax.scan (as the algorithms draw them)."""
    @fast_jit
    def go(data, key):
        return jax.lax.scan(lambda _, d: (None, sampler.sample(data, key, d)), None, jnp.arange(num))[1]
    return go(data, key)


def test_iid_shapes_and_reproducibility(data):
    s = S.iid(5)
    sample = jax.jit(s.sample)   # one program for the draws below
    key = jax.random.PRNGKey(0)
    batch, batch_id = sample(data, key, 3)
    assert jax.tree_util.tree_map(jnp.shape, batch) == {"x": (5, 2), "y": (5,), "z": {"w": (5,)}}
    assert batch["x"].dtype == data["x"].dtype and batch["y"].dtype == data["y"].dtype
    idx = _rows(batch)
    assert np.all((idx >= 0) & (idx < N))
    assert int(batch_id) == 0
    # the same (key, draw) gives the same batch; another draw or key another batch
    np.testing.assert_array_equal(sample(data, key, 3)[0]["y"], batch["y"])
    assert not np.array_equal(sample(data, key, 4)[0]["y"], batch["y"])
    assert not np.array_equal(sample(data, jax.random.PRNGKey(1), 3)[0]["y"], batch["y"])
    # i.i.d. with replacement: over many draws every sample appears, roughly uniformly
    batches, ids = _draws(s, data, key, 600)
    counts = np.bincount(_rows(_flat(batches)), minlength=N)
    assert counts.min() > 0.6 * 250 and counts.max() < 1.4 * 250
    assert np.all(np.asarray(ids) == 0)


def test_shuffled_visits_every_block_once_per_epoch_in_a_fresh_order(data):
    b = 3
    s = S.shuffled(b)
    m = N // b
    assert S.num_batches(s, data) == m
    batches, ids = _draws(s, data, jax.random.PRNGKey(2), 6 * m)
    ids = np.asarray(ids)
    rows = _rows(_flat(batches)).reshape(6 * m, b)
    # batch id j is the contiguous block j*b .. j*b + b - 1, read in place
    np.testing.assert_array_equal(rows, ids[:, None] * b + np.arange(b))
    orders = ids.reshape(6, m)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(m))   # each block exactly once per epoch
    assert len({tuple(o) for o in orders}) > 1   # a fresh order per epoch
    # reproducible: the same (key, draw) gives the same block
    key = jax.random.PRNGKey(2)
    assert int(jax.jit(s.sample)(data, key, 5)[1]) == int(ids[5])


def test_shuffled_block_orders_look_like_uniform_permutations():
    """The per-epoch orders (`block_order`, a keyed swap-or-not permutation) against uniformly
    random permutations: every order of 5 blocks equally often; for 16 blocks, each block equally
    often at each position and each ordered pair of consecutive blocks equally often."""
    def orders(m, epochs, key=jax.random.PRNGKey(7)):
        f = jax.jit(jax.vmap(jax.vmap(lambda e, p: S.block_order(key, e, p, m), (None, 0)), (0, None)))
        out = np.asarray(f(np.arange(epochs), np.arange(m)))
        assert all(np.array_equal(np.sort(o), np.arange(m)) for o in out)
        return out

    def chi2_per_dof(counts, expected):
        counts = np.asarray(counts, float).ravel()
        return float(((counts - expected) ** 2 / expected).sum() / (counts.size - 1))

    five = orders(5, 24000)
    _, counts = np.unique(five, axis=0, return_counts=True)
    assert counts.size == 120 and chi2_per_dof(counts, 200.0) < 1.5   # 1 +- 0.13 for uniform orders
    m, epochs = 16, 8000
    sixteen = orders(m, epochs)
    position = np.stack([np.bincount(sixteen[:, p], minlength=m) for p in range(m)])
    assert chi2_per_dof(position, epochs / m) < 1.3
    pairs = np.zeros((m, m))
    np.add.at(pairs, (sixteen[:, :-1].ravel(), sixteen[:, 1:].ravel()), 1)
    off = ~np.eye(m, dtype=bool)
    assert chi2_per_dof(pairs[off], epochs * (m - 1) / (m * (m - 1))) < 1.3
    # one block: always block 0; other keys give other orders
    assert int(S.block_order(jax.random.PRNGKey(0), 3, 0, 1)) == 0
    assert not np.array_equal(orders(16, 4, jax.random.PRNGKey(8)), sixteen[:4])


def test_partition_batch_ids_are_consistent(data):
    b = 3
    s = S.partition(b)
    assert S.num_batches(s, data) == N // b
    batches, ids = _draws(s, data, jax.random.PRNGKey(3), 200)
    ids = np.asarray(ids)
    rows = _rows(_flat(batches)).reshape(200, b)
    # batch id j is always the contiguous block j*b .. j*b + b - 1
    np.testing.assert_array_equal(rows, ids[:, None] * b + np.arange(b))
    assert set(ids.tolist()) == set(range(N // b))   # every id is drawn


def test_full_returns_the_data(data):
    s = S.full()
    batch, batch_id = s.sample(data, jax.random.PRNGKey(0), 7)
    assert batch is data and int(batch_id) == 0
    assert s.sample(None, jax.random.PRNGKey(0), 0)[0] is None
    assert S.make_sampler(None, "iid").kind == "full"
    assert S.make_sampler(None, "partition").kind == "full"
    assert S.num_batches(s, data) == 1


def test_make_sampler_kinds():
    for kind in ("iid", "shuffled", "partition"):
        s = S.make_sampler(4, kind)
        assert s.kind == kind and s.batch_size == 4


def test_sampler_bad_input(data):
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        S.make_sampler(4, "nope")
    for bad in (0, -2):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            S.make_sampler(bad, "iid")
    with pytest.raises(TypeError, match="batch_size must be a Python int"):
        S.iid(2.5)
    with pytest.raises(ValueError, match="all leaves must share a leading sample axis"):
        S.num_samples({"a": np.zeros((4, 2)), "b": np.zeros(5)})
    with pytest.raises(ValueError, match="all leaves must share a leading sample axis"):
        S.num_samples({"a": np.zeros((4, 2)), "b": np.zeros(())})
    assert S.num_samples(data) == N and S.num_samples(None) is None
    with pytest.raises(ValueError, match=f"batch_size=20 is larger than upper data's {N} samples"):
        S.check_fits(S.iid(20), data, "upper data")
    with pytest.raises(ValueError, match="batch_size=2 was given but lower data is None"):
        S.check_fits(S.iid(2), None, "lower data")


def test_block_samplers_say_when_samples_are_left_out(data, quad_stoch, recwarn):
    for kind in ("partition", "shuffled"):
        with pytest.warns(UserWarning, match=rf"{kind}\(batch_size=5\) on upper data's 12 samples: .* the last 2 "
                                             r"samples \(10..11\) are never drawn"):
            S.check_fits(S.make_sampler(5, kind), data, "upper data")
    S.check_fits(S.partition(4), data, "upper data")        # 12 = 3 blocks of 4
    S.check_fits(S.iid(5), data, "upper data")              # i.i.d. indices reach every sample
    assert not recwarn.list
    q = quad_stoch                                          # 64 samples per level: the init says it
    alg = bj.algorithms.soba(q.problem, upper_lr=0.1, lower_lr=0.1, batch_size=10, sampler="partition")
    with pytest.warns(UserWarning, match=r"lower data's 64 samples: .* the last 4 samples \(60..63\)"):
        alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)


def test_saga_memories_work_with_shuffled_blocks(quad_stoch):
    """SABA's memories are indexed by block id: with random reshuffling (each block once per
    epoch) it converges as with uniformly drawn blocks; i.i.d. batches have no id and are refused."""
    q = quad_stoch
    for sampler in ("shuffled", "partition"):
        alg = bj.algorithms.saba(q.problem, upper_lr=0.2, lower_lr=0.2, batch_size=16, sampler=sampler)
        init = lambda d: alg.init(q.theta0, q.phi0, jax.random.PRNGKey(5), d)
        state = eqx.filter_eval_shape(init, q.data)   # the memories' shapes (the init runs in the run's program)
        assert jax.tree_util.tree_leaves(state.estimator.lower.table)[0].shape[0] == 64 // 16
        theta = fast_jit(lambda d: bj.run(alg, init(d), d, num_steps=300)[0].theta)(q.data)
        grad_norm2 = lambda t: np.sum(np.asarray(q.grad(t)) ** 2)
        assert grad_norm2(theta) < 1e-3 * grad_norm2(q.theta0), sampler
    with pytest.raises(ValueError, match="use sampler='partition' or sampler='shuffled'"):
        bj.algorithms.saba(q.problem, batch_size=16, sampler="iid")

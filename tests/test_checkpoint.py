"""`bj.run_chunked`: a run killed after a checkpoint resumes to the same final state, bitwise, with
an equinox MLP in the state; `bj.run`'s progress callback fires at the evaluation points only."""
import equinox as eqx
import jax
import numpy as np
import pytest

import bilevel_jax as bj
from tests.test_models import make_mlp, mlp_setup  # noqa: F401  (fixture)


class Killed(Exception):
    pass


def test_killed_chunked_run_resumes_bitwise_with_an_mlp(mlp_setup, tmp_path):   # noqa: F811
    problem, theta0, data = mlp_setup
    alg = bj.algorithms.soba(problem, upper_lr=0.05, lower_lr=0.1, batch_size=4)
    state0 = alg.init(theta0, make_mlp(jax.random.PRNGKey(3)), jax.random.PRNGKey(4), data)
    kw = dict(num_steps=12, chunk=4, eval_every=2)

    def kill_after_first(steps_done):
        if steps_done == 4:
            raise Killed()

    with pytest.raises(Killed):
        bj.run_chunked(alg, state0, data, directory=str(tmp_path / "a"), on_checkpoint=kill_after_first, **kw)
    done = []
    resumed, hist = bj.run_chunked(alg, state0, data, directory=str(tmp_path / "a"), on_checkpoint=done.append, **kw)
    assert done == [8, 12]                                  # only the missing chunks ran
    straight, hist_straight = bj.run_chunked(alg, state0, data, directory=str(tmp_path / "b"), **kw)
    leaves = lambda s: jax.tree_util.tree_leaves(eqx.filter(s, eqx.is_array))
    for a, b in zip(leaves(resumed), leaves(straight)):
        np.testing.assert_array_equal(a, b)                # bitwise
    assert isinstance(resumed.phi, eqx.nn.MLP)
    for key in hist_straight:
        np.testing.assert_array_equal(hist[key], hist_straight[key], err_msg=key)
    # the same as one bj.run over all the steps (history rows, cumulative counts, final iterate)
    final, history = bj.run(alg, state0, data, num_steps=12, eval_every=2)
    np.testing.assert_array_equal(hist["step"], history["step"])
    np.testing.assert_array_equal(hist["hvps"], history["hvps"])
    np.testing.assert_allclose(resumed.theta, final.theta, rtol=1e-12)
    with pytest.raises(ValueError, match="made with other settings"):
        bj.run_chunked(alg, state0, data, directory=str(tmp_path / "a"), num_steps=12, chunk=6, eval_every=2)


def test_progress_is_called_at_evaluation_points(quad):
    alg = bj.algorithms.soba(quad.problem, batch_size=None)
    rows = []
    bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0)), quad.data, num_steps=6, eval_every=2,
           progress=rows.append)
    jax.effects_barrier()
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(r["status"] == bj.status.OK for r in rows)
    with pytest.raises(TypeError, match="progress must be a callable"):
        bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0)), quad.data, num_steps=2, progress=3)

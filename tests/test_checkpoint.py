"""`bj.run_chunked`: a run killed after a checkpoint resumes to the same final state, bitwise, with
an equinox MLP in the state; a checkpoint of another run (algorithm, data, initial state) is refused;
a finished run is extended; seeds run batched under vmap. `bj.run`'s progress callback fires at the
evaluation points only, once per point for a vmapped batch, and its exception keeps its type."""
import os
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from tests.test_models import make_mlp, mlp_setup  # noqa: F401  (fixture)


class Killed(Exception):
    pass


def test_killed_chunked_run_resumes_bitwise_with_an_mlp(mlp_setup, tmp_path):   # noqa: F811
    problem, theta0, data = mlp_setup
    alg = bj.algorithms.soba(problem, upper_lr=0.05, lower_lr=0.1, batch_size=4)
    # theta0 strongly typed, as a loaded checkpoint's (the fixture's is weak, and a chunk's output is strong):
    # the first chunk and the resumed ones run one compiled program (a weak theta0 compiled it twice)
    state0 = alg.init(theta0.astype(np.float64), make_mlp(jax.random.PRNGKey(3)), jax.random.PRNGKey(4), data)
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
        bj.run_chunked(alg, state0, data, directory=str(tmp_path / "a"), num_steps=12, chunk=6, eval_every=3)


def _soba(quad, **kw):
    """SOBA on the quadratic with a given upper step size (no step-size estimate at init: 1.2 s in a fresh process)."""
    return bj.algorithms.soba(quad.problem, batch_size=None, **{"upper_lr": 0.1, **kw})


def test_progress_is_called_at_evaluation_points(quad):
    alg = _soba(quad)
    rows = []
    bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data), quad.data, num_steps=6,
           eval_every=2, progress=rows.append)
    jax.effects_barrier()
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert all(r["status"] == bj.status.OK for r in rows)
    with pytest.raises(TypeError, match="progress must be a callable"):
        bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data), quad.data, num_steps=2,
               progress=3)


def test_a_checkpoint_of_another_run_is_refused(quad, tmp_path):
    alg = _soba(quad)
    state0 = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    kw = dict(num_steps=4, chunk=2, directory=str(tmp_path))
    bj.run_chunked(alg, state0, quad.data, **kw)
    other_data = jax.tree_util.tree_map(lambda x: x * 1.01, quad.data)
    cases = {
        "algorithm": (_soba(quad, upper_lr=0.2), state0, quad.data),
        "algorithm ": (_soba(quad, upper_opt=optax.adam(1e-2)), state0, quad.data),   # a whole optax rule
        "data": (alg, state0, other_data),
        "theta0": (alg, alg.init(quad.theta0 + 1.0, quad.phi0, jax.random.PRNGKey(0), quad.data), quad.data),
        "phi0": (alg, alg.init(quad.theta0, quad.phi0 + 1.0, jax.random.PRNGKey(0), quad.data), quad.data),
        "key": (alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(1), quad.data), quad.data),
    }
    for part, (a, s, d) in cases.items():
        with pytest.raises(ValueError, match=f"belongs to another run: its {part.strip()}"):
            bj.run_chunked(a, s, d, **kw)
    # adam(1e-2) and adam(1e-3) are two configurations (the learning rate is in the rule's closure)
    fp = lambda lr: bj.checkpoint.fingerprint(_soba(quad, upper_opt=optax.adam(lr)), state0, quad.data)["algorithm"]
    assert fp(1e-2) == fp(1e-2) != fp(1e-3)
    # the same run resumes (nothing left to do: the stored result)
    again, _ = bj.run_chunked(alg, state0, quad.data, on_checkpoint=pytest.fail, **kw)
    assert int(again.count) == 4


FINGERPRINT_SCRIPT = """
import jax, optax
jax.config.update("jax_enable_x64", True)
import bilevel_jax as bj
quad = bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), dim_upper=4, dim_lower=6)
alg = bj.algorithms.soba(quad.problem, batch_size=None, upper_opt=optax.adam(1e-2))
state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
print(sorted(bj.checkpoint.fingerprint(alg, state, quad.data).items()))
"""


def test_the_fingerprint_is_the_same_in_another_process():
    """A resumed process must recompute the fingerprint it stored: no ids, addresses or set order
    (another PYTHONHASHSEED)."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash("seed") % 1000 + 1), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", FINGERPRINT_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert done.returncode == 0, done.stderr
    here = {}
    exec(FINGERPRINT_SCRIPT.replace("\nprint(", "\nresult = ("), here)
    assert done.stdout.strip() == str(here["result"]) and "algorithm" in done.stdout


def test_a_finished_run_is_extended(quad, tmp_path):
    alg = _soba(quad)
    state0 = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    kw = dict(chunk=4, eval_every=2, directory=str(tmp_path))
    bj.run_chunked(alg, state0, quad.data, num_steps=8, **kw)
    done = []
    longer, hist = bj.run_chunked(alg, state0, quad.data, num_steps=14, on_checkpoint=done.append, **kw)
    assert done == [12, 14]                     # only the new steps ran (the last chunk is shorter)
    final, history = bj.run(alg, state0, quad.data, num_steps=14, eval_every=2)
    for key in history:
        np.testing.assert_allclose(hist[key], history[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(longer.theta, final.theta, rtol=1e-12)
    with pytest.raises(ValueError, match="holds 14 steps, more than num_steps=8"):
        bj.run_chunked(alg, state0, quad.data, num_steps=8, **kw)


def test_seeds_run_batched_and_resume(quad_stoch, tmp_path):
    alg = bj.algorithms.soba(quad_stoch.problem, batch_size=8, upper_lr=0.1)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    states = jax.vmap(lambda k: alg.init(quad_stoch.theta0, quad_stoch.phi0, k, quad_stoch.data))(keys)
    kw = dict(num_steps=6, chunk=2, eval_every=1, batched=True)

    def kill_after_first(steps_done):
        if steps_done == 2:
            raise Killed()

    with pytest.raises(Killed):
        bj.run_chunked(alg, states, quad_stoch.data, directory=str(tmp_path), on_checkpoint=kill_after_first, **kw)
    final, hist = bj.run_chunked(alg, states, quad_stoch.data, directory=str(tmp_path), **kw)
    assert hist["step"].shape == (3, 7) and hist["hvps"].shape == (3, 7)
    for i, key in enumerate(keys):   # each seed as its own run
        one, history = bj.run(alg, alg.init(quad_stoch.theta0, quad_stoch.phi0, key, quad_stoch.data),
                              quad_stoch.data, num_steps=6, eval_every=1)
        np.testing.assert_allclose(final.theta[i], one.theta, rtol=1e-12)
        for name in history:
            np.testing.assert_allclose(hist[name][i], history[name], rtol=1e-12, err_msg=name)
    assert not np.allclose(final.theta[0], final.theta[1])   # the seeds differ


def test_progress_under_vmap_is_one_call_per_evaluation_point(quad):
    alg = _soba(quad)
    rows = []
    thetas = np.asarray(quad.theta0) + np.arange(3.0)[:, None]      # test-side arithmetic in NumPy: nothing to compile

    def one(theta):
        state = alg.init(theta, quad.phi0, jax.random.PRNGKey(0))
        return bj.run(alg, state, quad.data, num_steps=6, eval_every=2, progress=rows.append,
                      eval_fn=lambda s, d: {"theta0": s.theta[0]})

    final, hist = jax.jit(jax.vmap(one))(thetas)
    jax.effects_barrier()
    hist = jax.tree_util.tree_map(np.asarray, hist)
    assert [r["step"].tolist() for r in rows] == [[2, 2, 2], [4, 4, 4], [6, 6, 6]]
    for i, row in enumerate(rows):                # row[name][j]: batch element j at that point
        np.testing.assert_allclose(row["theta0"], hist["theta0"][:, i + 1], rtol=1e-12)


class Stop(Exception):
    pass


def test_an_exception_in_progress_keeps_its_type(quad, tmp_path):
    alg = _soba(quad)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0))

    def stop_at_4(row):
        if np.any(row["step"] >= 4):
            raise Stop("enough at step 4")

    with pytest.raises(Stop, match="enough at step 4"):
        bj.run(alg, state, quad.data, num_steps=6, eval_every=2, progress=stop_at_4)
    with pytest.raises(Stop, match="enough at step 4"):
        bj.run(alg, state, quad.data, num_steps=6, eval_every=2, progress=stop_at_4, check=True)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    with pytest.raises(Stop, match="enough at step 4"):   # bj.run under an eager vmap over seeds
        jax.vmap(lambda k: bj.run(alg, alg.init(quad.theta0, quad.phi0, k), quad.data, num_steps=6, eval_every=2,
                                  progress=stop_at_4))(keys)
    states = jax.vmap(lambda k: alg.init(quad.theta0, quad.phi0, k))(keys)
    with pytest.raises(Stop, match="enough at step 4"):
        bj.run_chunked(alg, states, quad.data, num_steps=6, chunk=6, eval_every=2, directory=str(tmp_path),
                       batched=True, progress=stop_at_4)
    assert not os.path.exists(tmp_path / "meta.json")   # nothing was checkpointed


def test_the_readme_block_on_long_runs_runs(capsys):
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    section = readme.split("### Long runs: progress, checkpoints, seeds")[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    out = capsys.readouterr().out
    assert "step 100: status ok" in out and "step 300: status ok" in out
    assert "steps [100 100 100 100]" in out
    assert int(ns["state"].count) == 500 and ns["hist"]["step"][-1] == 500   # extended from 300
    assert ns["hists"]["step"].shape == (4, 4)

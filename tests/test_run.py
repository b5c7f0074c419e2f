"""`bj.run`: history layout, cumulative oracle counts, eval_fn metrics, non-finite reporting, and
`jax.vmap` over hyperparameters and tasks (equal to a Python loop)."""
import equinox as eqx
import jax
import jax.extend
import numpy as np
import pytest

import bilevel_jax as bj


def fast_jit(fun):
    """`jax.jit` without LLVM's optimisation passes: these problems run in milliseconds, compiling
    is what costs (the same XLA program, about 2-3x faster to compile)."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0})


COUNT_KEYS = bj.algorithms.base.OracleCounts._fields   # lower_grads, upper_grads, hvps, cross, ...


def test_history_rows_counts_and_metrics_match_a_manual_loop(quad):
    alg = bj.algorithms.aid_bio(quad.problem, upper_lr=0.5, lower_lr=0.5, lower_steps=2,
                                linear_solver=bj.linear_solvers.cg(3))
    state0 = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    # eval_fn sees the state and the data bj.run was given
    eval_fn = lambda s, d: {"f_upper": quad.problem.f_upper(s.theta, s.phi, d[0]), "theta1": s.theta[1]}
    num_steps, every = 12, 4
    final, hist = jax.device_get(fast_jit(lambda s: bj.run(alg, s, quad.data, num_steps=num_steps, eval_every=every,
                                                          eval_fn=eval_fn))(state0))
    rows = num_steps // every + 1
    assert set(hist) == {"step", "residual_norm", "finite", "status", *COUNT_KEYS, "f_upper", "theta1"}
    assert all(v.shape == (rows,) for v in hist.values())
    np.testing.assert_array_equal(hist["step"], np.arange(0, num_steps + 1, every))
    # cumulative oracle calls: 2 LL gradients, 1 UL gradient, 3 + 1 HVPs (warm CG), 1 cross per step
    for key, per_step in zip(COUNT_KEYS, (2, 1, 4, 1)):
        np.testing.assert_array_equal(hist[key], per_step * np.asarray(hist["step"]))
    assert bool(hist["finite"].all())
    assert np.isnan(hist["residual_norm"][0])

    # the same iterations by hand
    update, evaluate = eqx.filter_jit(alg.update), jax.jit(eval_fn)
    state, metrics, residuals = state0, [evaluate(state0, quad.data)], []
    for k in range(1, num_steps + 1):
        state, info = update(state, quad.data)
        if k % every == 0:
            metrics.append(evaluate(state, quad.data))
            residuals.append(info.residual_norm)
    np.testing.assert_allclose(final.theta, state.theta, rtol=1e-13)
    np.testing.assert_allclose(final.phi, state.phi, rtol=1e-13)
    assert int(final.count) == num_steps
    for key in ("f_upper", "theta1"):
        np.testing.assert_allclose(hist[key], [m[key] for m in metrics], rtol=1e-12)
    np.testing.assert_allclose(hist["residual_norm"][1:], residuals, rtol=1e-10)


def test_history_without_eval_every_has_two_rows(quad):
    alg = bj.algorithms.soba(quad.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    _, hist = bj.run(alg, state, quad.data, num_steps=3)
    np.testing.assert_array_equal(hist["step"], [0, 3])
    np.testing.assert_array_equal(hist["hvps"], [0, 3])


def test_non_finite_iterates_are_reported(quad):
    # LL step 1e10 on a Hessian with eigenvalues >= 0.1: phi blows up to inf, then nan
    kw = dict(upper_lr=0.1, lower_lr=1e10, batch_size=None, upper_decay=0.0, lower_decay=0.0)
    alg = bj.algorithms.soba(quad.problem, **kw)
    state = alg.init(quad.theta0, np.asarray(quad.phi0) + 1.0, jax.random.PRNGKey(0), quad.data)
    _, hist = jax.device_get(fast_jit(lambda s: bj.run(alg, s, quad.data, num_steps=60, eval_every=20))(state))
    assert bool(hist["finite"][1]) and not bool(hist["finite"][-1])
    assert int(hist["status"][-1]) & bj.status.NONFINITE
    checked = bj.algorithms.soba(quad.problem, check=True, **kw)
    with pytest.raises(Exception, match="soba outer step failed: a non-finite value"):
        jax.block_until_ready(fast_jit(lambda s: bj.run(checked, s, quad.data, num_steps=60))(state))
    # STABLE (its own loop) reports and checks the same way
    stable = bj.algorithms.stable(quad.problem, batch_size=None, upper_lr=0.1, lower_lr=1e10, check=True)
    state = stable.init(quad.theta0, np.asarray(quad.phi0) + 1.0, jax.random.PRNGKey(0), quad.data)
    with pytest.raises(Exception, match="stable outer step failed"):
        jax.block_until_ready(fast_jit(lambda s: bj.run(stable, s, quad.data, num_steps=60))(state))


def test_run_bad_input(quad):
    alg = bj.algorithms.soba(quad.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    with pytest.raises(ValueError, match="num_steps=10 must be a multiple of eval_every=3"):
        bj.run(alg, state, quad.data, num_steps=10, eval_every=3)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        bj.run(alg, state, quad.data, num_steps=0)
    with pytest.raises(TypeError, match="num_steps must be a Python int"):
        bj.run(alg, state, quad.data, num_steps=10.0)
    with pytest.raises(TypeError, match="alg must be a bj.Algorithm"):
        bj.run(alg.update, state, quad.data, num_steps=2)
    with pytest.raises(ValueError, match=r"eval_fn metrics \['step'\] clash"):
        bj.run(alg, state, quad.data, num_steps=2, eval_fn=lambda s, d: {"step": 1.0})
    with pytest.raises(TypeError, match=r"data must be a pair"):
        bj.run(alg, state, quad.data[0], num_steps=2)


def test_vmap_over_a_hyperparameter_grid_equals_a_python_loop(quad):
    """A sweep: the algorithm is built inside the vmapped function with a traced upper_lr (SOBA's
    default decays turn it into a traced schedule)."""

    def final_theta(upper_lr):
        alg = bj.algorithms.soba(quad.problem, upper_lr=upper_lr, lower_lr=0.5, batch_size=None)
        state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
        return bj.run(alg, state, quad.data, num_steps=20)[0].theta

    lrs = np.array([0.05, 0.2, 0.8])
    swept = np.asarray(fast_jit(jax.vmap(final_theta))(lrs))
    single = fast_jit(final_theta)
    looped = np.stack([single(lr) for lr in lrs])
    np.testing.assert_allclose(swept, looped, rtol=1e-12, atol=1e-14)
    assert np.abs(swept[0] - swept[2]).max() > 1e-3   # the step size mattered


def test_vmap_over_tasks_and_seeds_equals_a_python_loop():
    """Tasks: data with an extra leading axis (3 finite-sum problems of the same shape), each with
    its own key; SABA sizes its memories from the (traced) data inside the vmap."""
    tasks = [bj.problems.quadratic_bilevel(jax.random.PRNGKey(1 + t), dim_upper=4, dim_lower=6, n_samples=64)
             for t in range(3)]
    problem = tasks[0].problem   # same objectives (reg = 1); only the data differ
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[t.data for t in tasks])
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(5), 3))
    alg = bj.algorithms.saba(problem, upper_lr=0.2, lower_lr=0.2, batch_size=16)
    theta0, phi0 = tasks[0].theta0, tasks[0].phi0

    def final_theta(data, key):
        state = alg.init(theta0, phi0, key, data)
        return bj.run(alg, state, data, num_steps=200)[0].theta

    swept = np.asarray(fast_jit(jax.vmap(final_theta))(stacked, keys))
    single = fast_jit(final_theta)
    looped = np.stack([single(t.data, k) for t, k in zip(tasks, keys)])
    np.testing.assert_allclose(swept, looped, rtol=1e-12, atol=1e-14)
    # each task went towards its own solution
    for t, theta in zip(tasks, swept):
        assert np.sum(np.asarray(t.grad(theta)) ** 2) < 0.1 * np.sum(np.asarray(t.grad(theta0)) ** 2)


def _scan_bodies(jaxpr):
    """The body jaxprs of the scans in `jaxpr`, outermost first (depth-first)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            out.append(body)
            out += _scan_bodies(body)
        else:
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                out += _scan_bodies(sub)
    return out


def _vector_isfinite(jaxpr) -> int:
    """is_finite applied to non-scalar operands, in `jaxpr` and its sub-jaxprs except scans."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "is_finite" and eqn.invars[0].aval.ndim > 0:
            n += 1
        if eqn.primitive.name != "scan":
            n += sum(_vector_isfinite(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return n


def test_the_scan_body_tests_finiteness_only_at_the_evaluation_points(quad):
    """The per-step body of bj.run makes no finiteness reduction over the iterates (the reference
    plain-JAX step makes none): the whole state is tested once per evaluation block. A single
    `alg.update` outside bj.run still reports NONFINITE itself."""
    alg = bj.algorithms.soba(quad.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0))
    jaxpr = jax.make_jaxpr(lambda s: bj.run(alg, s, quad.data, num_steps=4, eval_every=2))(state).jaxpr
    block, step = _scan_bodies(jaxpr)[:2]
    assert _vector_isfinite(step) == 0
    assert _vector_isfinite(block) > 0
    # check=True at the step level keeps the per-step test (it raises at the failing step)
    checked = bj.algorithms.soba(quad.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None, check=True)
    jaxpr = jax.make_jaxpr(lambda s: bj.run(checked, s, quad.data, num_steps=4, eval_every=2))(state).jaxpr
    assert _vector_isfinite(_scan_bodies(jaxpr)[1]) > 0
    # outside bj.run, a step reports a non-finite iterate itself
    upper, lower = quad.data
    h = np.array(lower["h"])
    h[0, 0] = np.nan
    _, info = jax.device_get(eqx.filter_jit(alg.update)(state, (upper, {**lower, "h": h})))
    assert int(info.status) & bj.status.NONFINITE and not bool(info.finite)


def test_a_discarded_history_costs_nothing(quad_stoch):
    """What a run does not return is not computed: with the history discarded, XLA removes the
    status, counts and residual from the carry (a smaller program), and the iterates are the same."""
    alg = bj.algorithms.soba(quad_stoch.problem, upper_lr=0.1, lower_lr=0.1, batch_size=16, sampler="shuffled")
    state = alg.init(quad_stoch.theta0, quad_stoch.phi0, jax.random.PRNGKey(0))
    with_history = fast_jit(lambda s: bj.run(alg, s, quad_stoch.data, num_steps=4, eval_every=2))
    bare = fast_jit(lambda s: bj.run(alg, s, quad_stoch.data, num_steps=4, eval_every=2)[0].theta)
    size = lambda f: len(f.lower(state).compile().as_text())
    assert size(bare) < size(with_history)
    np.testing.assert_array_equal(bare(state), with_history(state)[0].theta)

"""Robust multi-objective bilevel: `bj.MultiObjectiveProblem` and MORBiT (MMB: tests/test_mmb.py).

Ground truth: a 3-task quadratic bilevel problem (`bj.problems.multitask.multitask_quadratic`)
whose task objectives F_i(theta) are closed-form quadratics; the robust solution is a dense
min-max reference (dual projected ascent, checked by its duality gap), the multi-task solution a
linear solve. Task 0 is inactive at the robust solution (lambda*_0 = 0).
"""
import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.morbit import project_simplex
from bilevel_jax.multi_objective import task_slice
from bilevel_jax.problems import multitask as mt


@pytest.fixture(scope="module")
def q():
    return mt.multitask_quadratic(0, num_tasks=3, dim_upper=2, dim_lower=3)


@pytest.fixture(scope="module")
def ref(q):
    return q.robust_solution()


THETA0 = jnp.zeros(2)
PHI0 = jnp.zeros((3, 3))


def _run(alg, q, steps, eval_fn=None, eval_every=None):
    state = alg.init(THETA0, PHI0, jax.random.PRNGKey(0), q.data)
    return eqx.filter_jit(lambda a, s, d: bj.run(a, s, d, steps, eval_every or steps, eval_fn=eval_fn))(alg, state,
                                                                                                      q.data)


def test_reference_is_a_saddle_point_with_an_inactive_task(q, ref):
    assert ref.gap < 1e-10
    np.testing.assert_allclose(ref.lam.sum(), 1.0, atol=1e-12)
    assert ref.lam[0] == 0.0 and np.all(ref.lam[1:] > 0.3)
    np.testing.assert_allclose(ref.values[1], ref.values[2], rtol=1e-10)   # the active objectives are equal
    assert ref.values[0] < ref.values[1] - 1.0
    # the worst objective at theta* is below the worst objective anywhere near it
    for d in np.random.RandomState(0).randn(20, 2):
        assert q.values(ref.theta + 1e-3 * d).max() > ref.values.max()


def test_project_simplex_is_the_euclidean_projection_with_a_floor():
    rs = np.random.RandomState(0)
    for delta in (0.0, 0.3):
        for _ in range(20):
            x = jnp.asarray(rs.randn(5) * 2)
            p = np.asarray(project_simplex(x, delta))
            floor = delta / 5
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-12)
            assert p.min() >= floor - 1e-12
            # KKT of min ||p - x||^2 s.t. sum p = 1, p >= floor: x - p = tau on the free set,
            # x - floor <= tau on the set at the floor
            free = p > floor + 1e-12
            tau = (np.asarray(x) - p)[free]
            np.testing.assert_allclose(tau, tau[0], atol=1e-12)
            assert np.all(np.asarray(x)[~free] - floor <= tau[0] + 1e-12)


def test_morbit_reaches_the_robust_solution_and_uniform_the_average_one(q, ref):
    robust, _ = _run(bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05), q, 3000)
    uniform, _ = _run(bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, uniform=True), q, 3000)
    avg = q.average_solution()
    assert np.linalg.norm(robust.theta - ref.theta) <= 1e-3 * np.linalg.norm(ref.theta)
    np.testing.assert_allclose(robust.lam, ref.lam, atol=1e-3)
    assert robust.lam[0] == 0.0                      # lambda concentrates on the active objectives
    np.testing.assert_allclose(robust.phi, q.phi_star(robust.theta), atol=1e-6)
    assert np.linalg.norm(uniform.theta - avg) <= 1e-3 * np.linalg.norm(avg)
    chex.assert_trees_all_close(uniform.lam, jnp.full(3, 1 / 3))
    assert np.linalg.norm(ref.theta - avg) > 0.3     # the two solutions differ
    f_rob, f_avg = q.values(robust.theta), q.values(uniform.theta)
    assert f_rob.max() < f_avg.max() - 0.5          # robust: a lower worst task ...
    assert f_rob.mean() > f_avg.mean()               # ... at some cost in the mean


def test_lambda_stays_in_the_simplex_above_the_floor_at_every_step(q):
    delta = 0.3
    alg = bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.5, dual_floor=delta)
    _, hist = _run(alg, q, 200, eval_fn=lambda s, d: {"lam": s.lam}, eval_every=1)
    lam = np.asarray(hist["lam"])
    np.testing.assert_allclose(lam.sum(axis=1), 1.0, atol=1e-12)
    assert lam.min() >= delta / 3 - 1e-12
    assert np.isclose(lam.min(), delta / 3)          # the floor is reached (task 0 is inactive)


def test_one_step_is_the_weighted_sum_of_per_task_hypergradients_one_task_at_a_time(q):
    n, alpha, beta, gamma = 3, 0.07, 0.2, 0.3
    alg = bj.algorithms.morbit(q.problem, upper_lr=alpha, lower_lr=beta, dual_lr=gamma,
                               linear_solver=bj.linear_solvers.dense())
    rs = np.random.RandomState(1)
    theta, phi, lam = jnp.asarray(rs.randn(2)), jnp.asarray(rs.randn(3, 3)), jnp.asarray([0.5, 0.2, 0.3])
    state = eqx.tree_at(lambda s: s.lam, alg.init(theta, phi, jax.random.PRNGKey(0), q.data), lam)
    new, info = eqx.filter_jit(alg.update)(state, q.data)

    direction, new_phi, values = 0.0, [], []
    for i in range(n):                                # a Python loop over tasks
        pair = q.problem.pair(i)
        up_i, lo_i = task_slice(q.data, i)
        phi_i = phi[i] - beta * bj.oracles.lower_grad_phi(pair, theta, phi[i], lo_i)
        g_i, _ = bj.hypergradient(pair, theta, phi_i, (up_i, lo_i), solver=bj.linear_solvers.dense())
        # closed form of eq. 38 here: J = -B_i', v = A_i^{-1}(phi - c_i)
        closed = q.rho * theta + q.B[i].T @ np.linalg.solve(q.A[i], np.asarray(phi_i) - q.c[i])
        np.testing.assert_allclose(g_i, closed, rtol=1e-12, atol=1e-12)
        direction = direction + lam[i] * g_i
        new_phi.append(phi_i)
    theta_new = theta - alpha * direction
    for i in range(n):
        values.append(pair.f_upper(theta_new, new_phi[i], task_slice(q.data, i)[0]))
    lam_new = project_simplex(lam + gamma * jnp.stack(values))

    np.testing.assert_allclose(new.theta, theta_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new.phi, jnp.stack(new_phi), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new.lam, lam_new, rtol=1e-12, atol=1e-12)
    assert int(info.status) == bj.status.OK
    assert int(info.oracles.lower_grads) == n and int(info.oracles.cross) == n
    assert int(info.oracles.upper_grads) == n and int(info.oracles.values) == n   # lambda's ascent: n UL values


def test_the_list_of_pairs_form_matches_the_shared_form(q):
    up, lo = q.problem.f_upper, q.problem.f_lower
    listed = bj.MultiObjectiveProblem([up] * 3, [lo] * 3)
    assert not listed.shared and listed.num_tasks == 3
    kw = dict(upper_lr=0.05, lower_lr=0.3, dual_lr=0.05)
    a, _ = _run(bj.algorithms.morbit(q.problem, **kw), q, 20)
    b, _ = _run(bj.algorithms.morbit(listed, **kw), q._replace(problem=listed), 20)
    chex.assert_trees_all_close((a.theta, a.phi, a.lam), (b.theta, b.phi, b.lam), rtol=1e-12, atol=1e-12)


def test_morbit_reaches_the_regularised_robust_solution(q):
    mu = 1.0
    r = q.robust_solution(mu)
    assert r.gap < 1e-10
    mor, _ = _run(bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05, dual_reg=mu), q, 2000)
    assert np.linalg.norm(mor.theta - r.theta) <= 1e-3 * np.linalg.norm(r.theta)
    np.testing.assert_allclose(mor.lam, r.lam, atol=1e-3)


def _sinusoid(n=4, m=12):
    tasks = mt.sinusoid_tasks(jax.random.PRNGKey(0), num_tasks=n, support=m, query=m, reg=0.1)
    return tasks, mt.embedding_mlp(jax.random.PRNGKey(1), embed_dim=4, width=8, depth=1)


def test_an_mlp_theta_under_jit_and_vmap_over_seeds_with_minibatches():
    tasks, mlp = _sinusoid()
    alg = bj.algorithms.get("morbit")(tasks.problem, upper_lr=1e-3, lower_lr=0.05, dual_lr=1e-3, batch_size=4,
                                  dual_reg=1.0)
    phi0 = jnp.zeros((4, 4))

    def one(key):
        state = alg.init(mlp, phi0, key, tasks.data)
        return bj.run(alg, state, tasks.data, 6, 3, eval_fn=lambda s, d: {"lam": s.lam})

    states, hist = eqx.filter_jit(eqx.filter_vmap(one))(jax.random.split(jax.random.PRNGKey(0), 2))
    assert np.all(np.asarray(hist["status"]) == bj.status.OK)
    assert hist["lam"].shape == (2, 3, 4)
    w = states.theta.layers[0].weight
    assert w.shape == (2, 8, 1) and np.all(np.isfinite(w))
    assert not np.allclose(states.phi[0], states.phi[1])      # different minibatches per seed


def test_update_compiles_once_for_equal_configurations(q):
    traces = []

    @jax.jit
    def step(alg, state, data):
        traces.append(1)
        return alg.update(state, data)

    for lr in (0.05, 0.02):
        alg = bj.algorithms.morbit(q.problem, upper_lr=lr, lower_lr=0.3, dual_lr=0.05)
        step(alg, alg.init(THETA0, PHI0, jax.random.PRNGKey(0), q.data), q.data)
    assert len(traces) == 1


def test_nan_data_is_reported(q):
    (c,), lower = q.data
    bad = ((c.at[1, 0].set(jnp.nan),), lower)
    alg = bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05)
    state, hist = eqx.filter_jit(lambda a, s, d: bj.run(a, s, d, 2))(alg, alg.init(THETA0, PHI0, jax.random.PRNGKey(0)),
                                                                       bad)
    assert int(hist["status"][-1]) & bj.status.NONFINITE
    assert np.isnan(np.asarray(state.theta)).all()


def test_sinusoid_closed_form_head_is_the_lower_minimiser():
    tasks, mlp = _sinusoid()
    support = task_slice(tasks.data[1], 2)
    w = mt.head_solution(mlp, support, tasks.reg)
    grad = jax.grad(lambda w: tasks.problem.f_lower(mlp, w, support))(w)
    np.testing.assert_allclose(grad, 0.0, atol=1e-10)


def test_errors_name_the_argument(q):
    with pytest.raises(TypeError, match="morbit: problem must be a bj.MultiObjectiveProblem"):
        bj.algorithms.morbit(bj.BilevelProblem(lambda t, p, b: 0.0, lambda t, p, b: 0.0))
    with pytest.raises(ValueError, match="morbit: dual_floor"):
        bj.algorithms.morbit(q.problem, dual_floor=1.0)
    with pytest.raises(ValueError, match="morbit: dual_reg"):
        bj.algorithms.morbit(q.problem, dual_reg=-1.0)
    with pytest.raises(ValueError, match="num_tasks"):
        bj.MultiObjectiveProblem(lambda t, p, b: 0.0, lambda t, p, b: 0.0)
    alg = bj.algorithms.morbit(q.problem)
    with pytest.raises(ValueError, match="leading task axis"):
        alg.init(THETA0, jnp.zeros((2, 3)), jax.random.PRNGKey(0), q.data)
    assert bj.algorithms.get("morbit") is bj.algorithms.morbit
    assert "morbit" not in bj.algorithms.ALGORITHMS   # single-problem presets only there

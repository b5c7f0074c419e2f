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


@eqx.filter_jit
def _run(algs, data, steps, eval_fn=None, eval_every=None):
    """`steps` steps of each algorithm of `algs` from (THETA0, PHI0), its init included, in one
    program (one compilation for the runs a test compares)."""
    return [bj.run(alg, alg.init(THETA0, PHI0, jax.random.PRNGKey(0), data), data, steps, eval_every or steps,
                   eval_fn=eval_fn) for alg in algs]


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
    project = jax.jit(jax.vmap(project_simplex, in_axes=(0, None)))   # the 20 points of a floor in one call
    for delta in (0.0, 0.3):
        xs = rs.randn(20, 5) * 2
        for x, p in zip(xs, np.asarray(project(xs, delta))):
            floor = delta / 5
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-12)
            assert p.min() >= floor - 1e-12
            # KKT of min ||p - x||^2 s.t. sum p = 1, p >= floor: x - p = tau on the free set,
            # x - floor <= tau on the set at the floor
            free = p > floor + 1e-12
            tau = (x - p)[free]
            np.testing.assert_allclose(tau, tau[0], atol=1e-12)
            assert np.all(x[~free] - floor <= tau[0] + 1e-12)


def test_morbit_reaches_the_robust_solution_and_uniform_the_average_one(q, ref):
    (robust, _), (uniform, _) = _run([bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05),
                                      bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, uniform=True)],
                                     q.data, 3000)
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
    [(_, hist)] = _run([alg], q.data, 200, eval_fn=lambda s, d: {"lam": s.lam}, eval_every=1)
    lam = np.asarray(hist["lam"])
    np.testing.assert_allclose(lam.sum(axis=1), 1.0, atol=1e-12)
    assert lam.min() >= delta / 3 - 1e-12
    assert np.isclose(lam.min(), delta / 3)          # the floor is reached (task 0 is inactive)


def test_one_step_is_the_weighted_sum_of_per_task_hypergradients_one_task_at_a_time(q):
    n, alpha, beta, gamma = 3, 0.07, 0.2, 0.3
    alg = bj.algorithms.morbit(q.problem, upper_lr=alpha, lower_lr=beta, dual_lr=gamma,
                               linear_solver=bj.linear_solvers.dense())
    rs = np.random.RandomState(1)
    theta, phi, lam = rs.randn(2), rs.randn(3, 3), np.array([0.5, 0.2, 0.3])

    @jax.jit
    def step_and_reference(theta, phi, lam, data):
        """MORBiT's step from (theta, phi, lam), and the same step one task at a time (one program)."""
        state = eqx.tree_at(lambda s: s.lam, alg.init(theta, phi, jax.random.PRNGKey(0), data), lam)
        direction, new_phi, grads, values = 0.0, [], [], []
        for i in range(n):                                # a Python loop over tasks
            pair = q.problem.pair(i)
            up_i, lo_i = task_slice(data, i)
            phi_i = phi[i] - beta * bj.oracles.lower_grad_phi(pair, theta, phi[i], lo_i)
            g_i, _ = bj.hypergradient(pair, theta, phi_i, (up_i, lo_i), solver=bj.linear_solvers.dense())
            direction = direction + lam[i] * g_i
            new_phi.append(phi_i)
            grads.append(g_i)
        theta_new = theta - alpha * direction
        for i in range(n):
            values.append(pair.f_upper(theta_new, new_phi[i], task_slice(data, i)[0]))
        lam_new = project_simplex(lam + gamma * jnp.stack(values))
        return alg.update(state, data), (grads, new_phi, theta_new, lam_new)

    (new, info), (grads, new_phi, theta_new, lam_new) = jax.device_get(step_and_reference(theta, phi, lam, q.data))
    for i in range(n):   # closed form of eq. 38 here: J = -B_i', v = A_i^{-1}(phi - c_i)
        closed = q.rho * theta + q.B[i].T @ np.linalg.solve(q.A[i], new_phi[i] - q.c[i])
        np.testing.assert_allclose(grads[i], closed, rtol=1e-12, atol=1e-12)

    np.testing.assert_allclose(new.theta, theta_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new.phi, np.stack(new_phi), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(new.lam, lam_new, rtol=1e-12, atol=1e-12)
    assert int(info.status) == bj.status.OK
    assert int(info.oracles.lower_grads) == n and int(info.oracles.cross) == n
    assert int(info.oracles.upper_grads) == n and int(info.oracles.values) == n   # lambda's ascent: n UL values


def test_the_list_of_pairs_form_matches_the_shared_form(q):
    up, lo = q.problem.f_upper, q.problem.f_lower
    listed = bj.MultiObjectiveProblem([up] * 3, [lo] * 3)
    assert not listed.shared and listed.num_tasks == 3
    kw = dict(upper_lr=0.05, lower_lr=0.3, dual_lr=0.05)
    (a, _), (b, _) = _run([bj.algorithms.morbit(q.problem, **kw), bj.algorithms.morbit(listed, **kw)], q.data, 20)
    chex.assert_trees_all_close((a.theta, a.phi, a.lam), (b.theta, b.phi, b.lam), rtol=1e-12, atol=1e-12)


def test_morbit_reaches_the_regularised_robust_solution(q):
    mu = 1.0
    r = q.robust_solution(mu)
    assert r.gap < 1e-10
    [(mor, _)] = _run([bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05, dual_reg=mu)],
                      q.data, 2000)
    assert np.linalg.norm(mor.theta - r.theta) <= 1e-3 * np.linalg.norm(r.theta)
    np.testing.assert_allclose(mor.lam, r.lam, atol=1e-3)


@pytest.fixture(scope="module")
def sinusoid():
    """4 sinusoid tasks of 12 samples per set and a small embedding MLP (drawn in one program)."""
    return eqx.filter_jit(lambda: (mt.sinusoid_tasks(jax.random.PRNGKey(0), num_tasks=4, support=12, query=12, reg=0.1),
                                   mt.embedding_mlp(jax.random.PRNGKey(1), embed_dim=4, width=8, depth=1)))()


def test_an_mlp_theta_under_jit_and_vmap_over_seeds_with_minibatches(sinusoid):
    tasks, mlp = sinusoid
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
    c = np.array(c)
    c[1, 0] = np.nan
    bad = ((jax.device_put(c),), lower)
    alg = bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3, dual_lr=0.05)
    state, hist = eqx.filter_jit(lambda a, d: bj.run(a, a.init(THETA0, PHI0, jax.random.PRNGKey(0)), d, 2))(alg, bad)
    assert int(hist["status"][-1]) & bj.status.NONFINITE
    assert np.isnan(np.asarray(state.theta)).all()


def test_sinusoid_closed_form_head_is_the_lower_minimiser(sinusoid):
    tasks, mlp = sinusoid

    @eqx.filter_jit
    def head_grad(mlp, supports):
        support = task_slice(supports, 2)
        w = mt.head_solution(mlp, support, tasks.reg)
        return jax.grad(lambda w: tasks.problem.f_lower(mlp, w, support))(w)

    np.testing.assert_allclose(head_grad(mlp, tasks.data[1]), 0.0, atol=1e-10)


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

"""MMB on the multi-block min-max bilevel class (`bj.MinMaxBilevelProblem`), and MORBiT with fixed
scalarisation weights.

Ground truth: `bj.problems.multitask.min_max_quadratic`, m = 3 quadratic blocks (f_i concave
quadratic in y_i, g_i strongly convex quadratic), whose reduced function's saddle point is one
dense float64 solve; MMB's per-step update against a NumPy transcription of the update; the
weighted multi-task solution of `multitask_quadratic` in closed form for `fixed_weights`.
"""
import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.problems import multitask as mt

M, D_THETA, D_Y, D_PHI = 3, 2, 2, 3


@pytest.fixture(scope="module")
def q():
    return mt.min_max_quadratic(0, num_blocks=M, dim_upper=D_THETA, dim_dual=D_Y, dim_lower=D_PHI)


@pytest.fixture(scope="module")
def ref(q):
    return q.saddle_point()


def _init(alg, data, theta=None, y=None, phi=None, key=0):
    theta = jnp.zeros(D_THETA) if theta is None else theta
    y = jnp.zeros((M, D_Y)) if y is None else y
    phi = jnp.zeros((M, D_PHI)) if phi is None else phi
    return alg.init(theta, phi, jax.random.PRNGKey(key), data, y0=y)


@eqx.filter_jit
def _run(algs, data, steps):
    """`steps` steps of each algorithm of `algs` from zeros, its init included, in one program
    (one compilation for the runs a test compares)."""
    return [bj.run(alg, _init(alg, data), data, steps, steps) for alg in algs]


def _reduced(q, theta, y):
    """Phi(theta, y) = (1/m) sum_i f_i(theta, y_i, phi_i*(theta)) through the problem's own f_i."""
    phi = jnp.linalg.solve(jnp.asarray(q.A), (jnp.asarray(q.B) @ theta)[..., None])[..., 0]
    values = jax.vmap(q.problem.f_upper, in_axes=(None, 0, 0, 0))(theta, y, phi, q.data[0])
    return jnp.mean(values)


def test_reference_is_the_saddle_point_of_the_reduced_function(q, ref):
    phi_fn = lambda t, y: _reduced(q, t, y)
    (g_theta, g_y), ((h_tt, _), (_, h_yy)) = jax.jit(
        lambda t, y: (jax.grad(phi_fn, (0, 1))(t, y), jax.hessian(phi_fn, (0, 1))(t, y)))(ref.theta, ref.y)
    np.testing.assert_allclose(g_theta, 0.0, atol=1e-13)
    np.testing.assert_allclose(g_y, 0.0, atol=1e-13)
    # strongly convex in theta, strongly concave in y: a saddle, not any stationary point
    assert np.linalg.eigvalsh(h_tt).min() > 0.1
    assert np.linalg.eigvalsh(h_yy.reshape(M * D_Y, M * D_Y)).max() < -0.1
    np.testing.assert_allclose(ref.phi, q.phi_star(ref.theta), rtol=1e-14)
    assert np.abs(ref.y).min() > 0.03 and np.linalg.norm(ref.theta) > 0.3   # not a trivial saddle


def test_mmb_reaches_the_dense_saddle_point(q, ref):
    alg = bj.algorithms.mmb(q.problem, upper_lr=0.1, lower_lr=0.3, dual_lr=0.3, upper_momentum=0.5)
    [(state, hist)] = _run([alg], q.data, 1000)
    assert np.all(np.asarray(hist["status"]) == bj.status.OK)
    np.testing.assert_allclose(state.theta, ref.theta, atol=1e-12)
    np.testing.assert_allclose(state.y, ref.y, atol=1e-12)
    np.testing.assert_allclose(state.phi, ref.phi, atol=1e-12)
    # v_i solves block i's system at the saddle: A_i v_i = grad_phi f_i = phi_i - c_i + C_i' y_i
    b = ref.phi - q.c + np.einsum("npq,np->nq", q.C, ref.y)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", q.A, state.v), b, atol=1e-12)


def _numpy_step(q, s, sampled, alpha, beta, gamma, a, box):
    """One MMB iteration in NumPy (closed-form derivatives of the quadratic blocks, exact v_i)."""
    theta, y, phi, mom = (np.array(x) for x in s)
    new_y, new_phi, gs = y.copy(), phi.copy(), []
    for i in sampled:
        A, B, c, C, D, e = q.A[i], q.B[i], q.c[i], q.C[i], q.D[i], q.e[i]
        v = np.linalg.solve(A, phi[i] - c + C.T @ y[i])
        gs.append(q.rho * theta + D.T @ y[i] + B.T @ v)             # grad_theta f_i - J_i v_i, J_i = -B_i'
        new_y[i] = np.clip(y[i] + gamma * (C @ phi[i] + D @ theta - e - q.sigma * y[i]), -box, box)
        new_phi[i] = phi[i] - beta * (A @ phi[i] - B @ theta)
    mom = a * mom + (1 - a) * np.mean(gs, axis=0)   # a = upper_momentum, the weight on the previous average
    return theta - alpha * mom, new_y, new_phi, mom


def test_two_steps_with_sampled_blocks_a_box_and_the_moving_average(q):
    box, alpha, beta, gamma, a = 0.3, 0.2, 0.25, 0.7, 0.6
    problem = dataclasses.replace(q.problem, project_dual=lambda y: jnp.clip(y, -box, box))
    alg = bj.algorithms.mmb(problem, upper_lr=alpha, lower_lr=beta, dual_lr=gamma, upper_momentum=a, blocks=2,
                            linear_solver=bj.linear_solvers.dense())
    rs = np.random.RandomState(3)

    @jax.jit
    def two_steps(theta, y, phi, data):
        """The initial state, and the states and infos of two updates stacked (one program, the
        update traced once)."""
        def step(state, _):
            new, info = alg.update(state, data)
            return new, (new, info)

        state = _init(alg, data, theta, y, phi)
        return state, jax.lax.scan(step, state, length=2)[1]

    state, steps = jax.device_get(two_steps(rs.randn(D_THETA), 0.2 * rs.randn(M, D_Y), rs.randn(M, D_PHI), q.data))
    expected = (state.theta, state.y, state.phi, np.zeros(D_THETA))
    clipped = 0
    for k in range(2):
        new, info = jax.tree_util.tree_map(lambda x: x[k], steps)
        sampled = [i for i in range(M) if not np.allclose(new.phi[i], state.phi[i])]
        assert len(sampled) == 2
        expected = _numpy_step(q, expected, sampled, alpha, beta, gamma, a, box)
        for got, want in zip((new.theta, new.y, new.phi, new.momentum), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        clipped += int(np.sum(np.isclose(np.abs(new.y), box)))
        assert int(info.status) == bj.status.OK
        assert int(info.oracles.lower_grads) == 2 and int(info.oracles.cross) == 2
        state = new
    assert clipped > 0                                            # the projection was active


def test_blocks_are_drawn_uniformly_without_replacement(q):
    alg = bj.algorithms.mmb(q.problem, blocks=2)

    @jax.jit
    def updated_y(data):
        """y after one update from the initial state with each of 600 keys (one program)."""
        state = _init(alg, data)
        keys = jax.random.split(jax.random.PRNGKey(5), 600)
        with_key = lambda k: eqx.tree_at(lambda s: s.header.key, state, k)
        return jax.vmap(lambda k: alg.update(with_key(k), data)[0].y)(keys)

    y = updated_y(q.data)
    moved = np.any(np.asarray(y) != 0.0, axis=2)                  # (keys, blocks): block i updated
    assert np.all(moved.sum(axis=1) == 2)
    np.testing.assert_allclose(moved.mean(axis=0), 2 / 3, atol=0.06)


def test_the_list_of_blocks_form_matches_the_shared_form(q):
    listed = bj.MinMaxBilevelProblem([q.problem.f_upper] * M, [q.problem.f_lower] * M)
    assert not listed.shared and listed.num_blocks == M
    kw = dict(upper_lr=0.1, lower_lr=0.3, dual_lr=0.3, blocks=2)
    (a, _), (b, _) = _run([bj.algorithms.mmb(q.problem, **kw), bj.algorithms.mmb(listed, **kw)], q.data, 5)
    chex.assert_trees_all_close((a.theta, a.y, a.phi), (b.theta, b.y, b.phi), rtol=1e-12, atol=1e-12)


def _dro_sinusoids(n=4, m=12):
    """A min-max class instance with an MLP theta: f_i = y_i L_i(theta, w_i) - 0.5 y_i^2, y_i >= 0
    (the tasks and the MLP drawn in one program)."""
    tasks, mlp = eqx.filter_jit(lambda: (mt.sinusoid_tasks(jax.random.PRNGKey(0), num_tasks=n, support=m, query=m,
                                                           reg=0.1),
                                         mt.embedding_mlp(jax.random.PRNGKey(1), embed_dim=4, width=8, depth=1)))()
    problem = bj.MinMaxBilevelProblem(lambda t, y, w, b: y * mt.sinusoid_upper(t, w, b) - 0.5 * y ** 2,
                                      tasks.problem.f_lower, num_blocks=n, project_dual=lambda y: jnp.maximum(y, 0.0))
    return problem, tasks.data, mlp


def test_an_mlp_theta_with_minibatches_and_a_projected_dual():
    problem, data, mlp = _dro_sinusoids()
    alg = bj.algorithms.mmb(problem, upper_lr=1e-3, lower_lr=0.05, dual_lr=0.5, batch_size=4, blocks=2)
    state, hist = eqx.filter_jit(lambda a, m, d: bj.run(
        a, a.init(m, jnp.zeros((4, 4)), jax.random.PRNGKey(0), d, y0=jnp.ones(4)), d, 4, 2,
        eval_fn=lambda s, d: {"y": s.y}))(alg, mlp, data)
    assert np.all(np.asarray(hist["status"]) == bj.status.OK)
    assert hist["y"].shape == (3, 4) and np.all(np.asarray(hist["y"]) >= 0.0)
    assert np.any(np.asarray(hist["y"]) != 1.0)
    w = state.theta.layers[0].weight
    assert w.shape == (8, 1) and np.all(np.isfinite(w)) and not np.allclose(w, mlp.layers[0].weight)


def test_mmb_errors_name_the_argument(q):
    with pytest.raises(TypeError, match="mmb: problem must be a bj.MinMaxBilevelProblem"):
        bj.algorithms.mmb(mt.multitask_quadratic(0).problem)
    with pytest.raises(ValueError, match="mmb: blocks must be <= num_blocks=3"):
        bj.algorithms.mmb(q.problem, blocks=4)
    with pytest.raises(ValueError, match=r"mmb: upper_momentum must lie in \[0.0, 1.0\)"):
        bj.algorithms.mmb(q.problem, upper_momentum=1.0)
    with pytest.warns(FutureWarning, match=r"mmb: momentum= is deprecated .*use upper_momentum= = 1 - momentum"):
        old = bj.algorithms.mmb(q.problem, momentum=0.3)   # 0.1's weight of the new direction
    assert eqx.tree_equal(old, bj.algorithms.mmb(q.problem, upper_momentum=0.7))
    with pytest.raises(ValueError, match="mmb: dual_lr must be a positive step size"):
        bj.algorithms.mmb(q.problem, dual_lr=-1.0)
    with pytest.raises(ValueError, match="pass v_lr="):
        bj.algorithms.mmb(q.problem, lower_lr=lambda k: 0.1)
    alg = bj.algorithms.mmb(q.problem)
    with pytest.raises(ValueError, match="mmb: init needs y0="):
        alg.init(jnp.zeros(D_THETA), jnp.zeros((M, D_PHI)), jax.random.PRNGKey(0), q.data)
    with pytest.raises(ValueError, match="y0: every array leaf needs a leading task axis of size 3"):
        _init(alg, q.data, y=jnp.zeros((2, D_Y)))
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        bj.MinMaxBilevelProblem(q.problem.f_upper, q.problem.f_lower)
    with pytest.raises(TypeError, match="MinMaxBilevelProblem: project_dual must be None or a callable"):
        bj.MinMaxBilevelProblem(q.problem.f_upper, q.problem.f_lower, num_blocks=3, project_dual=1.0)
    with pytest.raises(ValueError, match="f_upper has 2 functions and f_lower 1"):
        bj.MinMaxBilevelProblem([q.problem.f_upper] * 2, [q.problem.f_lower])
    assert bj.algorithms.get("mmb") is bj.algorithms.mmb and "mmb" not in bj.algorithms.ALGORITHMS


# --------------------------------------------------------------------- MORBiT with fixed weights
@pytest.fixture(scope="module")
def mq():
    return mt.multitask_quadratic(0, num_tasks=3, dim_upper=2, dim_lower=3)


@eqx.filter_jit
def _morbit_run(alg, data, steps, eval_fn=None, eval_every=None):
    """`steps` steps of `alg` from zeros, its init included, in one program."""
    state = alg.init(jnp.zeros(2), jnp.zeros((3, 3)), jax.random.PRNGKey(0), data)
    return bj.run(alg, state, data, steps, eval_every or steps, eval_fn=eval_fn)


def test_fixed_weights_reach_the_minimiser_of_the_weighted_problem(mq):
    w = np.array([0.6, 0.1, 0.3])
    alg = bj.algorithms.morbit(mq.problem, upper_lr=0.1, lower_lr=0.3, fixed_weights=w)
    assert alg.name == "morbit_fixed"
    state, hist = _morbit_run(alg, mq.data, 1000, eval_fn=lambda s, d: {"lam": s.lam}, eval_every=100)
    weighted = mq.weighted_solution(w)
    np.testing.assert_allclose(state.theta, weighted, atol=1e-12)
    np.testing.assert_allclose(state.phi, mq.phi_star(weighted), atol=1e-12)
    assert np.all(np.asarray(hist["lam"]) == w)                  # lambda is never updated
    # its closed form: the gradient of sum_i w_i F_i vanishes there, and it is neither the robust
    # nor the average solution
    M = np.linalg.solve(mq.A, mq.B)                               # phi_i*(theta) = M_i theta
    grad = sum(w[i] * (M[i].T @ (M[i] @ weighted - mq.c[i]) + mq.rho * weighted) for i in range(3))
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)
    assert min(np.linalg.norm(weighted - mq.average_solution()), np.linalg.norm(weighted - mq.robust_solution().theta)) > 0.1


def test_uniform_is_fixed_weights_one_over_n(mq):
    uniform = bj.algorithms.morbit(mq.problem, uniform=True)
    fixed = bj.algorithms.morbit(mq.problem, fixed_weights=jnp.full(3, 1 / 3))
    assert uniform.name == "morbit_uniform" and bj.algorithms.morbit(mq.problem).weights is None
    chex.assert_trees_all_equal(jax.tree_util.tree_leaves(uniform), jax.tree_util.tree_leaves(fixed))   # weights 1/n
    assert uniform.weights.shape == (3,)


@pytest.mark.parametrize("weights, kw, error, match", [
    ([0.5, 0.5], {}, ValueError, r"fixed_weights must hold one weight per task: shape \(3,\), got shape \(2,\)"),
    ([[0.2, 0.3, 0.5]], {}, ValueError, r"shape \(3,\), got shape \(1, 3\)"),
    ([0.7, -0.2, 0.5], {}, ValueError, "fixed_weights must be nonnegative"),
    ([0.2, np.nan, 0.5], {}, ValueError, "fixed_weights must be nonnegative"),
    ([0.2, 0.2, 0.5], {}, ValueError, "fixed_weights must sum to 1 .* got sum 0.9"),
    ("abc", {}, TypeError, "fixed_weights must be an array of 3 weights"),
    ([0.2, 0.3, 0.5], {"uniform": True}, ValueError, "uniform=True .* or fixed_weights=, not both"),
    ([0.2, 0.3, 0.5], {"dual_reg": 1.0}, ValueError, "lambda ascent's dual_reg would be ignored"),
    ([0.2, 0.3, 0.5], {"dual_floor": 0.1}, ValueError, "lambda ascent's dual_floor would be ignored"),
])
def test_fixed_weights_are_checked(mq, weights, kw, error, match):
    with pytest.raises(error, match="^morbit: .*" + match):
        bj.algorithms.morbit(mq.problem, fixed_weights=weights, **kw)

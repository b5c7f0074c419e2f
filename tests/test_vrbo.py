"""VRBO as the double loop of Yang, Ji & Liang 2021 (arXiv:2106.04692, Algorithm 2): the inner
SARAH loop and the periodic refresh in the per-step oracle counts, the iterates against the
algorithm written out (full batch), the recursion's same-sample differences (a minibatch run equals
the full-batch run when the oracles' slopes do not depend on the sample), and convergence to the
closed-form theta* of a strongly convex quadratic.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj


def _constant_slopes(q):
    """`q` with every per-sample matrix (H, C of the LL; P, S of the UL) replaced by its mean: only
    the linear terms h_i, p_j vary, so each oracle o(z; xi) is affine in z = (theta, phi) with a
    slope that does not depend on the sample."""
    upper, lower = q.data
    mean = lambda d, keys: {k: (jnp.broadcast_to(v.mean(0), v.shape) if k in keys else v) for k, v in d.items()}
    return q._replace(data=(mean(upper, ("P", "S")), mean(lower, ("H", "C"))))


def test_vrbo_is_a_double_loop_and_the_single_loop_variant_is_named_so(quad):
    alg = bj.algorithms.vrbo(quad.problem)
    assert alg.lower_steps >= 1 and alg.lower_recursion
    assert isinstance(alg.estimator, bj.algorithms.estimators.Recursive) and alg.estimator.refresh_period == 32
    single = bj.algorithms.vrbo_single_loop(quad.problem)
    assert single.lower_steps == 0 and not single.lower_recursion
    with pytest.raises(ValueError, match="vrbo: lower_steps"):
        bj.algorithms.vrbo(quad.problem, lower_steps=0)
    with pytest.raises(ValueError, match="lower_recursion needs a recursive estimator"):
        bj.algorithms.bilevel_loop(quad.problem, direction=bj.algorithms.directions.implicit(bj.linear_solvers.cg(5)),
                                   upper_opt=bj.algorithms.steps.step_rule("upper_lr", 0.1),
                                   lower_opt=bj.algorithms.steps.step_rule("lower_lr", 0.1), lower_steps=2,
                                   lower_recursion=True)


def test_oracle_counts_show_the_refresh_period_and_the_inner_loop(quad_stoch):
    """n = 64 samples, batches of 16: a refresh is 64 / 16 = 4 minibatch evaluations; the inner loop
    2 evaluations per LL step (two points) from the second outer step on; otherwise 2."""
    q, m, period, neumann = quad_stoch, 3, 4, 5
    alg = bj.algorithms.vrbo(q.problem, lower_steps=m, period=period, neumann_steps=neumann, neumann_eta=0.4,
                             batch_size=16)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    update = eqx.filter_jit(alg.update)
    hvps_per_evaluation = None
    for k in range(10):
        state, info = update(state, q.data)
        counts = tuple(int(c) for c in info.oracles[:4])   # (LL grads, UL grads, HVPs, cross)
        evaluations = (4 if k % period == 0 else 2) + (2 * m if k > 0 else 0)
        assert counts[0] == counts[1] == counts[3] == evaluations, (k, counts)
        hvps_per_evaluation = hvps_per_evaluation or counts[2] // evaluations
        assert counts[2] == hvps_per_evaluation * evaluations
    assert hvps_per_evaluation == neumann - 1   # the sampled Neumann series: one HVP per factor


def test_full_batch_iterates_are_the_algorithm_written_out(quad):
    """Full batch, LL Hessian I and Neumann step 1 (the series is exact): every recursion equals
    the exact oracle at its point, so VRBO is T LL gradient steps at theta_k (none at k = 0) and a
    step along the exact hypergradient at (theta_k, phi)."""
    lower = {**quad.data[1], "H": jnp.broadcast_to(jnp.eye(6), quad.data[1]["H"].shape)}
    q = quad._replace(data=(quad.data[0], lower))
    alpha, beta, m, steps = 0.3, 0.4, 3, 12
    alg = bj.algorithms.vrbo(q.problem, upper_lr=alpha, lower_lr=beta, lower_steps=m, period=5, neumann_steps=4,
                             neumann_eta=1.0, batch_size=None)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    state, _ = jax.jit(lambda s: bj.run(alg, s, q.data, num_steps=steps))(state)

    f_u, f_l = q.problem.f_upper, q.problem.f_lower
    up, low = q.data

    def hypergradient(x, y):
        g_x, g_y = jax.grad(f_u, (0, 1))(x, y, up)
        hess = jax.hessian(f_l, 1)(x, y, low)
        cross = jax.jacfwd(jax.grad(f_l, 1), 0)(x, y, low)
        return g_x - cross.T @ jnp.linalg.solve(hess, g_y)

    @jax.jit
    def written_out():
        x, y = q.theta0, q.phi0
        for k in range(steps):
            for _ in range(m if k > 0 else 0):
                y = y - beta * jax.grad(f_l, 1)(x, y, low)
            x = x - alpha * hypergradient(x, y)
        return x, y

    x, y = written_out()
    np.testing.assert_allclose(state.theta, x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.phi, y, rtol=1e-12, atol=1e-13)


def test_minibatch_recursion_equals_the_full_batch_run_when_slopes_are_shared(quad_stoch):
    """With sample-independent slopes, o(z; xi) - o(z'; xi) is the full-data difference, so the
    SARAH estimates (refresh + same-sample differences, never broken across outer steps) are the
    full-data oracles at every point: the minibatch iterates are the full-batch ones. A recursion
    that differenced different samples, or restarted from a stale point, would not be."""
    q = _constant_slopes(quad_stoch)
    kw = dict(upper_lr=0.3, lower_lr=0.5, lower_steps=3, period=4, neumann_steps=6, neumann_eta=0.5)
    final = {}
    for batch_size in (None, 16):
        alg = bj.algorithms.vrbo(q.problem, batch_size=batch_size, **kw)
        state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(1), q.data)
        final[batch_size], _ = jax.jit(lambda s: bj.run(alg, s, q.data, num_steps=13))(state)
    np.testing.assert_allclose(final[16].theta, final[None].theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final[16].phi, final[None].phi, rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(final[16].theta - q.theta0).max()) > 1e-2   # (it moved)


def test_minibatch_vrbo_reaches_the_closed_form_theta_star(quad_stoch):
    """Minibatches of 16 on the finite-sum quadratic with shared slopes (the Neumann series, 100
    terms of step 1, is then exact to 1e-5): theta* of the closed form within 1e-3 relative."""
    q = _constant_slopes(quad_stoch)   # the means, hence the closed forms, are unchanged
    theta_star = q.theta_star()
    alg = bj.algorithms.vrbo(q.problem, upper_lr=0.5, lower_lr=1.0, lower_steps=3, period=8, neumann_steps=100,
                             neumann_eta=1.0, batch_size=16)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(2), q.data)
    state, history = jax.jit(lambda s: bj.run(alg, s, q.data, num_steps=200))(state)
    assert bool(np.all(history["finite"]))
    rel = float(jnp.linalg.norm(state.theta - theta_star) / jnp.linalg.norm(theta_star))
    assert rel < 1e-3, rel
    assert float(jnp.linalg.norm(state.phi - q.phi_star(theta_star))) < 1e-3 * float(jnp.linalg.norm(q.phi_star(theta_star)))

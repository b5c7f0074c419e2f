"""VRBO as the double loop of Yang, Ji & Liang 2021 (arXiv:2106.04692, Algorithm 2): the inner
SARAH loop and the periodic refresh in the per-step oracle counts, the iterates against the
algorithm written out (full batch), the recursion's same-sample differences (a minibatch run equals
the full-batch run when the oracles' slopes do not depend on the sample), and convergence to the
closed-form theta* of a strongly convex quadratic.

The three minibatch tests share one configuration (`_MINIBATCH`, `_STEPS`: step sizes are array
fields of the algorithm), hence one compiled run (init included) for the whole file.
"""
import equinox as eqx
import jax
import numpy as np
import pytest

import bilevel_jax as bj

# Minibatches of 16 of quad_stoch's 64 samples, a refresh every 4 steps, m = 3 LL steps, Q = 100
# Neumann terms (exact to 1e-5 on shared slopes with step 1). 24 outer steps reach theta* of
# test_minibatch_vrbo_reaches_the_closed_form_theta_star to 5e-6 relative (phi* 9e-6, the floor of
# the Neumann truncation, the same as after 200 steps; 16 steps: 7e-4, the bound 1e-3).
_MINIBATCH = dict(lower_steps=3, period=4, neumann_steps=100, batch_size=16)
_STEPS = 24


@eqx.filter_jit
def _run(alg, theta0, phi0, key, data, num_steps, eval_every=None):
    """`alg.init` and `bj.run` in one program, shared by calls with the same configuration."""
    return bj.run(alg, alg.init(theta0, phi0, key, data), data, num_steps=num_steps, eval_every=eval_every)


def _constant_slopes(q):
    """`q` with every per-sample matrix (H, C of the LL; P, S of the UL) replaced by its mean: only
    the linear terms h_i, p_j vary, so each oracle o(z; xi) is affine in z = (theta, phi) with a
    slope that does not depend on the sample (NumPy: no eager program per shape)."""
    upper, lower = q.data
    mean = lambda d, keys: {k: (np.broadcast_to(np.asarray(v).mean(0), v.shape) if k in keys else v)
                            for k, v in d.items()}
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
    2 evaluations per LL step (two points) from the second outer step on; otherwise 2. Each step's
    counts are the differences of the run's cumulative counts, recorded at every step."""
    q, m, period, neumann = quad_stoch, _MINIBATCH["lower_steps"], _MINIBATCH["period"], _MINIBATCH["neumann_steps"]
    alg = bj.algorithms.vrbo(q.problem, neumann_eta=0.4, **_MINIBATCH)
    _, history = _run(alg, q.theta0, q.phi0, jax.random.PRNGKey(0), q.data, _STEPS, 1)
    totals = np.stack([np.asarray(history[k]) for k in ("lower_grads", "upper_grads", "hvps", "cross")], axis=1)
    for k, counts in enumerate(np.diff(totals, axis=0)):   # (LL grads, UL grads, HVPs, cross) of step k
        evaluations = (4 if k % period == 0 else 2) + (2 * m if k > 0 else 0)
        assert counts[0] == counts[1] == counts[3] == evaluations, (k, counts)
        # the sampled Neumann series: one HVP per factor
        assert counts[2] == (neumann - 1) * evaluations, (k, counts)


def test_full_batch_iterates_are_the_algorithm_written_out(quad):
    """Full batch, LL Hessian I and Neumann step 1 (the series is exact): every recursion equals
    the exact oracle at its point, so VRBO is T LL gradient steps at theta_k (none at k = 0) and a
    step along the exact hypergradient at (theta_k, phi). The algorithm written out is NumPy on
    the derivatives of the quadratic (`bj.problems.quadratic`) in closed form."""
    lower = {**quad.data[1], "H": np.broadcast_to(np.eye(6), quad.data[1]["H"].shape)}
    q = quad._replace(data=(quad.data[0], lower))
    alpha, beta, m, steps = 0.3, 0.4, 3, 12
    alg = bj.algorithms.vrbo(q.problem, upper_lr=alpha, lower_lr=beta, lower_steps=m, period=5, neumann_steps=4,
                             neumann_eta=1.0, batch_size=None)
    state, _ = _run(alg, q.theta0, q.phi0, jax.random.PRNGKey(0), q.data, steps)

    (P, S, p), (H, C, h) = ([np.asarray(d[k]).mean(0) for k in keys] for d, keys in zip(q.data, ("PSp", "HCh")))
    reg = float(q.means["reg"])
    P, H = (P + P.T) / 2, (H + H.T) / 2   # the gradients of 1/2 phi'P phi, 1/2 phi'H phi

    def hypergradient(x, y):   # grad_x f_u - (d_x grad_y f_l)' (grad_yy f_l)^{-1} grad_y f_u
        return S.T @ y + reg * x - C.T @ np.linalg.solve(H, P @ y + S @ x + p)

    x, y = np.asarray(q.theta0), np.asarray(q.phi0)
    for k in range(steps):
        for _ in range(m if k > 0 else 0):
            y = y - beta * (H @ y + C @ x + h)
        x = x - alpha * hypergradient(x, y)
    np.testing.assert_allclose(state.theta, x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(state.phi, y, rtol=1e-12, atol=1e-13)


def test_minibatch_recursion_equals_the_full_batch_run_when_slopes_are_shared(quad_stoch):
    """With sample-independent slopes, o(z; xi) - o(z'; xi) is the full-data difference, so the
    SARAH estimates (refresh + same-sample differences, never broken across outer steps) are the
    full-data oracles at every point: the minibatch iterates are the full-batch ones. A recursion
    that differenced different samples, or restarted from a stale point, would not be."""
    q = _constant_slopes(quad_stoch)
    kw = dict(_MINIBATCH, upper_lr=0.3, lower_lr=0.5, neumann_eta=0.5)
    final = {}
    for batch_size in (None, 16):
        alg = bj.algorithms.vrbo(q.problem, **{**kw, "batch_size": batch_size})
        state, _ = _run(alg, q.theta0, q.phi0, jax.random.PRNGKey(1), q.data, _STEPS, 1)
        final[batch_size] = jax.device_get((state.theta, state.phi))
    np.testing.assert_allclose(final[16][0], final[None][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final[16][1], final[None][1], rtol=1e-10, atol=1e-12)
    assert np.abs(final[16][0] - np.asarray(q.theta0)).max() > 1e-2   # (it moved)


def test_minibatch_vrbo_reaches_the_closed_form_theta_star(quad_stoch):
    """Minibatches of 16 on the finite-sum quadratic with shared slopes (the Neumann series, 100
    terms of step 1, is then exact to 1e-5): theta* of the closed form within 1e-3 relative."""
    q = _constant_slopes(quad_stoch)   # the means, hence the closed forms (and q.reference), are unchanged
    means = {k: np.asarray(v) for k, v in q.means.items()}
    theta_star = np.asarray(q.reference.theta)
    phi_star = -np.linalg.solve(means["H"], means["C"] @ theta_star + means["h"])
    alg = bj.algorithms.vrbo(q.problem, upper_lr=0.5, lower_lr=1.0, neumann_eta=1.0, **_MINIBATCH)
    state, history = _run(alg, q.theta0, q.phi0, jax.random.PRNGKey(2), q.data, _STEPS, 1)
    theta, phi = jax.device_get((state.theta, state.phi))
    assert np.asarray(history["finite"]).all()
    rel = float(np.linalg.norm(theta - theta_star) / np.linalg.norm(theta_star))
    assert rel < 1e-3, rel
    assert float(np.linalg.norm(phi - phi_star)) < 1e-3 * float(np.linalg.norm(phi_star))

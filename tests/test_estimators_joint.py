"""`estimators.storm(joint=True)` (one vmapped evaluation of the current and previous points, used
by SUSTAIN so that its HIA minibatches are drawn once) computes the same iterates as two calls."""
import jax
import numpy as np
import optax

import bilevel_jax as bj
from bilevel_jax.algorithms import directions, estimators
from bilevel_jax.linear_solvers import stochastic_neumann


def _run(problem_bundle, joint, steps=15):
    q = problem_bundle
    alg = bj.algorithms.bilevel_loop(
        q.problem, direction=directions.implicit(stochastic_neumann(5, 0.1), simultaneous=True),
        upper_opt=optax.sgd(0.05), lower_opt=optax.sgd(0.1),
        estimator=estimators.storm(0.5, joint=joint), batch_size=8)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(3), q.data)
    state, hist = jax.jit(lambda s, d: bj.run(alg, s, d, num_steps=steps))(state, q.data)
    return state, hist


def test_storm_joint_matches_separate_evaluations(quad_stoch):
    sep, hist_sep = _run(quad_stoch, joint=False)
    joint, hist_joint = _run(quad_stoch, joint=True)
    np.testing.assert_allclose(joint.theta, sep.theta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(joint.phi, sep.phi, rtol=1e-10, atol=1e-12)
    for k in ("lower_grads", "upper_grads", "hvps", "cross"):
        np.testing.assert_array_equal(hist_joint[k], hist_sep[k])


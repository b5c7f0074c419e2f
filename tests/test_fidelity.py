"""Fidelity of the presets to their papers: StocBiO's Neumann estimate with a fresh minibatch per
factor (unbiased for the truncated series) against the shared-batch option (biased)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.directions import Point
from bilevel_jax.algorithms.steps import draw_batches

Q, ETA, BATCH, DRAWS = 10, 0.3, 8, 4000


@pytest.fixture(scope="module")
def big_quad():
    """512 rank-one LL Hessians (the exact mean spectrum in [0.1, 1])."""
    return bj.problems.quadratic_bilevel(jax.random.PRNGKey(11), dim_upper=4, dim_lower=6, n_samples=512)


def _neumann_draws(q, shared_batch):
    """DRAWS independent StocBiO estimates v at a fixed point (UL full batch: b is exact)."""
    alg = bj.algorithms.stocbio(q.problem, batch_size=(None, BATCH), neumann_steps=Q, neumann_eta=ETA,
                                shared_batch=shared_batch, lower_steps=1)
    theta, phi = q.theta0 + 0.5, q.phi0 - 0.5
    point = Point(theta, phi, alg.direction.init(theta, phi))

    def one(key):
        batches = draw_batches(alg.samplers, q.data, key, 0)
        ev = alg.direction.evaluate(q.problem, point, batches, jax.random.fold_in(key, 1), "rev")
        return ev.rule_state.v

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), DRAWS)), theta, phi


def _truncated_series(q, theta, phi):
    a = jax.hessian(q.problem.f_lower, 1)(theta, phi, q.data[1])
    b = jax.grad(q.problem.f_upper, 1)(theta, phi, q.data[0])
    m = jnp.eye(a.shape[0]) - ETA * a
    return ETA * sum(jnp.linalg.matrix_power(m, k) @ b for k in range(Q))


def test_stocbio_estimate_is_unbiased_with_a_batch_per_factor(big_quad):
    draws, theta, phi = _neumann_draws(big_quad, shared_batch=False)
    expected = _truncated_series(big_quad, theta, phi)
    mean, stderr = draws.mean(0), draws.std(0) / np.sqrt(DRAWS)
    # within Monte-Carlo error of the truncated series, every coordinate
    assert bool(jnp.all(jnp.abs(mean - expected) < 4 * stderr)), (mean - expected) / stderr

    shared, _, _ = _neumann_draws(big_quad, shared_batch=True)
    bias = shared.mean(0) - expected
    shared_err = shared.std(0) / np.sqrt(DRAWS)
    # the shared batch is measurably off: many standard errors, and a visible relative bias
    assert float(jnp.max(jnp.abs(bias) / shared_err)) > 10
    assert float(jnp.linalg.norm(bias) / jnp.linalg.norm(expected)) > 0.05

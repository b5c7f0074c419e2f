"""Logistic-regression HPO (Dagréou et al. 2022, arXiv:2201.13409): the reference evaluators agree with the toolkit's
hypergradient, with autodiff through Newton and with finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax import datasets
from bilevel_jax.problems import logistic


@pytest.fixture(scope="module")
def hpo():
    data = datasets.ijcnn1_like(0, n_train=300, n_val=400)
    return bj.problems.logistic_hpo(data, key=1)


def test_bundle_shapes_and_init(hpo):
    (Xv, _), (X, _) = hpo.data
    assert hpo.theta0.shape == (22,) and hpo.phi0.shape == (22,) and X.shape == (300, 22)
    assert jnp.all(hpo.theta0 < 0)                                  # log U(0, 1)
    zeros = bj.problems.logistic_hpo(hpo.data, theta_init="zeros", phi_init="zeros", per_feature=False)
    assert zeros.theta0.shape == () and float(zeros.theta0) == 0.0 and not jnp.any(zeros.phi0)
    with pytest.raises(ValueError, match="theta_init"):
        bj.problems.logistic_hpo(hpo.data, theta_init="ones")
    with pytest.raises(ValueError, match="features"):
        bj.problems.logistic_hpo(((Xv[:, :5], hpo.data[0][1]), hpo.data[1]))


def test_closed_form_derivatives_match_autodiff(hpo):
    @jax.jit
    def both(theta, w, batch):
        f = lambda w: hpo.problem.f_lower(theta, w, batch)
        return logistic.lower_grad_hessian(theta, w, batch), (jax.grad(f)(w), jax.hessian(f)(w))

    (g, H), (g_ad, H_ad) = both(hpo.theta0, hpo.phi0, hpo.data[1])
    np.testing.assert_allclose(g, g_ad, atol=1e-12)
    np.testing.assert_allclose(H, H_ad, atol=1e-12)


def test_phi_star_is_stationary(hpo):
    for theta in (hpo.theta0, jnp.full(22, -8.0), jnp.full(22, 4.0)):
        w = hpo.phi_star(theta)
        assert float(jnp.linalg.norm(bj.oracles.lower_grad_phi(hpo.problem, theta, w, hpo.data[1]))) < 1e-10


def test_grad_matches_hypergradient_autodiff_and_fd(hpo):
    theta = hpo.theta0
    g = hpo.grad(theta)
    assert float(jnp.linalg.norm(g)) > 1e-4                         # a non-trivial gradient
    hypergradient = jax.jit(lambda th, w, data: bj.hypergradient(
        hpo.problem, th, w, data, solver=bj.linear_solvers.dense())[0])
    np.testing.assert_allclose(g, hypergradient(theta, hpo.phi_star(theta), hpo.data), atol=1e-8, rtol=0)
    np.testing.assert_allclose(g, jax.grad(hpo.value)(theta), atol=1e-8, rtol=0)
    eps = 1e-5
    fd = [(hpo.value(theta + eps * e) - hpo.value(theta - eps * e)) / (2 * eps) for e in jnp.eye(22)]
    np.testing.assert_allclose(g, jnp.stack(fd), atol=1e-8, rtol=0)


def test_scalar_theta_grad_is_the_sum(hpo):
    scalar = hpo._replace(theta0=jnp.asarray(-0.5))
    g = scalar.grad(scalar.theta0)
    assert g.shape == ()
    np.testing.assert_allclose(g, hpo.grad(jnp.full(22, -0.5)).sum(), atol=1e-12)
    np.testing.assert_allclose(g, jax.grad(scalar.value)(scalar.theta0), atol=1e-8)


def test_stable_for_large_margins(hpo):
    (Xv, yv), (X, y) = hpo.data
    big = ((1e3 * Xv, yv), (1e3 * X, y))
    w = jnp.ones(22)
    assert jnp.isfinite(hpo.problem.f_lower(hpo.theta0, w, big[1]))
    assert jnp.isfinite(hpo.problem.f_upper(hpo.theta0, w, big[0]))


def test_solve_value_decreases_h(hpo):
    sol = hpo.solve_value(steps=20)
    assert float(sol.value) < float(hpo.value(jnp.zeros(22))) - 1e-3
    np.testing.assert_allclose(sol.value, hpo.value(sol.theta), rtol=1e-12)
    assert float(sol.grad_norm) < 1e-3

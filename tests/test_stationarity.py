"""Stationarity measures of a projected / non-smooth upper level (`bj.stationarity`) against closed
forms, and in `bj.run` histories.

Box: F(theta) = sum_i d_i (theta_i - c_i)^2 / 2 on [0, 1]^3 (the LL phi* = theta), d = (1, 2, 4),
c = (2, -1, 0.5): theta* = clip(c, 0, 1) = (1, 0, 0.5), where grad F = (-1, 2, 0) (norm sqrt 5)
and the gradient mapping is 0. l1: F(theta) = ||theta - c||^2 / 2 + lam ||theta||_1, c = (2, 0.3,
-1.5), lam = 0.5: theta* = soft(c, lam) = (1.5, 0, -1).
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax import stationarity as stat

D, C = jnp.array([1.0, 2.0, 4.0]), jnp.array([2.0, -1.0, 0.5])
BOX_STAR = np.array([1.0, 0.0, 0.5])
L1_C, LAM = jnp.array([2.0, 0.3, -1.5]), 0.5
L1_STAR = np.array([1.5, 0.0, -1.0])


def _box_upper(t, p, b):
    return 0.5 * jnp.sum(D * (p - C) ** 2)


def _follow(t, p, b):
    return 0.5 * jnp.sum((p - t) ** 2)


BOX_PROBLEM = bj.BilevelProblem(_box_upper, _follow, project_upper=lambda t: jnp.clip(t, 0.0, 1.0))
FREE_PROBLEM = bj.BilevelProblem(_box_upper, _follow)


def _box_grad(state, data):
    return D * (state.theta - C)


class _State:
    def __init__(self, theta):
        self.theta = theta


# ------------------------------------------------------------------------------- closed forms

def test_gradient_mapping_of_a_box_at_an_active_point_and_at_the_constrained_minimiser():
    prox = stat.projection(BOX_PROBLEM.project)
    # theta = (1, 0, 0.25), eta = 0.5: grad F = (-1, 2, -1), theta - eta g = (1.5, -1, 0.75) -> clip
    # (1, 0, 0.75): the first two coordinates are held by the box (G = 0), the third moves (G = g)
    theta = jnp.array([1.0, 0.0, 0.25])
    g = D * (theta - C)
    np.testing.assert_allclose(stat.gradient_mapping(theta, g, 0.5, prox), [0.0, 0.0, -1.0], rtol=0, atol=1e-15)
    assert float(jnp.linalg.norm(g)) == pytest.approx(6 ** 0.5, rel=1e-15)
    # at theta* the mapping vanishes for any eta while ||grad F|| = sqrt 5
    star = jnp.asarray(BOX_STAR)
    for eta in (0.1, 1.0, 10.0):
        np.testing.assert_array_equal(stat.gradient_mapping(star, D * (star - C), eta, prox), 0.0)
    out = stat.measure(BOX_PROBLEM, _box_grad, step_size=0.5)(_State(star), None)
    assert set(out) == {"grad_norm", "grad_mapping_norm"}
    assert float(out["grad_mapping_norm"]) == 0.0
    assert float(out["grad_norm"]) == pytest.approx(5 ** 0.5, rel=1e-15)


def test_gradient_mapping_is_at_most_the_gradient_in_the_set_and_the_gradient_without_one():
    prox = stat.projection(BOX_PROBLEM.project)
    key = jax.random.PRNGKey(0)
    for k in jax.random.split(key, 5):
        theta = jax.random.uniform(k, (3,))                 # in the box
        g = 3.0 * jax.random.normal(jax.random.fold_in(k, 1), (3,))
        for eta in (0.05, 1.0, 7.0):
            mapping = float(jnp.linalg.norm(stat.gradient_mapping(theta, g, eta, prox)))
            assert mapping <= float(jnp.linalg.norm(g)) * (1 + 1e-14)
        # Theta = R^n: the mapping is grad F (exactly without a prox, to rounding with the identity)
        assert stat.gradient_mapping(theta, g, 0.3) is g
        np.testing.assert_allclose(stat.gradient_mapping(theta, g, 0.3, stat.projection(lambda t: t)), g, rtol=1e-14)
    # an unconstrained problem's record is ||grad F|| alone
    out = stat.measure(FREE_PROBLEM, _box_grad)(_State(jnp.asarray(BOX_STAR)), None)
    assert set(out) == {"grad_norm"}
    assert float(out["grad_norm"]) == pytest.approx(5 ** 0.5, rel=1e-15)


def test_prox_gradient_mapping_of_an_l1_term_against_soft_thresholding():
    np.testing.assert_array_equal(stat.soft_threshold(L1_C, LAM), L1_STAR)
    prox = stat.l1_prox(LAM)
    grad = lambda t: t - L1_C                                          # noqa: E731
    # theta = 0, eta = 1: G = 0 - soft(c, lam) = (-1.5, 0, 1)
    zero = jnp.zeros(3)
    np.testing.assert_allclose(stat.gradient_mapping(zero, grad(zero), 1.0, prox), [-1.5, 0.0, 1.0], atol=1e-15)
    # at theta* = soft(c, lam) it vanishes for any eta; the smooth part's gradient does not
    star = jnp.asarray(L1_STAR)
    for eta in (0.1, 0.5, 1.0):
        np.testing.assert_allclose(stat.gradient_mapping(star, grad(star), eta, prox), 0.0, atol=1e-15)
    np.testing.assert_allclose(grad(star), [-0.5, -0.3, 0.5], atol=1e-15)
    # the Moreau-envelope measure of Hong et al.: theta_hat(x) = argmin_u F(u) + h(u) + rho/2 ||u - x||^2
    # = soft((c + rho x) / (1 + rho), lam / (1 + rho)); with rho = 1/eta - 1, ||theta_hat - x|| = eta ||G_eta(x)||
    eta, x = 0.25, jnp.array([0.7, -0.2, 0.4])
    rho = 1.0 / eta - 1.0
    hat = np.sign((L1_C + rho * x) / (1 + rho)) * np.maximum(np.abs((L1_C + rho * x) / (1 + rho)) - LAM / (1 + rho), 0)
    mapping = stat.gradient_mapping(x, grad(x), eta, prox)
    assert float(np.linalg.norm(hat - x)) == pytest.approx(eta * float(jnp.linalg.norm(mapping)), rel=1e-14)


def test_l1_prox_in_a_box_is_the_one_dimensional_minimiser():
    """clip(soft(x, eta lam), lo, hi) = argmin_{u in [lo, hi]} lam |u| + (u - x)^2 / (2 eta), by a fine grid."""
    lo, hi, lam, eta = -0.3, 0.8, 0.5, 0.4
    prox = stat.l1_prox(lam, bounds=(lo, hi))
    grid = np.linspace(lo, hi, 110001)
    for x in (-2.0, -0.35, -0.1, 0.15, 0.5, 1.3):
        brute = grid[np.argmin(lam * np.abs(grid) + (grid - x) ** 2 / (2 * eta))]
        assert float(prox(jnp.array(x), eta)) == pytest.approx(brute, abs=2e-5)
    with pytest.raises(ValueError, match="lower <= upper"):
        stat.l1_prox(lam, bounds=(1.0, 0.0))


def test_a_prox_that_leaves_the_projected_set_gives_nan_and_bad_inputs_raise():
    # theta = 0.9: the l1 step lands at 0.9 - (0.9 - 2) - 0.5 > 1, outside the problem's box
    state = _State(jnp.full(3, 0.9))
    grad = lambda s, d: s.theta - L1_C                               # noqa: E731
    out = stat.measure(BOX_PROBLEM, grad, prox=stat.l1_prox(LAM))(state, None)
    assert set(out) == {"grad_norm", "prox_grad_mapping_norm"} and np.isnan(out["prox_grad_mapping_norm"])
    out = stat.measure(BOX_PROBLEM, grad, prox=stat.l1_prox(LAM, bounds=(0.0, 1.0)))(state, None)
    assert np.isfinite(out["prox_grad_mapping_norm"])
    with pytest.raises(ValueError, match="step_size"):
        stat.measure(BOX_PROBLEM, _box_grad, step_size=0.0)
    with pytest.raises(ValueError, match="weight"):
        stat.l1_prox(-1.0)
    with pytest.raises(TypeError, match="grad_fn"):
        stat.measure(BOX_PROBLEM, None)


# ------------------------------------------------------------------------------- in bj.run histories

def test_run_history_gradient_mapping_goes_to_zero_at_a_box_constrained_solution():
    """Projected AID-BiO on the box problem: the recorded gradient mapping falls to rounding while
    ||grad F|| stays at sqrt 5; the same eval_fn on the unconstrained problem records ||grad F|| alone."""
    def go(problem):
        alg = bj.algorithms.aid_bio(problem, upper_lr=0.2, lower_lr=0.5, lower_steps=5)
        state = alg.init(jnp.full(3, 0.5), jnp.zeros(3), jax.random.PRNGKey(0), (None, None))
        return bj.run(alg, state, (None, None), num_steps=200, eval_every=50,
                      eval_fn=stat.measure(problem, _box_grad, step_size=0.2))

    state, hist = go(BOX_PROBLEM)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, BOX_STAR, atol=1e-10)
    assert float(hist["grad_mapping_norm"][0]) > 0.5 and float(hist["grad_mapping_norm"][-1]) < 1e-10
    np.testing.assert_allclose(hist["grad_norm"][-1], 5 ** 0.5, rtol=1e-10)
    _, free = go(FREE_PROBLEM)
    assert "grad_mapping_norm" not in free and float(free["grad_norm"][-1]) < 1e-10


def test_cdb_history_of_an_l1_upper_level_records_the_prox_gradient_mapping():
    """CDB's subgradient steps on F(x) = ||x - Q'b||^2 / 2 + lam ||x||_1 (y*(x) = Qx, the lasso bilevel
    of tests/test_reformulations.py): the prox-gradient mapping starts at its closed form
    ||1 - soft(Q'b, lam)|| = ||(-0.5, 1, 2)|| and falls to the subgradient method's O(step)
    oscillation across the kink (1.5e-3 measured at step 500), while the smooth part's gradient
    tends to ||x* - Q'b|| = ||(-0.5, -0.3, 0.5)||, not 0."""
    Q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (3, 3)))
    H = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    b = Q @ L1_C
    problem = bj.BilevelProblem(lambda x, y, _: 0.5 * jnp.sum((y - b) ** 2) + LAM * jnp.sum(jnp.abs(x)),
                                lambda x, y, _: 0.5 * (y - Q @ x) @ H @ (y - Q @ x))
    alg = bj.algorithms.cdb(problem, upper_lr=1.0, upper_decay=0.75, lower_lr=0.3)
    state = alg.init(jnp.ones(3), jnp.zeros(3), jax.random.PRNGKey(0))
    record = stat.measure(problem, lambda s, d: s.theta - Q.T @ b, prox=stat.l1_prox(LAM))
    state, hist = bj.run(alg, state, (None, None), num_steps=500, eval_every=100, eval_fn=record)
    assert set(hist) >= {"grad_norm", "prox_grad_mapping_norm"} and "grad_mapping_norm" not in hist
    assert float(hist["prox_grad_mapping_norm"][0]) == pytest.approx(5.25 ** 0.5, rel=1e-12)
    assert float(hist["prox_grad_mapping_norm"][-1]) < 5e-3
    np.testing.assert_allclose(hist["grad_norm"][-1], 0.59 ** 0.5, rtol=5e-3)
    np.testing.assert_allclose(state.theta, L1_STAR, atol=5e-3)


# ------------------------------------------------------------------------------- experiments

def test_figures_draw_the_gradient_mapping_where_the_runs_recorded_it():
    from experiments.plotting import METRIC_LABELS, stationarity_metrics
    boxed, free = {"grad_sq": 1, "grad_map_sq": 1}, {"grad_sq": 1}
    assert stationarity_metrics(["grad_sq", "value_gap"], [boxed, boxed]) == ["grad_map_sq", "value_gap"]
    assert stationarity_metrics(["grad_sq", "value_gap"], [boxed, free]) == ["grad_sq", "value_gap"]
    assert "gradient mapping" in METRIC_LABELS["grad_map_sq"]


def test_logreg_records_the_box_gradient_mapping_with_grad_sq():
    """At theta = 2 (the upper bound) on every coordinate, where grad h pushes part of theta out of
    [-10, 2]: grad_map_sq = ||theta - clip(theta - grad h)||^2 with grad h from the dense reference
    path (`logistic._evaluate`: 20 Newton steps from 0), recorded whenever grad_sq is."""
    from experiments import problems
    from experiments.sweep import Iterate
    from bilevel_jax.problems import logistic as lg
    setup = problems.build({"name": "logreg_hpo", "data": "ijcnn1_like", "n_train": 60, "n_val": 40,
                            "theta_bounds": [-10.0, 2.0]})
    theta = jnp.full_like(setup.instance.theta0, 2.0)
    w, _, g = lg._evaluate(theta, setup.instance.data, 20)
    out = eqx.filter_jit(setup.make_eval(["grad_sq"], {"value_star": 0.0}))(Iterate(theta, w), setup.instance)
    assert set(out) == {"grad_sq", "grad_map_sq"}
    held = int(np.sum(np.asarray(g) < 0))                      # coordinates the bound holds (G_i = 0)
    assert 0 < held < theta.size
    np.testing.assert_allclose(out["grad_map_sq"], np.sum((theta - np.clip(theta - g, -10.0, 2.0)) ** 2), rtol=1e-8)
    np.testing.assert_allclose(out["grad_sq"], np.sum(np.asarray(g) ** 2), rtol=1e-8)
    assert float(out["grad_map_sq"]) < float(out["grad_sq"])

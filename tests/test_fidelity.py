"""Fidelity of the presets to their papers: StocBiO's Neumann estimate with a fresh minibatch per
factor (unbiased for the truncated series) against the shared-batch option (biased).

The references (closed forms, iterates by hand, checks) are NumPy float64 on the quadratic's
derivatives in closed form (`_means`): no eager program per operation and shape.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.directions import Point
from bilevel_jax.algorithms.stable import project_spd
from bilevel_jax.algorithms.steps import draw_batches

Q, ETA, BATCH, DRAWS = 10, 0.3, 8, 4000


@pytest.fixture(scope="module")
def big_quad():
    """512 rank-one LL Hessians (the exact mean spectrum in [0.1, 1])."""
    return bj.problems.quadratic_bilevel(jax.random.PRNGKey(11), dim_upper=4, dim_lower=6, n_samples=512)


def _means(q):
    """The full-batch means of the quadratic's data (NumPy), the Hessians symmetrised as their
    quadratic forms' derivatives are: grad_phi f_lower = H phi + C theta + h, grad_theta f_upper =
    S' phi + reg theta, grad_phi f_upper = P phi + S theta + p, grad^2_{theta phi} f_lower = C."""
    m = {k: np.asarray(v).mean(0) for d in q.data for k, v in d.items()}
    return {**m, "H": (m["H"] + m["H"].T) / 2, "P": (m["P"] + m["P"].T) / 2, "reg": float(q.means["reg"])}


def _neumann_draws(q, shared_batch):
    """DRAWS independent StocBiO estimates v at a fixed point (UL full batch: b is exact)."""
    alg = bj.algorithms.stocbio(q.problem, batch_size=(None, BATCH), neumann_steps=Q, neumann_eta=ETA,
                                shared_batch=shared_batch, lower_steps=1)
    theta, phi = np.asarray(q.theta0) + 0.5, np.asarray(q.phi0) - 0.5

    def one(key):
        point = Point(theta, phi, alg.direction.init(theta, phi))
        batches = draw_batches(alg.samplers, q.data, key, 0)
        ev = alg.direction.evaluate(q.problem, point, batches, jax.random.fold_in(key, 1), "rev")
        return ev.rule_state.v

    draws = jax.jit(lambda key: jax.vmap(one)(jax.random.split(key, DRAWS)))(jax.random.PRNGKey(0))
    return np.asarray(draws), theta, phi


def _truncated_series(q, theta, phi):
    """eta sum_{k<Q} (I - eta A)^k b with the dense LL Hessian A and b = grad_phi f_upper."""
    m = _means(q)
    b = m["P"] @ phi + m["S"] @ theta + m["p"]
    step = np.eye(len(phi)) - ETA * m["H"]
    return ETA * sum(np.linalg.matrix_power(step, k) @ b for k in range(Q))


def test_stocbio_estimate_is_unbiased_with_a_batch_per_factor(big_quad):
    draws, theta, phi = _neumann_draws(big_quad, shared_batch=False)
    expected = _truncated_series(big_quad, theta, phi)
    mean, stderr = draws.mean(0), draws.std(0) / np.sqrt(DRAWS)
    # within Monte-Carlo error of the truncated series, every coordinate
    assert np.all(np.abs(mean - expected) < 4 * stderr), (mean - expected) / stderr

    shared, _, _ = _neumann_draws(big_quad, shared_batch=True)
    bias = shared.mean(0) - expected
    shared_err = shared.std(0) / np.sqrt(DRAWS)
    # the shared batch is measurably off: many standard errors, and a visible relative bias
    assert np.max(np.abs(bias) / shared_err) > 10
    assert np.linalg.norm(bias) / np.linalg.norm(expected) > 0.05


# ------------------------------------------------------------------------- FSLA's update order

def test_fsla_first_three_iterates_follow_the_papers_order(quad):
    """Full batch, by hand: phi first, v at the new phi, the hypergradient at (theta_k, phi_{k+1},
    v_{k+1}), STORM with a = 1 - eta against the previous point (theta_{k-1}, phi_k, v_k)."""
    gamma, rho, eta_v, eta_m = 0.3, 0.5, 0.4, 0.25
    theta0 = np.asarray(quad.theta0) + 0.2
    alg = bj.algorithms.fsla(quad.problem, upper_lr=gamma, lower_lr=rho, v_lr=eta_v, momentum=1.0 - eta_m,
                             batch_size=None)
    state = alg.init(theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    got, update = [], eqx.filter_jit(alg.update)
    for _ in range(3):
        state, info = jax.device_get(update(state, quad.data))
        got.append((state.theta, state.phi, state.v))
        assert int(info.status) == bj.status.OK

    m = _means(quad)
    g_low = lambda t, f: m["H"] @ f + m["C"] @ t + m["h"]              # grad_phi f_lower
    grad_p = lambda t, f: m["P"] @ f + m["S"] @ t + m["p"]             # grad_phi f_upper
    h = lambda t, f, v: m["S"].T @ f + m["reg"] * t - m["C"].T @ v     # grad_theta f_upper - J v

    def by_hand(theta, phi):
        v, theta_prev, d, out = np.zeros_like(phi), theta, np.zeros_like(theta), []
        for k in range(3):
            phi_new = phi - rho * g_low(theta, phi)
            v_new = v - eta_v * (m["H"] @ v - grad_p(theta, phi_new))
            a = 0.0 if k == 0 else 1.0 - eta_m
            d = h(theta, phi_new, v_new) + a * (d - h(theta_prev, phi, v))
            theta_prev, theta, phi, v = theta, theta - gamma * d, phi_new, v_new
            out.append((theta, phi, v))
        return out

    for k, refs in enumerate(by_hand(theta0, np.asarray(quad.phi0))):
        for name, mine, ref in zip(("theta", "phi", "v"), got[k], refs):
            np.testing.assert_allclose(mine, ref, rtol=1e-12, atol=1e-14, err_msg=f"step {k} {name}")


def test_fsla_no_longer_equals_soba_on_logistic_hpo():
    """With the paper's order FSLA differs from SOBA even where grad_theta f_upper and J v do not
    depend on the batch (the logistic HPO problem: the UL does not depend on theta)."""
    data = bj.datasets.ijcnn1_like(0, n_train=200, n_val=200)
    hpo = bj.problems.logistic_hpo(data, key=1)
    kw = dict(upper_lr=0.05, lower_lr=0.05, batch_size=32)
    runs = []
    for alg in (bj.algorithms.fsla(hpo.problem, momentum=0.0, **kw),
                bj.algorithms.soba(hpo.problem, upper_decay=0.0, lower_decay=0.0, **kw)):
        state = alg.init(hpo.theta0, hpo.phi0, jax.random.PRNGKey(0), hpo.data)
        runs.append(np.asarray(bj.run(alg, state, hpo.data, num_steps=5)[0].theta))
    assert np.abs(runs[0] - runs[1]).max() > 1e-8


# ------------------------------------------------------------------------- TTSA's horizon form

@pytest.mark.parametrize("strongly_convex, a, b", [(False, 0.6, 0.4), (True, 1.0, 2 / 3)])
def test_ttsa_horizon_holds_constant_steps_from_k(quad, strongly_convex, a, b):
    """horizon=K: alpha = upper_lr K^-a, beta = lower_lr K^-b for every step (Theorem 1's form)."""
    K, c_up, c_low = 64, 0.8, 0.6
    problem = bj.BilevelProblem(lambda t, p, d: jnp.array([1.0, -2.0, 0.5, 0.3]) @ t,
                                lambda t, p, d: jnp.arange(1.0, 7.0) @ p)   # constant directions
    alg = bj.algorithms.ttsa(problem, upper_lr=c_up, lower_lr=c_low, horizon=K, strongly_convex=strongly_convex,
                             batch_size=None, neumann_steps=1, neumann_eta=0.1)
    state = alg.init(jnp.zeros(4), jnp.zeros(6), jax.random.PRNGKey(0))
    rec = lambda s, d: {"theta": s.theta, "phi": s.phi}
    _, hist = jax.device_get(bj.run(alg, state, (None, None), num_steps=5, eval_every=1, eval_fn=rec))
    steps_up = -np.diff(hist["theta"], axis=0)[:, 0] / 1.0
    steps_low = -np.diff(hist["phi"], axis=0)[:, 0] / 1.0
    np.testing.assert_allclose(steps_up, c_up * K ** -a, rtol=1e-12)
    np.testing.assert_allclose(steps_low, c_low * K ** -b, rtol=1e-12)
    with pytest.raises(ValueError, match="ttsa: horizon must be >= 1"):
        bj.algorithms.ttsa(problem, horizon=0)


def test_bsa_inner_decay_restarts_every_outer_iteration():
    """restart_lower_decay=True: beta_t = c / (t+1)^p over the T inner steps, the same in every outer
    iteration (Algorithm 2 as written); the default holds beta_k for all inner steps of iteration k."""
    w = np.array([0.5, 1.5, -1.0])
    problem = bj.BilevelProblem(lambda t, p, d: jnp.array([1.0, -2.0]) @ t, lambda t, p, d: w @ p)
    T, c, p = 4, 0.2, 0.5
    rec = lambda s, d: {"phi": s.phi}
    moves = {}
    for inner in (True, False):
        alg = bj.algorithms.bsa(problem, lower_lr=c, lower_decay=p, lower_steps=T, restart_lower_decay=inner,
                                batch_size=None, neumann_steps=1, neumann_eta=0.1)
        state = alg.init(jnp.zeros(2), jnp.zeros(3), jax.random.PRNGKey(0))
        _, hist = jax.device_get(bj.run(alg, state, (None, None), num_steps=3, eval_every=1, eval_fn=rec))
        moves[inner] = -np.diff(hist["phi"], axis=0) @ w / (w @ w)   # sum of the inner steps, per outer k
    t = np.arange(T)
    np.testing.assert_allclose(moves[True], np.full(3, np.sum(c / (t + 1.0) ** p)), rtol=1e-12)
    np.testing.assert_allclose(moves[False], T * c / (np.arange(3) + 1.0) ** p, rtol=1e-12)


# ------------------------------------------------------------------------- STABLE's Hessian tracking

def test_project_spd_clips_the_spectrum():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))
    h = (q * np.array([-2.0, -0.1, 0.05, 1.0, 3.0])) @ q.T
    project = jax.jit(project_spd)   # one program for both calls
    projected = np.asarray(project(h, 0.2))
    np.testing.assert_allclose(np.linalg.eigvalsh(projected), [0.2, 0.2, 0.2, 1.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(project(projected, 0.2), projected, atol=1e-12)


def test_stable_hessian_tracking_is_exact_stable_on_a_quadratic(quad):
    """On a quadratic the LL Hessian is constant, so the tracked estimate is exact and STABLE with
    tracking equals matrix-free STABLE with exact solves (dense), step for step."""
    kw = dict(upper_lr=0.5, lower_lr=1.0, batch_size=None)
    tracked = bj.algorithms.stable(quad.problem, hessian_tracking=True, hessian_momentum=0.7, **kw)
    exact = bj.algorithms.stable(quad.problem, linear_solver=bj.linear_solvers.dense(), **kw)
    rec = lambda s, d: {"theta": s.theta, "phi": s.phi}
    hist = [jax.device_get(bj.run(a, a.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data), quad.data,
                                  num_steps=200, eval_every=10, eval_fn=rec)[1]) for a in (tracked, exact)]
    np.testing.assert_allclose(hist[0]["theta"], hist[1]["theta"], rtol=1e-9, atol=1e-12)
    theta_star = np.asarray(quad.reference.theta)
    assert np.linalg.norm(hist[0]["theta"][-1] - theta_star) / np.linalg.norm(theta_star) < 1e-3
    assert int(hist[0]["status"][-1]) == bj.status.OK


def test_stable_hessian_tracking_decreases_the_gradient_with_minibatches(quad_stoch):
    q = quad_stoch
    alg = bj.algorithms.stable(q.problem, hessian_tracking=True, hessian_momentum=0.5, upper_lr=0.1, lower_lr=0.3, batch_size=16)
    state, hist = jax.jit(lambda d: bj.run(alg, alg.init(q.theta0, q.phi0, jax.random.PRNGKey(1), d), d,
                                           num_steps=300))(q.data)
    assert int(np.asarray(hist["status"])[-1]) == bj.status.OK
    assert np.sum(np.asarray(q.grad(state.theta)) ** 2) < 0.1 * np.sum(np.asarray(q.grad(q.theta0)) ** 2)
    with pytest.raises(ValueError, match="stable: hessian_tracking solves with the tracked dense Hessian"):
        bj.algorithms.stable(q.problem, hessian_tracking=True, linear_solver=bj.linear_solvers.cg(3))

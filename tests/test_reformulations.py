"""Reformulation methods on problems of their class with closed-form answers, and constrained lower
levels in the value-function family.

- Box-constrained LL with many minima (flat in one coordinate): f2sa, bome, pbgd, pdbo, vf_penalty
  reach the optimistic solution theta* = 2, phi* = (1, 1) (the unconstrained problem's is 2.5,
  (2.5, 2)), and against a UL that pulls the other way (theta* = 0.5) within their O(1/penalty)
  bias; pzobo reaches theta* of a box-constrained strongly convex LL.
- smoothing_pg on a box-constrained convex LL; optimality_penalty on the strongly convex quadratic
  (its multiplier is the negative adjoint); cdb on a non-smooth l1 UL; ebsa on a non-convex
  double-well LL and a box-constrained non-convex LL (and its loud failure).
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

NONE = (None, None)


def _run(alg, theta0, phi0, steps):
    """(final state, history) of jit(init + run), as NumPy arrays (reading them is then no eager
    operation, each compiled on its own)."""
    @jax.jit
    def go(theta0):
        state = alg.init(theta0, phi0, jax.random.PRNGKey(0), NONE)
        return bj.run(alg, state, NONE, num_steps=steps)
    return jax.tree_util.tree_map(np.asarray, go(theta0))


# ------------------------------------------------------------------------------- constrained LL

BOX = bj.constraints.box(0.0, 1.0)


def _box_upper(t, p, b):
    return 0.5 * jnp.sum((t - 2.0) ** 2) + 0.5 * (p[0] - 3.0) ** 2 + 0.5 * (p[1] - 2.0) ** 2


def _box_flat_lower(t, p, b):
    """phi_0 follows theta within [0, 1]; phi_1 is free in [0, 1] (many LL minima)."""
    return 0.5 * (p[0] - t[0]) ** 2


# Phi = [0, 1]^2: S(theta) = {clip(theta, 0, 1)} x [0, 1]. The optimistic choice phi_1 = clip(2) = 1,
# and F(theta) = (theta - 2)^2 / 2 + (clip(theta, 0, 1) - 3)^2 / 2 + 1/2 decreases until theta = 2:
# theta* = 2, phi* = (1, 1). Unconstrained, phi = (theta, 2) and theta* = 2.5.
BOX_THETA, BOX_PHI = np.array([2.0]), np.array([1.0, 1.0])
# The same LL against the UL (it pulls phi_0 to 0): F(theta) = (theta - 1)^2 / 2 + clip(theta)^2 / 2 + 1/2,
# theta* = 0.5, phi* = (0.5, 1); the value-function constraint is not calm here (q quadratic in phi_0):
# penalties are O(1/lambda) away (2.5e-3 measured at lambda = 100; bome 2.5e-4, pdbo 9.5e-3 after 3000 steps).
VALUE_FUNCTION_BOX = {   # preset: (its settings with the optimistic UL, against the UL)
    "f2sa": (dict(upper_lr=0.1, lower_lr=0.05, tracker_lr=0.5, lower_steps=5, penalty=10.0, penalty_rate=0.0,
                  batch_size=None),
             dict(upper_lr=0.01, lower_lr=0.005, tracker_lr=0.5, lower_steps=5, penalty=100.0, penalty_rate=0.0,
                  batch_size=None)),
    "bome": (dict(upper_lr=0.1, tracker_lr=0.5), dict(upper_lr=0.03, tracker_lr=0.5)),
    "pbgd": (dict(upper_lr=0.5, tracker_lr=0.5, penalty=10.0, penalty_max=10.0),
             dict(upper_lr=0.5, tracker_lr=0.5, penalty=100.0, penalty_max=100.0)),
    "vf_penalty": (dict(upper_lr=0.05, lower_lr=0.05, tracker_lr=0.5, penalty=10.0),
                   dict(upper_lr=0.003, lower_lr=0.003, tracker_lr=0.5, penalty=100.0)),
    "pdbo": (dict(upper_lr=0.05, lower_lr=0.05, tracker_lr=0.5, dual_lr=1.0, dual_max=10.0),
             dict(upper_lr=0.003, lower_lr=0.003, tracker_lr=0.5, dual_lr=10.0, dual_max=100.0)),
}


def _box_conflict_upper(t, p, b):
    return 0.5 * jnp.sum((t - 1.0) ** 2) + 0.5 * p[0] ** 2 + 0.5 * (p[1] - 2.0) ** 2


BOX_CASES = [   # the UL, steps, theta*, phi*, tolerances (theta, phi)
    (_box_upper, 300, BOX_THETA, BOX_PHI, (1e-5, 1e-6)),
    (_box_conflict_upper, 3000, [0.5], [0.5, 1.0], (1.2e-2, 1.2e-2)),
]


@pytest.mark.parametrize("case", [0, 1], ids=["optimistic", "against_the_upper_level"])
@pytest.mark.parametrize("name", sorted(VALUE_FUNCTION_BOX))
def test_value_function_presets_on_a_box_constrained_flat_lower_level(case, name):
    """Optimistic: the presets reach theta* = 2, phi* = (1, 1); against the UL: theta* = 0.5 within
    their O(1/penalty) bias. The tracker stays in Phi."""
    upper, steps, theta_star, phi_star, (tol_theta, tol_phi) = BOX_CASES[case]
    alg = bj.algorithms.get(name)(BOX.problem(upper, _box_flat_lower), **VALUE_FUNCTION_BOX[name][case])
    state, hist = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), steps)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, theta_star, atol=tol_theta)
    np.testing.assert_allclose(state.phi, phi_star, atol=tol_phi)
    assert float(np.max(state.z)) <= 1.0 and float(np.min(state.z)) >= 0.0


def test_lower_set_on_an_unconstrained_problem_and_a_bare_projection():
    """`lower_set=` restricts the LL of a problem given without constraints (the same answer);
    a constrained problem not built from a set takes a projection; without one it is refused."""
    plain = bj.BilevelProblem(_box_upper, _box_flat_lower)
    alg = bj.algorithms.vf_penalty(plain, lower_set=BOX, **VALUE_FUNCTION_BOX["vf_penalty"][0])
    state, _ = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 300)
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    free = bj.algorithms.vf_penalty(plain, **VALUE_FUNCTION_BOX["vf_penalty"][0])   # no set: the other answer
    state, _ = _run(free, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 1000)
    assert abs(float(state.theta[0]) - 2.5) < 0.05   # 2.476: the O(1/penalty) bias at penalty 10
    bare = bj.BilevelProblem(_box_upper, _box_flat_lower, lower_inequality=lambda t, p: jnp.concatenate([-p, p - 1]))
    with pytest.raises(ValueError, match="bome: .*lower_set="):
        bj.algorithms.bome(bare)
    alg = bj.algorithms.bome(bare, lower_set=lambda p: jnp.clip(p, 0.0, 1.0), **VALUE_FUNCTION_BOX["bome"][0])
    state, _ = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 300)
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    with pytest.raises(ValueError, match="pbgd: variant='gradient' .*unconstrained"):
        bj.algorithms.pbgd(plain, variant="gradient", lower_set=BOX)
    with pytest.raises(ValueError, match="pbgd: variant='gradient'"):
        bj.algorithms.pbgd(BOX.problem(_box_upper, _box_flat_lower), variant="gradient")


def test_pzobo_on_a_box_constrained_strongly_convex_lower_level():
    """g = ||phi - theta||^2 / 2 on [0, 1]^2: phi*(theta) = clip(theta), F = ||theta - 2||^2 / 2 +
    ||clip(theta) - 3||^2 / 2 is minimised at theta* = (2, 2) (unconstrained: 2.5)."""
    problem = BOX.problem(lambda t, p, b: 0.5 * jnp.sum((t - 2.0) ** 2) + 0.5 * jnp.sum((p - 3.0) ** 2),
                          lambda t, p, b: 0.5 * jnp.sum((p - t) ** 2))
    alg = bj.algorithms.pzobo(problem, upper_lr=0.3, lower_lr=0.5, directions="orthogonal", num_directions=2)
    state, hist = _run(alg, jnp.array([-1.0, 0.5]), jnp.array([0.3, 0.2]), 200)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, [2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(state.phi, [1.0, 1.0], atol=1e-12)


# ------------------------------------------------------------------------------- smoothing_pg

def test_smoothing_pg_on_a_box_constrained_convex_lower_level_against_the_upper_level():
    """The UL pulls phi_0 to 0 while the LL (convex, flat in phi_1, Phi = [0, 1]^2) pins phi_0 =
    clip(theta): F(theta) = (theta - 1)^2 / 2 + clip(theta)^2 / 2 + 1/2, theta* = 0.5, phi* = (0.5, 1).
    The value-function constraint is quadratic (not calm): a penalty bias O(1/rho), rho driven up by
    the method (1 -> 1e3) while the smoothing mu -> 0."""
    problem = BOX.problem(lambda t, p, b: 0.5 * jnp.sum((t - 1.0) ** 2) + 0.5 * p[0] ** 2 + 0.5 * (p[1] - 2.0) ** 2,
                          _box_flat_lower)
    alg = bj.algorithms.smoothing_pg(problem, upper_lr=0.5)
    state, hist = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 3000)
    assert bool((hist["status"] == bj.status.OK).all())
    mu, rho = state.multiplier
    assert float(mu) < 1e-4 and float(rho) == 1e3
    np.testing.assert_allclose(state.theta, [0.5], atol=3e-3)
    np.testing.assert_allclose(state.phi, [0.5, 1.0], atol=3e-3)
    # the calm case (the UL agrees with the LL at the boundary): exact
    alg = bj.algorithms.smoothing_pg(BOX.problem(_box_upper, _box_flat_lower), upper_lr=0.5)
    state, _ = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 1000)
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    np.testing.assert_allclose(state.phi, BOX_PHI, atol=1e-6)


# ------------------------------------------------------------------------------- optimality_penalty

def test_optimality_penalty_reaches_theta_star_and_its_multiplier_is_the_adjoint(quad):
    """Augmented Lagrangian of grad_y g = 0 on the strongly convex quadratic (defaults only, full
    batch): theta* to rounding level (no O(1/rho) bias at rho = 1), phi = phi*(theta*), and the
    multiplier mu* = -A^{-1} grad_y f(theta*, phi*) (the negative adjoint, dense solve)."""
    alg = bj.algorithms.optimality_penalty(quad.problem)
    state, hist = _run_data(alg, quad, 2000)
    assert bool((hist["status"] == bj.status.OK).all())

    @jax.jit
    def closed_forms():   # theta*, phi*(theta*) and the adjoint there (one program, not an eager op each)
        ts = quad.theta_star()
        ps = quad.phi_star(ts)
        hess = jax.hessian(quad.problem.f_lower, 1)(ts, ps, quad.data[1])
        return ts, ps, jnp.linalg.solve(hess, jax.grad(quad.problem.f_upper, 1)(ts, ps, quad.data[0]))

    ts, ps, adjoint = (np.asarray(x) for x in closed_forms())
    np.testing.assert_allclose(state.theta, ts, rtol=0, atol=1e-10 * float(np.linalg.norm(ts)))
    np.testing.assert_allclose(state.phi, ps, atol=1e-10)
    np.testing.assert_allclose(state.multiplier, -adjoint, atol=1e-9)
    # G-PBGD (no multiplier) at the same penalty stays O(1/gamma) away
    gpbgd = bj.algorithms.pbgd(quad.problem, variant="gradient", penalty=1.0, penalty_max=1.0)
    state, _ = _run_data(gpbgd, quad, 2000)
    assert float(np.linalg.norm(state.theta - ts) / np.linalg.norm(ts)) > 1e-2


def _run_data(alg, q, steps):
    """`_run` on the instance `q`'s data, from its start."""
    @jax.jit
    def go(theta0):
        state = alg.init(theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        return bj.run(alg, state, q.data, num_steps=steps)
    return jax.tree_util.tree_map(np.asarray, go(q.theta0))


# ------------------------------------------------------------------------------- cdb

def _lasso_bilevel():
    """UL f = ||y - b||^2 / 2 + lam ||x||_1 (non-smooth), LL g = (y - Qx)' H (y - Qx) / 2 (strongly
    convex, Q orthogonal): y*(x) = Qx, F(x) = ||x - Q'b||^2 / 2 + lam ||x||_1, x* = soft(Q'b, lam)
    = (1.5, 0, -1): a kink at the solution's second coordinate."""
    Q, b = _lasso_arrays(jax.random.PRNGKey(1))
    H, lam = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]]), 0.5
    problem = bj.BilevelProblem(lambda x, y, _: 0.5 * jnp.sum((y - b) ** 2) + lam * jnp.sum(jnp.abs(x)),
                                lambda x, y, _: 0.5 * (y - Q @ x) @ H @ (y - Q @ x))
    return problem, Q, np.array([1.5, 0.0, -1.0])


@jax.jit
def _lasso_arrays(key):
    """Q and b of `_lasso_bilevel`, one compiled program (not an eager op each)."""
    Q, _ = jnp.linalg.qr(jax.random.normal(key, (3, 3)))
    return Q, Q @ jnp.array([2.0, 0.3, -1.5])


def test_cdb_reaches_the_solution_of_a_non_smooth_l1_upper_level():
    problem, Q, x_star = _lasso_bilevel()
    # the subgradient method's diminishing steps on x (measured max error 7e-4 after 2000 steps)
    alg = bj.algorithms.cdb(problem, upper_lr=1.0, upper_decay=0.75, lower_lr=0.3)
    state, hist = _run(alg, jnp.ones(3), jnp.zeros(3), 2000)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, x_star, atol=3e-3)
    # y follows the LL solution Q x within the x oscillation across the kink (4e-4 measured)
    np.testing.assert_allclose(state.phi, np.asarray(Q) @ state.theta, atol=2e-3)
    # one step's cost: 1 linearisation, two warm-started cg(20) solves (21 HVPs each) + 1 pullback
    _, info = eqx.filter_jit(lambda: alg.update(alg.init(jnp.ones(3), jnp.zeros(3), jax.random.PRNGKey(0)), NONE))()
    assert tuple(int(c) for c in info.oracles[:4]) == (1, 1, 43, 1)


def test_cdb_defaults_on_the_strongly_convex_quadratic(quad):
    """Only the problem (full batch, constant steps 0.1): theta* within 1e-3 in 2000 steps (2.4e-4
    measured). The UL sees the Newton point y_hat = y - A^{-1} grad_y g, which is phi*(theta) for a
    quadratic LL, while y itself contracts only at the rate 1 - alpha beta lambda_min(A)^2 of the
    penalty's gradient beta A c (0.999 here: y is 0.07 away after 2000 steps)."""
    state, hist = _run_data(bj.algorithms.cdb(quad.problem), quad, 2000)
    assert bool((hist["status"] == bj.status.OK).all())

    @jax.jit
    def closed_forms(theta, phi):   # theta*, the Newton point and phi*(theta) (one program, not an eager op each)
        hess = jax.hessian(quad.problem.f_lower, 1)(theta, phi, quad.data[1])
        y_hat = phi - jnp.linalg.solve(hess, jax.grad(quad.problem.f_lower, 1)(theta, phi, quad.data[1]))
        return quad.theta_star(), y_hat, quad.phi_star(theta)

    ts, y_hat, phi_star = (np.asarray(x) for x in closed_forms(state.theta, state.phi))
    assert float(np.linalg.norm(state.theta - ts) / np.linalg.norm(ts)) < 1e-3
    np.testing.assert_allclose(y_hat, phi_star, atol=1e-10)


# ------------------------------------------------------------------------------- ebsa

def test_ebsa_reaches_the_optimistic_solution_of_a_double_well_lower_level():
    """g = ((y - x)^2 - 1)^2 (non-convex, two global minima y = x +- 1, a local maximum y = x),
    f = x^2 / 2 + (y - 2)^2 / 2: the optimistic branch y = x + 1 gives x* = 0.5, y* = 1.5 (F = 0.25;
    the other minimum's branch: x = 1.5, F = 1.125). From a start in its basin, to rounding level
    (no constraint: no barrier, the augmented Lagrangian is exact)."""
    problem = bj.BilevelProblem(lambda x, y, b: 0.5 * jnp.sum(x ** 2) + 0.5 * jnp.sum((y - 2.0) ** 2),
                                lambda x, y, b: jnp.sum(((y - x) ** 2 - 1.0) ** 2))
    # L_g = g''(x + 1) = 8: alpha rho L_g^2 < 2 needs a smaller step or penalty than the defaults
    alg = bj.algorithms.ebsa(problem, upper_lr=0.05, penalty=0.1)
    state, hist = _run(alg, jnp.array([0.0]), jnp.array([0.8]), 2000)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, [0.5], atol=1e-10)
    np.testing.assert_allclose(state.phi, [1.5], atol=1e-10)


def test_ebsa_on_a_box_constrained_non_convex_lower_level_and_its_loud_failure():
    """g = t^2 + 3 sin^2 t, t = y - x (non-convex: g'' = 2 + 6 cos 2t in [-4, 8], one stationary
    point t = 0), Phi = [0, 2] by the log barrier; f = (x - 1)^2 / 2 + y^2 / 2: x* = y* = 0.5, an
    interior solution (barrier bias O(mu): 6e-6 in x, 2e-5 in y at mu = 5e-5 after 2000 steps).
    With the default step (alpha rho L_g^2 = 6.4 > 2) the iterates leave the barrier's domain: NaN
    and NONFINITE, never a finite wrong answer."""
    problem = bj.constraints.box(0.0, 2.0).problem(
        lambda x, y, b: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * jnp.sum(y ** 2),
        lambda x, y, b: jnp.sum((y - x) ** 2 + 3.0 * jnp.sin(y - x) ** 2))
    alg = bj.algorithms.ebsa(problem, upper_lr=0.05, penalty=0.1)
    state, hist = _run(alg, jnp.array([1.5]), jnp.array([1.0]), 2000)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, [0.5], atol=2e-5)
    np.testing.assert_allclose(state.phi, [0.5], atol=5e-5)
    state, hist = _run(bj.algorithms.ebsa(problem), jnp.array([1.5]), jnp.array([1.0]), 200)
    assert int(hist["status"][-1]) & bj.status.NONFINITE and not bool(np.isfinite(state.phi).any())
    with pytest.raises(ValueError, match="ebsa: equality constraints"):
        bj.algorithms.ebsa(bj.constraints.simplex().problem(problem.f_upper, problem.f_lower))


def test_ebsa_defaults_and_smoothing_pg_on_the_strongly_convex_quadratic(quad):
    """issue 21's rule (only the problem, full batch, a well-conditioned quadratic: L_g = 1,
    condition number 10): ebsa (no constraint: optimality_penalty's update) to 1e-8 in 2000 steps.
    smoothing_pg's steps scale like 1/rho (documented: 0.18 after 4000 steps with the defaults);
    with upper_lr=0.5 it is 3.7e-3 from theta* after 4000 (rho = 1e3: the O(1/rho) bias)."""
    ts = np.asarray(quad.theta_star())
    state, hist = _run_data(bj.algorithms.ebsa(quad.problem), quad, 2000)
    assert bool((hist["status"] == bj.status.OK).all())
    assert float(np.linalg.norm(state.theta - ts) / np.linalg.norm(ts)) < 1e-8
    state, hist = _run_data(bj.algorithms.smoothing_pg(quad.problem, upper_lr=0.5), quad, 4000)
    assert bool((hist["status"] == bj.status.OK).all())
    assert float(np.linalg.norm(state.theta - ts) / np.linalg.norm(ts)) < 1e-2

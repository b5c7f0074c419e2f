"""Constrained lower levels: the KKT implicit gradient against closed forms, finite differences
and the dense reference; degeneracy reported; MINRES; projected and augmented-Lagrangian LL
solvers; kkt_argmin; the KKT direction rule and the constrained presets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import status as st
from bilevel_jax.constraints import Multipliers

NONE = (None, None)


# ------------------------------------------------------------------ problems with closed forms

def box_quadratic(key=jax.random.PRNGKey(0), dim_t=3, weak=False):
    """LL 1/2 phi'H phi - phi'(B theta + c) on the box 0 <= phi <= 1 (H dense), built backwards from
    a KKT point with both bounds active somewhere, two free components, and strict
    complementarity (or, with `weak`, one bound active with a zero multiplier)."""
    k = jax.random.split(key, 5)
    d = 6
    m = jax.random.normal(k[0], (d, d)) / jnp.sqrt(d)
    h = m @ m.T + jnp.eye(d)
    b = jax.random.normal(k[1], (d, dim_t))
    theta0 = jax.random.normal(k[2], (dim_t,))
    phi = jnp.array([0.0, 0.0, 1.0, 0.3, 0.6, 1.0])
    lam_lo = jnp.array([0.7, 0.0 if weak else 1.3, 0, 0, 0, 0.])
    lam_up = jnp.array([0, 0, 0.9, 0, 0, 0.5])
    c = h @ phi - b @ theta0 - lam_lo + lam_up
    y = jax.random.normal(k[3], (d,))
    cu = jax.random.normal(k[4], (dim_t, d))

    def f_lower(theta, phi, batch):
        return 0.5 * phi @ h @ phi - phi @ (b @ theta + c)

    def f_upper(theta, phi, batch):
        return 0.5 * jnp.sum((phi - y) ** 2) + theta @ cu @ phi + 0.5 * jnp.sum(theta ** 2)

    problem = bj.constraints.box(0.0, 1.0).problem(f_upper, f_lower)
    free, fixed = jnp.array([3, 4]), jnp.array([0, 1, 2, 5])

    def phi_star(theta):  # the active set is fixed near theta0 (strict complementarity)
        rhs = (b @ theta + c)[free] - h[jnp.ix_(free, fixed)] @ phi[fixed]
        return phi.at[free].set(jnp.linalg.solve(h[jnp.ix_(free, free)], rhs))

    mult = Multipliers({"lower": lam_lo, "upper": lam_up}, None)
    return problem, theta0, phi, mult, lambda t: f_upper(t, phi_star(t), None)


def equality_quadratic(key=jax.random.PRNGKey(1), dim_t=3, d=5, q=2):
    """LL 1/2 phi'H phi - phi'(B theta + c) s.t. A phi = E theta + e (theta-dependent): phi*(theta)
    is the first block of the KKT system [[H, A'], [A, 0]]^{-1} (B theta + c, E theta + e)."""
    k = jax.random.split(key, 7)
    m = jax.random.normal(k[0], (d, d)) / jnp.sqrt(d)
    h = m @ m.T + 0.5 * jnp.eye(d)
    b, c = jax.random.normal(k[1], (d, dim_t)), jax.random.normal(k[2], (d,))
    a, e_mat, e = jax.random.normal(k[3], (q, d)), jax.random.normal(k[4], (q, dim_t)), jax.random.normal(k[5], (q,))
    y = jax.random.normal(k[6], (d,))

    def f_lower(theta, phi, batch):
        return 0.5 * phi @ h @ phi - phi @ (b @ theta + c)

    def f_upper(theta, phi, batch):
        return 0.5 * jnp.sum((phi - y) ** 2) + 0.5 * jnp.sum(jnp.sin(theta) ** 2) + jnp.sum(theta) * phi[0]

    problem = bj.BilevelProblem(f_upper, f_lower, lower_equality=lambda t, p: a @ p - e_mat @ t - e)
    kkt = jnp.block([[h, a.T], [a, jnp.zeros((q, q))]])

    def phi_star(theta):
        return jnp.linalg.solve(kkt, jnp.concatenate([b @ theta + c, e_mat @ theta + e]))[:d]

    return problem, jnp.linspace(-0.5, 0.5, dim_t), phi_star, lambda t: f_upper(t, phi_star(t), None)


def simplex_logistic(key=jax.random.PRNGKey(2), d=5, n=40):
    """Logistic regression with weights on the simplex, an exp(theta) ridge: non-quadratic LL."""
    k = jax.random.split(key, 4)
    x, xv = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (n, d))
    w = jnp.array([0.9, 0.1, 0.0, 0.0, 0.0])
    y = jnp.sign(x @ w + 0.3 * jax.random.normal(k[2], (n,)))
    yv = jnp.sign(xv @ w + 0.3 * jax.random.normal(k[3], (n,)))

    def f_lower(theta, phi, batch):
        return jnp.mean(jax.nn.softplus(-y * (x @ phi))) + 0.5 * jnp.exp(theta[0]) * jnp.sum(phi ** 2)

    def f_upper(theta, phi, batch):
        return jnp.mean(jax.nn.softplus(-yv * (xv @ phi)))

    return bj.constraints.simplex().problem(f_upper, f_lower), jnp.array([-1.0])


# ------------------------------------------------------------------ the KKT hypergradient

def test_box_quadratic_matches_closed_form():
    problem, theta, phi, mult, F = box_quadratic()
    g_ref = jax.grad(F)(theta)
    g, info = jax.jit(lambda t, p: bj.hypergradient(problem, t, p, NONE))(theta, phi)  # least-squares multipliers
    assert int(info.status) == st.OK
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(info.multipliers.inequality["lower"], mult.inequality["lower"], atol=1e-10)
    np.testing.assert_allclose(info.multipliers.inequality["upper"], mult.inequality["upper"], atol=1e-10)
    assert np.asarray(info.active["lower"]).tolist() == [1, 1, 0, 0, 0, 0]
    assert np.asarray(info.active["upper"]).tolist() == [0, 0, 1, 0, 0, 1]
    g2, info2 = jax.jit(lambda t, p, m: bj.hypergrad.kkt_hypergradient(problem, t, p, NONE, multipliers=m))(
        theta, phi, mult)
    np.testing.assert_allclose(g2, g_ref, atol=1e-8)
    dense = jax.jit(lambda t, p, m: bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE, m))
    np.testing.assert_allclose(dense(theta, phi, mult), g_ref, atol=1e-10)


def test_equality_quadratic_matches_closed_form_and_dense():
    problem, theta, phi_star, F = equality_quadratic()
    phi = phi_star(theta)
    g, info, dense = jax.jit(lambda t, p: (*bj.hypergradient(problem, t, p, NONE),
                                           bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE)))(theta, phi)
    g_ref = jax.grad(F)(theta)
    assert int(info.status) == st.OK and info.active is None
    np.testing.assert_allclose(g, g_ref, atol=1e-8)
    np.testing.assert_allclose(dense, g, atol=1e-10)
    assert float(info.residual_norm) < 1e-10


def test_simplex_logistic_matches_finite_differences():
    problem, theta = simplex_logistic()
    ss = bj.constraints.simplex()

    def lower(t):
        return bj.constraints.solve_projected(problem, ss, t, jnp.full(5, 0.2), None, learning_rate=1.0, steps=3000)

    phi = jax.jit(lower)(theta)
    g, info, dense = jax.jit(lambda t, p: (*bj.hypergradient(problem, t, p, NONE),
                                           bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE)))(theta, phi)
    assert int(info.status) == st.OK
    active = np.asarray(info.active)
    assert 0 < active.sum() < 5          # both active and inactive constraints
    assert np.all(np.asarray(info.multipliers.inequality)[active == 1] > 1e-4)  # strictly complementary
    F = jax.jit(jax.vmap(lambda t: problem.f_upper(t, lower(t), None)))
    eps = 1e-5
    f_plus, f_minus = F(jnp.stack([theta + eps, theta - eps]))
    fd = (f_plus - f_minus) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dense, g, atol=1e-9)


def test_weakly_active_constraint_is_reported():
    problem, theta, phi, mult, F = box_quadratic(weak=True)
    both = jax.jit(lambda t, p: (bj.hypergradient(problem, t, p, NONE),
                                 bj.hypergrad.kkt_hypergradient(problem, t, p, NONE, nan_if_degenerate=False)))
    (g, info), (g2, info2) = both(theta, phi)
    assert int(info.status) & st.DEGENERATE
    assert np.all(np.isnan(np.asarray(g)))
    assert int(info2.status) == st.DEGENERATE and np.all(np.isfinite(np.asarray(g2)))
    assert "degenerate" in st.describe(info.status)


def test_wrong_sign_multiplier_and_dependent_constraints_are_reported():
    problem, theta, phi, mult, _ = box_quadratic()
    bad = Multipliers({"lower": -mult.inequality["lower"], "upper": mult.inequality["upper"]}, None)
    given = jax.jit(lambda t, p, m: bj.hypergrad.kkt_hypergradient(problem, t, p, NONE, multipliers=m))
    assert int(given(theta, phi, bad)[1].status) & st.DEGENERATE
    # LICQ fails: the same active constraint twice (singular least-squares normal equations, found
    # by the random probe): never a finite-looking number
    twice = bj.BilevelProblem(problem.f_upper, problem.f_lower,
                              lower_inequality=lambda t, p: jnp.stack([-p[0], -p[0]]))
    phi0 = jnp.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    g, info = jax.jit(lambda t, p: bj.hypergradient(twice, t, p, NONE))(theta, phi0)
    assert int(info.status) != st.OK and np.all(np.isnan(np.asarray(g)))


def test_kkt_hypergradient_jit_vmap_and_warm_start():
    problem, theta, phi, mult, F = box_quadratic()
    thetas = theta + 0.01 * jax.random.normal(jax.random.PRNGKey(3), (4, 3))
    phis = jax.vmap(lambda t: bj.constraints.solve_projected(problem, bj.constraints.box(0.0, 1.0), t, phi, None,
                                                             learning_rate=0.3, steps=300))(thetas)
    gs, infos = jax.jit(jax.vmap(lambda t, p: bj.hypergradient(problem, t, p, NONE)))(thetas, phis)
    assert np.all(np.asarray(infos.status) == st.OK)
    np.testing.assert_allclose(gs, jax.vmap(jax.grad(F))(thetas), atol=1e-8)
    info0 = jax.tree_util.tree_map(lambda x: x[0], infos)
    phi = phis[0]
    g = jax.jit(lambda t, p, x0: bj.hypergradient(problem, t, p, NONE, x0=x0, solver=bj.linear_solvers.minres(3))[0])(
        thetas[0], phi, (info0.v, tuple(info0.adjoint)))
    theta = thetas[0]
    np.testing.assert_allclose(g, jax.grad(F)(theta), atol=1e-8)   # warm start at the solution: 3 steps suffice


def test_constrained_problem_validation():
    with pytest.raises(TypeError, match="lower_inequality"):
        bj.BilevelProblem(lambda t, p, b: 0.0, lambda t, p, b: 0.0, lower_inequality=3)
    problem = bj.BilevelProblem(lambda t, p, b: jnp.sum(p), lambda t, p, b: jnp.sum(p ** 2),
                                lower_equality=lambda t, p: p @ jnp.ones(4))
    with pytest.raises(ValueError, match="lower_equality"):
        problem.validate(jnp.zeros(2), jnp.zeros(3), NONE)
    with pytest.raises(ValueError, match="no lower_inequality"):
        bj.hypergrad.kkt_hypergradient(bj.BilevelProblem(problem.f_upper, problem.f_lower), jnp.zeros(2),
                                       jnp.zeros(3), NONE)


# ------------------------------------------------------------------ MINRES

def test_minres_solves_indefinite_and_reports_singular():
    m = jax.random.normal(jax.random.PRNGKey(0), (12, 12))
    a = m + m.T
    b = jax.random.normal(jax.random.PRNGKey(1), (12,))
    solver = bj.linear_solvers.minres(40)
    x, _, info = jax.jit(lambda b: solver.solve(lambda v: a @ v, b, solver.init(b)))(b)
    np.testing.assert_allclose(x, jnp.linalg.solve(a, b), atol=1e-10)
    assert int(info.status) == st.OK and float(info.residual_norm) < 1e-10
    a2 = a.at[0].set(0.0).at[:, 0].set(0.0)   # singular; b not in its range
    x, _, info = solver.solve(lambda v: a2 @ v, b, solver.init(b))
    assert int(info.status) & st.BREAKDOWN and np.all(np.isnan(np.asarray(x)))
    b2 = b.at[0].set(0.0)                      # singular, consistent: a solution
    x, _, info = solver.solve(lambda v: a2 @ v, b2, solver.init(b2))
    assert int(info.status) == st.OK and float(jnp.linalg.norm(a2 @ x - b2)) < 1e-10


# ------------------------------------------------------------------ LL solvers

def test_projected_and_augmented_lagrangian_solvers():
    problem, theta, phi, mult, _ = box_quadratic()
    hat = jax.jit(lambda t: bj.constraints.solve_projected(problem, bj.constraints.box(0.0, 1.0), t, jnp.zeros(6),
                                                           None, learning_rate=0.3, steps=500))(theta)
    np.testing.assert_allclose(hat, phi, atol=1e-10)
    alm = jax.jit(lambda t: bj.constraints.augmented_lagrangian(problem, t, jnp.zeros(6), None,
                                                               optimizer=optax.sgd(0.05), inner_steps=200,
                                                               outer_steps=20, penalty=10.0))
    phi_a, lam = alm(theta)
    np.testing.assert_allclose(phi_a, phi, atol=1e-8)
    np.testing.assert_allclose(lam.inequality["lower"], mult.inequality["lower"], atol=1e-8)
    np.testing.assert_allclose(lam.inequality["upper"], mult.inequality["upper"], atol=1e-8)
    eq, theta_e, phi_star, _ = equality_quadratic()
    phi_e, lam_e = jax.jit(lambda t: bj.constraints.augmented_lagrangian(
        eq, t, jnp.zeros(5), None, optimizer=optax.sgd(0.05), inner_steps=300, outer_steps=30, penalty=5.0))(theta_e)
    np.testing.assert_allclose(phi_e, phi_star(theta_e), atol=1e-8)


def test_sets_project_onto_their_constraints():
    x = jnp.array([1.5, -0.3, 0.4])
    for s in (bj.constraints.box(0.0, 1.0), bj.constraints.simplex(), bj.constraints.l2_ball(0.5),
              bj.constraints.halfspace(jnp.ones(3), 0.2), bj.constraints.hyperplane(jnp.ones(3), 0.2),
              bj.constraints.non_negative()):
        p = s.project(x)
        if s.has_inequality:
            assert max(float(jnp.max(v)) for v in jax.tree_util.tree_leaves(s.inequality(None, p))) <= 1e-12
        if s.has_equality:
            assert abs(float(s.equality(None, p))) <= 1e-12
        np.testing.assert_allclose(s.project(p), p, atol=1e-12)   # idempotent


def test_kkt_argmin_gradients_match_closed_form():
    problem, theta, phi, mult, F = box_quadratic()
    ss = bj.constraints.box(0.0, 1.0)
    solve = bj.hypergrad.kkt_argmin(
        problem, lambda t, p0, b: (bj.constraints.solve_projected(problem, ss, t, p0, b, learning_rate=0.3,
                                                                  steps=300), None))
    F_hat = lambda t: problem.f_upper(t, solve(t, jnp.zeros(6), None), None)
    np.testing.assert_allclose(jax.jit(jax.grad(F_hat))(theta), jax.grad(F)(theta), atol=1e-8)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(F_hat))(theta), jax.grad(F)(theta), atol=1e-8)


# ------------------------------------------------------------------ the KKT direction rule and BSG with constraints

def test_bsg_constrained_converges_to_the_closed_form_theta_star():
    """f_upper + ||theta - theta0||^2 - <grad F(theta0), theta>, so that theta* = theta0 (F is then a
    convex quadratic while the active set stays, checked); BSG with constraints reaches it, jit +
    vmap over seeds."""
    problem, theta0, phi, mult, F = box_quadratic()
    g0 = jax.grad(F)(theta0)
    shift = lambda t: jnp.sum((t - theta0) ** 2) - g0 @ t
    assert np.all(np.linalg.eigvalsh(np.asarray(jax.hessian(lambda t: F(t) + shift(t))(theta0))) > 0.1)
    tilted = bj.constraints.box(0.0, 1.0)
    prob = tilted.problem(lambda t, p, b: problem.f_upper(t, p, b) + shift(t), problem.f_lower)
    alg = bj.algorithms.bsg_constrained(prob, lower_set=tilted, upper_lr=0.2, lower_lr=0.3, lower_steps=20)

    def run(key):
        t0 = theta0 + 0.05 * jax.random.normal(key, (3,))
        state = alg.init(t0, jnp.full(6, 0.5), key)
        state, hist = bj.run(alg, state, NONE, num_steps=150)
        return state

    states = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(0), 2))
    np.testing.assert_allclose(states.theta, jnp.broadcast_to(theta0, (2, 3)), atol=1e-6)
    np.testing.assert_allclose(states.phi, jnp.broadcast_to(phi, (2, 6)), atol=1e-6)

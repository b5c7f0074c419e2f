"""Constrained lower levels: the KKT implicit gradient against closed forms, finite differences
and the dense reference; degeneracy reported; MINRES; projected and augmented-Lagrangian LL
solvers; kkt_argmin; the KKT direction rule and the constrained presets."""
import dataclasses
import functools

import chex
import equinox as eqx
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

@functools.partial(jax.jit, static_argnums=(1, 2))
def _box_arrays(key, dim_t, weak):
    """The arrays of `box_quadratic`, as one compiled program (built eagerly, each operation would
    compile on its own)."""
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
    return h, b, theta0, phi, lam_lo, lam_up, c, jax.random.normal(k[3], (d,)), jax.random.normal(k[4], (dim_t, d))


@functools.lru_cache(maxsize=None)   # one problem object per variant: the jitted `hypergradient` compiles once
def box_quadratic(seed=0, dim_t=3, weak=False):
    """LL 1/2 phi'H phi - phi'(B theta + c) on the box 0 <= phi <= 1 (H dense), built backwards from
    a KKT point with both bounds active somewhere, two free components, and strict
    complementarity (or, with `weak`, one bound active with a zero multiplier)."""
    h, b, theta0, phi, lam_lo, lam_up, c, y, cu = _box_arrays(jax.random.PRNGKey(seed), dim_t, weak)

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


@functools.lru_cache(maxsize=None)
def box_grad(weak=False):
    """grad F of `box_quadratic(weak=weak)` in closed form, compiled once and shared by the tests."""
    return jax.jit(jax.grad(box_quadratic(weak=weak)[4]))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _equality_arrays(key, dim_t, d, q):
    """The arrays of `equality_quadratic` and its theta, as one compiled program."""
    k = jax.random.split(key, 7)
    m = jax.random.normal(k[0], (d, d)) / jnp.sqrt(d)
    h = m @ m.T + 0.5 * jnp.eye(d)
    b, c = jax.random.normal(k[1], (d, dim_t)), jax.random.normal(k[2], (d,))
    a, e_mat, e = jax.random.normal(k[3], (q, d)), jax.random.normal(k[4], (q, dim_t)), jax.random.normal(k[5], (q,))
    kkt = jnp.block([[h, a.T], [a, jnp.zeros((q, q))]])
    return h, b, c, a, e_mat, e, jax.random.normal(k[6], (d,)), kkt, jnp.linspace(-0.5, 0.5, dim_t)


@functools.lru_cache(maxsize=None)
def equality_quadratic(seed=1, dim_t=3, d=5, q=2):
    """LL 1/2 phi'H phi - phi'(B theta + c) s.t. A phi = E theta + e (theta-dependent): phi*(theta)
    is the first block of the KKT system [[H, A'], [A, 0]]^{-1} (B theta + c, E theta + e)."""
    h, b, c, a, e_mat, e, y, kkt, theta = _equality_arrays(jax.random.PRNGKey(seed), dim_t, d, q)

    def f_lower(theta, phi, batch):
        return 0.5 * phi @ h @ phi - phi @ (b @ theta + c)

    def f_upper(theta, phi, batch):
        return 0.5 * jnp.sum((phi - y) ** 2) + 0.5 * jnp.sum(jnp.sin(theta) ** 2) + jnp.sum(theta) * phi[0]

    problem = bj.BilevelProblem(f_upper, f_lower, lower_equality=lambda t, p: a @ p - e_mat @ t - e)

    def phi_star(theta):
        return jnp.linalg.solve(kkt, jnp.concatenate([b @ theta + c, e_mat @ theta + e]))[:d]

    return problem, theta, phi_star, lambda t: f_upper(t, phi_star(t), None)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _ball_arrays(key, dim_t, d):
    """The arrays of `ball_quadratic` and its theta, as one compiled program."""
    k = jax.random.split(key, 3)
    b, y = jax.random.normal(k[0], (d, dim_t)), jax.random.normal(k[1], (d,))
    return b, y, 3.0 * jax.random.normal(k[2], (d,)), jnp.linspace(-0.3, 0.3, dim_t)


def ball_quadratic(seed=5, dim_t=3, d=5, radius=0.5):
    """LL 1/2 ||phi - c(theta)||^2 s.t. ||phi|| <= radius (a curved constraint, P = (||phi||^2 -
    radius^2) / 2), c(theta) = B theta + c0 outside the ball: phi* = radius c / ||c||, with the
    multiplier lambda = ||c|| / radius - 1 > 0 (stationarity phi - c + lambda phi = 0), so the
    Lagrangian's Hessian is (1 + lambda) I: its constraint curvature enters the KKT system."""
    b, y, c0, theta = _ball_arrays(jax.random.PRNGKey(seed), dim_t, d)

    def f_lower(theta, phi, batch):
        return 0.5 * jnp.sum((phi - b @ theta - c0) ** 2)

    def f_upper(theta, phi, batch):
        return 0.5 * jnp.sum((phi - y) ** 2) + 0.5 * jnp.sum(jnp.sin(theta) ** 2) + jnp.sum(theta) * phi[0]

    def phi_star(theta):
        c = b @ theta + c0
        return radius * c / jnp.linalg.norm(c)

    def multiplier(theta):
        return jnp.linalg.norm(b @ theta + c0) / radius - 1.0

    problem = bj.constraints.l2_ball(radius).problem(f_upper, f_lower)
    return problem, theta, phi_star, multiplier, lambda t: f_upper(t, phi_star(t), None)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _logistic_arrays(key, d, n):
    """The data of `simplex_logistic`, as one compiled program."""
    k = jax.random.split(key, 4)
    x, xv = jax.random.normal(k[0], (n, d)), jax.random.normal(k[1], (n, d))
    w = jnp.array([0.9, 0.1, 0.0, 0.0, 0.0])
    y = jnp.sign(x @ w + 0.3 * jax.random.normal(k[2], (n,)))
    return x, xv, y, jnp.sign(xv @ w + 0.3 * jax.random.normal(k[3], (n,)))


def simplex_logistic(seed=2, d=5, n=40):
    """Logistic regression with weights on the simplex, an exp(theta) ridge: non-quadratic LL."""
    x, xv, y, yv = _logistic_arrays(jax.random.PRNGKey(seed), d, n)

    def f_lower(theta, phi, batch):
        return jnp.mean(jax.nn.softplus(-y * (x @ phi))) + 0.5 * jnp.exp(theta[0]) * jnp.sum(phi ** 2)

    def f_upper(theta, phi, batch):
        return jnp.mean(jax.nn.softplus(-yv * (xv @ phi)))

    return bj.constraints.simplex().problem(f_upper, f_lower), np.array([-1.0])


# ------------------------------------------------------------------ the KKT hypergradient

@functools.partial(jax.jit, static_argnums=0, static_argnames="nan_if_degenerate")
def hypergradient(problem, theta, phi, multipliers=None, nan_if_degenerate=False):
    """bj.hypergradient's KKT path (minres(100); multipliers given, or by least squares when None),
    compiled once per problem and variant and shared by the tests."""
    return bj.hypergrad.kkt_hypergradient(problem, theta, phi, NONE, multipliers=multipliers,
                                          nan_if_degenerate=nan_if_degenerate)


def test_box_quadratic_matches_closed_form():
    problem, theta, phi, mult, F = box_quadratic()
    g_ref = box_grad()(theta)
    g, info = hypergradient(problem, theta, phi)  # least-squares multipliers
    assert int(info.status) == st.OK
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(info.multipliers.inequality["lower"], mult.inequality["lower"], atol=1e-10)
    np.testing.assert_allclose(info.multipliers.inequality["upper"], mult.inequality["upper"], atol=1e-10)
    assert np.asarray(info.active["lower"]).tolist() == [1, 1, 0, 0, 0, 0]
    assert np.asarray(info.active["upper"]).tolist() == [0, 0, 1, 0, 0, 1]
    g2, info2 = hypergradient(problem, theta, phi, mult)
    assert int(info2.status) == st.OK
    np.testing.assert_allclose(g2, g_ref, atol=1e-8)
    dense = jax.jit(lambda t, p, m: bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE, m))
    np.testing.assert_allclose(dense(theta, phi, mult), g_ref, atol=1e-10)


def test_equality_quadratic_matches_closed_form_and_dense():
    problem, theta, phi_star, F = equality_quadratic()

    @jax.jit
    def hypergradients(t):   # with the closed form F's gradient (one program, not an eager op each)
        p = phi_star(t)
        return (*bj.hypergradient(problem, t, p, NONE), bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE),
                jax.grad(F)(t))

    g, info, dense, g_ref = hypergradients(theta)
    assert int(info.status) == st.OK and info.active is None
    np.testing.assert_allclose(g, g_ref, atol=1e-8)
    np.testing.assert_allclose(dense, g, atol=1e-10)
    assert float(info.residual_norm) < 1e-10


def test_curved_constraint_matches_closed_form_dense_and_counts():
    """The l2 ball: the multiplier-weighted constraint curvature of the Lagrangian is part of K and of
    the cross term. Closed form, dense reference, and the oracle counts of one KKT hypergradient:
    one gradient of each level, one HVP per MINRES matvec, one cross product; the dense reference
    n_phi HVPs and n_theta cross products (the constraints' derivatives are not oracle calls)."""
    problem, theta, phi_star, multiplier, F = ball_quadratic()

    @jax.jit
    def counted(t):   # with the closed forms (one program, not an eager op each)
        p = phi_star(t)
        with bj.oracles.counting() as tally:
            g, info = bj.hypergrad.kkt_hypergradient(problem, t, p, NONE)
        with bj.oracles.counting() as dense_tally:
            dense = bj.hypergrad.kkt_hypergradient_dense(problem, t, p, NONE)
        return g, info, tally.counts, dense, dense_tally.counts, jax.grad(F)(t), multiplier(t)

    g, info, counts, dense, dense_counts, g_ref, lam = counted(theta)
    assert int(info.status) == st.OK
    np.testing.assert_allclose(info.multipliers.inequality, lam, rtol=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dense, g_ref, rtol=0, atol=1e-12)
    assert tuple(int(c) for c in counts) == (1, 1, 100, 1, 0), counts   # minres(100), no warm start
    assert tuple(int(c) for c in dense_counts) == (1, 1, 5, 3, 0), dense_counts


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
    f_plus, f_minus = np.asarray(F(np.stack([theta + eps, theta - eps])))
    fd = (f_plus - f_minus) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(dense, g, atol=1e-9)


def test_weakly_active_constraint_is_reported_and_the_estimate_kept_everywhere():
    """One rule for DEGENERATE (bj.hypergrad.kkt): the one-sided estimate, finite and flagged, from
    bj.hypergradient, kkt_hypergradient and the KKT rule inside a loop alike; NaN only on request."""
    problem, theta, phi, mult, F = box_quadratic(weak=True)
    (g, info), (g_nan, info_nan) = hypergradient(problem, theta, phi), hypergradient(problem, theta, phi,
                                                                                     nan_if_degenerate=True)
    assert int(info.status) == st.DEGENERATE and int(info_nan.status) == st.DEGENERATE
    assert "degenerate" in st.describe(info.status)
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.isnan(np.asarray(g_nan)))
    # the estimate holds the weakly active bound phi_1 >= 0 active: the gradient of the smooth piece
    # of F on which it stays active (phi_0 = phi_1 = 0, phi_2 = phi_5 = 1; F's closed form is that piece)
    np.testing.assert_allclose(g, box_grad(weak=True)(theta), atol=1e-8)
    # inside a loop: one aid_bio step (the KKT rule, dispatched) from the KKT point, which projected
    # LL steps keep, with upper_lr = 1: theta_1 = theta_0 - g, the same estimate and status
    alg = bj.algorithms.aid_bio(problem, upper_lr=1.0, lower_lr=0.1, lower_steps=1,
                                linear_solver=bj.linear_solvers.minres(50))
    first_step = eqx.filter_jit(lambda a: a.update(a.init(theta, phi, jax.random.PRNGKey(0)), NONE))   # one program
    state, step = first_step(alg)
    np.testing.assert_allclose(state.phi, phi, atol=1e-15)
    np.testing.assert_allclose(np.asarray(theta) - np.asarray(state.theta), g, atol=1e-10)
    assert int(step.status) == st.DEGENERATE
    # ... and NaN on request (the rule's nan_if_degenerate)
    alg_nan = eqx.tree_at(lambda a: a.direction, alg, bj.algorithms.kkt(problem, bj.linear_solvers.minres(50),
                                                                        nan_if_degenerate=True))
    state, step = first_step(alg_nan)
    assert int(step.status) == st.DEGENERATE | st.NONFINITE and np.all(np.isnan(np.asarray(state.theta)))


def test_wrong_sign_multiplier_and_dependent_constraints_are_reported():
    """Degeneracy of given multipliers (wrong sign; LICQ: the same active constraint twice, checked
    on the active set's Gram matrix whether the multipliers are given or by least squares)."""
    problem, theta, phi, mult, _ = box_quadratic()
    lam = {k: np.asarray(v) for k, v in mult.inequality.items()}   # NumPy: no eager op to compile
    bad = Multipliers({"lower": -lam["lower"], "upper": lam["upper"]}, None)
    assert int(hypergradient(problem, theta, phi, bad)[1].status) == st.DEGENERATE
    # LICQ fails: phi_1 >= 0 and phi_2 >= 0 (both active) stated twice each
    twice = bj.BilevelProblem(problem.f_upper, problem.f_lower,
                              lower_inequality=lambda t, p: {"lower": -p, "upper": p - 1.0, "again": -p[:2]})
    halved = lam["lower"] * np.array([0.5, 0.5, 1, 1, 1, 1])
    split = Multipliers({"lower": halved, "upper": lam["upper"], "again": halved[:2]}, None)
    (g_ls, info_ls), (g_given, info_given) = hypergradient(twice, theta, phi), hypergradient(twice, theta, phi, split)
    assert int(info_ls.status) == st.DEGENERATE and int(info_given.status) == st.DEGENERATE
    # (the same point and multipliers without the duplicates are OK: test_box_quadratic_matches_closed_form)
    # theta-independent duplicates: phi*(theta) is unchanged, and so is the (kept) estimate
    g_ref = box_grad()(theta)
    np.testing.assert_allclose(g_given, g_ref, atol=1e-8)
    np.testing.assert_allclose(g_ls, g_ref, atol=1e-8)


def test_kkt_hypergradient_jit_vmap_and_warm_start():
    problem, theta, phi, mult, _ = box_quadratic()

    @jax.jit
    def points(key):   # 4 thetas near theta0 and their projected LL solutions
        thetas = theta + 0.01 * jax.random.normal(key, (4, 3))
        return thetas, jax.vmap(lambda t: bj.constraints.solve_projected(
            problem, bj.constraints.box(0.0, 1.0), t, phi, None, learning_rate=0.3, steps=300))(thetas)

    thetas, phis = points(jax.random.PRNGKey(3))
    gs, infos = jax.jit(jax.vmap(lambda t, p: bj.hypergradient(problem, t, p, NONE)))(thetas, phis)
    assert np.all(np.asarray(infos.status) == st.OK)
    # NumPy from here: the per-theta slices and references are no eager ops to compile
    (thetas, phis, gs, infos) = jax.tree_util.tree_map(np.asarray, (thetas, phis, gs, infos))
    g_refs = np.stack([box_grad()(t) for t in thetas])
    np.testing.assert_allclose(gs, g_refs, atol=1e-8)
    for i in range(4):   # vmapped = per theta
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], (gs, infos)),
                                    hypergradient(problem, thetas[i], phis[i]), rtol=0, atol=1e-12)
    info0 = jax.tree_util.tree_map(lambda x: x[0], infos)
    g = jax.jit(lambda t, p, x0: bj.hypergradient(problem, t, p, NONE, x0=x0, solver=bj.linear_solvers.minres(3))[0])(
        thetas[0], phis[0], (info0.v, tuple(info0.adjoint)))
    np.testing.assert_allclose(g, g_refs[0], atol=1e-8)   # warm start at the solution: 3 steps suffice


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
    m = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (12, 12)))
    a = m + m.T
    b = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (12,)))
    solver = bj.linear_solvers.minres(40)
    solve = jax.jit(lambda a, b: solver.solve(lambda v: a @ v, b, solver.init(b)))   # one program for the 3 systems
    x, _, info = solve(a, b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), atol=1e-10)
    assert int(info.status) == st.OK and float(info.residual_norm) < 1e-10
    a2 = a.copy()
    a2[0], a2[:, 0] = 0.0, 0.0                 # singular; b not in its range
    x, _, info = solve(a2, b)
    assert int(info.status) & st.BREAKDOWN and np.all(np.isnan(np.asarray(x)))
    b2 = b.copy()
    b2[0] = 0.0                                # singular, consistent: a solution
    x, _, info = solve(a2, b2)
    assert int(info.status) == st.OK and float(np.linalg.norm(a2 @ np.asarray(x) - b2)) < 1e-10


# ------------------------------------------------------------------ LL solvers

def test_projected_and_augmented_lagrangian_solvers():
    problem, theta, phi, mult, _ = box_quadratic()
    hat = jax.jit(lambda t: bj.constraints.solve_projected(problem, bj.constraints.box(0.0, 1.0), t, jnp.zeros(6),
                                                           None, learning_rate=0.3, steps=500))(theta)
    np.testing.assert_allclose(hat, phi, atol=1e-10)
    alm = jax.jit(lambda t: bj.constraints.augmented_lagrangian(problem, t, jnp.zeros(6), None,
                                                               optimizer=optax.sgd(0.05), inner_steps=200,
                                                               outer_steps=20, penalty=10.0))
    phi_a, lam, info = alm(theta)
    np.testing.assert_allclose(phi_a, phi, atol=1e-8)
    assert int(info.status) == st.OK and float(info.stationarity) < 1e-8 and float(info.infeasibility) < 1e-8
    thetas = np.asarray(theta + 0.01 * jax.random.normal(jax.random.PRNGKey(5), (3, 3)))   # vmapped = per theta
    vmapped = jax.tree_util.tree_map(np.asarray, jax.jit(jax.vmap(alm))(thetas))   # NumPy: slices are no eager ops
    for i in range(3):
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], vmapped), alm(thetas[i]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(lam.inequality["lower"], mult.inequality["lower"], atol=1e-8)
    np.testing.assert_allclose(lam.inequality["upper"], mult.inequality["upper"], atol=1e-8)
    eq, theta_e, phi_star, _ = equality_quadratic()
    (phi_e, lam_e, _), phi_e_star = jax.jit(lambda t: (bj.constraints.augmented_lagrangian(
        eq, t, jnp.zeros(5), None, optimizer=optax.sgd(0.05), inner_steps=300, outer_steps=30, penalty=5.0),
        phi_star(t)))(theta_e)
    np.testing.assert_allclose(phi_e, phi_e_star, atol=1e-8)
    # a diverging inner optimizer (sgd(1.0) on L_rho, whose curvature is above 2): NaN and NONFINITE, not a bare NaN
    phi_d, lam_d, info_d = jax.jit(lambda t: bj.constraints.augmented_lagrangian(
        problem, t, jnp.zeros(6), None, optimizer=optax.sgd(1.0), inner_steps=200, outer_steps=20))(theta)
    assert int(info_d.status) == st.NONFINITE
    assert np.all(np.isnan(np.asarray(phi_d))) and all(np.all(np.isnan(np.asarray(x)))
                                                      for x in jax.tree_util.tree_leaves(lam_d))


def test_sets_project_onto_their_constraints():
    sets = (bj.constraints.box(0.0, 1.0), bj.constraints.simplex(), bj.constraints.l2_ball(0.5),
            bj.constraints.halfspace(jnp.ones(3), 0.2), bj.constraints.hyperplane(jnp.ones(3), 0.2),
            bj.constraints.non_negative())

    @jax.jit
    def project(x):
        """Per set: the projection, its constraints there (None: it has none) and the projection of it;
        one program (not an eager op each)."""
        out = []
        for s in sets:
            p = s.project(x)
            out.append((p, s.inequality(None, p) if s.has_inequality else None,
                        s.equality(None, p) if s.has_equality else None, s.project(p)))
        return out

    for p, inequality, equality, again in project(jnp.array([1.5, -0.3, 0.4])):
        if inequality is not None:
            assert max(float(np.max(v)) for v in jax.tree_util.tree_leaves(inequality)) <= 1e-12
        if equality is not None:
            assert abs(float(equality)) <= 1e-12
        np.testing.assert_allclose(again, p, atol=1e-12)   # idempotent


def test_sets_validate_their_parameters():
    """An empty or degenerate set is an error at construction (a concrete parameter) or when the
    program runs (a traced one), never a projection onto something else."""
    C = bj.constraints
    bad = [(lambda: C.box(1.0, 0.0), "box: lower > upper"),
           (lambda: C.box(jnp.zeros(3), jnp.array([1.0, -1.0, 1.0])), "box: lower > upper"),
           (lambda: C.box(jnp.nan), "box: the lower bound has NaN"), (lambda: C.simplex(-1.0), "simplex: scale"),
           (lambda: C.simplex(0.0), "simplex: scale"), (lambda: C.l2_ball(-1.0), "l2_ball: radius"),
           (lambda: C.l2_ball(jnp.inf), "l2_ball: radius"),
           (lambda: C.hyperplane(jnp.zeros(3), 1.0), "hyperplane: `a`"),
           (lambda: C.halfspace(jnp.zeros(3), 1.0), "halfspace: `a`"),
           (lambda: C.halfspace(jnp.ones(3), jnp.nan), "halfspace: `b`"),
           (lambda: C.Box(1.0, 0.0), "box: lower > upper"), (lambda: C.L2Ball(0.0), "l2_ball: radius")]   # classes too
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            make()
    tree_box = C.box({"a": 0.0, "b": jnp.zeros(2)}, 1.0)   # a pytree bound against a scalar one
    assert float(tree_box.project({"a": jnp.asarray(2.0), "b": -jnp.ones(2)})["a"]) == 1.0
    # traced (a swept radius): the valid values project, an invalid one raises when the program runs
    project = eqx.filter_jit(lambda r, x: C.l2_ball(r).project(x))
    np.testing.assert_allclose(project(2.0, jnp.full(4, 3.0)), jnp.ones(4), atol=1e-12)
    with pytest.raises(Exception, match="l2_ball: radius must be a positive"):
        jax.block_until_ready(project(-1.0, jnp.full(4, 3.0)))
    boxes = eqx.filter_jit(jax.vmap(lambda lo: C.box(lo, 1.0).project(jnp.zeros(2))))
    with pytest.raises(Exception, match="box: lower > upper"):
        jax.block_until_ready(boxes(jnp.array([0.0, 2.0])))


def test_kkt_argmin_gradients_match_closed_form_jit_vmap():
    """Projected steps (least-squares multipliers) and the augmented Lagrangian (multipliers given
    by the solver) as primal solvers; both autodiff modes; vmapped over thetas = per theta."""
    problem, theta, phi, mult, _ = box_quadratic()
    ss = bj.constraints.box(0.0, 1.0)
    projected = bj.hypergrad.kkt_argmin(
        problem, lambda t, p0, b: (bj.constraints.solve_projected(problem, ss, t, p0, b, learning_rate=0.3,
                                                                  steps=300), None))
    alm = bj.hypergrad.kkt_argmin(
        problem, lambda t, p0, b: bj.constraints.augmented_lagrangian(problem, t, p0, b, optimizer=optax.sgd(0.05),
                                                                      inner_steps=200, outer_steps=20))
    F_hat = lambda t, solve: problem.f_upper(t, solve(t, jnp.zeros(6), None), None)
    both = lambda t: (jax.grad(F_hat)(t, projected), jax.grad(F_hat)(t, alm))
    np.testing.assert_allclose(jax.jit(jax.jacfwd(F_hat), static_argnums=1)(theta, projected), box_grad()(theta),
                               atol=1e-8)
    thetas = np.asarray(theta + 0.01 * jax.random.normal(jax.random.PRNGKey(4), (2, 3)))   # NumPy: no eager slices
    vmapped, single = np.asarray(jax.jit(jax.vmap(both))(thetas)), jax.jit(both)(thetas[-1])
    ref = np.stack([box_grad()(t) for t in thetas])
    for g_v, g in zip(vmapped, single):
        np.testing.assert_allclose(g_v, ref, atol=1e-8)
        np.testing.assert_allclose(g_v[-1], g, rtol=0, atol=1e-12)   # vmapped = per theta


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_kkt_argmin_uses_the_augmented_lagrangian_multipliers(dtype):
    """The augmented Lagrangian ends 4e-3 inside a bound it holds with multiplier 1.7 (its multiplier
    update approaching lambda* = 1.3 from a warm start above it): kkt_argmin takes the constraint
    as active from the solver's multiplier, and gives the exact hypergradient (3.41) to 1e-3 in
    float32 and float64 (a fixed 1e-6 tolerance on P dropped it: 3.27).

    LL (by hand): 1/4 ||phi||^2 - phi'(b theta + c) s.t. 0.05 (phi_1 + phi_2) <= 0.05, b = (1, -1/2),
    c = (1/2, 3/100). Active: phi = 2 (q - lambda a), q = b theta + c, a = (1, 1)/20, phi_1 + phi_2 = 1, so
    lambda = 10 (q_1 + q_2) - 5 (1.3 at theta = 0.2), phi* = (1.27, -0.27) and d phi*/d theta = (3/2, -3/2)."""
    a, b, c, y = (jnp.asarray(x, dtype) for x in ([0.05, 0.05], [1.0, -0.5], [0.5, 0.03], [0.3, 0.9]))
    f_lower = lambda t, p, _: 0.25 * p @ p - p @ (b * t[0] + c)
    f_upper = lambda t, p, _: 0.5 * jnp.sum((p - y) ** 2) + 0.5 * t[0] ** 2
    problem = bj.constraints.halfspace(a, 0.05).problem(f_upper, f_lower)

    def phi_star(t):
        q = b * t[0] + c
        return 2 * (q - (10 * jnp.sum(q) - 5) * a)

    theta, warm = jnp.asarray([0.2], dtype), Multipliers(jnp.asarray(4.0, dtype), None)   # warm: above lambda*

    def alm(t, p0, batch):
        return bj.constraints.augmented_lagrangian(problem, t, p0, batch, optimizer=optax.sgd(0.05), inner_steps=200,
                                                   outer_steps=20, multipliers=warm)

    solve = bj.hypergrad.kkt_argmin(problem, alm)
    phi0 = jnp.zeros(2, dtype)

    @jax.jit
    def solved(t):   # with the exact hypergradient and the constraint at the solver's phi (one program)
        phi, lam, info = alm(t, phi0, None)
        return (jax.grad(lambda t: f_upper(t, phi_star(t), None))(t), phi, lam, info,
                jax.grad(lambda t: f_upper(t, solve(t, phi0, None), None))(t), problem.lower_inequality(t, phi))

    exact, phi, lam, info, g, p = solved(theta)
    np.testing.assert_allclose(exact, [3.41], rtol=1e-6)
    assert -5e-3 < float(p) < -3e-3 and 1.6 < float(lam.inequality) < 1.8 and int(info.status) == st.OK
    assert g.dtype == dtype
    np.testing.assert_allclose(g, exact, atol=1e-3)


def ridge_box(seed=4, dtype=jnp.float32, n=100, d=6):
    """The README's box example: the ridge problem of its "Use" section (theta = log-regularisation)
    with the weights in [0, 1]."""
    rng = np.random.default_rng(seed)
    w, x_tr, x_val = rng.normal(size=d), rng.normal(size=(n, d)), rng.normal(size=(n, d))
    data = ((x_val, x_val @ w + 0.3 * rng.normal(size=n)), (x_tr, x_tr @ w + 0.3 * rng.normal(size=n)))

    def f_lower(theta, phi, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ phi - y) ** 2) + 0.5 * jnp.exp(theta) * phi @ phi

    def f_upper(theta, phi, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ phi - y) ** 2)

    problem = bj.constraints.box(0.0, 1.0).problem(f_upper, f_lower)
    return problem, jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), data)


def test_readme_box_example_runs_checked(dtype=jnp.float32):
    """aid_bio on the box-constrained ridge LL with check=True runs to the end: the LL of the first
    steps is not yet solved, and a least-squares multiplier of 1e-6 (float32 rounding) or of an
    inactive bound is not degeneracy (a fixed 1e-6 tolerance raised at outer step 12, in float64
    too); the end point is a KKT point (status OK) where the hypergradient is small."""
    problem, data = ridge_box(dtype=dtype)
    alg = bj.algorithms.aid_bio(problem, upper_lr=0.2, lower_lr=0.3, lower_steps=20)
    state = alg.init(jnp.asarray(0.0, dtype), jnp.full(6, 0.5, dtype), jax.random.PRNGKey(0))
    state, hist = bj.run(alg, state, data, num_steps=300, eval_every=100, check=True)
    assert np.all(np.asarray(hist["status"]) == st.OK) and state.theta.dtype == dtype
    g, info = jax.jit(lambda t, p: bj.hypergradient(problem, t, p, data))(state.theta, state.phi)
    assert int(info.status) == st.OK and abs(float(g)) < 2e-2 and float(state.theta) < -2.0   # from theta0 = 0


# ------------------------------------------------------------------ the KKT rules in the loops: aid_bio, soba, BSG

SEEDS = jax.random.split(jax.random.PRNGKey(0), 2)


@pytest.fixture(scope="module")
def tilted():
    """f_upper + ||theta - theta0||^2 - <grad F(theta0), theta>, so that theta* = theta0 (F is then a
    convex quadratic while the active set stays, checked), phi* the box quadratic's KKT point; runs
    start at theta0 + 0.05 N(0, I) (per seed) and phi = 0.5."""
    problem, theta0, phi, mult, F = box_quadratic()
    g0 = box_grad()(theta0)
    shift = lambda t: jnp.sum((t - theta0) ** 2) - g0 @ t
    assert np.all(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(lambda t: F(t) + shift(t)))(theta0))) > 0.1)
    prob = bj.constraints.box(0.0, 1.0).problem(lambda t, p, b: problem.f_upper(t, p, b) + shift(t), problem.f_lower)

    def runs(alg, num_steps):
        """(final state, last step's residual) of jit(vmap(run)) over SEEDS, and of jit(run) on the last
        seed alone."""
        def run(key):
            state = alg.init(theta0 + 0.05 * jax.random.normal(key, (3,)), jnp.full(6, 0.5), key)
            state, hist = bj.run(alg, state, NONE, num_steps=num_steps)
            return state, hist["residual_norm"][-1]
        return jax.jit(jax.vmap(run))(SEEDS), jax.jit(run)(SEEDS[-1])

    return prob, theta0, phi, runs


def _converged(runs, theta_star, phi_star, rtol):
    (states, _), (single, _) = jax.tree_util.tree_map(np.asarray, runs)   # NumPy: no eager slices, comparisons
    err = np.linalg.norm(states.theta - theta_star, axis=-1) / np.linalg.norm(theta_star)
    assert np.all(err < rtol), err
    np.testing.assert_allclose(states.phi, np.broadcast_to(phi_star, states.phi.shape), atol=10 * rtol)
    # vmapped over seeds = the seed run alone
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[-1], states), single, rtol=0, atol=1e-12)
    return err


def test_aid_bio_dispatches_to_kkt_and_reaches_theta_star(tilted):
    """aid_bio on a constrained problem: the KKT rule (warm-started MINRES) and projected LL steps
    onto the set the problem was built from, with no constraint argument; theta* to 1e-3 (reached
    to ~1e-15); BSG with constraints is the same composition; amigo dispatches alike."""
    prob, theta_star, phi_star, runs = tilted
    alg = bj.algorithms.aid_bio(prob, upper_lr=0.2, lower_lr=0.3, lower_steps=20)
    assert isinstance(alg.direction, bj.algorithms.KKT) and isinstance(alg.direction.solver, bj.linear_solvers.MINRES)
    assert isinstance(alg.lower.projection, bj.constraints.ProjectionAt) and alg.lower.transform is optax.sgd
    err = _converged(runs(alg, 150), theta_star, phi_star, 1e-3)
    assert np.all(err < 1e-10)
    bsg = bj.algorithms.bsg_constrained(prob, upper_lr=0.2, lower_lr=0.3, lower_steps=20,
                                        linear_solver=bj.linear_solvers.minres(10, warm_start=True))
    assert eqx.tree_equal(dataclasses.replace(bsg, name="aid_bio"), alg)
    amigo = bj.algorithms.amigo(prob, upper_lr=0.2, lower_lr=0.3, lower_steps=20, batch_size=None)
    assert eqx.tree_equal(dataclasses.replace(amigo, name="aid_bio"), alg)


def test_soba_amortized_kkt_reaches_theta_star(tilted):
    """soba on a constrained problem: the amortized KKT rule (one step per outer step on the KKT
    normal equations, the adjoint z = (a, b_P, b_Q) a loop variable) and projected phi steps;
    theta* to 1e-3 full batch, jit + vmap over seeds."""
    prob, theta_star, phi_star, runs = tilted
    alg = bj.algorithms.soba(prob, upper_lr=0.03, lower_lr=0.3, v_lr=0.07, upper_decay=0.0, lower_decay=0.0,
                             batch_size=None)
    assert isinstance(alg.direction, bj.algorithms.AmortizedKKT)
    (states, residual), _ = out = runs(alg, 2000)
    _converged(out, theta_star, phi_star, 1e-3)
    assert np.all(np.asarray(residual) < 1e-3)   # ||K z - r||: the amortized adjoint solves the KKT system


def test_presets_refuse_or_dispatch_constrained_problems():
    """Every preset not tagged "constrained" in bj.algorithms.CAPABILITIES would ignore the LL
    constraints: a clear error naming it (every preset on a constrained problem:
    tests/test_registries.py). A constrained problem not built from a set needs lower_set=; lower_set
    on an unconstrained problem is an error; an amortized rule with SAGA memories is refused."""
    problem, *_ = box_quadratic()
    bare = bj.BilevelProblem(problem.f_upper, problem.f_lower, lower_inequality=lambda t, p: -p)
    with pytest.raises(ValueError, match="aid_bio: .*lower_set="):
        bj.algorithms.aid_bio(bare)
    alg = bj.algorithms.soba(bare, lower_set=lambda p: jnp.maximum(p, 0.0))
    assert isinstance(alg.direction, bj.algorithms.AmortizedKKT)
    plain = bj.BilevelProblem(problem.f_upper, problem.f_lower)
    with pytest.raises(ValueError, match="amigo: lower_set"):
        bj.algorithms.amigo(plain, lower_set=bj.constraints.box(0.0))
    with pytest.raises(ValueError, match="SAGA"):
        bj.algorithms.bilevel_loop(problem, direction=bj.algorithms.amortized_kkt(problem, optax.sgd(0.1)),
                                   upper_opt=optax.sgd(0.1), lower_opt=optax.sgd(0.1),
                                   estimator=bj.algorithms.estimators.saga(), sampler="partition")

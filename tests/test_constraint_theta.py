"""Theta-dependent lower-level feasible sets Phi(theta): the KKT hypergradient and the constrained
loops (bsg_constrained; aid_bio, amigo and soba's KKT dispatch) against closed forms, and bad
input.

The problems (theta, phi in R^2): a strongly convex quadratic LL on a set whose bound moves with
theta, and a quadratic UL,

    f_lower(theta, phi) = 1/2 (phi - m)' H (phi - m),   m(theta) = M theta + c,
    f_upper(theta, phi) = 1/2 ||phi - y||^2 + rho/2 ||theta||^2.

Closed form (`active_piece`). Near a solution where the active constraints are E phi = e(theta)
= e0 + E_theta theta (LICQ, strict complementarity: the active set stays), phi*(theta) solves the
equality-constrained QP on them, i.e. the linear KKT system

    [[H, E'], [E, 0]] (phi, lambda) = (H m(theta), e(theta)),

so phi*(theta) = A theta + d and lambda(theta) = N theta + n0 are affine (columns of the inverse
KKT matrix times (H M, E_theta) and (H c, e0)). The reduced UL function is then the quadratic

    F(theta) = 1/2 ||A theta + d - y||^2 + rho/2 ||theta||^2,
    grad F(theta) = A'(A theta + d - y) + rho theta,   theta* = -(A'A + rho I)^{-1} A'(d - y),

and the piece is the right one when lambda(theta*) > 0 and the other constraints hold strictly
at phi*(theta*) (checked). F is piecewise quadratic and may have a stationary point on another
piece (with the box's upper bound 0.5 + 0.3 theta on both components: both bounds active at
theta = (0.20, -0.36), where BSG from theta = 0 ends); each problem here has one (gradient
descent on F, phi* by active-set enumeration, from 40 random starts in [-3, 3]^2 ends at theta*).

The halfspace problem, phi_0 + phi_1 <= 1 + 0.2 theta_0, has one active row: phi* = m - lambda H^{-1} a with lambda = (a'm - b(theta)) / (a'H^{-1}a), a = (1, 1).
A theta-independent bound (b frozen at its value) gives another A, and another gradient: the
grad_theta P term of the KKT hypergradient (Giovannelli, Kent, Vicente, "Bilevel stochastic
methods for optimization and machine learning: Bilevel stochastic descent and DARTS", 2021,
arXiv:2110.00604) is what makes the difference.
"""
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax import status as st

NONE = (None, None)
H = np.array([[2.0, 0.5], [0.5, 1.0]])
M = np.array([[1.0, 0.5], [-0.5, 1.0]])
C = np.array([1.0, 0.8])
Y = np.array([0.9, -0.2])
RHO = 0.5


def f_lower(theta, phi, batch):
    r = phi - (M @ theta + C)
    return 0.5 * r @ H @ r


def f_upper(theta, phi, batch):
    return 0.5 * jnp.sum((phi - Y) ** 2) + 0.5 * RHO * jnp.sum(theta ** 2)


def active_piece(e_phi, e_theta, e0):
    """(A, d, N, n0): phi*(theta) = A theta + d and lambda(theta) = N theta + n0 on the piece where
    the constraints e_phi phi <= e0 + e_theta theta are active (module docstring)."""
    q = e_phi.shape[0]
    kkt_inv = np.linalg.inv(np.block([[H, e_phi.T], [e_phi, np.zeros((q, q))]]))
    lin = kkt_inv @ np.vstack([H @ M, e_theta])
    const = kkt_inv @ np.concatenate([H @ C, e0])
    return lin[:2], const[:2], lin[2:], const[2:]


def reduced(piece):
    """(theta*, grad F) of F(theta) = f_upper(theta, A theta + d) (module docstring)."""
    a, d, _, _ = piece
    theta_star = -np.linalg.solve(a.T @ a + RHO * np.eye(2), a.T @ (d - Y))
    return theta_star, lambda t: a.T @ (a @ t + d - Y) + RHO * t


# the halfspace Phi(theta) = {phi_0 + phi_1 <= 1 + 0.2 theta_0}, active at the solution
HALF = bj.constraints.halfspace(jnp.ones(2), lambda theta: 1.0 + 0.2 * theta[0])
HALF_ACTIVE = (np.ones((1, 2)), np.array([[0.2, 0.0]]), np.array([1.0]))     # (E, E_theta, e0)
# the box Phi(theta) = {-1 + 0.1 theta <= phi <= (0.5, 1.5) + 0.3 theta}: phi_0 at its upper bound at the solution
BOX = bj.constraints.box(lambda theta: -1.0 + 0.1 * theta, lambda theta: jnp.array([0.5, 1.5]) + 0.3 * theta)
BOX_ACTIVE = (np.array([[1.0, 0.0]]), np.array([[0.3, 0.0]]), np.array([0.5]))
HALF_PIECE, BOX_PIECE = active_piece(*HALF_ACTIVE), active_piece(*BOX_ACTIVE)
# name: (the set, its active constraints, a theta on their piece (for the hypergradient), the set frozen at a theta)
CASES = {"halfspace": (HALF, HALF_ACTIVE, np.array([0.3, -0.4]),
                       lambda t: bj.constraints.halfspace(jnp.ones(2), 1.0 + 0.2 * t[0])),
         "box": (BOX, BOX_ACTIVE, np.array([0.3, -0.7]),
                 lambda t: bj.constraints.box(-1.0 + 0.1 * t, jnp.array([0.5, 1.5]) + 0.3 * t))}


@functools.lru_cache(maxsize=None)
def problem(constraint_set):
    return constraint_set.problem(f_upper, f_lower)


def phi_star(piece, theta):
    a, d, _, _ = piece
    return a @ np.asarray(theta) + d


def test_the_closed_forms_are_on_their_pieces():
    """lambda(theta*) > 0 and the inactive bounds strictly slack: the pieces of the closed forms are
    the solutions' (numbers in the module docstring's notation)."""
    theta, _ = reduced(HALF_PIECE)
    np.testing.assert_allclose(theta, [0.19888961, 0.04043109], rtol=1e-7)
    _, _, n, n0 = HALF_PIECE
    assert float((n @ theta + n0)[0]) > 0.8              # lambda = 0.805
    theta, _ = reduced(BOX_PIECE)
    phi = phi_star(BOX_PIECE, theta)
    _, _, n, n0 = BOX_PIECE
    assert float((n @ theta + n0)[0]) > 0.5              # lambda = 0.575 (phi_0 <= 0.5 + 0.3 theta_0)
    assert -1.0 + 0.1 * theta[1] + 0.5 < phi[1] < 1.5 + 0.3 * theta[1] - 0.5   # phi_1 strictly inside
    assert np.all(-1.0 + 0.1 * theta < phi)


@pytest.mark.parametrize("name", ["halfspace", "box"])
def test_projection_onto_phi_theta(name):
    """project_at(theta, .) lands in Phi(theta) (P <= 0) and is idempotent; the set evaluated at
    theta is the theta-independent set with those parameters (the special case)."""
    s, _, theta, frozen = CASES[name]
    assert s.depends_on_theta and not s.at(theta).depends_on_theta
    x = np.array([2.0, 1.5])

    @jax.jit
    def projections(theta, x):   # one program, not an eager one per operation
        p = s.project_at(theta, x)
        return p, s.inequality(theta, p), s.project_at(theta, p), frozen(theta).project(x)

    p, inequality, again, frozen_p = jax.device_get(projections(theta, x))
    assert max(np.max(v) for v in jax.tree_util.tree_leaves(inequality)) <= 1e-12
    assert np.linalg.norm(p - x) > 0.1   # x was outside
    np.testing.assert_allclose(again, p, atol=1e-14)
    np.testing.assert_allclose(p, frozen_p, atol=1e-15)


@functools.partial(jax.jit, static_argnums=0)
def hypergradient(prob, theta, phi):
    return bj.hypergrad.kkt_hypergradient(prob, theta, phi, NONE)


@pytest.mark.parametrize("name", ["halfspace", "box"])
def test_kkt_hypergradient_includes_the_moving_bound(name):
    """At a theta on the closed form's piece and phi = phi*(theta) (closed form), the KKT
    hypergradient equals grad F (closed form) to 1e-10, and the multiplier lambda(theta); the
    reduced function of the set with its bounds frozen at this theta (the same phi*(theta), another
    d phi*/d theta) has another gradient, by more than 0.03: the grad_theta P term is in."""
    s, (e_phi, e_theta, e0), theta, _ = CASES[name]
    piece = active_piece(e_phi, e_theta, e0)
    phi = phi_star(piece, theta)
    g, info = jax.device_get(hypergradient(problem(s), theta, phi))
    assert int(info.status) == st.OK
    exact = reduced(piece)[1](np.asarray(theta))
    np.testing.assert_allclose(g, exact, rtol=0, atol=1e-10)
    lam = info.multipliers.inequality if name == "halfspace" else info.multipliers.inequality["upper"][0]
    np.testing.assert_allclose(lam, (piece[2] @ np.asarray(theta) + piece[3])[0], rtol=0, atol=1e-10)
    frozen_piece = active_piece(e_phi, 0 * e_theta, e0 + e_theta @ np.asarray(theta))   # the same phi*(theta)
    np.testing.assert_allclose(phi_star(frozen_piece, theta), phi, rtol=0, atol=1e-14)
    assert float(np.max(np.abs(reduced(frozen_piece)[1](np.asarray(theta)) - exact))) > 0.03


def _run(alg, num_steps):
    """`num_steps` of `alg` from theta0 = phi0 = 0, the init (a projection) inside the run's program."""
    run = jax.jit(lambda: bj.run(alg, alg.init(jnp.zeros(2), jnp.zeros(2), jax.random.PRNGKey(0)), NONE,
                                 num_steps=num_steps))
    return jax.device_get(run())


def _reached(state, hist, piece, atol):
    theta_star, _ = reduced(piece)
    np.testing.assert_allclose(state.theta, theta_star, rtol=0, atol=atol)
    np.testing.assert_allclose(state.phi, phi_star(piece, theta_star), rtol=0, atol=atol)
    assert np.all(np.asarray(hist["status"]) == st.OK)


@pytest.mark.parametrize("name", ["halfspace", "box"])
def test_bsg_constrained_reaches_the_closed_form(name):
    """BSG with constraints: 10 projected LL steps onto Phi(theta_k) per outer step, the KKT
    adjoint (MINRES), theta* and phi*(theta*) of the closed form to 1e-10 from theta0 = phi0 = 0."""
    s, active, _, _ = CASES[name]
    piece = active_piece(*active)
    alg = bj.algorithms.bsg_constrained(problem(s), upper_lr=0.75, lower_lr=0.4, lower_steps=10,
                                        linear_solver=bj.linear_solvers.minres(10))
    assert alg.lower.projection.depends_on_theta
    _reached(*_run(alg, 80), piece, 1e-10)


@pytest.mark.parametrize("preset", ["aid_bio", "amigo"])
def test_kkt_dispatch_reaches_the_closed_form(preset):
    """aid_bio and amigo on the theta-dependent halfspace: the KKT rule (warm-started MINRES)
    with projected LL steps onto Phi(theta_k), theta* to 1e-10."""
    alg = bj.algorithms.get(preset)(problem(HALF), upper_lr=0.75, lower_lr=0.4, lower_steps=10, batch_size=None)
    assert isinstance(alg.direction, bj.algorithms.KKT) and alg.lower.projection.depends_on_theta
    _reached(*_run(alg, 80), HALF_PIECE, 1e-10)


def test_soba_amortized_kkt_reaches_the_closed_form():
    """soba (the amortized KKT adjoint, projected phi steps onto Phi(theta_{k+1})) on the
    theta-dependent halfspace: theta* to 1e-8."""
    alg = bj.algorithms.soba(problem(HALF), upper_lr=0.3, lower_lr=0.4, v_lr=0.1, upper_decay=0.0, lower_decay=0.0,
                             batch_size=None)
    assert isinstance(alg.direction, bj.algorithms.AmortizedKKT)
    _reached(*_run(alg, 1500), HALF_PIECE, 1e-8)


def test_bad_theta_dependent_sets_raise_clearly():
    """A parameter that is not a function of theta alone, or whose value is not an array; a
    theta-dependent set projected without theta; a set empty at some theta (concrete: at once;
    traced: when the program runs); presets whose theta-gradient ignores Phi(theta)."""
    C_ = bj.constraints
    phi, theta = jnp.zeros(2), jnp.zeros(2)
    with pytest.raises(TypeError, match=r"halfspace: `b` is a function of theta, but `b\(theta\)` failed"):
        C_.halfspace(jnp.ones(2), lambda theta, phi: 1.0).inequality(theta, phi)
    with pytest.raises(TypeError, match=r"box: `upper\(theta\)` must give an array"):
        C_.box(0.0, lambda theta: None).project_at(theta, phi)
    with pytest.raises(ValueError, match="halfspace: the set depends on theta.*project_at"):
        HALF.project(phi)
    with pytest.raises(ValueError, match="lower_inequality.*halfspace: `b` is a function of theta"):
        problem(C_.halfspace(jnp.ones(2), lambda: 1.0)).validate(theta, phi, NONE)
    moving = C_.box(lambda theta: theta, 1.0)        # empty where theta > 1
    np.testing.assert_allclose(moving.project_at(jnp.array([0.5, 0.0]), jnp.full(2, -1.0)), [0.5, 0.0])
    with pytest.raises(ValueError, match="box: lower > upper"):
        moving.project_at(jnp.array([2.0, 0.0]), phi)
    with pytest.raises(Exception, match="box: lower > upper"):
        jax.block_until_ready(eqx.filter_jit(moving.project_at)(jnp.array([2.0, 0.0]), phi))
    with pytest.raises(ValueError, match="l2_ball: radius must be a positive"):
        C_.l2_ball(lambda theta: theta[0]).project_at(jnp.array([-1.0, 0.0]), phi)
    for name in ("f2sa", "bome", "pzobo", "pessimistic_penalty"):
        with pytest.raises(ValueError, match=f"^{name}: .*depends on theta.*bsg_constrained"):
            getattr(bj.algorithms, name)(problem(HALF))
    with pytest.raises(ValueError, match="depends on theta"):
        bj.algorithms.f2sa(problem(C_.halfspace(jnp.ones(2), 1.0)), lower_set=HALF)
    # a theta-dependent projection step rule without theta: the same clear error when it steps
    rule = bj.algorithms.steps.StepRule(learning_rate=jnp.asarray(0.1), projection=bj.constraints.ProjectionAt(HALF))
    with pytest.raises(ValueError, match="depends on theta"):
        rule.build().update(phi, rule.build().init(phi), phi)
    step, _ = rule.build(theta).update(jnp.full(2, -30.0), rule.build(theta).init(phi), phi)   # to (3, 3), projected
    np.testing.assert_allclose(phi + step, [0.5, 0.5], atol=1e-15)

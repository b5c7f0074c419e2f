"""Reformulation methods on problems of their class with closed-form answers, and constrained lower
levels in the value-function family.

- Box-constrained LL with many minima (flat in one coordinate): f2sa, bome, pbgd, pdbo, vf_penalty
  reach the optimistic solution theta* = 2, phi* = (1, 1) (the unconstrained problem's is 2.5,
  (2.5, 2)); pzobo reaches theta* of a box-constrained strongly convex LL.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

NONE = (None, None)


def _run(alg, theta0, phi0, steps):
    @jax.jit
    def go(theta0):
        state = alg.init(theta0, phi0, jax.random.PRNGKey(0), NONE)
        return bj.run(alg, state, NONE, num_steps=steps)
    return go(theta0)


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
VALUE_FUNCTION_BOX = {
    "f2sa": dict(upper_lr=0.1, lower_lr=0.05, inner_lr=0.5, lower_steps=5, penalty=10.0, penalty_rate=0.0,
                 batch_size=None),
    "bome": dict(upper_lr=0.1, inner_lr=0.5),
    "pbgd": dict(upper_lr=0.5, inner_lr=0.5, gamma=10.0, gamma_max=10.0),
    "vf_penalty": dict(upper_lr=0.05, lower_lr=0.05, inner_lr=0.5, penalty=10.0),
    "pdbo": dict(upper_lr=0.05, lower_lr=0.05, inner_lr=0.5, dual_lr=1.0, dual_max=10.0),
}


@pytest.mark.parametrize("name", sorted(VALUE_FUNCTION_BOX))
def test_value_function_presets_reach_the_optimistic_solution_of_a_box_constrained_flat_lower_level(name):
    problem = BOX.problem(_box_upper, _box_flat_lower)
    alg = bj.algorithms.get(name)(problem, **VALUE_FUNCTION_BOX[name])
    state, hist = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 300)
    assert bool((hist["status"] == bj.status.OK).all())
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    np.testing.assert_allclose(state.phi, BOX_PHI, atol=1e-6)
    assert float(jnp.max(state.z)) <= 1.0 and float(jnp.min(state.z)) >= 0.0   # the tracker stays in Phi


def test_lower_set_on_an_unconstrained_problem_and_a_bare_projection():
    """`lower_set=` restricts the LL of a problem given without constraints (the same answer);
    a constrained problem not built from a set takes a projection; without one it is refused."""
    plain = bj.BilevelProblem(_box_upper, _box_flat_lower)
    alg = bj.algorithms.vf_penalty(plain, lower_set=BOX, **VALUE_FUNCTION_BOX["vf_penalty"])
    state, _ = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 300)
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    free = bj.algorithms.vf_penalty(plain, **VALUE_FUNCTION_BOX["vf_penalty"])   # no set: the other answer
    state, _ = _run(free, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 1000)
    assert abs(float(state.theta[0]) - 2.5) < 0.05   # 2.476: the O(1/penalty) bias at penalty 10
    bare = bj.BilevelProblem(_box_upper, _box_flat_lower, lower_inequality=lambda t, p: jnp.concatenate([-p, p - 1]))
    with pytest.raises(ValueError, match="bome: .*lower_set="):
        bj.algorithms.bome(bare)
    alg = bj.algorithms.bome(bare, lower_set=lambda p: jnp.clip(p, 0.0, 1.0), **VALUE_FUNCTION_BOX["bome"])
    state, _ = _run(alg, jnp.array([-1.0]), jnp.array([0.3, 0.2]), 300)
    np.testing.assert_allclose(state.theta, BOX_THETA, atol=1e-5)
    with pytest.raises(ValueError, match="pbgd: penalty='gradient' .*unconstrained"):
        bj.algorithms.pbgd(plain, penalty="gradient", lower_set=BOX)
    with pytest.raises(ValueError, match="pbgd: penalty='gradient'"):
        bj.algorithms.pbgd(BOX.problem(_box_upper, _box_flat_lower), penalty="gradient")


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
    ts = quad.theta_star()
    np.testing.assert_allclose(state.theta, ts, rtol=0, atol=1e-10 * float(jnp.linalg.norm(ts)))
    ps = quad.phi_star(ts)
    np.testing.assert_allclose(state.phi, ps, atol=1e-10)
    hess = jax.hessian(quad.problem.f_lower, 1)(ts, ps, quad.data[1])
    adjoint = jnp.linalg.solve(hess, jax.grad(quad.problem.f_upper, 1)(ts, ps, quad.data[0]))
    np.testing.assert_allclose(state.multiplier, -adjoint, atol=1e-9)
    # G-PBGD (no multiplier) at the same penalty stays O(1/gamma) away
    gpbgd = bj.algorithms.pbgd(quad.problem, penalty="gradient", gamma=1.0, gamma_max=1.0)
    state, _ = _run_data(gpbgd, quad, 2000)
    assert float(jnp.linalg.norm(state.theta - ts) / jnp.linalg.norm(ts)) > 1e-2


def _run_data(alg, q, steps):
    @jax.jit
    def go(theta0):
        state = alg.init(theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        return bj.run(alg, state, q.data, num_steps=steps)
    return go(q.theta0)

"""Presets called with the problem only (`bj.algorithms.defaults`): step sizes, loop lengths and
penalties from the curvatures estimated at init, full batch when the default batch size does not
fit the data; or an error naming the arguments to pass.

Three well-conditioned problems in float64, theta* never from the code under test: a quadratic
with LL spectrum [1, 100] (condition number 100, L_g = 100: the unscaled default lower_lr = 0.1
would diverge) and UL spectrum [1, 10] (closed form), a ridge HPO (theta* = -0.90 by Newton on
the closed-form hypergradient) and a logistic HPO (theta* = -3.34 by L-BFGS on the value).
Every preset of `bj.algorithms.ALGORITHMS` either reaches theta* within 5e-2 relative with an OK
status, or raises an error naming an argument (`RAISES`). The fast test runs each preset on one
problem (`FAST`: where it converges soonest); the slow one crosses every preset with the three
(`python -m benchmarks.defaults` prints the same cross with the step at which each run reached 5e-2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from benchmarks.defaults import CASES
from bilevel_jax.algorithms import defaults as D

NAMES = sorted(bj.algorithms.ALGORITHMS)
QUAD, RIDGE, LOGISTIC = range(3)
# (preset, problem) -> the argument its error names; every other pair must reach theta*
RAISES = {**{(name, case): "upper_lr=" for name in D.NO_DEFAULTS for case in range(3)},
          **{(name, QUAD): "lower_lr=" for name in ("cdb", "ebsa", "optimality_penalty")}}
# the fast test: one preset of each kind of default (a Neumann series made deterministic, F2SA's inner
# loop, a joint penalty step with and without V-PBGD's scaling, pzobo's directions, smoothing_pg's
# adaptive penalty, an own default checked at init, the raising ones; aid_bio and soba below), on a
# problem where it got within 5e-2 soonest (benchmarks/defaults.py, recorded every 500 steps)
FAST = {"bsa": (RIDGE, 500), "f2sa": (RIDGE, 500), "pbgd": (LOGISTIC, 500), "vf_penalty": (LOGISTIC, 500),
        "pzobo": (RIDGE, 500), "smoothing_pg": (RIDGE, 500), "optimality_penalty": (RIDGE, 500),
        "cdb": (QUAD, 1),                                      # init raises
        **{name: (RIDGE, 1) for name in D.NO_DEFAULTS}}       # construction raises
STEPS = 10_000   # the slow cross (the slowest measured: bome on the quadratic, 5e-2 from step 6,500 on)


@pytest.fixture(scope="module")
def cases():
    return [make() for make in CASES]


def _error(name, case, steps):
    alg = bj.algorithms.get(name)(case.problem)
    state = alg.init(case.theta0, case.phi0, jax.random.PRNGKey(0), case.data)
    state, history = bj.run(alg, state, case.data, num_steps=steps)
    assert int(history["status"][-1]) == bj.status.OK, (name, case.name, bj.status.describe(int(history["status"][-1])))
    theta_star = np.ravel(case.theta_star)   # NumPy: no eager operation compiled per shape
    return float(np.linalg.norm(np.ravel(state.theta) - theta_star) / np.linalg.norm(theta_star))


def _check(name, index, case, steps):
    if (name, index) in RAISES:
        with pytest.raises(ValueError, match=f"^{name}: .*{RAISES[name, index]}"):
            _error(name, case, steps)
        return
    assert _error(name, case, steps) < 5e-2, name


@pytest.mark.parametrize("name", sorted(FAST))
def test_presets_with_defaults_reach_theta_star_or_raise(cases, name):
    index, steps = FAST[name]
    _check(name, index, cases[index], steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_preset_with_defaults_on_three_problems(cases, name):
    for index, case in enumerate(cases):
        _check(name, index, case, STEPS)


@pytest.mark.parametrize("name", ["aid_bio", "soba"])
def test_defaults_reach_theta_star_on_the_ill_scaled_quadratic(cases, name):
    assert _error(name, cases[QUAD], 600) < 5e-2


def test_explicit_step_sizes_are_used_as_given(cases):
    case = cases[QUAD]
    alg = bj.algorithms.soba(case.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    assert not isinstance(alg, D.Normalized)
    # the quadratic's L_g = 100: the unscaled default diverges, which the rescaling prevents
    state = alg.init(case.theta0, case.phi0, jax.random.PRNGKey(0), case.data)
    state, history = bj.run(alg, state, case.data, num_steps=50)
    assert int(history["status"][-1]) != 0


def _dense(q, theta):
    """The `Curvatures` of a quadratic bilevel problem at theta, phi*(theta) from dense Hessians."""
    lower, upper = q.data[1], q.data[0]
    g = lambda t, p: q.problem.f_lower(t, p, lower)
    f = lambda t, p: q.problem.f_upper(t, p, upper)
    eig = jnp.linalg.eigvalsh

    @jax.jit
    def dense(theta):
        phi = q.phi0 - jnp.linalg.solve(jax.hessian(g, 1)(theta, q.phi0), jax.grad(g, 1)(theta, q.phi0))   # quadratic
        A, J = jax.hessian(g, 1)(theta, phi), jax.jacfwd(jax.grad(g, 1), 0)(theta, phi)
        hess_F = jax.hessian(lambda t: f(t, phi + jnp.linalg.solve(A, J @ (theta - t))))(theta)
        return D.Curvatures(eig(jax.hessian(g, 1)(theta, q.phi0))[-1], eig(A)[0], jnp.abs(eig(hess_F)).max(),
                            eig(J.T @ jnp.linalg.solve(A, J))[-1], jnp.abs(eig(jax.hessian(f, 0)(theta, phi))).max(),
                            jnp.abs(eig(jax.hessian(f, 1)(theta, phi))).max())
    return dense(theta)


def test_curvatures_match_dense_eigenvalues(cases):
    q = cases[QUAD]
    estimate, dense = D.curvatures(q.problem, q.theta0, q.phi0, q.data), _dense(q, q.theta0)
    for field, a, b in zip(D.Curvatures._fields, estimate, dense):
        # 30 power iterations: 5e-3 on L_F, whose top eigenvalues are 1.011 and 1.004 (a step size needs
        # the scale, not the digits), 1e-6 on the others
        assert abs(float(a) / float(b) - 1) < (1e-2 if field == "upper" else 1e-5), field
    # the rescaled problem's: L_g = 10, L_F = 0.2, and mu_g, M scale with f_lower, f_tt and f_pp with f_upper
    r, s = D.rescaled(estimate), D.scales_at(q.problem, q.theta0, q.phi0, q.data)
    np.testing.assert_allclose([r.lower, r.upper, r.lower_min, r.upper_phi],
                               [D.LOWER_SCALE, D.UPPER_SCALE, s.lower * estimate.lower_min, s.upper * estimate.upper_phi],
                               rtol=1e-12)


def test_zero_or_non_finite_curvature_raises_or_flags(cases):
    """An LL linear in phi (L_g = 0): init raises naming the step sizes; traced (no concrete values
    to test), the factors are NaN and the run reports NONFINITE at its first step."""
    q = cases[QUAD]
    flat = bj.BilevelProblem(q.problem.f_upper, lambda t, p, b: jnp.sum(p) * jnp.sum(t))
    alg = bj.algorithms.soba(flat)
    with pytest.raises(ValueError, match=r"soba: .*L_g = 0.*pass the step sizes \(upper_lr=, lower_lr=\)"):
        alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    assert np.isnan(D.scales_at(flat, q.theta0, q.phi0, q.data).lower)
    # init traced in the run's jit (one program)
    _, history = jax.jit(lambda t: bj.run(alg, alg.init(t, q.phi0, jax.random.PRNGKey(0), q.data), q.data,
                                          num_steps=2))(q.theta0)
    assert int(history["status"][-1]) & bj.status.NONFINITE


def test_loop_length_meets_its_tolerance():
    """K = ceil(ln TOL / ln(1 - mu/L)) at least MIN_STEPS; above MAX_STEPS an error naming the argument."""
    one = jnp.ones(())
    for kappa in (2.0, 100.0, 1000.0):
        c = D.Curvatures(10 * one, 10 / kappa * one, one, one, one, one)
        k = D.loop_length("stocbio", c, "neumann_steps")
        assert k >= D.MIN_STEPS and (1 - 1 / kappa) ** k <= D.TOL
        assert k == D.MIN_STEPS or (1 - 1 / kappa) ** (k - 1) > D.TOL
    with pytest.raises(ValueError, match=r"stocbio: .*condition number L_g / mu_g = 1e\+04.*pass neumann_steps="):
        D.loop_length("stocbio", D.Curvatures(10 * one, 1e-3 * one, one, one, one, one), "neumann_steps")
    with pytest.raises(ValueError, match=r"f2sa: .*mu_g.*-1.*pass lower_steps="):
        D.loop_length("f2sa", D.Curvatures(10 * one, -one, one, one, one, one), "lower_steps")


def test_neumann_presets_choose_their_terms_and_sum_the_series_on_full_batches(cases, quad_stoch):
    """No warning: neumann_steps = K from mu_g / L_g at init; the HIA's random truncation (bsa)
    is replaced by its expectation on full batches, and kept (with K terms) on minibatches; a
    given neumann_steps is kept; init under jit cannot choose K and says so."""
    q = cases[QUAD]
    for name in ("stocbio", "bsa"):
        alg = bj.algorithms.get(name)(q.problem)
        state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        k = state.chosen["steps"]
        assert k == D.loop_length(name, state.curvatures, "neumann_steps") == 459   # mu_g / L_g = 1e-2
        solver = alg._at(state.curvatures, state.chosen, q.data).direction.solver
        assert type(solver) is bj.linear_solvers.Neumann and solver.steps == k
    stoch = quad_stoch   # the shared finite-sum quadratic (64 samples): no new problem to draw
    alg = bj.algorithms.bsa(stoch.problem, batch_size=16)
    state = alg.init(stoch.theta0, stoch.phi0, jax.random.PRNGKey(0), stoch.data)
    solver = alg._at(state.curvatures, state.chosen, stoch.data).direction.solver
    assert type(solver) is bj.linear_solvers.StochasticNeumann and solver.steps == state.chosen["steps"]
    alg = bj.algorithms.stocbio(q.problem, neumann_steps=7)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    assert alg._at(state.curvatures, state.chosen, q.data).direction.solver.steps == 7
    with pytest.raises(ValueError, match="stocbio: .*call init outside jit/vmap, or pass neumann_steps="):
        jax.jit(lambda t: bj.algorithms.stocbio(q.problem).init(t, q.phi0, jax.random.PRNGKey(0), q.data))(q.theta0)


def test_penalty_steps_stay_stable_along_the_ramp(cases):
    """F2SA: beta_k (f_pp + lambda_k L_g) = 1 and lambda_k rises to PENALTY over RAMP_STEPS outer steps,
    with phi_steps inner steps each (the schedule counts inner steps); the joint-step presets:
    xi (f_tt + lambda M) and beta (f_pp + lambda L_g) = JOINT_STEP at every lambda, V-PBGD's
    direction divided by lambda included."""
    q = cases[RIDGE]
    alg = bj.algorithms.f2sa(q.problem)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    # the checks in NumPy (an eager jnp operation compiles once per operation and shape)
    c, inner = jax.device_get(D.rescaled(state.curvatures)), alg._at(state.curvatures, state.chosen, q.data)
    assert inner.phi_steps == inner.tracker_steps == state.chosen["steps"] == D.MIN_STEPS
    outer = np.array([0, 10, 500, D.RAMP_STEPS, 5 * D.RAMP_STEPS])
    lam = np.asarray(inner.multiplier.ramp(outer))
    np.testing.assert_allclose(lam, np.minimum(1 + (D.PENALTY - 1) * outer / D.RAMP_STEPS, D.PENALTY))
    beta = np.asarray(inner.lower.learning_rate(outer * inner.phi_steps + 3))
    np.testing.assert_allclose(beta * (c.upper_phi + lam * c.lower), 1.0, rtol=1e-12)
    for name in ("vf_penalty", "pdbo", "pbgd", "bome"):
        alg = bj.algorithms.get(name)(q.problem)
        state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        c, inner = jax.device_get(D.rescaled(state.curvatures)), alg._at(state.curvatures, state.chosen, q.data)
        lam = np.asarray(inner.upper.learning_rate.ramp(outer))
        scale = lam if inner.scale_upper else 1.0   # V-PBGD: the direction is divided by lambda
        xi = np.asarray(inner.upper.learning_rate(outer)) / scale
        beta = np.asarray(inner.lower.learning_rate(outer)) / scale
        np.testing.assert_allclose(xi * (np.maximum(c.upper_theta, c.upper) + lam * c.coupling), D.JOINT_STEP)
        np.testing.assert_allclose(beta * (c.upper_phi + lam * c.lower), D.JOINT_STEP)
        assert float(lam[-1]) == D.JOINT_PENALTY and inner.tracker_steps == D.MIN_STEPS, name


def test_presets_without_defaults_raise_naming_step_sizes(cases):
    for name in D.NO_DEFAULTS:
        with pytest.raises(ValueError, match=f"^{name}: built without step sizes, .*pass upper_lr= and lower_lr="):
            bj.algorithms.get(name)(cases[RIDGE].problem, batch_size=None)
        bj.algorithms.get(name)(cases[RIDGE].problem, upper_lr=0.1, lower_lr=0.1)   # with step sizes: as given
    # the own-defaults presets: init estimates L_g and refuses unstable default steps (L_g = 100 here)
    with pytest.raises(ValueError, match=r"cdb: .*lower_lr \* penalty \* L_g\^2 < 2.*L_g = 100.*gives 1e\+03"):
        bj.algorithms.cdb(cases[QUAD].problem).init(cases[QUAD].theta0, cases[QUAD].phi0, jax.random.PRNGKey(0),
                                                    cases[QUAD].data)


def test_pzobo_defaults_use_exact_directions_and_unroll_to_the_tolerance(cases):
    q = cases[QUAD]
    alg = bj.algorithms.pzobo(q.problem)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    inner = alg._at(state.curvatures, state.chosen, q.data)
    assert (inner.directions, inner.num_directions, inner.lower_steps) == ("orthogonal", 3, 459)
    assert math.isclose(float(inner.mu), math.sqrt(float(jnp.finfo(jnp.float64).eps)))
    big = bj.BilevelProblem(lambda t, p, b: jnp.sum(t ** 2) + jnp.sum(p ** 2), lambda t, p, b: jnp.sum((p - t[:3]) ** 2))
    with pytest.raises(ValueError, match=r"pzobo: .*dim\(theta\) = 12: pass num_directions="):
        bj.algorithms.pzobo(big).init(jnp.ones(12), jnp.zeros(3), jax.random.PRNGKey(0), (None, None))

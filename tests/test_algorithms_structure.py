"""What each preset computes, step by step: partial gradients (SignSGD + UL), the papers' schedule
exponents, the UL projection, SAGA memories per batch id, oracle counts per step, STABLE's
correction term, and clear errors on bad input.

Expected values come from closed forms or from `jax.grad`/`jax.jacfwd` of the objectives,
never from the code under test.
"""
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj



NAMES = sorted(bj.algorithms.ALGORITHMS)


@eqx.filter_jit
def _init(alg, theta0, phi0, data, seed=0):
    """`alg.init` as one compiled program (shared by equal configurations), not an eager dispatch per operation."""
    return alg.init(theta0, phi0, jax.random.PRNGKey(seed), data)


@eqx.filter_jit
def _history(alg, theta0, phi0, data, num_steps):
    """`alg.init`, then bj.run recording theta and phi after every step (row 0: the initial state),
    in one program."""
    state = alg.init(theta0, phi0, jax.random.PRNGKey(0), data)
    return bj.run(alg, state, data, num_steps=num_steps, eval_every=1,
                  eval_fn=lambda s, d: {"theta": s.theta, "phi": s.phi})


def _counts(info):
    return tuple(int(c) for c in info.oracles[:4])   # (lower_grads, upper_grads, hvps, cross); values: test_hessian_free


def test_registry_has_the_eighteen_presets():
    assert set(NAMES) == {"alternating", "ba", "bsa", "aid_bio", "stocbio", "amigo", "ttsa", "stable", "alset",
                          "soba", "saba", "srba", "mrbo", "sustain", "vrbo", "vrbo_single_loop", "fsla", "signsgd_ul", "momentum",
                          "lancbio", "subbio", "f2sa", "bome", "pbgd", "pdbo", "vf_penalty", "pzobo", "hjfbio", "bsg1",
                          "smoothing_pg", "optimality_penalty", "cdb", "ebsa"}
    for name in NAMES:
        assert bj.algorithms.get(name) is getattr(bj.algorithms, name)


def test_every_preset_says_which_sampling_its_paper_assumes():
    for name in NAMES:
        doc = " ".join(bj.algorithms.get(name).__doc__.split())
        assert "Sampling:" in doc or "i.i.d." in doc, name


# --------------------------------------------------------------------------- SignSGD + UL

def test_signsgd_ul_uses_the_partial_gradient_at_the_post_ll_point(quad):
    upper_lr, lower_lr, steps = 0.3, 0.05, 4
    alg = bj.algorithms.signsgd_ul(quad.problem, upper_lr=upper_lr, lower_lr=lower_lr, lower_steps=steps)
    theta0 = np.array([0.5, -1.0, 2.0, 0.1])
    phi0 = np.linspace(-1.0, 1.0, 6)

    @jax.jit
    def step_and_reference(theta0, phi0):
        """The preset's first step, and the reference written out (one program)."""
        new, info = alg.update(alg.init(theta0, phi0, jax.random.PRNGKey(0), quad.data), quad.data)
        # LL: T SignSGD steps at theta_k from phi_k, written out
        phi = phi0
        for _ in range(steps):
            phi = phi - lower_lr * jnp.sign(jax.grad(quad.problem.f_lower, 1)(theta0, phi, quad.data[1]))
        # UL: the partial gradient at (theta_k, phi_{k+1}), and the implicit one for contrast
        g_theta, g_phi = jax.grad(quad.problem.f_upper, (0, 1))(theta0, phi, quad.data[0])
        hess = jax.hessian(quad.problem.f_lower, 1)(theta0, phi, quad.data[1])
        jac = jax.jacfwd(jax.grad(quad.problem.f_lower, 1), 0)(theta0, phi, quad.data[1])
        return new, info, phi, g_theta, g_theta - jac.T @ jnp.linalg.solve(hess, g_phi)

    new, info, phi1, g_partial, g_implicit = jax.device_get(step_and_reference(theta0, phi0))
    np.testing.assert_allclose(new.phi, phi1, rtol=0, atol=1e-14)
    # theta_{k+1} = theta_k - alpha grad_theta f_upper(theta_k, phi_{k+1}): no implicit term
    np.testing.assert_allclose(new.theta, theta0 - upper_lr * g_partial, rtol=1e-13, atol=1e-14)
    assert np.linalg.norm(g_implicit - g_partial) > 1e-3   # (which would differ)
    # gradients only: T LL gradients, 1 UL gradient, no second-order products
    assert _counts(info) == (steps, 1, 0, 0)


# --------------------------------------------------------------------------- schedules

def _linear_problem():
    """Constant directions: grad_theta f_upper = c, grad_phi f_lower = w, no second-order terms
    (grad_phi f_upper = 0, A = 0, J = 0). Every update is then -step_k * (constant)."""
    c = np.array([1.0, -2.0])
    w = np.array([0.5, 1.5, -1.0])
    problem = bj.BilevelProblem(lambda theta, phi, batch: c @ theta, lambda theta, phi, batch: w @ phi)
    return problem, c, w


@pytest.mark.parametrize("name, kw, upper_exp, lower_exp", [
    ("ttsa", {}, 3 / 5, 2 / 5),
    ("ttsa", {"strongly_convex": True}, 1.0, 2 / 3),
    ("soba", {}, 3 / 5, 2 / 5),
    ("mrbo", {}, 1 / 3, 1 / 3),
    # BSA: c / sqrt(k + 1) with k the outer iteration, for the T LL steps of iteration k as well
    ("bsa", {"lower_steps": 3}, 1 / 2, 1 / 2),
])
def test_schedule_exponents_match_the_papers(name, kw, upper_exp, lower_exp):
    """The effective steps: alpha_k = upper_lr / (k+1)^a, beta_k = lower_lr / (k+1)^b per outer step k."""
    problem, c, w = _linear_problem()
    ll_steps = kw.get("lower_steps", 1)   # LL steps per outer step (SOBA/MRBO: one simultaneous step)
    upper_lr, lower_lr = 0.3, 0.2
    alg = bj.algorithms.get(name)(problem, upper_lr=upper_lr, lower_lr=lower_lr, batch_size=None, **kw)
    _, hist = jax.device_get(_history(alg, np.zeros(2), np.zeros(3), (None, None), num_steps=8))
    k = np.arange(8.0)
    # theta_{k+1} - theta_k = -alpha_k c,  phi_{k+1} - phi_k = -beta_k w
    alpha = -np.diff(hist["theta"], axis=0) @ c / (c @ c)
    beta = -np.diff(hist["phi"], axis=0) @ w / (w @ w) / ll_steps
    np.testing.assert_allclose(alpha, upper_lr / (k + 1) ** upper_exp, rtol=1e-12)
    np.testing.assert_allclose(beta, lower_lr / (k + 1) ** lower_exp, rtol=1e-12)
    # the exponent read off the first two updates
    assert math.isclose(-math.log2(alpha[1] / alpha[0]), upper_exp, rel_tol=1e-10)
    assert math.isclose(-math.log2(beta[1] / beta[0]), lower_exp, rel_tol=1e-10)


def test_inverse_power_schedule():
    s = bj.schedules.inverse_power(0.5, 0.4)
    assert s.exponent == 0.4
    np.testing.assert_allclose(eqx.filter_jit(s)(np.arange(4)), 0.5 / np.arange(1, 5) ** 0.4, rtol=1e-14)
    with pytest.raises(ValueError, match="p must lie in"):
        bj.schedules.inverse_power(0.5, 1.5)
    with pytest.raises(ValueError, match="c must be a positive step size"):
        bj.schedules.inverse_power(-0.5, 0.5)


# --------------------------------------------------------------------------- UL projection

@eqx.filter_jit
def _projected_gd_solution(q, lo, hi):
    """min_{theta in [lo, hi]^d} F(theta) by projected GD on the closed-form grad F (one program
    for every problem of the same shapes)."""
    step = 1.0 / jnp.linalg.eigvalsh(q.hessian()).max()
    body = lambda _, t: jnp.clip(t - step * q.grad(t), lo, hi)
    return jax.lax.fori_loop(0, 2000, body, jnp.zeros_like(q.theta0))


@pytest.mark.parametrize("name, kw", [
    ("aid_bio", dict(upper_lr=0.5, lower_lr=1.0)),
    ("stable", dict(upper_lr=0.5, lower_lr=1.0)),
    # TTSA's HIA is exact on an identity LL Hessian with N = 1, eta = 1
    ("ttsa", dict(upper_lr=0.5, lower_lr=1.0, upper_decay=0.0, lower_decay=0.0, neumann_steps=1, neumann_eta=1.0)),
])
def test_upper_projection_keeps_theta_in_the_box(quad, name, kw):
    q = quad
    if name == "ttsa":   # LL Hessian = I
        lower = {**q.data[1], "H": jax.device_put(np.broadcast_to(np.eye(6), q.data[1]["H"].shape))}
        q = q._replace(data=(q.data[0], lower), means={**q.means, "H": jax.device_put(np.eye(6))})
    lo, hi = 0.0, 0.5   # theta* has components above 0.5: the constraint is active
    assert np.any(np.asarray(q.theta_star()) > hi)
    problem = bj.BilevelProblem(q.problem.f_upper, q.problem.f_lower, project_upper=lambda t: jnp.clip(t, lo, hi))
    alg = bj.algorithms.get(name)(problem, batch_size=None, **kw)
    theta0 = np.array([-1.0, 2.0, 3.0, -2.0])   # outside: init projects it
    thetas = np.asarray(_history(alg, theta0, q.phi0, q.data, num_steps=100)[1]["theta"])
    assert np.all((thetas >= lo) & (thetas <= hi)), "theta left Theta at some step"
    assert np.any(thetas[1:] == hi)  # the projection was active along the run
    # and the iterates converge to the constrained minimiser of F
    np.testing.assert_allclose(thetas[-1], _projected_gd_solution(q, lo, hi), atol=1e-6)


# --------------------------------------------------------------------------- SABA memories

def _raw_oracles(problem, theta, phi, v, upper_batch, lower_batch):
    """The five SABA oracles from jax.grad / jax.jacfwd (independent of bilevel_jax.oracles)."""
    g_theta, g_phi = jax.grad(problem.f_upper, (0, 1))(theta, phi, upper_batch)
    grad_phi = jax.grad(problem.f_lower, 1)(theta, phi, lower_batch)
    hess = jax.hessian(problem.f_lower, 1)(theta, phi, lower_batch)
    jac = jax.jacfwd(jax.grad(problem.f_lower, 1), 0)(theta, phi, lower_batch)   # (d_phi, d_theta)
    return ({"g_theta": g_theta, "g_phi": g_phi},
            {"grad_phi": grad_phi, "hvp": hess @ v, "cross": jac.T @ v})


def _table(state, level):
    """The SAGA table of `level` ("upper"/"lower") as {oracle name: rows} (typed memories)."""
    table = getattr(state.estimator, level).table._asdict()
    return {k: np.asarray(v) for k, v in table.items() if v is not None}


def test_saba_updates_only_the_memory_row_of_the_drawn_batch(quad_stoch):
    b = 16
    q = quad_stoch
    n_batches = 64 // b
    alg = bj.algorithms.saba(q.problem, upper_lr=0.2, lower_lr=0.2, batch_size=b)
    state = _init(alg, q.theta0, q.phi0, q.data, seed=4)
    update = eqx.filter_jit(alg.update)
    # the pre-step point's oracles on batch `idx` of each level (contiguous partition)
    batch = lambda data, idx: jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, idx * b, b), data)
    oracles = jax.jit(lambda s, i, j: _raw_oracles(q.problem, s.theta, s.phi, s.v, batch(q.data[0], i),
                                                   batch(q.data[1], j)))
    for _ in range(3):  # move away from the zero initialisation (v = 0 makes A v, J v vanish)
        state, _ = update(state, q.data)
    seen = {"upper": set(), "lower": set()}
    for _ in range(6):
        new, _ = update(state, q.data)
        ids = []
        for level in ("upper", "lower"):
            old_mem = _table(state, level)
            new_mem = _table(new, level)
            changed = np.zeros(n_batches, bool)
            for key in old_mem:
                assert new_mem[key].shape[0] == n_batches
                changed |= np.any((old_mem[key] != new_mem[key]).reshape(n_batches, -1), axis=1)
            assert changed.sum() == 1, (level, changed)
            ids.append(int(np.flatnonzero(changed)[0]))
            seen[level].add(ids[-1])
        expected = oracles(state, *ids)
        for level, idx, raw in zip(("upper", "lower"), ids, expected):
            new_mem = _table(new, level)
            mean = {k: v for k, v in getattr(new.estimator, level).mean._asdict().items() if v is not None}
            assert set(raw) == set(new_mem)
            for key, value in raw.items():
                np.testing.assert_allclose(new_mem[key][idx], value, rtol=1e-10, atol=1e-12)
                # the running mean is the mean of the table (zero initialisation)
                np.testing.assert_allclose(mean[key], new_mem[key].mean(0),
                                           rtol=1e-10, atol=1e-12)
        state = new
    assert len(seen["upper"]) > 1 and len(seen["lower"]) > 1  # the drawn ids do vary


def test_saba_default_memories_start_at_the_initial_point(quad_stoch):
    """SAGA initialisation m_i = oracle at z_0 on batch i, S = mean: the first step's estimate is
    new - m_i + S = S, the full-data oracles (equal blocks of a mean objective), so the first
    SABA step is the full-batch SOBA step, by hand: with v_0 = 0,
        theta_1 = theta_0 - gamma grad_theta f_u,  phi_1 = phi_0 - rho grad_phi f_l,  v_1 = rho grad_phi f_u."""
    q = quad_stoch
    gamma, rho = 0.2, 0.3
    alg = bj.algorithms.saba(q.problem, upper_lr=gamma, lower_lr=rho, batch_size=16)
    state = _init(alg, q.theta0, q.phi0, q.data, seed=4)   # (the program of the test above, as is its update's)
    np.testing.assert_allclose(np.asarray(state.estimator.upper.table.g_theta).mean(0),
                               state.estimator.upper.mean.g_theta, rtol=1e-12)
    new, _ = eqx.filter_jit(alg.update)(state, q.data)
    (g_theta, g_phi), grad_phi = jax.jit(lambda t, p, d: (jax.grad(q.problem.f_upper, (0, 1))(t, p, d[0]),
                                                          jax.grad(q.problem.f_lower, 1)(t, p, d[1])))(
        q.theta0, q.phi0, q.data)
    np.testing.assert_allclose(new.theta, q.theta0 - gamma * g_theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new.phi, q.phi0 - rho * grad_phi, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new.v, rho * g_phi, rtol=1e-12, atol=1e-14)
    # with zero memories the first step is new - 0 + 0: the minibatch oracle, not the full one
    zero = bj.algorithms.saba(q.problem, upper_lr=gamma, lower_lr=rho, batch_size=16, saga_init="zero")
    first, _ = eqx.filter_jit(lambda d: zero.update(zero.init(q.theta0, q.phi0, jax.random.PRNGKey(4), d), d))(q.data)
    assert np.abs(np.asarray(first.phi) - np.asarray(new.phi)).max() > 1e-6


# --------------------------------------------------------------------------- oracle counts

# Every preset's reported counts are its traced oracle calls (tests/test_oracle_counts.py, at a
# recursion step) and the per-step costs sum to bj.run's totals (test_algorithms_convergence.py); here
# the SARAH refresh, which a count of calls does not see.
def test_sarah_refresh_costs_one_pass_over_the_data(quad_stoch):
    """SRBA: every `period` steps the full-data refresh (n / b minibatch oracles per level), else
    the recursion (2 evaluations)."""
    b, period = 16, 3
    alg = bj.algorithms.srba(quad_stoch.problem, batch_size=b, period=period)
    state = _init(alg, quad_stoch.theta0, quad_stoch.phi0, quad_stoch.data)
    update = eqx.filter_jit(alg.update)
    passes = 64 // b
    for k in range(2 * period + 1):
        state, info = update(state, quad_stoch.data)
        assert _counts(info) == ((passes,) * 4 if k % period == 0 else (2, 2, 2, 2)), k


# --------------------------------------------------------------------------- STABLE correction

def test_stable_correction_tracks_phi_star(quad):
    """From phi_0 = phi*(theta_0) with a negligible LL step, phi_{k+1} = phi_k - A^{-1} J^T (theta_{k+1} - theta_k)
    equals phi*(theta_{k+1}) on a quadratic (phi* is affine in theta)."""
    alg = bj.algorithms.stable(quad.problem, batch_size=None, upper_lr=0.5, lower_lr=1e-12,
                               linear_solver=bj.linear_solvers.cg(10))
    theta0 = np.array([2.0, -1.0, 0.5, 3.0])
    _, hist = _history(alg, theta0, quad.phi_star(theta0), quad.data, num_steps=6)
    phi_stars = np.asarray(jax.vmap(quad.phi_star)(hist["theta"]))
    thetas, phis = np.asarray(hist["theta"]), np.asarray(hist["phi"])
    err = np.linalg.norm(phis - phi_stars, axis=1) / np.linalg.norm(phi_stars, axis=1)
    assert err.max() < 1e-10, err
    # the test is not vacuous: theta and phi*(theta) moved a lot
    assert np.linalg.norm(phi_stars[-1] - phi_stars[0]) > 1e-2
    # and the hypergradient step was exact (phi = phi*): theta follows GD on F
    np.testing.assert_allclose(thetas[1], theta0 - 0.5 * quad.grad(theta0), rtol=1e-9)


# --------------------------------------------------------------------------- bad input

def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown algorithm 'nope'\. Valid names: .*aid_bio.*soba"):
        bj.algorithms.get("nope")
    with pytest.raises(ValueError, match=r"unknown algorithm 'sobaa'\. Did you mean 'soba'\?"):
        bj.algorithms.get("sobaa")


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_errors_before_tracing(quad_stoch, name):
    q = quad_stoch
    make = bj.algorithms.get(name)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match=f"{name}: upper_lr must be a positive step size"):
            make(q.problem, upper_lr=bad)
        with pytest.raises(ValueError, match=f"{name}: lower_lr must be a positive step size"):
            make(q.problem, lower_lr=bad)
    with pytest.raises(TypeError, match=f"{name}: upper_opt must be an optax GradientTransformation"):
        make(q.problem, upper_opt="adam")
    # without step sizes, alternating, signsgd_ul and bsg1 raise (bj.algorithms.defaults.NO_DEFAULTS)
    extra = dict(upper_lr=0.1, lower_lr=0.1) if name in bj.algorithms.defaults.NO_DEFAULTS else {}
    alg = make(q.problem, batch_size=16, **extra)
    key = jax.random.PRNGKey(0)
    # a key that is not a PRNG key
    for bad_key in (0, jnp.zeros(2), None):
        with pytest.raises(TypeError, match="key must be a PRNG key"):
            alg.init(q.theta0, q.phi0, bad_key, q.data)
    # batch size larger than the data
    big = make(q.problem, batch_size=100, **extra)
    with pytest.raises(ValueError, match=r"batch_size=100 is larger than upper data's 64 samples"):
        big.init(q.theta0, q.phi0, key, q.data)
    # data leaves with different leading sizes
    upper, lower = q.data
    ragged = ({**upper, "p": upper["p"][:10]}, lower)
    with pytest.raises(ValueError, match="must share a leading sample axis"):
        alg.init(q.theta0, q.phi0, key, ragged)
    # data that is not an (upper, lower) pair
    with pytest.raises(TypeError, match=r"data must be a pair \(upper_data, lower_data\)"):
        alg.init(q.theta0, q.phi0, key, [upper])


def test_bad_input_in_update_is_caught_at_trace_time(quad_stoch):
    q = quad_stoch
    alg = bj.algorithms.soba(q.problem, batch_size=100, upper_lr=0.1, lower_lr=0.1)   # step sizes: init needs no data
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0))   # no data: nothing to check yet
    with pytest.raises(ValueError, match="is larger than upper data's 64 samples"):
        eqx.filter_jit(alg.update)(state, q.data)
    alg = bj.algorithms.stable(q.problem, batch_size=100, upper_lr=0.1, lower_lr=0.1)
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="stable: built without step sizes, init estimates them on the data"):
        bj.algorithms.stable(q.problem, batch_size=100).init(q.theta0, q.phi0, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="is larger than upper data's 64 samples"):
        eqx.filter_jit(alg.update)(state, q.data)


def test_bad_preset_hyperparameters(quad):
    p = quad.problem
    with pytest.raises(ValueError, match="momentum must lie in"):
        bj.algorithms.fsla(p, momentum=1.5)
    with pytest.raises(ValueError, match="momentum must lie in"):
        bj.algorithms.mrbo(p, momentum=1.0)
    with pytest.raises(ValueError, match="upper_momentum must lie in"):
        bj.algorithms.momentum(p, upper_momentum=-0.1)
    with pytest.raises(ValueError, match="v_lr must be a positive step size"):
        bj.algorithms.soba(p, v_lr=0.0)
    with pytest.raises(ValueError, match="neumann_eta must be a positive step size"):
        bj.algorithms.stocbio(p, neumann_eta=-1.0)
    with pytest.raises(ValueError, match="lower_lr is used as the linear solver's step"):
        bj.algorithms.ttsa(p, lower_lr=bj.schedules.inverse_power(0.1, 0.4))
    with pytest.raises(TypeError, match="aid_bio: lower_steps must be a Python int"):
        bj.algorithms.aid_bio(p, lower_steps=2.5)
    # methods that need LL steps reject 0 (phi would never move)
    for name in ("amigo", "aid_bio", "stocbio", "ba", "bsa", "alternating", "signsgd_ul", "alset"):
        with pytest.raises(ValueError, match=f"{name}: lower_steps must be >= 1, got 0"):
            bj.algorithms.get(name)(p, lower_steps=0)
    with pytest.raises(ValueError, match="use sampler='partition'"):
        bj.algorithms.saba(p, sampler="iid")
    with pytest.raises(ValueError, match="unknown sampler"):
        bj.algorithms.soba(p, batch_size=8, sampler="random")
    with pytest.raises(TypeError, match="problem must be a bj.BilevelProblem"):
        bj.algorithms.stable(lambda: None)
    with pytest.raises(TypeError, match="problem must be a bj.BilevelProblem"):
        bj.algorithms.soba(lambda: None)


def test_a_float32_run_stays_float32_under_x64(quad_stoch):
    """The suite runs with x64 on; a float32 problem must keep float32 iterates and residuals (a
    float64 penalty weight once promoted theta and broke the scan's carry). The shared finite-sum
    quadratic cast to float32 (drawing a float32 one compiles its construction again)."""
    q = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x, np.float32)) if eqx.is_inexact_array(x) else x,
                               quad_stoch)   # (cast on the host: no program per leaf shape)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((q.data, q.theta0, q.phi0)))
    def run(alg):   # the run traced only: the dtypes of its outputs (init is concrete: it estimates step sizes)
        state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        return eqx.filter_eval_shape(lambda s: bj.run(alg, s, q.data, num_steps=2), state)

    for name in ("soba", "f2sa", "bome", "pdbo"):
        state, hist = run(bj.algorithms.get(name)(q.problem, batch_size=8))
        assert state.theta.dtype == state.phi.dtype == hist["residual_norm"].dtype == jnp.float32, name
    box = bj.constraints.box(jnp.zeros(6, jnp.float32), jnp.ones(6, jnp.float32))
    problem = box.problem(q.problem.f_upper, q.problem.f_lower, pessimistic=True)
    state, hist = run(bj.algorithms.pessimistic_penalty(problem, follower_steps=2, tracker_steps=2))
    assert state.theta.dtype == hist["residual_norm"].dtype == jnp.float32

"""Hypergradient estimators against closed forms (float64): implicit (dense, CG, both derivative
modes), unrolled (reverse/forward, checkpointed, truncated, T -> infinity), zero-IG; pytrees,
equinox Modules and vmap over seeds.

Each test jits one function holding the estimates it compares (compile time dominates); the
references are NumPy (closed forms) or plain loops inside the same jit.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers


@pytest.fixture(scope="module")
def ridge_scalar():
    """Ridge HPO with one scalar log-regularisation."""
    return bj.problems.ridge_hpo(jax.random.PRNGKey(2), per_feature=False)


def _theta(name, inst):
    rng = np.random.default_rng(3)
    shape = np.shape(inst.theta0)
    return rng.normal(size=shape) if name == "quad" else -1.0 + 0.5 * rng.normal(size=shape)


def closed_form(name, inst, theta):
    """(phi*, grad F, A, b) in NumPy: A = grad^2_phi f_lower, b = grad_phi f_upper at phi*."""
    if name == "quad":
        m = {k: np.asarray(v) for k, v in inst.means.items()}
        phi = -np.linalg.solve(m["H"], m["C"] @ theta + m["h"])
        dphi = -np.linalg.solve(m["H"], m["C"])
        b = m["P"] @ phi + m["S"] @ theta + m["p"]
        return phi, dphi.T @ b + m["S"].T @ phi + m["reg"] * theta, m["H"], b
    (xv, yv), (x, y) = (tuple(np.asarray(a) for a in d) for d in inst.data)
    a = x.T @ x / len(x) + np.diag(np.broadcast_to(np.exp(theta), x.shape[1:]))
    w = np.linalg.solve(a, x.T @ y / len(x))
    b = xv.T @ (xv @ w - yv) / len(xv)
    per_feature = -np.exp(theta) * w * np.linalg.solve(a, b)  # d w*/d theta_k = -A^-1 e_k e^theta_k w_k
    return w, (per_feature.sum() if np.ndim(theta) == 0 else per_feature), a, b


def unrolled_gd_closed_form(inst, theta, beta, T, K=None):
    """(phi_T, grad) of T GD steps on the quadratic LL from phi0, differentiating the last K:
    phi_t = phi_{t-1} - beta (H phi_{t-1} + C theta + h), so phi_T = phi* + (I - beta H)^T (phi0 - phi*)
    and, with phi_{T-K} held constant, d phi_T / d theta = -beta sum_{j<K} (I - beta H)^j C
    (the forward-mode unrolled recursion)."""
    m = {k: np.asarray(v) for k, v in inst.means.items()}
    step = np.eye(len(m["h"])) - beta * m["H"]
    phi_star = closed_form("quad", inst, theta)[0]
    phi_T = phi_star + np.linalg.matrix_power(step, T) @ (np.asarray(inst.phi0) - phi_star)
    Z = -beta * sum(np.linalg.matrix_power(step, j) for j in range(T if K is None else K)) @ m["C"]
    g_phi = m["P"] @ phi_T + m["S"] @ theta + m["p"]
    return phi_T, m["S"].T @ phi_T + m["reg"] * theta + Z.T @ g_phi


def sign_sgd_closed_form(inst, theta, lr, T):
    """(phi_T, grad_theta f_upper(theta, phi_T)) of T SignSGD steps on the quadratic LL."""
    m = {k: np.asarray(v) for k, v in inst.means.items()}
    phi = np.asarray(inst.phi0)
    for _ in range(T):
        phi = phi - lr * np.sign(m["H"] @ phi + m["C"] @ theta + m["h"])
    return phi, m["S"].T @ phi + m["reg"] * theta


def _close(actual, desired, rtol):
    """Relative closeness in norm (robust to coordinates that happen to be ~0)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert np.linalg.norm(actual - desired) <= rtol * np.linalg.norm(desired), (actual, desired)


# ---------------------------------------------------------------------------------- oracles
def test_oracles_match_quadratic_derivatives(quad):
    """f_lower = 1/2 phi'H phi + phi'C theta + h'phi: A v = H v, J v = C'v, J^T d = C d."""
    m = {k: np.asarray(v) for k, v in quad.means.items()}
    rng = np.random.default_rng(7)
    theta, phi, v, d = rng.normal(size=4), rng.normal(size=6), rng.normal(size=6), rng.normal(size=4)

    @jax.jit
    def run(theta, phi, v, d):
        out = {}
        for mode in ("rev", "fwd"):
            lin = bj.oracles.linearize_lower(quad.problem, theta, phi, quad.data[1], mode)
            out[mode] = (bj.oracles.grad_hvp_cross(quad.problem, theta, phi, v, quad.data[1], mode),
                         lin.cross_transpose(d))
        return out

    for mode, ((g, av, jv), jtd) in run(theta, phi, v, d).items():
        np.testing.assert_allclose(g, m["H"] @ phi + m["C"] @ theta + m["h"], rtol=1e-12, err_msg=mode)
        np.testing.assert_allclose(av, m["H"] @ v, rtol=1e-12, err_msg=mode)
        np.testing.assert_allclose(jv, m["C"].T @ v, rtol=1e-12, err_msg=mode)
        np.testing.assert_allclose(jtd, m["C"] @ d, rtol=1e-12, err_msg=mode)


# --------------------------------------------------------------------------------- implicit
@pytest.mark.parametrize("name", ["quad", "ridge", "ridge_scalar"])
def test_implicit_matches_closed_form(request, name):
    inst = request.getfixturevalue(name)
    theta = _theta(name, inst)
    phi, expected, a, b = closed_form(name, inst, theta)
    variants = [("dense", "rev"), ("cg", "rev"), ("cg", "fwd")]

    @jax.jit
    def estimates(theta, phi):
        solvers = {"dense": ls.dense(), "cg": ls.cg(maxiter=phi.size)}
        return [bj.hypergradient(inst.problem, theta, phi, inst.data, solvers[s], mode=mode) for s, mode in variants]

    out = dict(zip(variants, estimates(theta, phi)))
    v_star = np.linalg.solve(a, b)
    for (s, mode), (g, info) in out.items():
        assert np.shape(g) == np.shape(theta)
        _close(g, expected, 1e-8)
        _close(info.v, v_star, 1e-8)
        assert float(info.residual_norm) <= 1e-10 * np.linalg.norm(b)
        assert int(info.status) == bj.status.OK and int(info.solver.status) == bj.status.OK
    np.testing.assert_allclose(out["cg", "fwd"][0], out["cg", "rev"][0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out["cg", "fwd"][1].v, out["cg", "rev"][1].v, rtol=1e-12, atol=1e-14)


def test_fwd_equals_rev_for_dense(quad):
    theta = _theta("quad", quad)
    phi = closed_form("quad", quad, theta)[0] + 0.1  # away from phi*: the modes still agree
    g = jax.jit(lambda t, p: [bj.hypergradient(quad.problem, t, p, quad.data, ls.dense(), mode=m)[0]
                              for m in ("rev", "fwd")])(theta, phi)
    np.testing.assert_allclose(g[1], g[0], rtol=1e-12, atol=1e-14)


def test_stochastic_solver_mean_is_neumann_hypergradient(ridge):
    """stochastic_neumann with a fresh minibatch per factor (lower_sampler): g is affine in v, so
    E[g] is the neumann hypergradient on the full batch; checked within 5 standard errors."""
    theta = _theta("ridge", ridge)
    phi = closed_form("ridge", ridge, theta)[0]
    X, y = ridge.data[1]

    def sampler(key):
        idx = jax.random.randint(key, (10,), 0, X.shape[0])
        return X[idx], y[idx]

    n_terms, eta, m = 8, 0.2, 1024

    @jax.jit
    def estimates(theta, phi, key):
        g_ref, _ = bj.hypergradient(ridge.problem, theta, phi, ridge.data, ls.neumann(n_terms, eta))
        solver = ls.stochastic_neumann(n_terms, eta)
        one = lambda k: bj.hypergradient(ridge.problem, theta, phi, ridge.data, solver, key=k,
                                         lower_sampler=sampler)[0]
        return g_ref, jax.lax.map(one, jax.random.split(key, m))  # lax.map: compiles faster than a batched PRNG

    g_ref, gs = jax.device_get(estimates(theta, phi, jax.random.PRNGKey(4)))
    se = gs.std(0) / np.sqrt(m)
    assert se.min() > 0
    assert np.all(np.abs(gs.mean(0) - g_ref) <= 5 * se)


def test_warm_start_x0(quad):
    """x0 warm-starts the solver (one more matvec for CG): from v* itself, one iteration is exact;
    solvers without an initial point ignore it."""
    theta = _theta("quad", quad)
    phi, expected, a, b = closed_form("quad", quad, theta)
    v_star = np.linalg.solve(a, b)

    @jax.jit
    def estimates(theta, phi, x0):
        return [bj.hypergradient(quad.problem, theta, phi, quad.data, s, x0=x0)
                for s in (ls.cg(maxiter=1), ls.neumann(3, 0.1))] + \
            [bj.hypergradient(quad.problem, theta, phi, quad.data, ls.neumann(3, 0.1))]

    (g, info), (g_n, info_n), (g_n_cold, _) = estimates(theta, phi, v_star)
    _close(g, expected, 1e-10)
    _close(info.v, v_star, 1e-10)
    assert int(info.solver.num_matvecs) == 2
    np.testing.assert_array_equal(g_n, g_n_cold)
    assert int(info_n.solver.num_matvecs) == 3


# -------------------------------------------------------------------------- loud failures
def _toy_problem(kind):
    """phi in R^3, theta in R^3. "concave": f_lower = -0.5||phi||^2 + theta.phi (A = -I);
    "singular": f_lower ignores phi_3 (A = diag(1, 1, 0)) while grad_phi f_upper is nonzero there."""
    if kind == "concave":
        f_lower = lambda th, p, batch: -0.5 * jnp.sum(p ** 2) + th @ p
    else:
        f_lower = lambda th, p, batch: 0.5 * jnp.sum(p[:2] ** 2) - th[:2] @ p[:2]
    f_upper = lambda th, p, batch: 0.5 * jnp.sum((p - jnp.array([1.0, -2.0, 3.0])) ** 2) + 0.1 * th @ th
    return bj.BilevelProblem(f_upper, f_lower)


@pytest.mark.parametrize("kind", ["concave", "singular"])
def test_bad_lower_level_breaks_down_loudly(kind):
    """A concave or singular LL Hessian: cg and dense report BREAKDOWN and return NaN g and v,
    never zero, never finite."""
    problem = _toy_problem(kind)
    theta, phi = np.array([0.3, -0.2, 0.5]), np.array([0.1, 0.2, 0.3])

    @jax.jit
    def estimates(theta, phi):
        return [bj.hypergradient(problem, theta, phi, (None, None), s) for s in (ls.cg(maxiter=5), ls.dense())]

    for g, info in estimates(theta, phi):
        assert int(info.status) & bj.status.BREAKDOWN, bj.status.describe(info.status)
        assert int(info.solver.status) & bj.status.BREAKDOWN
        assert np.all(np.isnan(g)) and np.all(np.isnan(info.v))
        assert np.isnan(info.residual_norm)


@pytest.mark.parametrize("where", ["lower H", "lower C", "upper P"])
def test_nan_in_data_is_flagged(quad, where):
    """One NaN in the data (the LL Hessian: the matvec; the LL cross term: J v; the UL Hessian:
    b): the status has NONFINITE and g is NaN, with cg, dense and neumann."""
    theta = _theta("quad", quad)
    phi = closed_form("quad", quad, theta)[0]
    level, name = where.split()
    data = {"upper": dict(quad.data[0]), "lower": dict(quad.data[1])}
    data[level][name] = np.asarray(data[level][name]).copy()
    data[level][name].flat[0] = np.nan
    data = (data["upper"], data["lower"])

    @jax.jit
    def estimates(theta, phi, data):
        return [bj.hypergradient(quad.problem, theta, phi, data, s)
                for s in (ls.cg(maxiter=6), ls.dense(), ls.neumann(5, 0.1))]

    for g, info in estimates(theta, phi, data):
        assert int(info.status) & bj.status.NONFINITE, bj.status.describe(info.status)
        assert np.all(np.isnan(g))
        if name != "C":  # the linear solve itself saw the NaN
            assert np.all(np.isnan(info.v)) and int(info.solver.status) != bj.status.OK


# --------------------------------------------------------------------------------- unrolled
OPTIMIZERS = {"sgd": lambda: optax.sgd(1.0), "momentum": lambda: optax.sgd(0.3, momentum=0.9),
              "adam": lambda: optax.adam(0.05)}


def _unroll_with_state(inst, opt, theta, steps, phi, state):
    """Independent reference: a plain fori_loop of optax steps on f_lower."""
    def body(_, carry):
        phi, state = carry
        g = jax.grad(inst.problem.f_lower, argnums=1)(theta, phi, inst.data[1])
        updates, state = opt.update(g, state, phi)
        return optax.apply_updates(phi, updates), state

    return jax.lax.fori_loop(0, steps, body, (phi, state))


def test_unrolled_reverse_forward_checkpoint_agree(quad):
    """Heavy-ball LL steps (plain GD is checked against its closed form below)."""
    theta = _theta("quad", quad)
    opt = OPTIMIZERS["momentum"]()
    T = 15
    kw = dict(optimizer=opt, steps=T)

    def manual(th):
        phi_T, _ = _unroll_with_state(quad, opt, th, T, quad.phi0, opt.init(quad.phi0))
        return quad.problem.f_upper(th, phi_T, quad.data[0])

    @jax.jit
    def estimates(theta):
        return (bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, **kw),
                bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, mode="forward", **kw),
                bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, checkpoint=True, **kw),
                jax.jacfwd(manual)(theta))

    (g_rev, phi_rev), (g_fwd, phi_fwd), (g_ck, phi_ck), g_manual = estimates(theta)
    np.testing.assert_allclose(g_fwd, g_rev, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g_ck, g_rev, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_rev, g_manual, rtol=1e-10, atol=1e-12)  # forward-mode AD of a plain loop
    np.testing.assert_array_equal(phi_fwd, phi_rev)
    np.testing.assert_array_equal(phi_ck, phi_rev)


def test_unrolled_truncated_sgd_closed_form(quad):
    """truncate=K, T and None against the closed form of differentiating the last K GD steps."""
    theta = _theta("quad", quad)
    beta, T, K = 1.0, 12, 4
    kw = dict(optimizer=optax.sgd(beta), steps=T)

    @jax.jit
    def estimates(theta):
        return [bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, truncate=k, **kw)
                for k in (K, T, None)]

    (g_k, phi_k), (g_t, phi_t), (g_full, phi_full) = jax.device_get(estimates(theta))
    phi_T, expected_k = unrolled_gd_closed_form(quad, theta, beta, T, K)
    _, expected_full = unrolled_gd_closed_form(quad, theta, beta, T)
    np.testing.assert_allclose(phi_k, phi_T, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(phi_full, phi_k)
    np.testing.assert_array_equal(phi_t, phi_k)
    np.testing.assert_allclose(g_k, expected_k, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g_full, expected_full, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g_t, g_full, rtol=1e-12, atol=1e-14)
    assert np.linalg.norm(g_k - g_full) > 1e-3  # truncation does change the estimate


def test_unrolled_truncated_carries_optimizer_state(quad):
    """truncate=K differentiates only the last K steps of the same T-step trajectory: the
    optimizer state (here Adam's moments and count) after T-K steps is carried, not reset."""
    theta = _theta("quad", quad)
    opt = OPTIMIZERS["adam"]()
    T, K = 12, 4

    def reference(theta):
        start = _unroll_with_state(quad, opt, theta, T - K, quad.phi0, opt.init(quad.phi0))
        phi, state = jax.lax.stop_gradient(start)

        def tail(th):
            phi_T, _ = _unroll_with_state(quad, opt, th, K, phi, state)
            return quad.problem.f_upper(th, phi_T, quad.data[0]), phi_T

        return jax.grad(tail, has_aux=True)(theta)

    @jax.jit
    def estimates(theta):
        kw = dict(optimizer=opt, steps=T)
        return (bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, truncate=K, **kw),
                bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, **kw),
                reference(theta))

    (g_k, phi_k), (g_full, phi_full), (g_ref, phi_ref) = estimates(theta)
    np.testing.assert_allclose(phi_k, phi_full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(phi_ref, phi_full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_k, g_ref, rtol=1e-10, atol=1e-12)
    assert np.linalg.norm(g_k - g_full) > 1e-6


def test_unrolled_converges_to_implicit(quad):
    theta = _theta("quad", quad)
    steps = (10, 40, 160)

    @jax.jit
    def estimates(theta):
        return [bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data,
                                          optimizer=optax.sgd(1.0), steps=T)[0] for T in steps]

    expected = closed_form("quad", quad, theta)[1]
    errors = [np.linalg.norm(g - expected) / np.linalg.norm(expected) for g in estimates(theta)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-5, errors  # GD's error contracts like (1 - beta mu)^T = 0.9^T


# ------------------------------------------------------------------------------------ zero-IG
def test_zero_ig_equals_grad_through_signsgd(quad):
    theta = _theta("quad", quad)
    lr, T = 0.05, 10
    f_lower, f_upper = quad.problem.f_lower, quad.problem.f_upper
    upper, lower = quad.data

    def phi_T(th):
        step = lambda _, phi: phi - lr * jnp.sign(jax.grad(f_lower, argnums=1)(th, phi, lower))
        return jax.lax.fori_loop(0, T, step, quad.phi0)

    @jax.jit
    def estimates(theta):
        phi = phi_T(theta)
        return (bj.zero_ig_hypergradient(quad.problem, theta, quad.phi0, quad.data, lower_lr=lr, steps=T),
                bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data,
                                          optimizer=optax.sign_sgd(lr), steps=T),
                jax.grad(lambda th: f_upper(th, phi_T(th), upper))(theta),
                jax.grad(f_upper, argnums=0)(theta, phi, upper), phi)

    (g_z, phi_z), (g_u, phi_u), g_through, g_partial, phi = estimates(theta)
    np.testing.assert_allclose(phi_z, phi, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(phi_u, phi, rtol=1e-14, atol=1e-15)
    assert np.abs(np.asarray(phi) - np.asarray(quad.phi0)).max() > 0  # the LL did move
    for g in (g_z, g_u, g_through):  # d sign / dx = 0: only the partial gradient survives
        np.testing.assert_allclose(g, g_partial, rtol=1e-12, atol=1e-14)
    phi_np, g_np = sign_sgd_closed_form(quad, theta, lr, T)  # and both match a NumPy loop
    np.testing.assert_allclose(phi, phi_np, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_partial, g_np, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------ pytrees
def test_pytree_theta_and_phi(quad):
    """theta = {"a", "b"} and phi = (phi_1, phi_2), split from the quadratic problem's vectors:
    every estimator returns the split closed form."""
    def flat(theta, phi):
        return jnp.concatenate([theta["a"], theta["b"]]), jnp.concatenate(phi)

    problem = bj.BilevelProblem(lambda t, p, b: quad.problem.f_upper(*flat(t, p), b),
                                lambda t, p, b: quad.problem.f_lower(*flat(t, p), b))
    split_theta = lambda t: {"a": t[:1], "b": t[1:]}
    split_phi = lambda p: (p[:2], p[2:])
    theta = _theta("quad", quad)
    phi, g_star, a, b = closed_form("quad", quad, theta)
    beta, lr, T = 1.0, 0.05, 8

    @jax.jit
    def estimates(theta, phi, phi0):
        out = {}
        for s, solver in (("dense", ls.dense()), ("cg", ls.cg(maxiter=6))):
            g, info = bj.hypergradient(problem, theta, phi, quad.data, solver)
            out[s] = (g, info.v)
        for mode in ("reverse", "forward"):
            out[mode] = bj.unrolled_hypergradient(problem, theta, phi0, quad.data, optimizer=optax.sgd(beta),
                                                  steps=T, mode=mode)
        out["zero_ig"] = bj.zero_ig_hypergradient(problem, theta, phi0, quad.data, lower_lr=lr, steps=T)
        return out

    out = estimates(split_theta(theta), split_phi(phi), split_phi(np.asarray(quad.phi0)))
    phi_T, g_unrolled = unrolled_gd_closed_form(quad, theta, beta, T)
    phi_sign, g_zero = sign_sgd_closed_form(quad, theta, lr, T)
    expected = {"dense": (g_star, np.linalg.solve(a, b)), "cg": (g_star, np.linalg.solve(a, b)),
                "reverse": (g_unrolled, phi_T), "forward": (g_unrolled, phi_T), "zero_ig": (g_zero, phi_sign)}
    for k, (g, second) in expected.items():
        want = (split_theta(g), split_phi(second))
        assert jax.tree_util.tree_structure(out[k]) == jax.tree_util.tree_structure(want), k
        for got, e in zip(jax.tree_util.tree_leaves(out[k]), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(got, e, rtol=1e-8, atol=1e-12, err_msg=k)


def test_equinox_linear_phi():
    """phi = eqx.nn.Linear: least squares with 2 outputs and a bias, penalty exp(theta) on all
    parameters. Its solution is ridge on [X, 1], so the exact hypergradient is jax.grad through
    that closed-form solve."""
    rng = np.random.default_rng(5)
    X, Xv, Y, Yv = (rng.normal(size=s) for s in ((20, 3), (15, 3), (20, 2), (15, 2)))
    data = ((Xv, Yv), (X, Y))

    def mse(model, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=-1))

    def f_lower(theta, model, batch):
        return mse(model, batch) + 0.5 * jnp.exp(theta) * (jnp.sum(model.weight ** 2) + jnp.sum(model.bias ** 2))

    problem = bj.BilevelProblem(lambda theta, model, batch: mse(model, batch), f_lower)

    def solution(theta):  # rows of W_aug = [weight'; bias]
        xa = jnp.concatenate([X, jnp.ones((X.shape[0], 1))], axis=1)
        return jnp.linalg.solve(xa.T @ xa / X.shape[0] + jnp.exp(theta) * jnp.eye(4), xa.T @ Y / X.shape[0])

    def F(theta):
        w = solution(theta)
        return 0.5 * jnp.mean(jnp.sum((Xv @ w[:3] + w[3] - Yv) ** 2, axis=-1))

    @jax.jit
    def estimates(theta):
        w = solution(theta)
        model = eqx.nn.Linear(3, 2, key=jax.random.PRNGKey(0), dtype=jnp.float64)
        model = eqx.tree_at(lambda m: (m.weight, m.bias), model, (w[:3].T, w[3]))
        out = [bj.hypergradient(problem, theta, model, data, solver) for solver in (ls.dense(), ls.cg(maxiter=8))]
        return out, jax.grad(F)(theta)

    out, expected = estimates(-1.0)
    g_dense = out[0][0]
    np.testing.assert_allclose(g_dense, expected, rtol=1e-8)
    for g, info in out:
        np.testing.assert_allclose(g, g_dense, rtol=1e-10)
        assert isinstance(info.v, eqx.nn.Linear)
        assert info.v.weight.shape == (2, 3) and info.v.bias.shape == (2,)


# -------------------------------------------------------------------------- vmap over seeds
def test_vmap_over_8_ridge_problems_equals_loop():
    """8 ridge HPO instances drawn from 8 keys, stacked: vmap == Python loop == closed forms."""
    insts = [bj.problems.ridge_hpo(jax.random.PRNGKey(100 + s), per_feature=True) for s in range(8)]
    data = jax.tree_util.tree_map(lambda *x: np.stack(x), *[i.data for i in insts])
    theta = _theta("ridge", insts[0])
    phis = np.stack([closed_form("ridge", i, theta)[0] for i in insts])

    def one(phi, data):
        return bj.hypergradient(bj.problems.RIDGE, theta, phi, data, ls.cg(maxiter=8))[0]

    batched = np.asarray(jax.jit(jax.vmap(one))(phis, data))
    single = jax.jit(one)
    looped = np.stack([single(phi, i.data) for phi, i in zip(phis, insts)])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-15)
    for g, inst in zip(batched, insts):
        _close(g, closed_form("ridge", inst, theta)[1], 1e-8)
    assert np.std(batched, axis=0).max() > 0  # the 8 problems differ


def test_vmap_over_8_thetas_equals_loop(quad):
    """Unrolled (a scan differentiated in reverse) and zero-IG over 8 thetas."""
    thetas = np.random.default_rng(6).normal(size=(8, 4))
    beta, lr, T = 1.0, 0.05, 10

    def one(theta):
        g_unr, _ = bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data,
                                             optimizer=optax.sgd(beta), steps=T)
        g_zero, _ = bj.zero_ig_hypergradient(quad.problem, theta, quad.phi0, quad.data, lower_lr=lr, steps=T)
        return g_unr, g_zero

    batched = jax.device_get(jax.jit(jax.vmap(one))(thetas))
    single = jax.jit(one)
    looped = [np.stack(x) for x in zip(*[single(t) for t in thetas])]
    for b, l in zip(batched, looped):
        np.testing.assert_allclose(b, l, rtol=1e-12, atol=1e-14)
    for theta, g_unr, g_zero in zip(thetas, *batched):
        np.testing.assert_allclose(g_unr, unrolled_gd_closed_form(quad, theta, beta, T)[1], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g_zero, sign_sgd_closed_form(quad, theta, lr, T)[1], rtol=1e-10, atol=1e-12)

"""Linear solvers against `jnp.linalg.solve` (float64), their SolverInfo and the stateful form.

Ground truth is computed independently of the solver under test, in NumPy (matrices, matrix
powers, `np.linalg.solve`); each solve is one `jax.jit` (one compilation, no eager op-by-op).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers


def _spd(seed, n, spectrum):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * spectrum) @ q.T


def _system(seed, n, spectrum):
    a = _spd(seed, n, spectrum)
    b = np.random.default_rng(seed + 1).normal(size=n)
    return a, b, np.linalg.solve(a, b)


@pytest.fixture(scope="module")
def system():
    """A 12 x 12 SPD system with condition number 1e3 (eigenvalues evenly spaced in [1, 1e3])."""
    return _system(10, 12, np.linspace(1.0, 1e3, 12))


@pytest.fixture(scope="module")
def small():
    """A well-conditioned 5 x 5 system (eigenvalues evenly spaced in [1, 10]) for the rates."""
    return _system(12, 5, np.linspace(1.0, 10.0, 5))


def _rel(x, y):
    return np.linalg.norm(np.asarray(x) - y) / np.linalg.norm(y)


def _res(a, b, x):
    """||b - A x||, in NumPy."""
    return np.linalg.norm(b - a @ np.asarray(x))


def _solve(solver, a, b, x0=None):
    """One jitted solve of A x = b."""
    return jax.jit(lambda a, b, x0: solver.solve(lambda v: a @ v, b, x0))(a, b, x0)


# --------------------------------------------------------------------------------------- CG
@pytest.mark.parametrize("spectrum", ["linspace", "logspace"])
def test_cg_solves_cond_1e3_in_n_iterations(system, spectrum):
    if spectrum == "linspace":
        a, b, x_star = system
    else:
        # A log-spread spectrum delays CG in finite precision (loss of A-orthogonality: at
        # n = 12 it is still at 1e-2), so there the n-step property is checked at n = 6.
        a, b, x_star = _system(14, 6, np.logspace(0, 3, 6))
    np.testing.assert_allclose(np.linalg.cond(a), 1e3, rtol=1e-6)
    n = b.shape[0]
    x, info = _solve(ls.cg(maxiter=n), a, b)
    assert _rel(x, x_star) < 1e-8
    assert not bool(info.breakdown)
    assert int(info.num_matvecs) == n
    # the recursive residual is the true one (to rounding; both are tiny here)
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), atol=1e-12 * np.linalg.norm(b))


def _numpy_cg_residuals(a, b, iters):
    """Relative residuals ||r_k|| / ||b||, k = 1..iters, of textbook CG (seed 001, Alg. 7)."""
    r, d, out = b.copy(), b.copy(), []
    for _ in range(iters):
        ad = a @ d
        alpha = (r @ r) / (d @ ad)
        r_new = r - alpha * ad
        d = r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
        out.append(np.linalg.norm(r) / np.linalg.norm(b))
    return np.array(out)


def test_cg_tolerance_freezes_iterate(system):
    a, b, _ = system
    # CG residuals are not monotone: once rtol is met at step k, the iterate must stay x_k.
    rel = _numpy_cg_residuals(a, b, 11)
    rtol = 1.2 * rel[:4].min()
    first = int(np.argmax(rel <= rtol)) + 1
    assert first < 11 and rel[first:].max() > rtol  # plain CG would move on (and up)

    @jax.jit
    def both(a, b):
        return (ls.cg(maxiter=first).solve(lambda v: a @ v, b),
                ls.cg(maxiter=12, rtol=rtol).solve(lambda v: a @ v, b))

    (x_first, _), (x, info) = both(a, b)
    np.testing.assert_array_equal(x, x_first)
    assert float(info.residual_norm) <= rtol * np.linalg.norm(b)
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), rtol=1e-10)


def test_cg_singular_operator_breaks_down_without_nan():
    x, info = _solve(ls.cg(maxiter=5), np.diag([1.0, 0.0]), np.ones(2))
    assert bool(info.breakdown)
    assert np.all(np.isfinite(x)) and np.isfinite(info.residual_norm)


def test_cg_indefinite_operator_freezes_at_last_good_iterate():
    a, b = np.diag([2.0, -1.0, 1.0]), np.ones(3)
    x1, info1 = _solve(ls.cg(maxiter=1), a, b)  # the first direction has d'Ad = 2 > 0
    x, info = _solve(ls.cg(maxiter=6), a, b)
    assert not bool(info1.breakdown)
    assert bool(info.breakdown)
    np.testing.assert_array_equal(x, x1)
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), rtol=1e-12)


@pytest.mark.parametrize("warm", [False, True])
def test_cg_nan_matvec_returns_finite(warm):
    b = np.ones(3)
    x0 = np.array([0.5, -1.0, 2.0]) if warm else None
    x, info = jax.jit(lambda b, x0: ls.cg(maxiter=4).solve(lambda v: v * jnp.nan, b, x0))(b, x0)
    assert bool(info.breakdown)
    np.testing.assert_array_equal(x, x0 if warm else np.zeros(3))


# -------------------------------------------------------------- residual_norm and num_matvecs
SOLVERS = {
    "cg": (lambda: ls.cg(maxiter=3), False),
    "cg_warm": (lambda: ls.cg(maxiter=3), True),
    "gd": (lambda: ls.gd(steps=4, eta=1e-3), False),
    "gd_warm": (lambda: ls.gd(steps=4, eta=1e-3), True),
    "neumann": (lambda: ls.neumann(steps=4, eta=1e-3), False),
    "dense": (lambda: ls.dense(), False),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_info_residual_and_matvec_count(system, name):
    a, b, x_star = system
    make, warm = SOLVERS[name]
    calls = []

    def mv(v):
        jax.debug.callback(lambda: calls.append(None))  # runs once per application
        return a @ v

    x0 = 0.1 * b if warm else None
    x, info = jax.jit(lambda b, x0: make().solve(mv, b, x0))(b, x0)
    jax.effects_barrier()
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), rtol=1e-8, atol=1e-12 * np.linalg.norm(b))
    assert not bool(info.breakdown)
    if name == "dense":
        assert int(info.num_matvecs) == b.size  # one jvp column per coordinate
        np.testing.assert_allclose(x, x_star, rtol=1e-12)
    else:
        assert int(info.num_matvecs) == len(calls)


# ------------------------------------------------------------------------------- GD / Neumann
def test_gd_from_warm_start(small):
    a, b, x_star = small
    eta, k = 0.1, 120  # eta = 1/L, mu = 1
    x0 = x_star + 1e-6 * np.random.default_rng(16).normal(size=5)
    x, info = _solve(ls.gd(steps=k, eta=eta), a, b, x0)
    # exact: x* - x_k = (I - eta A)^k (x* - x0) ...
    contraction = np.linalg.matrix_power(np.eye(5) - eta * a, k)
    np.testing.assert_allclose(x_star - x, contraction @ (x_star - x0), atol=1e-14)
    # ... hence ||x_k - x*|| <= (1 - eta mu)^k ||x0 - x*||: from a warm start, x_k is the solve
    assert np.linalg.norm(x - x_star) <= (1 - eta) ** k * np.linalg.norm(x0 - x_star) * (1 + 1e-8)
    np.testing.assert_allclose(x, x_star, atol=1e-10)
    assert int(info.num_matvecs) == k + 1


@pytest.mark.parametrize("k", [1, 8, 40])
def test_neumann_error_rate(small, k):
    a, b, x_star = small
    eta = 0.1
    w, q = np.linalg.eigh(a)
    mu = w[0]
    rate = (1 - eta * mu) ** k
    b_mu = q[:, 0]

    @jax.jit
    def solves(b, b_mu, x_star):
        solve = lambda rhs, x0=None: ls.neumann(steps=k, eta=eta).solve(lambda v: a @ v, rhs, x0)[0]
        return solve(b_mu), solve(b), solve(b, x_star)

    x_mu, x, x_warm = solves(b, b_mu, x_star)
    # b along the eigenvector of mu: the relative error is exactly (1 - eta mu)^k
    np.testing.assert_allclose(_rel(x_mu, b_mu / mu), rate, rtol=1e-10)
    # general b: bounded by the same factor, and x is the truncated series
    assert _rel(x, x_star) <= rate * (1 + 1e-12)
    series = eta * sum(np.linalg.matrix_power(np.eye(5) - eta * a, i) for i in range(k)) @ b
    np.testing.assert_allclose(x, series, rtol=1e-12, atol=1e-14)
    # the series has no initial point: x0 is ignored
    np.testing.assert_array_equal(x_warm, x)


# ------------------------------------------------------------------------- stochastic Neumann
def test_stochastic_neumann_expectation_deterministic_operator(small):
    """With a deterministic A the only randomness is p ~ U{0..N-1}: every draw is one of the N
    terms N eta (I - eta A)^p b, all of them occur, and their uniform average is neumann(N)."""
    a, b, _ = small
    n_terms, eta, m = 6, 0.1, 1024
    solver = ls.stochastic_neumann(steps=n_terms, eta=eta)
    keys = jax.random.split(jax.random.PRNGKey(17), m)
    # lax.map, not vmap: the same draws, and half the compile time of a batched PRNG
    xs, infos = jax.jit(lambda ks: jax.lax.map(lambda k: solver.solve(lambda v, key: a @ v, b, key=k), ks))(keys)
    xs = np.asarray(xs)
    terms = np.stack([n_terms * eta * np.linalg.matrix_power(np.eye(5) - eta * a, p) @ b
                      for p in range(n_terms)])
    dist = np.linalg.norm(xs[:, None, :] - terms[None], axis=-1)  # (m, N)
    p = dist.argmin(axis=1)
    np.testing.assert_allclose(dist[np.arange(m), p], 0.0, atol=1e-12)
    counts = np.bincount(p, minlength=n_terms)
    assert counts.min() > 0, counts
    # the exact expectation (the average over p) is the truncated series
    expected, _ = _solve(ls.neumann(steps=n_terms, eta=eta), a, b)
    np.testing.assert_allclose(terms.mean(0), expected, rtol=1e-12)
    # and the empirical mean lies within 5 standard errors of it
    se = xs.std(0) / np.sqrt(m)
    assert np.all(np.abs(xs.mean(0) - expected) <= 5 * se + 1e-12)
    assert np.all(np.isnan(infos.residual_norm))
    assert np.all(np.asarray(infos.num_matvecs) == n_terms - 1)
    # (with minibatch Hessians, one per factor: tests/test_hypergrad.py, stochastic solver test)


# ------------------------------------------------------------------------------ stateful form
@pytest.mark.parametrize("name", ["cg", "gd"])
def test_stateful_warm_start_reduces_residual(small, name):
    """Repeated solves of one system: a warm start keeps improving, a cold start repeats itself.
    GD (eta = 1/L) contracts ||b - A x|| at every step; CG from x0 minimises the A-norm error over
    x0 + Krylov space, so restarted CG decreases ||x - x*||_A (its residual need not be monotone)."""
    a, b, x_star = small
    solver = ls.cg(maxiter=2) if name == "cg" else ls.gd(steps=2, eta=0.1)

    @jax.jit
    def run(a, b):
        out = []
        for warm_start in (True, False):
            s = ls.stateful(solver, warm_start=warm_start)

            def body(state, _):
                x, state, info = s.update(lambda v: a @ v, b, state)
                return state, (x, info.residual_norm, state.x)

            out.append(jax.lax.scan(body, s.init(b), None, length=5))
        return out

    (state, (xs, res, state_xs)), (_, (xs_cold, res_cold, _)) = run(a, b)
    assert isinstance(state, ls.LinearSolverState)
    np.testing.assert_array_equal(state_xs, xs)  # the state holds the returned solution
    np.testing.assert_allclose(res, [_res(a, b, x) for x in xs], rtol=1e-8)
    err_a = lambda xs: np.array([np.sqrt((x - x_star) @ a @ (x - x_star)) for x in np.asarray(xs)])
    progress, cold = (res, res_cold) if name == "gd" else (err_a(xs), err_a(xs_cold))
    assert np.all(np.diff(progress) < 0), progress
    np.testing.assert_allclose(cold, cold[0], rtol=1e-12)  # no warm start: the same solve again
    assert progress[-1] < 0.5 * cold[-1]


def test_stateful_init_is_zeros():
    b = {"a": np.ones(3), "b": (np.ones((2, 2)),)}
    state = ls.stateful(ls.cg(maxiter=2)).init(b)
    assert jax.tree_util.tree_structure(state.x) == jax.tree_util.tree_structure(b)
    assert all(np.abs(x).max() == 0.0 for x in jax.tree_util.tree_leaves(state.x))


# ------------------------------------------------------------------------------------ pytrees
@pytest.mark.parametrize("name", ["cg", "gd", "dense"])
def test_pytree_system_equals_flat(small, name):
    a, b, _ = small
    solver = {"cg": ls.cg(maxiter=5), "gd": ls.gd(steps=7, eta=0.1), "dense": ls.dense()}[name]
    to_tree = lambda x: {"u": x[:2], "w": (x[2:4].reshape(2, 1), x[4])}
    to_flat = lambda t: jnp.concatenate([t["u"], t["w"][0].reshape(-1), t["w"][1][None]])

    @jax.jit
    def both(a, b):
        flat = solver.solve(lambda v: a @ v, b)
        tree = solver.solve(lambda t: to_tree(a @ to_flat(t)), to_tree(b))
        return flat, tree

    (x_flat, info_flat), (x_tree, info_tree) = both(a, b)
    assert jax.tree_util.tree_structure(x_tree) == jax.tree_util.tree_structure(to_tree(b))
    np.testing.assert_allclose(to_flat(x_tree), x_flat, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(info_tree.residual_norm, info_flat.residual_norm, rtol=1e-8, atol=1e-14)

"""Linear solvers against `jnp.linalg.solve` (float64): the one protocol (init / solve with a
persistent state), SolverInfo, and loud failures (x NaN with a status, never a finite-looking x).

Ground truth is computed independently of the solver under test, in NumPy (matrices, matrix
powers, `np.linalg.solve`); each solve is one `jax.jit` (one compilation, no eager op-by-op).
"""
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers
st = bj.status


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


@jax.jit
def _jit_solve(solver, a, b, x0):
    x, state, info = solver.solve(lambda v: a @ v, b, solver.init(b, x0))
    return x, state, info


def _solve(solver, a, b, x0=None):
    """One jitted solve of A x = b; with `x0`, a warm start from it. Returns (x, info)."""
    if x0 is not None:
        solver = dataclasses.replace(solver, warm_start=True)
    x, state, info = _jit_solve(solver, a, b, x0)
    np.testing.assert_array_equal(state.x, x)  # the returned state holds the solution
    return x, info


def _ok(info):
    assert int(info.status) == st.OK, st.describe(info.status)


def _failed(x, info, code):
    """The loud-failure contract: every leaf NaN, the exact status, a NaN residual."""
    assert int(info.status) == code, st.describe(info.status)
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree_util.tree_leaves(x))
    assert np.isnan(info.residual_norm)


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
    _ok(info)
    assert int(info.num_matvecs) == n
    # residual_norm is the true ||b - A x|| at x
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), atol=1e-12 * np.linalg.norm(b))


def test_cg_many_iterations_past_convergence_do_not_drift():
    """4000 iterations on a 50 x 50 system with condition number 50: once the recursive residual
    reaches rounding level, the iterate freezes (it used to drift to a relative error of 1e68)."""
    a, b, x_star = _system(20, 50, np.linspace(1.0, 50.0, 50))
    x_ref = np.asarray(jnp.linalg.solve(a, b))
    x, info = _solve(ls.cg(maxiter=4000), a, b)
    _ok(info)
    assert _rel(x, x_ref) < 1e-10
    assert _rel(x, x_star) < 1e-10
    assert int(info.num_matvecs) == 4000
    # the reported residual is the true one at x (not the recursive one, which is far smaller):
    # recomputed the same way (one XLA matvec) it agrees to 1e-12; NumPy sums in another order,
    # which at this rounding level moves the 3rd digit, so that check is relative to ||b||
    true = float(jax.jit(lambda x: jnp.linalg.norm(b - a @ x))(x))
    np.testing.assert_allclose(info.residual_norm, true, rtol=1e-12)
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), atol=1e-12 * np.linalg.norm(b))
    assert float(info.residual_norm) < 1e-13 * np.linalg.norm(b)


def _numpy_cg_residuals(a, b, iters):
    """Relative residuals ||r_k|| / ||b||, k = 1..iters, of textbook CG (Hestenes & Stiefel 1952)."""
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
        solvers = ls.cg(maxiter=first), ls.cg(maxiter=12, rtol=rtol)
        return [s.solve(lambda v: a @ v, b, s.init(b)) for s in solvers]

    (x_first, _, _), (x, _, info) = both(a, b)
    np.testing.assert_array_equal(x, x_first)
    _ok(info)
    assert float(info.residual_norm) <= rtol * np.linalg.norm(b)
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), rtol=1e-10)


def test_cg_zero_rhs_returns_zero():
    x, info = _solve(ls.cg(maxiter=5), np.diag([1.0, 0.0, -1.0]), np.zeros(3))
    _ok(info)  # solved before any direction is met: no breakdown, even on a singular operator
    np.testing.assert_array_equal(x, np.zeros(3))


# -------------------------------------------------------------------- loud failures: CG, dense
FAILING = {
    # name: (A, b); b is never in the range of A's positive part alone
    "singular": (np.diag([1.0, 0.0]), np.ones(2)),
    # d_1'A d_1 is 0 in exact arithmetic and a rounding-level positive number in floating point
    # (plain CG then divides by it and returns a huge finite x)
    "singular_rounding": (np.diag([1.0, 1.0, 0.0]), np.array([1.0, 2.0, 3.0])),
    "concave": (-np.eye(3), np.ones(3)),
    "indefinite": (np.diag([2.0, -1.0, 1.0]), np.ones(3)),
}


@pytest.mark.parametrize("solver", ["cg", "cg_warm", "dense"])
@pytest.mark.parametrize("name", list(FAILING))
def test_cg_dense_breakdown_is_nan(name, solver):
    a, b = FAILING[name]
    x0 = 0.1 * np.ones_like(b) if solver == "cg_warm" else None
    x, info = _solve(ls.dense() if solver == "dense" else ls.cg(maxiter=6), a, b, x0)
    _failed(x, info, st.BREAKDOWN)


def test_cg_indefinite_breaks_down_only_when_met():
    a, b = FAILING["indefinite"]
    x1, info1 = _solve(ls.cg(maxiter=1), a, b)  # the first direction has d'Ad = 2 > 0
    _ok(info1)
    np.testing.assert_allclose(info1.residual_norm, _res(a, b, x1), rtol=1e-12)
    x, info = _solve(ls.cg(maxiter=6), a, b)
    _failed(x, info, st.BREAKDOWN)


@pytest.mark.parametrize("where", ["matvec", "b", "x0"])
@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_cg_dense_nonfinite_input_is_nan(where, solver):
    if solver == "dense" and where == "x0":
        pytest.skip("dense has no initial point")
    b = np.array([1.0, np.nan, 1.0]) if where == "b" else np.ones(3)
    x0 = np.array([0.5, np.nan, 2.0]) if where == "x0" else None
    scale = jnp.nan if where == "matvec" else 1.0
    s = ls.dense() if solver == "dense" else ls.cg(maxiter=4)
    if x0 is not None:
        s = dataclasses.replace(s, warm_start=True)
    x, state, info = jax.jit(lambda b, x0: s.solve(lambda v: v * scale, b, s.init(b, x0)))(b, x0)
    expected = st.BREAKDOWN | st.NONFINITE
    if solver == "dense" and where == "b":
        expected = st.NONFINITE  # A itself factors fine
    _failed(x, info, expected)
    assert np.all(np.isnan(state.x))  # the failure is carried to the next warm start


def test_failure_sets_every_pytree_leaf_to_nan():
    b = {"u": np.ones(2), "w": (np.ones((2, 1)),)}
    mv = lambda t: jax.tree_util.tree_map(lambda v: -v, t)  # concave
    for s in (ls.cg(maxiter=3), ls.dense(), ls.gd(steps=3, eta=0.5)):
        x, _, info = jax.jit(lambda b: s.solve(mv, b, s.init(b)))(b)
        _failed(x, info, st.BREAKDOWN)
        assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(b)


# ------------------------------------------------------------------ loud failures: GD, Neumann
@pytest.mark.parametrize("make", [ls.gd, ls.neumann])
def test_gd_neumann_divergence_is_nan(small, make):
    a, b, _ = small
    L = np.linalg.eigvalsh(a).max()
    x, info = _solve(make(steps=20, eta=2.5 / L), a, b)  # |1 - eta L| = 1.5: diverges
    _failed(x, info, st.BREAKDOWN)
    x, info = _solve(make(steps=5, eta=0.1), -a, b)      # concave: I + 0.1 A expands
    _failed(x, info, st.BREAKDOWN)
    x, info = _solve(make(steps=5, eta=0.1), a, np.where(np.arange(5) == 2, np.nan, b))
    _failed(x, info, st.NONFINITE)
    x, info = _solve(make(steps=2000, eta=2.5 / L), a, b)  # divergence until overflow (inf - inf)
    _failed(x, info, st.NONFINITE)


def test_gd_converged_warm_start_is_not_divergence(small):
    """From an exact warm start the residual stays at rounding level: no false alarm."""
    a, b, x_star = small
    x, info = _solve(ls.gd(steps=30, eta=0.1), a, b, x_star)
    _ok(info)
    np.testing.assert_allclose(x, x_star, rtol=1e-12)


def test_stochastic_neumann_nonfinite_is_nan():
    """A NaN shows once a factor is applied (p > 0): then x is NaN and the status NONFINITE."""
    s = ls.stochastic_neumann(steps=4, eta=0.1)
    b = np.ones(3)
    xs, _, infos = jax.jit(lambda key: jax.vmap(lambda k: s.solve(lambda v, key: v * jnp.nan, b, s.init(b), key=k))(
        jax.random.split(key, 8)))(jax.random.PRNGKey(1))
    status, xs = np.asarray(infos.status), np.asarray(xs)
    bad = status != st.OK
    assert bad.any() and (~bad).any()  # both p = 0 (no factor) and p > 0 occur
    assert np.all(status[bad] == st.NONFINITE)
    assert np.all(np.isnan(xs[bad])) and np.all(np.isfinite(xs[~bad]))
    assert np.all(np.isnan(infos.residual_norm))


# -------------------------------------------------------------- residual_norm and num_matvecs
SOLVERS = {
    "cg": (lambda: ls.cg(maxiter=3), False),
    "cg_warm": (lambda: ls.cg(maxiter=3), True),
    "gd": (lambda: ls.gd(steps=4, eta=1e-3), False),
    "gd_warm": (lambda: ls.gd(steps=4, eta=1e-3), True),
    "neumann": (lambda: ls.neumann(steps=4, eta=1e-3), False),
    "neumann_warm": (lambda: ls.neumann(steps=4, eta=1e-3), True),  # ignored: no extra matvec
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

    solver = dataclasses.replace(make(), warm_start=warm)
    x0 = 0.1 * b if warm else None
    x, _, info = jax.jit(lambda b, x0: solver.solve(mv, b, solver.init(b, x0)))(b, x0)
    jax.effects_barrier()
    np.testing.assert_allclose(info.residual_norm, _res(a, b, x), rtol=1e-8, atol=1e-12 * np.linalg.norm(b))
    _ok(info)
    assert info.num_matvecs.dtype == jnp.int32 and info.status.dtype == jnp.int32
    if name == "dense":
        assert int(info.num_matvecs) == b.size  # one jvp column per coordinate
        np.testing.assert_allclose(x, x_star, rtol=1e-12)
    else:
        expected = {"cg": 3, "cg_warm": 4, "gd": 4, "gd_warm": 5, "neumann": 4, "neumann_warm": 4}[name]
        assert int(info.num_matvecs) == expected
        # CG's true residual is one more (diagnostic) application, not counted
        assert len(calls) == expected + name.startswith("cg")


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
    _ok(info)


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
        cold = ls.neumann(steps=k, eta=eta)
        warm = dataclasses.replace(cold, warm_start=True)
        solve = lambda s, rhs, x0=None: s.solve(lambda v: a @ v, rhs, s.init(rhs, x0))[0]
        return solve(cold, b_mu), solve(cold, b), solve(warm, b, x_star)

    x_mu, x, x_warm = solves(b, b_mu, x_star)
    # b along the eigenvector of mu: the relative error is exactly (1 - eta mu)^k
    np.testing.assert_allclose(_rel(x_mu, b_mu / mu), rate, rtol=1e-10)
    # general b: bounded by the same factor, and x is the truncated series
    assert _rel(x, x_star) <= rate * (1 + 1e-12)
    series = eta * sum(np.linalg.matrix_power(np.eye(5) - eta * a, i) for i in range(k)) @ b
    np.testing.assert_allclose(x, series, rtol=1e-12, atol=1e-14)
    # the series has no initial point: a warm start (and the state's x) is ignored
    np.testing.assert_array_equal(x_warm, x)


# ------------------------------------------------------------------------- stochastic Neumann
def test_stochastic_neumann_expectation_deterministic_operator(small):
    """With a deterministic A the only randomness is p ~ U{0..N-1}: every draw is one of the N
    terms N eta (I - eta A)^p b, all of them occur, and their uniform average is neumann(N)."""
    a, b, _ = small
    n_terms, eta, m = 6, 0.1, 1024
    solver = ls.stochastic_neumann(steps=n_terms, eta=eta)
    assert solver.stochastic and not ls.neumann().stochastic
    keys = jax.random.split(jax.random.PRNGKey(17), m)
    state = solver.init(b)
    # lax.map, not vmap: the same draws, and half the compile time of a batched PRNG
    xs, _, infos = jax.jit(lambda ks: jax.lax.map(
        lambda k: solver.solve(lambda v, key: a @ v, b, state, key=k), ks))(keys)
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
    assert np.all(np.asarray(infos.status) == st.OK)
    # (with minibatch Hessians, one per factor: tests/test_hypergrad.py, stochastic solver test)


def test_stochastic_neumann_needs_key():
    s = ls.stochastic_neumann(steps=3, eta=0.1)
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
        s.solve(lambda v, key: v, jnp.ones(3), s.init(jnp.ones(3)))


# ------------------------------------------------------------------------ state and warm starts
@pytest.mark.parametrize("name", ["cg", "gd"])
def test_warm_start_reduces_residual(small, name):
    """Repeated solves of one system: a warm start keeps improving, a cold start repeats itself.
    GD (eta = 1/L) contracts ||b - A x|| at every step; CG from x0 minimises the A-norm error over
    x0 + Krylov space, so restarted CG decreases ||x - x*||_A (its residual need not be monotone)."""
    a, b, x_star = small
    make = (lambda w: ls.cg(maxiter=2, warm_start=w)) if name == "cg" else (lambda w: ls.gd(2, 0.1, warm_start=w))

    @jax.jit
    def run(a, b):
        out = []
        for warm_start in (True, False):
            s = make(warm_start)

            def body(state, _):
                x, state, info = s.solve(lambda v: a @ v, b, state)
                return state, (x, info.residual_norm, state.x)

            out.append(jax.lax.scan(body, s.init(b), None, length=5))
        return out

    (state, (xs, res, state_xs)), (_, (xs_cold, res_cold, _)) = run(a, b)
    assert isinstance(state, ls.WarmStart)
    np.testing.assert_array_equal(state_xs, xs)  # the state holds the returned solution
    np.testing.assert_allclose(res, [_res(a, b, x) for x in xs], rtol=1e-8)
    err_a = lambda xs: np.array([np.sqrt((x - x_star) @ a @ (x - x_star)) for x in np.asarray(xs)])
    progress, cold = (res, res_cold) if name == "gd" else (err_a(xs), err_a(xs_cold))
    assert np.all(np.diff(progress) < 0), progress
    np.testing.assert_allclose(cold, cold[0], rtol=1e-12)  # no warm start: the same solve again
    assert progress[-1] < 0.5 * cold[-1]


def test_init_is_zeros_or_x0():
    b = {"a": np.ones(3), "b": (np.ones((2, 2)),)}
    for s in (ls.cg(maxiter=2), ls.gd(), ls.neumann(), ls.stochastic_neumann(), ls.dense()):
        state = s.init(b)
        assert isinstance(state, ls.WarmStart)
        assert jax.tree_util.tree_structure(state.x) == jax.tree_util.tree_structure(b)
        assert all(np.abs(x).max() == 0.0 for x in jax.tree_util.tree_leaves(state.x))
    x0 = {"a": 2 * np.ones(3), "b": (np.ones((2, 2)),)}
    assert ls.cg(maxiter=2).init(b, x0).x is x0


def test_warm_start_state_must_match_b():
    s = ls.cg(maxiter=2, warm_start=True)
    with pytest.raises(ValueError, match=r"state's x does not have the structure of b"):
        s.solve(lambda v: v, {"a": jnp.ones(2)}, s.init(jnp.ones(2)))


# ------------------------------------------------------------------------------------ pytrees
@pytest.mark.parametrize("name", ["cg", "gd", "dense"])
def test_pytree_system_equals_flat(small, name):
    a, b, _ = small
    solver = {"cg": ls.cg(maxiter=5), "gd": ls.gd(steps=7, eta=0.1), "dense": ls.dense()}[name]
    to_tree = lambda x: {"u": x[:2], "w": (x[2:4].reshape(2, 1), x[4])}
    to_flat = lambda t: jnp.concatenate([t["u"], t["w"][0].reshape(-1), t["w"][1][None]])

    @jax.jit
    def both(a, b):
        flat = solver.solve(lambda v: a @ v, b, solver.init(b))
        tb = to_tree(b)
        tree = solver.solve(lambda t: to_tree(a @ to_flat(t)), tb, solver.init(tb))
        return flat, tree

    (x_flat, _, info_flat), (x_tree, _, info_tree) = both(a, b)
    assert jax.tree_util.tree_structure(x_tree) == jax.tree_util.tree_structure(to_tree(b))
    np.testing.assert_allclose(to_flat(x_tree), x_flat, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(info_tree.residual_norm, info_flat.residual_norm, rtol=1e-8, atol=1e-14)
    _ok(info_tree)


# --------------------------------------------------------------------- modules: jit and vmap
def test_equal_solvers_compile_once(small):
    """Solvers are equinox Modules: counts are static, step sizes and tolerances are leaves, so
    two separately constructed equal configurations (and other step sizes) share one compilation."""
    a, b, _ = small
    traces = []

    def solve(s, b):
        traces.append(type(s).__name__)
        return s.solve(lambda v: a @ v, b, s.init(b))

    f = jax.jit(solve)
    for make in (lambda: ls.cg(maxiter=5), lambda: ls.gd(3, 0.1)):
        s1, s2 = make(), make()
        assert s1 is not s2
        out1, out2 = f(s1, b), f(s2, b)
        np.testing.assert_array_equal(out1[0], out2[0])
    f(ls.gd(3, 0.2), b)  # another step size: the same program
    assert traces == ["CG", "GD"], traces
    f(ls.gd(4, 0.1), b)  # another count: a new program
    f(ls.cg(maxiter=5, warm_start=True), b)
    assert traces == ["CG", "GD", "GD", "CG"], traces


def test_vmap_over_eta_field(small):
    """A sweep over step sizes: vmap over a stacked solver's eta (filter_vmap-built, and
    tree-stacked) equals the per-eta solves and the closed form."""
    a, b, _ = small
    etas = np.array([0.02, 0.05, 0.1])
    k = 6

    def solve(s):
        x, _, info = s.solve(lambda v: a @ v, b, s.init(b))
        return x, info.residual_norm

    built = eqx.filter_vmap(lambda eta: ls.gd(steps=k, eta=eta))(etas)
    stacked = jax.tree_util.tree_map(lambda *e: np.stack(e), *[ls.gd(steps=k, eta=float(e)) for e in etas])
    assert built.steps == k and built.eta.shape == (3,)
    xs, res = jax.jit(jax.vmap(solve))(built)
    xs_stacked, _ = eqx.filter_jit(eqx.filter_vmap(solve))(stacked)
    np.testing.assert_array_equal(xs_stacked, xs)
    for eta, x, r in zip(etas, np.asarray(xs), np.asarray(res)):
        series = eta * sum(np.linalg.matrix_power(np.eye(5) - eta * a, i) for i in range(k)) @ b
        np.testing.assert_allclose(x, series, rtol=1e-12)
        np.testing.assert_allclose(r, _res(a, b, x), rtol=1e-8)
    # tolerances are fields too
    rtols = np.array([1e-1, 1e-3, 0.0])
    cgs = eqx.filter_vmap(lambda r: ls.cg(maxiter=12, rtol=r))(rtols)  # atol stays a float: filter_vmap
    xs, res = eqx.filter_jit(eqx.filter_vmap(solve))(cgs)
    assert np.all(np.asarray(res) <= np.maximum(np.asarray(rtols), 1e-12) * np.linalg.norm(b))
    assert np.asarray(res)[0] > np.asarray(res)[2]


def test_factory_argument_checks():
    with pytest.raises(TypeError, match=r"warm_start must be a Python bool"):
        ls.cg(warm_start=1)
    with pytest.raises(TypeError, match=r"warm_start must be a Python bool"):
        ls.gd(warm_start="yes")
    with pytest.raises(TypeError, match=r"eta must be a number or an array, not a schedule"):
        ls.gd(eta=lambda count: 0.1)
    with pytest.raises(ValueError, match=r"maxiter must be >= 1"):
        ls.CG(maxiter=0)  # the classes check too
    with pytest.raises(ValueError, match=r"eta must be a positive step size"):
        dataclasses.replace(ls.gd(), eta=-1.0)


# ------------------------------------------------------------------------------------ damping
def test_damped_solves_the_shifted_system_where_the_undamped_breaks_down():
    """A indefinite (lambda_min = -0.5): CG and the dense factorisation break down (NaN); damped by
    1 they solve (A + I) x = b to rounding, with the inner solver's count and status."""
    a = _spd(3, 6, np.array([-0.5, 0.2, 1.0, 2.0, 3.0, 4.0]))
    b = np.random.default_rng(4).normal(size=6)
    expected = np.linalg.solve(a + np.eye(6), b)
    for inner in (ls.cg(30), ls.dense()):
        x, info = _solve(inner, a, b)
        _failed(x, info, st.BREAKDOWN)
        x, info = _solve(ls.damped(inner, 1.0), a, b)
        _ok(info)
        np.testing.assert_allclose(x, expected, rtol=1e-10)
        assert int(info.num_matvecs) == int(_solve(inner, a + np.eye(6), b)[1].num_matvecs)
    # the damping is an array field: one compilation serves a sweep over it
    sweep = jax.jit(jax.vmap(lambda lam: ls.damped(ls.dense(), lam).solve(lambda v: a @ v, b, ls.dense().init(b))[0]))
    lams = np.array([1.0, 2.0, 5.0])
    np.testing.assert_allclose(sweep(lams), [np.linalg.solve(a + lam * np.eye(6), b) for lam in lams], rtol=1e-10)


def test_damped_sweep_with_an_invalid_damping_is_flagged():
    """A traced damping that is negative or not finite (a swept grid value, which the constructor
    cannot see) gives NaN and INVALID_STEP, never the solve of another system with status OK; the
    valid grid points are untouched (bj.hypergradient: 1.75 with status OK for -0.5 before)."""
    a = _spd(5, 4, np.array([0.6, 1.0, 2.0, 3.0]))
    b = np.random.default_rng(6).normal(size=4)
    lams = np.array([-0.5, 0.0, 0.1, np.nan])
    def solve(lam):
        solver = ls.damped(ls.cg(20), lam)
        x, _, info = solver.solve(lambda v: a @ v, b, solver.init(b))
        return x, info

    xs, infos = jax.device_get(jax.jit(jax.vmap(solve))(lams))
    status = infos.status
    assert status[0] == st.INVALID_STEP and status[3] & st.INVALID_STEP and np.all(status[1:3] == st.OK)
    assert np.all(np.isnan(xs[[0, 3]]))
    np.testing.assert_allclose(xs[1:3], [np.linalg.solve(a + lam * np.eye(4), b) for lam in (0.0, 0.1)], rtol=1e-10)


def test_damped_forwards_the_key_of_a_stochastic_solver_and_checks_its_input(small):
    a, b, _ = small
    inner = ls.stochastic_neumann(steps=5, eta=0.1)
    solver = ls.damped(inner, 0.3)
    assert solver.stochastic and not ls.damped(ls.cg()).stochastic

    @jax.jit
    def both(key):   # one program for the damped solve and its reference
        x, _, info = solver.solve(lambda v, k: a @ v, b, solver.init(b), key=key)
        x_ref, _, _ = inner.solve(lambda v, k: a @ v + 0.3 * v, b, inner.init(b), key=key)
        return x, info, x_ref

    x, info, x_ref = both(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(x, x_ref)
    _ok(info)
    with pytest.raises(ValueError, match=r"damping must lie in \[0.0, inf\)"):
        ls.damped(ls.cg(), -1.0)
    with pytest.raises(TypeError, match="already damped"):
        ls.damped(ls.damped(ls.cg()))
    with pytest.raises(TypeError, match="solver must be a bj.linear_solvers solver"):
        ls.damped(lambda v: v)

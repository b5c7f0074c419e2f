"""Krylov solvers and presets (LancBiO / SubBiO, Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331).

Ground truth in NumPy (np.linalg.solve, a dense 2-D Galerkin projection), independent of the code
under test. Each sequence of solves is one `jax.jit` of a `lax.scan` over the calls (the way a
bilevel loop carries the solver state), so the file compiles a handful of small programs: the
solve helpers are module-level jits (tests with the same solver configuration and shapes share a
program), take NumPy inputs and the checks run on NumPy values (no eager operation compiled per
shape: `jnp.asarray` of a NumPy array, an index or a sum of a jax.Array each compile one).
"""
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers
st = bj.status


def _spd(seed, n, spectrum):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * np.asarray(spectrum)) @ q.T


@jax.jit   # one function: calls with the same solver configuration and shapes share a program
def _scan_calls(solver, mats, rhs):
    def body(state, ab):
        a, b = ab
        x, state, info = solver.solve(lambda v: a @ v, b, state)
        return state, (x, info)

    state, (xs, infos) = jax.lax.scan(body, solver.init(rhs[0]), (mats, rhs))
    return xs, infos, state


def _calls(solver, mats, rhs):
    """`len(mats)` solves of A_k x = b_k with the state carried across them, in one jit:
    (xs, infos, final state) as NumPy values (the checks index and reduce them without compiling
    an eager operation per shape; NumPy inputs likewise go in without one)."""
    return jax.device_get(_scan_calls(solver, mats, rhs))


@jax.jit
def _solve_fresh(solver, a, b, *v_prev):
    """One solve of A x = b from `solver.init(b, *v_prev)`, in one jit (NumPy inputs)."""
    return solver.solve(lambda u: a @ u, b, solver.init(b, *v_prev))


@jax.jit
def _init(solver, b):
    return solver.init(b)


@jax.jit
def _solve_from(solver, a, b, state):
    """One solve of A x = b from `state`: the same solver and shapes share a program."""
    return solver.solve(lambda u: a @ u, b, state)


def _frozen(a, b, k):
    return np.broadcast_to(a, (k,) + a.shape), np.broadcast_to(b, (k,) + b.shape)


# ------------------------------------------------------------------------------------ lanczos
def test_lanczos_m_equals_n_reproduces_the_dense_solve_with_a_falling_residual():
    """A and b frozen, m = n: the dynamic process is Lanczos / CG from 0 (one vector per call);
    after n calls it is the dense solution, and on a well-conditioned spectrum the residual falls
    at every call (the A-norm error falls in exact arithmetic for any SPD A)."""
    n = 24
    a = _spd(0, n, np.linspace(1.0, 10.0, n))
    b = np.random.default_rng(1).normal(size=n)
    x_star = np.linalg.solve(a, b)
    xs, infos, state = _calls(ls.lanczos(n, m_start=n), *_frozen(a, b, n))
    assert np.all(np.asarray(infos.status) == st.OK)
    xs = np.asarray(xs)
    err = np.linalg.norm(xs[-1] - x_star) / np.linalg.norm(x_star)
    assert err < 1e-8, err
    res = np.linalg.norm(b[None] - xs @ a, axis=1)
    active = res > 1e-12 * np.linalg.norm(b)  # until it reaches rounding level
    assert np.all(np.diff(res[active]) < 0), res
    e = xs - x_star
    a_err = np.sqrt(np.einsum("ki,ij,kj->k", e, a, e))
    assert np.all(np.diff(a_err[a_err > 1e-12]) < 0)
    # the Lanczos estimate of the residual is the true one for a fixed operator
    np.testing.assert_allclose(np.asarray(infos.residual_norm)[active], res[active], rtol=1e-6, atol=1e-14)
    # one restart (the first call), then one matvec per call
    assert int(np.sum(infos.num_matvecs)) == n + 1
    assert int(state.size) <= n
    # the same in one solve: `steps` Lanczos steps per call, from a fresh state
    one = ls.lanczos(n, m_start=n, steps=n, warm_start=False)
    x, _, info = _solve_fresh(one, a, b)
    assert int(info.status) == st.OK and int(info.num_matvecs) == n + 1
    np.testing.assert_allclose(x, xs[-1], rtol=1e-10, atol=1e-12)


def test_lanczos_restarts_with_a_small_m_still_solve():
    """m = 3 < n: restarted every 3 calls at v_bar = v with the residual correction (restarted CG)."""
    n, k = 12, 150
    a = _spd(2, n, np.linspace(1.0, 20.0, n))
    b = np.random.default_rng(3).normal(size=n)
    xs, infos, _ = _calls(ls.lanczos(3, m_start=3), *_frozen(a, b, k))
    assert np.all(np.asarray(infos.status) == st.OK)
    np.testing.assert_allclose(xs[-1], np.linalg.solve(a, b), rtol=1e-8)
    assert int(np.sum(infos.num_matvecs)) == k + k // 3   # 1 + 1/m per call


def test_lanczos_tracks_a_drifting_system_better_than_one_cg_step():
    """A_k, b_k drift slowly: LancBiO's v_k stays closer to A_k^{-1} b_k than one warm-started CG
    step per call (2 matvecs: the warm-start residual and the step), with fewer matvecs."""
    n, k = 30, 120
    rng = np.random.default_rng(4)
    a0 = _spd(5, n, np.logspace(0, 2, n))
    e = rng.normal(size=(n, n))
    e = (e + e.T) / np.linalg.norm(e + e.T, 2)
    b0, db = rng.normal(size=n), rng.normal(size=n)
    t = np.arange(k) / k
    mats = a0[None] + 0.5 * np.sin(3 * t)[:, None, None] * e[None]
    rhs = b0[None] + 0.3 * np.cos(2 * t)[:, None] * db[None]
    truth = np.linalg.solve(mats, rhs[..., None])[..., 0]

    def tracking(solver):
        xs, infos, _ = _calls(solver, mats, rhs)
        assert np.all(np.asarray(infos.status) == st.OK)
        err = np.linalg.norm(np.asarray(xs) - truth, axis=1) / np.linalg.norm(truth, axis=1)
        return err[k // 2:].mean(), int(np.sum(infos.num_matvecs))

    lanczos_err, lanczos_mv = tracking(ls.lanczos(10, m_start=10))
    cg_err, cg_mv = tracking(ls.cg(1, warm_start=True))
    assert lanczos_mv <= cg_mv and lanczos_mv == k + math.ceil(k / 10)
    assert lanczos_err < 0.5 * cg_err, (lanczos_err, cg_err)   # measured: 0.043 vs 0.152


def _schedule(m0, inc, every, m_max, calls):
    """The paper's m schedule and the restarts it implies, in plain Python."""
    m, epoch, out = m0, 0, []
    for c in range(calls):
        if c > 0 and c % every == 0:
            m = min(math.ceil(round(m * inc, 9)), m_max)
        restart = epoch == 0 or epoch >= m
        epoch = 1 if restart else epoch + 1
        out.append((m, int(restart)))
    return out


def test_lanczos_dimension_schedule_and_matvec_count():
    n, calls = 16, 90
    a = _spd(6, n, np.linspace(1.0, 50.0, n))
    b = np.random.default_rng(7).normal(size=n)
    solver = ls.lanczos(8, m_start=1, inc=1.5, every=10)

    @jax.jit
    def go(solver):
        def body(state, _):
            x, state, info = solver.solve(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), state)
            return state, (state.m, info.num_matvecs, info.status)
        return jax.lax.scan(body, solver.init(jnp.asarray(b)), None, length=calls)[1]

    ms, mvs, status = jax.device_get(go(solver))
    expected = _schedule(1, 1.5, 10, 8, calls)
    assert np.all(np.asarray(status) == st.OK)
    assert [int(m) for m in ms] == [m for m, _ in expected]
    assert [int(v) for v in mvs] == [1 + r for _, r in expected]
    # ceil(m inc) is meant exactly: 10 * 1.1 gives 11 (not 12 from 11.000000000000002)
    assert _schedule(10, 1.1, 1, 80, 2)[-1][0] == 11
    _, _, state = _calls(ls.lanczos(80, m_start=10, inc=1.1, every=1), *_frozen(a, b, 2))
    assert int(state.m) == 11


def test_lanczos_indefinite_operator_breaks_down_loudly():
    """A non-positive pivot of T (A has a negative eigenvalue): x NaN, BREAKDOWN, and the NaN stays
    in the state (the next solve fails too)."""
    n = 8
    a = _spd(8, n, np.r_[-1.0, np.linspace(1.0, 4.0, n - 1)])
    b = np.random.default_rng(9).normal(size=n)
    xs, infos, state = _calls(ls.lanczos(n, m_start=n), *_frozen(a, b, n))
    status = np.asarray(infos.status)
    assert status[-1] != st.OK and np.all(status[status != st.OK] & st.BREAKDOWN)
    first = int(np.argmax(status != st.OK))
    assert np.all(np.isnan(np.asarray(xs)[first:])) and np.all(np.isfinite(np.asarray(xs)[:first]))
    assert np.all(np.isnan(np.asarray(infos.residual_norm)[first:]))
    assert np.all(np.isnan(np.asarray(state.x)))


def test_lanczos_invariant_subspace_is_not_a_failure():
    """A with 2 distinct eigenvalues: beta_2 = 0 (an invariant subspace) after 2 calls. The solve is
    exact there; the basis stops growing, later calls keep the solution, status OK, no NaN."""
    n = 10
    a = _spd(10, n, np.r_[np.full(5, 2.0), np.full(5, 7.0)])
    b = np.random.default_rng(11).normal(size=n)
    xs, infos, state = _calls(ls.lanczos(n, m_start=n), *_frozen(a, b, 3 * n))
    assert np.all(np.asarray(infos.status) == st.OK)
    np.testing.assert_allclose(np.asarray(xs)[2:], np.broadcast_to(np.linalg.solve(a, b), (3 * n - 2, n)),
                               rtol=1e-10)
    # b = 0: the solution 0, no failure
    xs0, infos0, _ = _calls(ls.lanczos(4, m_start=4), *_frozen(a, np.zeros(n), 6))
    assert np.all(np.asarray(infos0.status) == st.OK) and np.all(np.asarray(xs0) == 0)


@pytest.mark.parametrize("where", ["b", "matvec"])
def test_lanczos_nonfinite_input_is_nan(where):
    n = 6
    a = _spd(12, n, np.linspace(1.0, 3.0, n))
    b = np.random.default_rng(13).normal(size=n)
    if where == "b":
        b[2] = np.nan
    else:
        a[1, 1] = np.inf
    xs, infos, _ = _calls(ls.lanczos(4, m_start=4), *_frozen(a, b, 3))
    assert np.all(np.asarray(infos.status) == st.BREAKDOWN | st.NONFINITE)
    assert np.all(np.isnan(np.asarray(xs)))


def test_lanczos_pytree_vmap_and_traced_dimension():
    """A pytree b gives the flat result; vmap over seeds (right-hand sides) and over a traced m_start
    with one buffer size (m_max static) compile once and match the unbatched runs."""
    n = 9
    a = _spd(14, n, np.linspace(1.0, 30.0, n))
    rhs = np.random.default_rng(15).normal(size=(3, n))
    k = 12

    def run(solver, b, tree=False):
        aj, bj_ = jnp.asarray(a), jnp.asarray(b)
        if tree:
            split = lambda v: {"u": v[:4], "w": v[4:].reshape(-1, 1)}
            join = lambda t: jnp.concatenate([t["u"], t["w"].reshape(-1)])
            mv = lambda t: split(aj @ join(t))
            bb = split(bj_)
        else:
            join, mv, bb = (lambda t: t), (lambda v: aj @ v), bj_

        def body(state, _):
            x, state, _ = solver.solve(mv, bb, state)
            return state, join(x)
        return jax.lax.scan(body, solver.init(bb), None, length=k)[1]

    flat = jax.jit(run)(ls.lanczos(4, m_start=2, inc=1.5, every=3), rhs[0])
    tree = jax.jit(lambda s, b: run(s, b, tree=True))(ls.lanczos(4, m_start=2, inc=1.5, every=3), rhs[0])
    np.testing.assert_allclose(tree, flat, rtol=1e-10, atol=1e-12)
    seeds = jax.device_get(jax.jit(jax.vmap(run, in_axes=(None, 0)))(ls.lanczos(4, m_start=2, inc=1.5, every=3), rhs))
    np.testing.assert_allclose(seeds[0], flat, rtol=1e-10, atol=1e-12)
    # m_start swept as an array field, one m_max
    solver = ls.lanczos(5, m_start=1)
    swept = jax.device_get(jax.jit(jax.vmap(lambda m0: run(eqx.tree_at(lambda s: s.m_start, solver, m0), rhs[0])))(
        np.array([2, 5])))
    for i, m0 in enumerate((2, 5)):
        np.testing.assert_allclose(swept[i], jax.jit(run)(ls.lanczos(5, m_start=m0), rhs[0]), rtol=1e-10, atol=1e-12)


def test_lanczos_factory_checks():
    with pytest.raises(ValueError, match="m_start"):
        ls.lanczos(4, m_start=5)
    with pytest.raises(ValueError, match="inc"):
        ls.lanczos(4, inc=0.9)
    with pytest.raises(ValueError, match="m_max"):
        ls.lanczos(0)
    with pytest.raises(TypeError, match="every"):
        ls.lanczos(4, every=2.5)
    with pytest.raises(ValueError, match="m_start must be an integer"):
        ls.lanczos(4, m_start=1.5)


# ----------------------------------------------------------------------------------- subspace
def test_subspace_equals_the_dense_2d_galerkin_solution():
    n, eta = 15, 0.05
    a = _spd(16, n, np.logspace(0, 2, n))
    rng = np.random.default_rng(17)
    b, v_prev = rng.normal(size=n), rng.normal(size=n)
    solver = ls.subspace(eta)
    x, state, info = _solve_fresh(solver, a, b, v_prev)
    w = np.stack([b, v_prev - eta * a @ v_prev], axis=1)
    dense = w @ np.linalg.solve(w.T @ a @ w, w.T @ b)
    assert int(info.status) == st.OK and int(info.num_matvecs) == 3
    np.testing.assert_allclose(x, dense, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ dense), rtol=1e-8)
    np.testing.assert_array_equal(state.x, x)
    # v_prev = 0 (the first solve): the subspace is span{b}, the exact line search along b
    x0, _, info0 = _solve_fresh(solver, a, b)
    assert int(info0.status) == st.OK
    np.testing.assert_allclose(x0, (b @ b) / (b @ a @ b) * b, rtol=1e-12)


def test_subspace_failures_are_loud():
    n = 6
    a = _spd(18, n, np.r_[-2.0, np.linspace(1.0, 2.0, n - 1)])
    rng = np.random.default_rng(19)
    b = np.linalg.eigh(a)[1][:, 0]  # along the negative eigenvector: b'A b < 0
    solver = ls.subspace(0.1)
    x, state, info = jax.device_get(_solve_fresh(solver, a, b))
    assert int(info.status) == st.BREAKDOWN and np.all(np.isnan(np.asarray(x))) and np.isnan(info.residual_norm)
    assert np.all(np.isnan(np.asarray(state.x)))
    bad = rng.normal(size=n)
    bad[0] = np.nan
    x, _, info = _solve_fresh(solver, np.eye(n), bad)   # the identity: one program for the three solves
    assert int(info.status) == st.BREAKDOWN | st.NONFINITE and np.all(np.isnan(np.asarray(x)))
    x, _, info = _solve_fresh(solver, np.eye(n), np.zeros(n))
    assert int(info.status) == st.OK and np.all(np.asarray(x) == 0)


# ------------------------------------------------------------------------------------ presets
def test_lancbio_preset_costs_follow_the_schedule(quad):
    """The default schedule (m_start = 1, x1.1 every 20 steps, cap 80): HVPs = steps + restarts, the
    restarts those of the schedule; full batch, jit + vmap over 4 seeds, every run reaches theta*."""
    alg = bj.algorithms.lancbio(quad.problem, upper_lr=0.5, lower_lr=1.0, lower_steps=10)
    num = 120
    theta0s = np.asarray(quad.theta0) + np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4,) + quad.theta0.shape))

    @jax.jit
    @jax.vmap
    def go(theta0, key):
        state = alg.init(theta0, quad.phi0, key, quad.data)
        state, history = bj.run(alg, state, quad.data, num_steps=num, eval_every=num)
        return state.theta, history

    thetas, history = go(theta0s, jax.random.split(jax.random.PRNGKey(2), 4))
    restarts = sum(r for _, r in _schedule(1, 1.1, 20, 80, num))
    assert np.all(np.asarray(history["hvps"])[:, -1] == num + restarts)
    assert np.all(np.asarray(history["status"]) == st.OK)
    rel = np.linalg.norm(np.asarray(thetas) - np.asarray(quad.theta_star()), axis=1)
    assert rel.max() < 1e-3 * np.linalg.norm(quad.theta_star())


def test_preset_argument_errors_name_the_preset(quad):
    with pytest.raises(ValueError, match="lancbio: m_start"):
        bj.algorithms.lancbio(quad.problem, m_start=10, m_max=5)
    with pytest.raises(ValueError, match="lancbio: lower_steps"):
        bj.algorithms.lancbio(quad.problem, lower_steps=0)
    with pytest.raises(ValueError, match="subbio: subspace_eta"):
        bj.algorithms.subbio(quad.problem, subspace_eta=-1.0)
    with pytest.raises(ValueError, match="subbio: subspace_eta defaults to lower_lr"):
        bj.algorithms.subbio(quad.problem, lower_opt=optax.adam(1e-2))
    assert bj.algorithms.subbio(quad.problem, lower_opt=optax.adam(1e-2), subspace_eta=0.5).direction.solver.eta == 0.5
    assert bj.algorithms.get("lancbio") is bj.algorithms.lancbio


# ------------------------------------------------------------------------- synthetic problem
@pytest.fixture(scope="module")
def synthetic():
    return bj.problems.lancbio_synthetic(jax.random.PRNGKey(0), n=20, kappa=100.0)


def test_synthetic_closed_forms_match_autodiff(synthetic):
    p = synthetic
    v = jax.random.normal(jax.random.PRNGKey(1), p.phi0.shape)
    grad_phi = jax.grad(p.problem.f_lower, argnums=1)

    @jax.jit
    def pairs(theta, phi, v, data):
        up, low = data
        q = p._replace(data=data)
        hvp = jax.jvp(lambda y: grad_phi(theta, y, low), (phi,), (v,))[1]
        cross = jax.grad(lambda x: jnp.vdot(grad_phi(x, phi, low), v))(theta)
        return [(q.lower_grad(theta, phi), grad_phi(theta, phi, low)),
                (q.lower_hessian(theta, phi), jax.hessian(p.problem.f_lower, argnums=1)(theta, phi, low)),
                (q.lower_hvp(theta, phi, v), hvp), (q.cross(theta, phi, v), cross),
                *zip(q.upper_grads(theta, phi), jax.grad(p.problem.f_upper, argnums=(0, 1))(theta, phi, up))]

    checked = jax.device_get(pairs(p.theta0, p.phi0, v, p.data))
    for mine, auto in checked:
        np.testing.assert_allclose(mine, auto, rtol=1e-12, atol=1e-10)
    # G's spectrum is linspace(1, kappa, n); the LL is strongly convex (Hessian >= 1/2)
    low = p.data[1]
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(low["G"])[0]), np.linspace(1.0, 100.0, 20), rtol=1e-10)
    assert np.linalg.eigvalsh(checked[1][0]).min() > 0.5 - 1e-12   # q.lower_hessian(theta0, phi0), in `pairs`


def test_synthetic_hypergradient_and_one_product_with_g_per_oracle(synthetic):
    p = synthetic

    @jax.jit
    def values(theta, phi, data):
        q = p._replace(data=data)
        star = q.phi_star(theta, phi)
        g, _ = bj.hypergradient(p.problem, theta, star, data, ls.dense())
        return star, jnp.linalg.norm(q.lower_grad(theta, star)), g, q.hypergradient(theta, star)

    star, grad_norm, g, g_closed = values(p.theta0, p.phi0, p.data)
    assert float(grad_norm) < 1e-10
    np.testing.assert_allclose(g, g_closed, rtol=1e-10, atol=1e-12)
    # the library's fused (grad, HVP, J v) from one vjp touches G twice: G phi and G'(cotangent)
    jaxpr = jax.make_jaxpr(lambda y, v: bj.oracles.grad_hvp_cross(p.problem, p.theta0, y, v, p.data[1], "rev"))(
        star, star)
    g_shape = p.data[1]["G"].shape
    uses = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"
            and any(getattr(x.aval, "shape", None) == g_shape for x in e.invars)]
    assert len(uses) == 2


@jax.jit
def _synthetic_metrics(data, theta0, phi0, theta, phi, v):
    q = bj.problems.LancBiOSynthetic(None, data, theta0, phi0)
    norm = lambda t, y: jnp.linalg.norm(q.hypergradient(t, q.phi_star(t, y)))
    return norm(theta0, phi0), norm(theta, phi), q.residual(theta, phi, v)


def test_presets_on_the_synthetic_problem_reduce_the_hypergradient(synthetic):
    """A short full-batch run of both presets (the paper's step sizes scaled to kappa = 100)."""
    p = synthetic
    for name, kw in (("lancbio", dict(m_max=10)), ("subbio", {})):
        alg = bj.algorithms.get(name)(p.problem, upper_lr=1.0, lower_lr=1e-2, lower_steps=5, **kw)
        state = alg.init(p.theta0, p.phi0, jax.random.PRNGKey(0), p.data)
        state, history = eqx.filter_jit(bj.run)(alg, state, p.data, num_steps=300)
        assert int(history["status"][-1]) == st.OK
        before, after, res = _synthetic_metrics(p.data, p.theta0, p.phi0, state.theta, state.phi, state.v)
        assert float(after) < 0.05 * float(before), (name, float(before), float(after))
        assert float(res) < 1e-3


@pytest.mark.slow   # the figure end to end; `make fig-lancbio` runs it, the solver tests stay fast
def test_lancbio_figure_runs_and_states_the_claims(tmp_path):
    """The fig-lancbio-dim machinery on a tiny problem: cells, figure, summary with the claims."""
    from experiments import config, lancbio

    cfg = config.load("configs/lancbio_dim.toml", [
        f"results_dir={tmp_path}", "seeds=2", "steps=40", "eval_every=20", "progress=false", "timing_repeats=1",
        "problem.n=12", "problem.kappa=50.0", "defaults.lower_lr=0.01", "only=LancBiO_m10,AmIGO-CG_I3"])
    lancbio.main(cfg)
    root = tmp_path / "lancbio_dim"
    assert (root / "lancbio_dim.png").is_file()
    text = (root / "summary.md").read_text()
    assert "Increases in m enhance the convergence of the residual norm" in text and "m=10" in text
    summary = json.loads((root / "summary.json").read_text())
    entry = summary["algorithms"]["LancBiO_m10"]
    assert entry["status_ok"] and 1.0 < entry["hvps_per_step"] < 2.0
    assert np.isfinite(entry["residual_final"])
    # a rerun loads the finished cells
    cells = sorted(p.name for p in (root / "cells").iterdir())
    lancbio.main(cfg)
    assert sorted(p.name for p in (root / "cells").iterdir()) == cells


# ------------------------------------------------------------- lanczos: minimal-residual correction
def _dense_min_residual(a, b, state):
    """The minimal-residual correction computed densely: s = argmin ||(b - w) - A Q s|| over the
    state's basis Q (its first `size` rows), x = v_bar + Q s."""
    size = int(state.size)
    q = np.asarray(state.basis)[:size].T
    s = np.linalg.lstsq(a @ q, b - np.asarray(state.w), rcond=None)[0]
    return np.asarray(state.x_bar) + q @ s


@pytest.mark.parametrize("spectrum", ["spd", "indefinite"])
def test_lanczos_min_residual_equals_the_dense_least_squares_correction(spectrum):
    """A fixed, b drifting from call to call, m = 6 on n = 10 (a restart after 6 calls): after every
    call, x = v_bar + Q s with s the dense least-squares solution over the current basis, to
    1e-10 (float64). On an indefinite A (where the Galerkin T has a non-positive pivot and breaks
    down loudly) the minimal-residual correction is defined: status OK, the same dense reference."""
    n, m, calls = 10, 6, 9
    eig = np.linspace(1.0, 8.0, n) if spectrum == "spd" else np.r_[-2.0, -0.5, np.linspace(1.0, 8.0, n - 2)]
    a = _spd(20, n, eig)
    rng = np.random.default_rng(21)
    b0, drift = rng.normal(size=n), rng.normal(size=n)
    solver = ls.lanczos(m, m_start=m, correction="min_residual")
    state = _init(solver, b0)
    residuals = []
    for k in range(calls):
        b = b0 + 0.05 * k * drift
        x, state, info = _solve_from(solver, a, b, state)
        assert int(info.status) == st.OK, k
        np.testing.assert_allclose(x, _dense_min_residual(a, b, state), rtol=1e-10, atol=1e-12, err_msg=str(k))
        residuals.append(float(np.linalg.norm(b - a @ np.asarray(x))))
    # within an epoch on a fixed system the residual is minimal over a growing subspace: it never rises
    fixed = _calls(solver, *_frozen(a, b0, m))[1].residual_norm
    assert np.all(np.diff(np.asarray(fixed)) <= 1e-12)
    if spectrum == "indefinite":
        assert int(_calls(ls.lanczos(m, m_start=m), *_frozen(a, b0, m))[1].status[-1]) & st.BREAKDOWN


def test_lanczos_corrections_solve_the_system_at_m_equal_n_and_bad_names_are_refused():
    n = 8
    a = _spd(22, n, np.linspace(1.0, 5.0, n))
    b = np.random.default_rng(23).normal(size=n)
    for correction in ls.lanczos.__globals__["CORRECTIONS"]:
        xs, infos, _ = _calls(ls.lanczos(n, m_start=n, correction=correction), *_frozen(a, b, n))
        np.testing.assert_allclose(xs[-1], np.linalg.solve(a, b), rtol=1e-10, err_msg=correction)
    with pytest.raises(ValueError, match="correction must be one of"):
        ls.lanczos(4, correction="petrov")


# ------------------------------------------------------------------- lancbio options (issue 23, 21)
def test_lancbio_dimension_above_phi_is_capped_with_a_warning(quad):
    """A Lanczos dimension of 50 on a 6-d phi: the basis of a drifting operator stops being a basis
    past n vectors (the correction diverged, status OK, before the cap); now a warning at init, m
    capped at n = 6, and theta* reached."""
    alg = bj.algorithms.lancbio(quad.problem, upper_lr=0.5, lower_lr=1.0, lower_steps=10, m_start=50, m_max=50)
    with pytest.warns(UserWarning, match="m_start=50 exceeds the dimension n=6"):
        state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    assert int(state.direction.solver.m) == 6
    state, history = jax.jit(lambda s: bj.run(alg, s, quad.data, num_steps=200, eval_every=200))(state)
    assert np.all(np.asarray(history["status"]) == st.OK)
    theta_star = np.asarray(quad.theta_star())
    assert np.linalg.norm(np.asarray(state.theta) - theta_star) / np.linalg.norm(theta_star) < 1e-8


def test_lancbio_theorem_schedule_and_min_residual_option(quad):
    """m0 = 2 on epochs of m = 4: theta stays exactly where it is in the first 2 steps of every
    epoch and moves in the other 2; the minimal-residual v of every step is the dense least-squares
    correction over the state's basis with the step's A and b (the LL is quadratic: A is fixed), and
    theta* is reached."""
    alg = bj.algorithms.lancbio(quad.problem, upper_lr=0.5, lower_lr=1.0, lower_steps=10, m_start=4, m_max=4, m0=2,
                                correction="min_residual")
    assert alg.direction.rule.solver.correction == "min_residual" and alg.direction.m0 == 2
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    update = eqx.filter_jit(alg.update)
    hessian = jax.jit(jax.hessian(quad.problem.f_lower, 1))
    grad_upper = jax.jit(jax.grad(quad.problem.f_upper, 1))
    moved = []
    for _ in range(12):
        new, info = update(state, quad.data)
        assert int(info.status) == st.OK
        moved.append(bool(np.any(np.asarray(new.theta) != np.asarray(state.theta))))
        a = np.asarray(hessian(state.theta, new.phi, quad.data[1]))
        b = np.asarray(grad_upper(state.theta, new.phi, quad.data[0]))
        np.testing.assert_allclose(new.v, _dense_min_residual(a, b, new.direction.solver), rtol=1e-10,
                                   atol=1e-12)
        state = new
    assert moved == [k % 4 >= 2 for k in range(12)]
    state, _ = jax.jit(lambda s: bj.run(alg, s, quad.data, num_steps=300, eval_every=300))(state)
    theta_star = np.asarray(quad.theta_star())
    assert np.linalg.norm(np.asarray(state.theta) - theta_star) / np.linalg.norm(theta_star) < 1e-8
    with pytest.raises(ValueError, match="lancbio: m0=4 must be below the starting dimension"):
        bj.algorithms.lancbio(quad.problem, m_start=4, m_max=4, m0=4)
    with pytest.raises(ValueError, match="lancbio: correction must be one of"):
        bj.algorithms.lancbio(quad.problem, correction="cg")
    with pytest.warns(UserWarning, match="capped at 6"), pytest.raises(ValueError, match="theta would never move"):
        bj.algorithms.lancbio(quad.problem, m_start=8, m_max=8, m0=6).init(quad.theta0, quad.phi0,
                                                                          jax.random.PRNGKey(0), quad.data)

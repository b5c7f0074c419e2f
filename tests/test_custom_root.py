"""`bj.custom_root` / `bj.custom_fixed_point` (jaxopt's implicit-differentiation decorators) and
`bj.linear_solvers.normal`, in float64.

References: closed forms (ridge regression: d w*/d lambda = -(X'X + lambda I)^{-1} w*; the linear
fixed point x = M x + theta: dx*/dtheta = (I - M)^{-1}; x = cos(a x): dx*/da = -x sin(ax) / (1 + a
sin(ax))), autodiff through the exact linear solve (the dense reference), and jaxopt's own
`custom_root`/`custom_fixed_point` on the same inner solvers (optional: jaxopt is the `bench` extra).

The inner solvers are `lax.while_loop`s run to rounding level: reverse-mode autodiff cannot go
through them, so every derivative here comes from the implicit function theorem.
"""
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers
st = bj.status
N, D = 20, 5


def _data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, D))
    return X, X @ rng.normal(size=D) + 0.1 * rng.normal(size=N)


def _ridge_objective(w, lam, X, y):
    return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * w @ w


def _gd_until(grad, x0, step, tol=1e-13, maxiter=10_000):
    """Gradient descent x <- x - step grad(x) until ||grad|| <= tol (a while_loop: no reverse mode)."""
    def body(c):
        x, i = c
        return jax.tree_util.tree_map(lambda a, g: a - step * g, x, grad(x)), i + 1

    def cond(c):
        g = jax.flatten_util.ravel_pytree(grad(c[0]))[0]
        return (jnp.linalg.norm(g) > tol) & (c[1] < maxiter)

    return jax.lax.while_loop(cond, body, (x0, 0))


def _ridge_solver(init_w, lam, X, y):
    """(w*, iterations): GD on the ridge objective (L <= 2 ||X||^2 + lam)."""
    step = 1.0 / (jnp.linalg.norm(X, 2) ** 2 + lam)
    return _gd_until(lambda w: jax.grad(_ridge_objective)(w, lam, X, y), init_w, step)


def ridge_solver(init_w, lam, X, y):
    return _ridge_solver(init_w, lam, X, y)[0]


def _exact_ridge(lam, X, y):
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)


SOLVERS = {"default": None, "cg": ls.cg(maxiter=20), "dense": ls.dense(), "minres": ls.minres(maxiter=20)}


def test_ridge_matches_closed_form_fwd_and_rev():
    X, y = _data()
    lam = 0.7
    w_star = np.linalg.solve(X.T @ X + lam * np.eye(D), X.T @ y)
    expected = -np.linalg.solve(X.T @ X + lam * np.eye(D), w_star)

    @jax.jit
    def derivatives(lam):
        out = {}
        for name, solve in SOLVERS.items():
            solver = bj.custom_root(jax.grad(_ridge_objective), solve=solve)(ridge_solver)
            w, pullback = jax.vjp(lambda lam: solver(jnp.zeros(D), lam, X, y), lam)
            out[name] = (w, jax.vmap(pullback)(jnp.eye(D))[0], jax.jvp(lambda lam: solver(jnp.zeros(D), lam, X, y),
                                                                       (lam,), (1.0,))[1])
        return out

    for name, (w, jac_rev, jac_fwd) in derivatives(lam).items():
        np.testing.assert_allclose(w, w_star, rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(jac_rev, expected, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(jac_fwd, expected, rtol=1e-10, atol=1e-12, err_msg=name)


def test_several_args_kwargs_and_hessian_match_dense_reference():
    """grads w.r.t. lam, X and y (y passed by keyword) of a validation loss, and its Hessian in lam,
    against autodiff through the exact solve."""
    X, y = _data()
    Xv, yv = _data(1)
    solver = bj.custom_root(jax.grad(_ridge_objective), solve=ls.cg(maxiter=20))(ridge_solver)
    val = lambda w: 0.5 * jnp.sum((Xv @ w - yv) ** 2)
    implicit = lambda lam, X, y: val(solver(jnp.zeros(D), lam, X, y=y))
    exact = lambda lam, X, y: val(_exact_ridge(lam, X, y))
    derivatives = lambda f, lam: (jax.grad(f, argnums=(0, 1, 2))(lam, X, y), jax.hessian(f)(lam, X, y))
    (got, got_hessian), (want, want_hessian) = jax.jit(lambda lam: (derivatives(implicit, lam),
                                                                    derivatives(exact, lam)))(0.7)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got_hessian, want_hessian, rtol=1e-9)


def test_pytree_params_and_has_aux():
    """params = {"w", "b"} (ridge with an unpenalised intercept); the solver also returns its
    iteration count (an int aux): aux passes through, gets no derivative, the grads are exact."""
    X, y = _data()

    def objective(p, lam, X, y):
        return 0.5 * jnp.sum((X @ p["w"] + p["b"] - y) ** 2) + 0.5 * lam * p["w"] @ p["w"]

    def solver(init, lam, X, y):
        step = 1.0 / (jnp.linalg.norm(X, 2) ** 2 + N + lam)
        return _gd_until(lambda p: jax.grad(objective)(p, lam, X, y), init, step)

    def exact(lam, X, y):
        Z = jnp.concatenate([X, jnp.ones((N, 1))], axis=1)
        z = jnp.linalg.solve(Z.T @ Z + lam * jnp.diag(jnp.r_[jnp.ones(D), 0.0]), Z.T @ y)
        return {"w": z[:D], "b": z[D]}

    decorated = bj.custom_root(jax.grad(objective), has_aux=True, solve=ls.cg(maxiter=20))(solver)
    init = {"w": np.zeros(D), "b": np.zeros(())}
    loss = lambda p: jnp.sum(p["w"] ** 2) + p["b"]

    @jax.jit
    def run(lam, X):
        implicit = lambda lam, X: loss(decorated(init, lam, X, y)[0])
        reference = lambda lam, X: loss(exact(lam, X, y))
        return (decorated(init, lam, X, y), exact(lam, X, y)["w"], jax.grad(implicit, argnums=(0, 1))(lam, X),
                jax.grad(reference, argnums=(0, 1))(lam, X), jax.jacfwd(lambda lam: decorated(init, lam, X, y))(lam),
                jax.jacfwd(lambda lam: exact(lam, X, y)["w"])(lam))

    (p, iters), w_exact, got, want, (jac, aux_tangent), jac_ref = run(0.7, X)
    assert jnp.issubdtype(iters.dtype, jnp.integer) and 0 < int(iters) < 10_000
    np.testing.assert_allclose(p["w"], w_exact, rtol=1e-10)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(jac["w"], jac_ref, rtol=1e-9)
    assert int(aux_tangent) == 0   # the aux gets no derivative


def test_jit_vmap_over_lambdas_equals_loop():
    X, y = _data()
    lams = np.array([0.1, 1.0, 10.0])
    solver = bj.custom_root(jax.grad(_ridge_objective), solve=ls.cg(maxiter=20))(ridge_solver)
    dw = lambda lam: jax.jacrev(solver, argnums=1)(jnp.zeros(D), lam, X, y)
    batched = np.asarray(jax.jit(jax.vmap(dw))(lams))
    for lam, got in zip(lams, batched):   # the closed form in NumPy
        a = X.T @ X + lam * np.eye(D)
        np.testing.assert_allclose(got, -np.linalg.solve(a, np.linalg.solve(a, X.T @ y)), rtol=1e-10)


def _linear_map(seed=3, n=4):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(n, n))
    return 0.5 * m / np.linalg.norm(m, 2)   # a contraction, not symmetric


def _iterate(T, x0, *args, tol=1e-15, maxiter=10_000):
    """x <- T(x) until ||T(x) - x|| <= tol (a while_loop)."""
    def cond(c):
        return (jnp.linalg.norm(T(c[0], *args) - c[0]) > tol) & (c[1] < maxiter)
    return jax.lax.while_loop(cond, lambda c: (T(c[0], *args), c[1] + 1), (x0, 0))[0]


def test_fixed_points_match_closed_forms():
    M = _linear_map()
    theta, a = np.arange(1.0, 5.0), 0.8
    linear = lambda x, theta: M @ x + theta
    cosine = lambda x, a: jnp.cos(a * x)
    # a jaxopt-style callable solve(matvec, b) for the non-symmetric I - M': BiCGSTAB (GMRES, as
    # well, adds 0.7 s of tracing and compiling)
    bicgstab = lambda mv, b: jax.scipy.sparse.linalg.bicgstab(mv, b, tol=1e-14, atol=0.0)[0]
    solves = {"default": None, "normal_dense": ls.normal(ls.dense()), "bicgstab": bicgstab}

    @jax.jit
    def run(theta, a):
        linear_jacobians = {}
        for name, solve in solves.items():
            fp = bj.custom_fixed_point(linear, solve=solve)(functools.partial(_iterate, linear))
            linear_jacobians[name] = jax.jacrev(fp, argnums=1)(jnp.zeros(4), theta)
        linear_jacobians["jacfwd"] = jax.jacfwd(fp, argnums=1)(jnp.zeros(4), theta)
        fc = bj.custom_fixed_point(cosine)(functools.partial(_iterate, cosine))
        return linear_jacobians, jax.value_and_grad(fc, argnums=1)(jnp.zeros(()), a)

    linear_jacobians, (x, dx) = run(theta, a)
    x, dx = float(x), float(dx)
    for name, jac in linear_jacobians.items():
        np.testing.assert_allclose(jac, np.linalg.inv(np.eye(4) - M), rtol=1e-10, atol=1e-13, err_msg=name)
    np.testing.assert_allclose(x, np.cos(a * x), atol=1e-14)
    np.testing.assert_allclose(dx, -x * np.sin(a * x) / (1 + a * np.sin(a * x)), rtol=1e-10)


def test_root_vjp_and_root_jvp_are_the_decorated_derivatives():
    M = _linear_map()
    F = lambda x, theta: M @ x + theta - x
    fp = bj.custom_root(F)(functools.partial(_iterate, lambda x, t: M @ x + t))
    cot, tan = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.3, 0.1, -1.0, 2.0])

    @jax.jit
    def run(theta):
        sol = fp(jnp.zeros(4), theta)
        decorated = lambda t: fp(jnp.zeros(4), t)
        return (bj.hypergrad.root_vjp(F, sol, (theta,), cot, return_info=True), jax.vjp(decorated, theta)[1](cot)[0],
                bj.hypergrad.root_jvp(F, sol, (theta,), (tan,)), jax.jvp(decorated, (theta,), (tan,))[1])

    ((vjp,), info), vjp_ref, jvp, jvp_ref = run(np.arange(1.0, 5.0))
    np.testing.assert_allclose(vjp, vjp_ref, rtol=1e-10)
    np.testing.assert_allclose(vjp, np.linalg.solve((np.eye(4) - M).T, cot), rtol=1e-10)
    assert int(info.status) == st.OK and float(info.residual_norm) < 1e-12
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-10)
    np.testing.assert_allclose(jvp, np.linalg.solve(np.eye(4) - M, tan), rtol=1e-10)


def test_failures_are_loud():
    """A singular optimality Jacobian with no solution (x^2 = a at a = 0: dx/da infinite), and a
    symmetric solver on a non-symmetric Jacobian: NaN derivatives and a status, never a number."""
    F = lambda x, a: x ** 2 - a
    root = lambda init, a: jnp.sqrt(a)
    M = _linear_map()
    T = lambda x, t: M @ x + t

    @jax.jit
    def run(zero):
        out = []
        for solve in (None, ls.cg(), ls.dense(), ls.minres()):
            g = jax.grad(lambda a: bj.custom_root(F, solve=solve)(root)(zero, a)[0])(zero)
            out.append((g, bj.hypergrad.root_vjp(F, zero, (zero,), jnp.ones(1), solve=solve, return_info=True)[1].status))
        fp = bj.custom_fixed_point(T, solve=ls.cg(maxiter=20))(functools.partial(_iterate, T))
        return out, jax.jacrev(fp, argnums=1)(jnp.zeros(4), jnp.ones(4))

    out, jac = run(np.zeros(1))
    for g, status in out:
        assert np.all(np.isnan(g)) and int(status) & st.BREAKDOWN
    assert np.all(np.isnan(jac))
    checked = bj.custom_root(F, solve=ls.cg(), check=True)(root)
    with pytest.raises(Exception, match="custom_root's implicit linear solve failed.*breakdown"):
        jax.block_until_ready(eqx.filter_jit(jax.grad(lambda a: checked(jnp.zeros(1), a)[0]))(np.zeros(1)))


def test_bad_input_is_refused_before_tracing():
    F = jax.grad(_ridge_objective)
    solver = bj.custom_root(F)(ridge_solver)
    with pytest.raises(TypeError, match=r"does not accept"):
        solver(np.zeros(D), 1.0, *_data(), 3.0)
    with pytest.raises(TypeError, match=r"deterministic"):
        bj.custom_root(F, solve=ls.stochastic_neumann())
    with pytest.raises(TypeError, match=r"solve must be"):
        bj.custom_root(F, solve="cg")
    with pytest.raises(TypeError, match=r"has_aux must be a Python bool"):
        bj.custom_root(F, has_aux=1)
    not_square = bj.custom_root(lambda w, lam: jnp.sum(w) - lam)(lambda init, lam: init)
    with pytest.raises(ValueError, match=r"shaped like the solution"):
        jax.grad(lambda lam: not_square(np.zeros(2), lam)[0])(1.0)


def test_normal_solver_on_a_nonsymmetric_system():
    """normal(cg) solves a non-symmetric A x = b (vs np.linalg.solve); a singular inconsistent one
    is BREAKDOWN with NaN; the info residual is that of A x = b."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6)) + 4 * np.eye(6)
    b = rng.normal(size=6)
    solver = ls.normal(ls.cg(maxiter=60))
    solve = jax.jit(lambda a, b: solver.solve(lambda v: a @ v, b, solver.init(b)))   # one program for both systems
    x, _, info = solve(a, b)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-10)
    assert int(info.status) == st.OK and float(info.residual_norm) < 1e-10 and int(info.num_matvecs) == 122
    singular = a.copy()
    singular[:, 0] = singular[:, 1]   # rank 5; b has a component outside the range
    x, state, info = solve(singular, b)
    assert np.all(np.isnan(x)) and np.all(np.isnan(state.x)) and int(info.status) == st.BREAKDOWN


def _jaxopt_implicit_diff():
    pytest.importorskip("jaxopt")
    from jaxopt import implicit_diff, linear_solve
    return implicit_diff, linear_solve


def test_ridge_matches_jaxopt():
    implicit_diff, linear_solve = _jaxopt_implicit_diff()
    X, y = _data()
    Xv, yv = _data(1)
    val = lambda w: 0.5 * jnp.sum((Xv @ w - yv) ** 2)
    F = jax.grad(_ridge_objective)
    ours = bj.custom_root(F, solve=ls.cg(maxiter=20))(ridge_solver)
    theirs = implicit_diff.custom_root(F, solve=functools.partial(linear_solve.solve_cg, tol=1e-14))(ridge_solver)
    grad = lambda s, lam, X, y: jax.grad(lambda lam, X, y: val(s(jnp.zeros(D), lam, X, y)),
                                         argnums=(0, 1, 2))(lam, X, y)
    got, want = jax.jit(lambda lam, X, y: (grad(ours, lam, X, y), grad(theirs, lam, X, y)))(0.7, X, y)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-12)


def test_multiclass_logistic_regression_matches_jaxopt():
    """Multiclass logistic regression, params {"W": (d, k), "b": (k,)}, l2reg and the data as args:
    grads of a validation loss w.r.t. l2reg and X, at the same solution, against jaxopt."""
    implicit_diff, linear_solve = _jaxopt_implicit_diff()
    rng = np.random.default_rng(7)
    k = 3
    X, Xv = rng.normal(size=(30, 4)), rng.normal(size=(10, 4))
    Y, Yv = np.eye(k)[rng.integers(0, k, 30)], np.eye(k)[rng.integers(0, k, 10)]   # one-hot labels

    def xent(p, X, Y):
        return -jnp.mean(jnp.sum(Y * jax.nn.log_softmax(X @ p["W"] + p["b"]), axis=1))

    def objective(p, l2reg, X, Y):
        return xent(p, X, Y) + 0.5 * l2reg * jnp.sum(p["W"] ** 2)

    def solver(init, l2reg, X, Y):
        return _gd_until(lambda p: jax.grad(objective)(p, l2reg, X, Y), init, 1.0, tol=1e-12)[0]

    F = jax.grad(objective)
    init = {"W": np.zeros((4, k)), "b": np.zeros(k)}
    ours = bj.custom_root(F, solve=ls.cg(maxiter=40))(solver)
    theirs = implicit_diff.custom_root(F, solve=functools.partial(linear_solve.solve_cg, tol=1e-14))(solver)
    grad = lambda s, l2, X: jax.grad(lambda l2, X: xent(s(init, l2, X, Y), Xv, Yv), argnums=(0, 1))(l2, X)
    got, want = jax.jit(lambda l2, X: (grad(ours, l2, X), grad(theirs, l2, X)))(0.1, X)
    assert abs(float(want[0])) > 1e-3   # a non-trivial derivative
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-12)


def test_fixed_point_matches_jaxopt():
    """x = tanh(W x + U theta) (a contraction), grads of a loss w.r.t. theta and W, against jaxopt."""
    implicit_diff, linear_solve = _jaxopt_implicit_diff()
    rng = np.random.default_rng(9)
    W = 0.4 * rng.normal(size=(5, 5)) / np.sqrt(5)
    U, theta = rng.normal(size=(5, 3)), rng.normal(size=3)
    T = lambda x, W, theta: jnp.tanh(W @ x + U @ theta)
    fp = lambda x0, W, theta: _iterate(T, x0, W, theta)   # jaxopt wants the signature of T
    ours = bj.custom_fixed_point(T)(fp)
    theirs = implicit_diff.custom_fixed_point(
        T, solve=functools.partial(linear_solve.solve_normal_cg, tol=1e-14))(fp)
    loss = lambda s, W, theta: jax.grad(lambda W, theta: jnp.sum(jnp.sin(s(jnp.zeros(5), W, theta))),
                                        argnums=(0, 1))(W, theta)
    got, want = jax.jit(lambda W, theta: (loss(ours, W, theta), loss(theirs, W, theta)))(W, theta)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-12)


def test_from_jaxopt_doc_blocks_run():
    """The python blocks of docs/from_jaxopt.md run as written (their asserts included)."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).parents[1] / "docs" / "from_jaxopt.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3
    for block in blocks:
        exec(compile(block, "docs/from_jaxopt.md", "exec"), {})

"""BilevelProblem, input validation (clear errors before tracing) and the closed-form problems
that the other tests use as ground truth."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

ls = bj.linear_solvers


# ------------------------------------------------------------------- closed-form ground truth
def test_closed_forms_agree_with_autodiff(quad, ridge):
    """grad F, phi* and theta* of the closed-form problems against autodiff of F = f_upper(., phi*)."""
    ridge_scalar = bj.problems.ridge_hpo(jax.random.PRNGKey(2), per_feature=False)
    theta_q = np.random.default_rng(0).normal(size=4)
    theta_r = -1.0 + 0.5 * np.random.default_rng(1).normal(size=8)

    @jax.jit
    def run(theta_q, theta_r):
        out = {}
        for name, inst, th in (("quad", quad, theta_q), ("ridge", ridge, theta_r),
                               ("ridge_scalar", ridge_scalar, theta_r[0])):
            ll_grad = jax.grad(inst.problem.f_lower, argnums=1)(th, inst.phi_star(th), inst.data[1])
            out[name] = (inst.grad(th), jax.grad(inst.value)(th), ll_grad)
        ts = quad.theta_star()
        out["theta_star"] = (quad.grad(ts), quad.hessian(), jax.hessian(quad.value)(ts))
        # the closed-form F is the problem's own f_upper at phi* (not a formula of its own)
        out["value"] = (quad.value(theta_q), quad.problem.f_upper(theta_q, quad.phi_star(theta_q), quad.data[0]))
        return out

    out = run(theta_q, theta_r)
    for name in ("quad", "ridge", "ridge_scalar"):
        g, g_ad, ll_grad = out[name]
        np.testing.assert_allclose(g, g_ad, rtol=1e-10, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(ll_grad, 0.0, atol=1e-12, err_msg=name)  # phi* is the LL minimiser
    g_star, hess, hess_ad = out["theta_star"]
    np.testing.assert_allclose(g_star, 0.0, atol=1e-12)
    np.testing.assert_allclose(hess, hess_ad, rtol=1e-10, atol=1e-14)
    assert np.linalg.eigvalsh(np.asarray(hess)).min() > 0
    np.testing.assert_allclose(*out["value"], rtol=1e-13)


def test_stochastic_quadratic_means_are_exact(quad_stoch):
    """The finite-sum problem: per-sample rank-one LL Hessians average to `means["H"]`, whose
    spectrum is the requested linspace(0.1, 1), and the data means are the closed forms' means."""
    lower, upper = quad_stoch.data[1], quad_stoch.data[0]
    H = np.asarray(lower["H"])
    assert H.shape == (64, 6, 6)
    np.testing.assert_allclose(np.linalg.matrix_rank(H[0]), 1)
    np.testing.assert_allclose(H.mean(0), quad_stoch.means["H"], atol=1e-12)
    np.testing.assert_allclose(np.linalg.eigvalsh(H.mean(0)), np.linspace(0.1, 1.0, 6), atol=1e-12)
    for k, data in (("C", lower), ("h", lower), ("P", upper), ("S", upper), ("p", upper)):
        np.testing.assert_allclose(np.asarray(data[k]).mean(0), quad_stoch.means[k], atol=1e-12, err_msg=k)


def test_builders_return_one_instance_type_with_the_reference_where_known(quad, ridge):
    """Every builder returns a `bj.problems.Instance`; the closed-form problems carry theta* as
    `reference` (grad F(theta*) = 0, F(theta*) the value); `_replace` and pytree flattening work
    as for the NamedTuples they replace, and a bound closed form jits."""
    flat = bj.problems.flat_bilevel(jax.random.PRNGKey(3))
    for inst in (quad, ridge, flat):
        assert isinstance(inst, bj.problems.Instance) and inst.name
    for inst in (quad, flat):
        theta = inst.reference.theta
        np.testing.assert_allclose(inst.grad(theta), 0.0, atol=1e-10)
        np.testing.assert_allclose(inst.reference.value, inst.value(theta), rtol=1e-12)
    assert ridge.reference is None
    moved = quad._replace(theta0=quad.theta0 + 1.0)
    assert type(moved) is type(quad) and moved.description == quad.description and moved.means is quad.means
    leaves, treedef = jax.tree_util.tree_flatten(quad)
    assert jax.tree_util.tree_unflatten(treedef, leaves).means.keys() == quad.means.keys()
    np.testing.assert_allclose(jax.jit(quad.grad)(quad.theta0), quad.grad(quad.theta0), rtol=1e-12)


# ---------------------------------------------------------------------------- BilevelProblem
def test_problem_requires_callables(quad):
    f_upper, f_lower = quad.problem.f_upper, quad.problem.f_lower
    with pytest.raises(TypeError, match=r"`f_upper` must be a callable .*got float"):
        bj.BilevelProblem(1.0, f_lower)
    with pytest.raises(TypeError, match=r"`f_lower` must be a callable .*got str"):
        bj.BilevelProblem(f_upper, "f_lower")
    with pytest.raises(TypeError, match=r"`project_upper` must be None or a callable"):
        bj.BilevelProblem(f_upper, f_lower, project_upper=0.0)


def test_projection():
    f = lambda theta, phi, batch: jnp.sum(phi ** 2)
    theta = jnp.array([-1.0, 0.5, 2.0])
    np.testing.assert_array_equal(bj.BilevelProblem(f, f).project(theta), theta)
    clipped = bj.BilevelProblem(f, f, project_upper=lambda t: jnp.clip(t, 0.0, 1.0)).project(theta)
    np.testing.assert_array_equal(clipped, [0.0, 0.5, 1.0])


# ----------------------------------------------------------------------- structure mismatches
def test_phi_that_does_not_fit_f_lower(quad):
    # f_upper accepts any phi, so it is f_lower that must be named
    problem = bj.BilevelProblem(lambda t, p, b: jnp.sum(t ** 2) + jnp.sum(p ** 2), quad.problem.f_lower)
    with pytest.raises(ValueError, match=r"f_lower\(theta, phi, batch\) fails on the given structures.*"
                                         r"phi: float64\[5\]"):
        bj.hypergradient(problem, quad.theta0, jnp.zeros(5), quad.data)
    with pytest.raises(ValueError, match=r"f_upper\(theta, phi, batch\) fails.*phi: float64\[5\]"):
        bj.hypergradient(quad.problem, quad.theta0, jnp.zeros(5), quad.data)
    with pytest.raises(ValueError, match=r"f_upper\(theta, phi, batch\) fails"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, jnp.zeros(5), quad.data,
                                  optimizer=optax.sgd(0.1), steps=3)


def test_objective_must_return_real_scalar(quad):
    problem = bj.BilevelProblem(lambda t, p, b: p, quad.problem.f_lower)
    with pytest.raises(ValueError, match=r"f_upper must return a real scalar, got float64\[6\]"):
        bj.hypergradient(problem, quad.theta0, quad.phi0, quad.data)


def test_integer_variables_rejected(quad):
    with pytest.raises(TypeError, match=r"theta has no floating-point array leaf"):
        bj.hypergradient(quad.problem, jnp.zeros(4, jnp.int32), quad.phi0, quad.data)
    f = lambda theta, phi, batch: jnp.sum(theta ** 2) + jnp.sum(phi[0] ** 2)
    with pytest.raises(TypeError, match=r"phi\[1\] has dtype int32.*must be floating point"):
        bj.hypergradient(bj.BilevelProblem(f, f), quad.theta0, (quad.phi0, jnp.zeros(2, jnp.int32)), (None, None))


def test_mixed_float_dtypes_rejected(quad):
    with pytest.raises(TypeError, match=r"mix floating dtypes \['float32', 'float64'\]"):
        bj.hypergradient(quad.problem, quad.theta0.astype(jnp.float32), quad.phi0, quad.data)
    with pytest.raises(TypeError, match=r"mix floating dtypes"):
        bj.zero_ig_hypergradient(quad.problem, quad.theta0, quad.phi0.astype(jnp.float32), quad.data,
                                 lower_lr=0.1, steps=2)


@pytest.mark.parametrize("data", ["dict", "triple", "none"])
def test_data_must_be_a_pair(quad, data):
    calls = []

    def f(theta, phi, batch):
        calls.append(None)
        return quad.problem.f_upper(theta, phi, batch)

    bad = {"dict": quad.data[0], "triple": (quad.data[0], quad.data[1], None), "none": None}[data]
    with pytest.raises(TypeError, match=r"data must be a pair \(upper_data, lower_data\)"):
        bj.hypergradient(bj.BilevelProblem(f, quad.problem.f_lower), quad.theta0, quad.phi0, bad)
    assert not calls  # rejected before the objectives were traced


def test_hypergradient_argument_checks(quad):
    with pytest.raises(TypeError, match=r"problem must be a bj.BilevelProblem"):
        bj.hypergradient((quad.problem.f_upper, quad.problem.f_lower), quad.theta0, quad.phi0, quad.data)
    with pytest.raises(TypeError, match=r"solver must be a bj.linear_solvers solver"):
        bj.hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, solver="cg")
    with pytest.raises(ValueError, match=r"x0: leaf 0 has shape \(5,\), expected \(6,\)"):
        bj.hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, x0=jnp.zeros(5))
    calls = []
    counted = bj.BilevelProblem(lambda *a: calls.append(None) or quad.problem.f_upper(*a), quad.problem.f_lower)
    with pytest.raises(ValueError, match=r"mode must be 'rev' or 'fwd', got 'backward'"):
        bj.hypergradient(counted, quad.theta0, quad.phi0, quad.data, mode="backward")
    assert not calls  # rejected before anything was traced


# ------------------------------------------------------------------------ hyperparameter checks
def test_iteration_counts_must_be_positive_ints(quad):
    with pytest.raises(ValueError, match=r"maxiter must be >= 1, got 0"):
        ls.cg(maxiter=0)
    with pytest.raises(TypeError, match=r"maxiter must be a Python int"):
        ls.cg(maxiter=10.0)
    for make in (ls.gd, ls.neumann, ls.stochastic_neumann):
        with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
            make(steps=0)
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1), steps=0)
    with pytest.raises(ValueError, match=r"steps must be >= 1, got -1"):
        bj.zero_ig_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, lower_lr=0.1, steps=-1)
    with pytest.raises(ValueError, match=r"truncate=5 exceeds steps=3"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1),
                                  steps=3, truncate=5)
    with pytest.raises(ValueError, match=r"truncate is a reverse-mode option"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1),
                                  steps=3, truncate=2, mode="forward")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1),
                                  steps=3, mode="rev")


@pytest.mark.parametrize("eta", [0.0, -0.1, float("nan"), np.array([0.1, -0.1])])
def test_step_sizes_must_be_positive(eta):
    for make in (ls.gd, ls.neumann, ls.stochastic_neumann):
        with pytest.raises(ValueError, match=r"eta must be a positive step size"):
            make(steps=3, eta=eta)
    with pytest.raises(ValueError, match=r"lower_lr must be a positive step size"):
        bj.algorithms.signsgd_ul(bj.BilevelProblem(lambda t, p, b: 0.0, lambda t, p, b: 0.0), lower_lr=eta)


def test_tolerances_must_be_nonnegative():
    with pytest.raises(ValueError, match=r"rtol must lie in \[0.0, inf\]"):
        ls.cg(rtol=-1e-3)
    with pytest.raises(ValueError, match=r"atol must lie in"):
        ls.cg(atol=-1.0)


def test_stochastic_solver_needs_key(quad):
    solver = ls.stochastic_neumann(steps=3, eta=0.1)
    with pytest.raises(ValueError, match=r"stochastic: pass `key=`"):
        bj.hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, solver)
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
        solver.solve(lambda v, key: v, jnp.ones(3), solver.init(jnp.ones(3)))


def test_traced_step_sizes_pass_through():
    """Step sizes may be traced (a vmapped sweep): no check can run, nothing is rejected."""
    a = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
    b = jnp.ones(3)
    etas = jnp.array([0.05, 0.1, 0.2])
    xs = jax.jit(jax.vmap(lambda eta: ls.gd(steps=5, eta=eta).solve(lambda v: a @ v, b, ls.gd().init(b))[0]))(etas)
    for eta, x in zip(np.asarray(etas), np.asarray(xs)):
        d = 1 - eta * np.array([1.0, 2.0, 4.0])
        np.testing.assert_allclose(x, (1 - d ** 5) / np.array([1.0, 2.0, 4.0]), rtol=1e-12)

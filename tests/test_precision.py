"""Mixed precision (`bj.Precision`): bfloat16/float16 objective evaluations, float32 states.

References: the logistic HPO's dense implicit gradient (float64 closed form), float64 runs of the
same estimator at the same point (an MLP LL), the quadratic's closed-form theta*. Range faults of
float16 (overflow, underflow) must be flagged, never a finite-looking (zero) gradient.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import datasets, oracles
from bilevel_jax import status as st
from bilevel_jax.hypergrad import implicit_direction
from bilevel_jax.precision import policy_of, with_precision, wrap_problem
from bilevel_jax.precision import precision_status as _precision_status

BF16 = bj.Precision()                                   # bfloat16 compute, float32 states
F16 = bj.Precision(compute=jnp.float16)


@pytest.fixture(scope="module")
def hpo():
    data = datasets.ijcnn1_like(0, n_train=300, n_val=400)
    return bj.problems.logistic_hpo(data, key=1)


precision_status = eqx.filter_jit(_precision_status)
upper_grads = eqx.filter_jit(oracles.upper_grads)


def _rel(a, b):
    """||a - b|| / ||b|| over the float leaves, in NumPy float64."""
    a, b = (np.concatenate([np.ravel(x).astype(np.float64)
                            for x in jax.tree_util.tree_leaves(jax.device_get(eqx.filter(t, eqx.is_inexact_array)))])
            for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_policy_arguments(hpo, quad):
    assert (BF16.compute, BF16.state, BF16.loss_scale) == (jnp.bfloat16, jnp.float32, 1.0)
    assert bj.Precision(jnp.bfloat16) == BF16 and hash(bj.Precision(jnp.bfloat16)) == hash(BF16)
    assert F16.narrower_range and not BF16.narrower_range
    with pytest.raises(ValueError, match="compute must be one of"):
        bj.Precision(compute=jnp.int32)
    with pytest.raises(ValueError, match="state must be one of"):
        bj.Precision(state=jnp.bfloat16)
    with pytest.raises(ValueError, match="at least as wide"):
        bj.Precision(compute=jnp.float64, state=jnp.float32)
    with pytest.raises(ValueError, match="loss_scale"):
        bj.Precision(loss_scale=0.0)
    with pytest.raises(TypeError, match="precision must be None or a bj.Precision"):
        bj.hypergradient(hpo.problem, hpo.theta0, hpo.phi0, hpo.data, precision="bfloat16")
    wrapped = wrap_problem(hpo.problem, BF16)
    assert policy_of(wrapped) == BF16 and policy_of(hpo.problem) is None
    assert wrap_problem(hpo.problem, BF16) == wrapped          # equal policies hash equal: no recompilation
    with pytest.raises(ValueError, match="already runs under"):
        wrap_problem(wrapped, F16)
    alg = bj.algorithms.soba(quad.problem, batch_size=None)
    assert with_precision(alg, None) is alg


def test_bfloat16_hypergradient_on_the_logistic_hpo(hpo):
    theta = hpo.theta0
    w = hpo.phi_star(theta)
    ref = hpo.grad(theta)                                   # float64, dense A
    solver = bj.linear_solvers.cg(maxiter=50, rtol=1e-3)
    for policy, tol in ((BF16, 1e-2), (F16, 1e-2)):        # measured 4.3e-3 (bf16), 7.3e-4 (f16)
        g, info = bj.hypergradient(hpo.problem, theta, w, hpo.data, solver=solver, precision=policy)
        assert int(info.status) == st.OK
        assert g.dtype == info.v.dtype == jnp.float32
        assert _rel(g, ref) < tol
    # bj.argmin under the policy: jax.grad through the bfloat16 LL solution
    # (30 gradient steps from the float64 solution: phi* where the bfloat16 LL gradient vanishes)
    solve = bj.argmin(hpo.problem.f_lower, optax.sgd(1.0), 30, solver=bj.linear_solvers.cg(30, rtol=1e-3),
                      precision=BF16)
    h = lambda t: hpo.problem.f_upper(t, solve(t, w, hpo.data[1]), hpo.data[0])
    phi, grad = jax.jit(lambda t: (solve(t, w, hpo.data[1]), jax.grad(h)(t)))(theta)   # one program
    assert phi.dtype == jnp.float32
    assert _rel(grad, ref) < 2e-2


def _mlp_problem(n=2048):
    """phi = a 4-16-1 tanh MLP, f_lower = MSE + 1/2 sum_l exp(theta_l) ||W_l||^2 (one theta per leaf)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(101), 3)
    X = jax.random.normal(k1, (2 * n, 4))
    y = jnp.sin(X @ jnp.arange(1.0, 5.0) / 2)[:, None] + 0.3 * jax.random.normal(k2, (2 * n, 1))
    data = ((X[n:], y[n:]), (X[:n], y[:n]))

    def mse(model, batch):
        return jnp.mean((jax.vmap(model)(batch[0]) - batch[1]) ** 2)

    def f_lower(theta, model, batch):
        sq = jnp.stack([jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))])
        return mse(model, batch) + 0.5 * jnp.sum(jnp.exp(theta) * sq)

    model = eqx.nn.MLP(4, 1, 16, 1, activation=jnp.tanh, key=jax.random.PRNGKey(1))
    model = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
    return bj.BilevelProblem(lambda t, m, b: mse(m, b), f_lower), data, model


@pytest.mark.slow   # the policy's code is the logistic bf16 test's (test_bfloat16_hypergradient_on_the_logistic_hpo)
def test_bfloat16_hypergradient_on_an_mlp():
    problem, data, model = _mlp_problem()
    theta = jnp.full((4,), jnp.log(0.1))
    phi = bj.hypergrad.solve_lower(problem, optax.lbfgs(), theta, model, data[1], steps=100)
    ref, info = bj.hypergradient(problem, theta, phi, data, solver=bj.linear_solvers.cg(maxiter=100))
    assert info.status == st.OK
    g, info = bj.hypergradient(problem, theta, phi, data, solver=bj.linear_solvers.cg(maxiter=100, rtol=1e-3),
                               precision=BF16)
    assert info.status == st.OK and g.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(info.v))
    assert _rel(g, ref) < 1e-2                                # measured 3.4e-3


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_oracle_arithmetic_is_bfloat16_and_the_solver_state_float32(hpo):
    problem = wrap_problem(hpo.problem, BF16)
    theta, w = BF16.cast_state(hpo.theta0), BF16.cast_state(hpo.phi_star(hpo.theta0))
    solver = bj.linear_solvers.cg(maxiter=5)

    def g(theta, w, data):
        return implicit_direction(problem, theta, w, data[0], data[1], solver, solver.init(w)).g

    jaxpr = jax.make_jaxpr(g)(theta, w, hpo.data).jaxpr
    eqns = list(_equations(jaxpr))
    data_dots = [e for e in eqns if e.primitive.name == "dot_general" and max(v.aval.ndim for v in e.invars) == 2]
    # forward, gradient and the A v / J v products of both objectives: every product with the data
    assert len(data_dots) >= 6
    assert all(v.aval.dtype == jnp.bfloat16 for e in data_dots for v in e.invars)
    scans = [e for e in eqns if e.primitive.name == "scan"]   # CG's iterations
    assert scans
    for e in scans:
        carry = e.outvars[:e.params["num_carry"]]
        floats = [v.aval.dtype for v in carry if jnp.issubdtype(v.aval.dtype, jnp.floating)]
        assert floats and all(d == jnp.float32 for d in floats)
    assert jaxpr.outvars[0].aval.dtype == jnp.float32


def test_soba_in_bfloat16_keeps_float32_states_and_converges(quad):
    theta_star = quad.reference.theta
    alg = with_precision(bj.algorithms.soba(quad.problem, upper_lr=0.5, lower_lr=0.5, batch_size=None), BF16)
    assert policy_of(alg.problem) == BF16

    @jax.jit
    def run(data):   # init inside the run's program
        state = alg.init(BF16.cast_state(quad.theta0), BF16.cast_state(quad.phi0), jax.random.PRNGKey(0), data)
        return bj.run(alg, state, data, num_steps=2000, eval_every=1000)

    state, hist = run(quad.data)
    assert int(np.asarray(hist["status"])[-1]) == st.OK
    leaves = jax.tree_util.tree_leaves(eqx.filter(state, eqx.is_inexact_array))
    assert len(leaves) >= 3 and all(x.dtype == jnp.float32 for x in leaves)     # theta, phi, v
    # float64 soba reaches 2e-4 with these steps; bfloat16 oracles 3.5e-3 (measured)
    assert _rel(state.theta, theta_star) < 1e-2


def test_with_precision_reaches_every_copy_of_the_problem():
    f_lower = lambda t, p, b: 0.5 * jnp.sum((p - t) ** 2)
    f_upper = lambda t, p, b: 0.5 * jnp.sum((p - 1.0) ** 2)
    box = bj.constraints.box(0.0, 1.0)
    alg = with_precision(bj.algorithms.soba(box.problem(f_upper, f_lower), batch_size=None), BF16)
    assert alg.direction.problem is alg.problem and policy_of(alg.problem) == BF16   # the KKT rule's copy
    # a multi-objective preset: its problem's objectives are wrapped, the run keeps float32 states
    from bilevel_jax.problems import multitask as mt
    q = mt.multitask_quadratic(0, num_tasks=3, dim_upper=2, dim_lower=3)
    alg = with_precision(bj.algorithms.morbit(q.problem, upper_lr=0.05, lower_lr=0.3), BF16)
    assert policy_of(alg.problem) == BF16
    state, hist = jax.jit(lambda d: bj.run(alg, alg.init(jnp.zeros(2, jnp.float32), jnp.zeros((3, 3), jnp.float32),
                                                         jax.random.PRNGKey(0), d), d, num_steps=20))(q.data)
    assert int(np.asarray(hist["status"])[-1]) == st.OK
    # (its simplex weights lam are sized in the default float, float64 under x64: wider is allowed)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((state.theta, state.phi, state.solver)))


def test_float16_overflow_is_flagged(hpo):
    theta, phi = hpo.theta0, hpo.phi_star(hpo.theta0)
    w = 1e5 * np.asarray(phi)     # |w| <= 5.9e4 fits float16, margins up to 1.1e5 do not (max 65504)
    big = jax.tree_util.tree_map(lambda x: 1e5 * np.asarray(x), hpo.data)
    for data in (hpo.data, big):   # in the arithmetic; in the cast
        g, info = jax.device_get(bj.hypergradient(hpo.problem, theta, w if data is hpo.data else phi, data,
                                                  precision=F16))
        assert info.status & st.PRECISION and np.all(np.isnan(g))
    g, info = jax.device_get(bj.hypergradient(hpo.problem, theta, w, hpo.data, precision=BF16))   # bfloat16's range
    assert info.status == st.OK and np.all(np.isfinite(g))                                        # holds it
    # inside a preset the faulty oracles are NaN: the run reports it (and check=True raises)
    alg = with_precision(bj.algorithms.soba(hpo.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None), F16)
    _, hist = jax.jit(lambda d: bj.run(alg, alg.init(F16.cast_state(theta), F16.cast_state(w), jax.random.PRNGKey(0),
                                                     d), d, num_steps=2))(hpo.data)
    assert int(np.asarray(hist["status"])[-1]) & st.NONFINITE


def test_float16_underflow_is_flagged_and_loss_scaling_recovers(hpo):
    scale = 2.0 ** -20       # exact in float16 (a subnormal): the objectives' values of order 1e-6
    small = bj.BilevelProblem(lambda t, p, b: scale * hpo.problem.f_upper(t, p, b),
                              lambda t, p, b: scale * hpo.problem.f_lower(t, p, b))
    theta, w = hpo.theta0, hpo.phi_star(hpo.theta0)
    t32, w32 = F16.cast_state(theta), F16.cast_state(w)
    # gradients of order 1e-8: below float16's smallest normal (6.1e-5), subnormal or zero
    wrapped = wrap_problem(small, F16)
    assert int(precision_status(wrapped, t32, w32, hpo.data)) == st.PRECISION
    grads = jax.device_get(upper_grads(wrapped, t32, w32, hpo.data[0]))
    assert all(np.all(np.isnan(x)) for x in jax.tree_util.tree_leaves(grads))   # never a silent zero
    _, info = bj.hypergradient(small, theta, w, hpo.data, precision=F16)
    assert int(info.status) & st.PRECISION
    # the same gradients from the seed 2^15 are in range, and match float64 after unscaling
    scaled = bj.Precision(compute=jnp.float16, loss_scale=2.0 ** 15)
    wrapped = wrap_problem(small, scaled)
    assert int(precision_status(wrapped, t32, w32, hpo.data)) == st.OK
    ref = upper_grads(small, theta, w, hpo.data[0])[1]
    assert _rel(upper_grads(wrapped, t32, w32, hpo.data[0])[1], ref) < 1e-2
    # all the way to zero (1e-12 is 0 in float16): flagged by precision_status, which compares with the
    # state dtype; an exact stationary point (zero in both) is not a fault
    tinier = bj.BilevelProblem(lambda t, p, b: 1e-12 * hpo.problem.f_upper(t, p, b), hpo.problem.f_lower)
    assert int(precision_status(wrap_problem(tinier, F16), t32, w32, hpo.data)) == st.PRECISION
    flat = bj.BilevelProblem(lambda t, p, b: 0.5 * jnp.sum((p - t) ** 2), lambda t, p, b: 0.5 * jnp.sum((p - t) ** 2))
    zeros = np.zeros(3, np.float32)
    assert int(precision_status(wrap_problem(flat, F16), zeros, zeros, (None, None))) == st.OK
    np.testing.assert_equal(st.describe(st.PRECISION), "compute-dtype range")

"""Model pruning (`bj.problems.pruning`) and data subset selection (`bj.problems.subset_selection`):
their pieces against hand computations and SciPy, a short run that lowers the UL objective
F(theta) = f_upper(theta, phi*(theta)) (phi* by L-BFGS), and their examples (--quick)."""
import importlib.util
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.problems import pruning as pr
from bilevel_jax.problems import subset_selection as ss

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def blobs(n, d=5, classes=3, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(0, classes, n)
    X = centers[y] + rng.normal(size=(n, d))
    noisy = y.copy()
    flip = rng.random(n) < noise
    noisy[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes
    return jnp.asarray(X), jnp.asarray(noisy), jnp.asarray(flip)


def ul_value(problem, theta, phi_init, data):
    """F(theta) with phi* by 200 L-BFGS steps: the runs' phi0 solve, so its compiled program is reused
    (F at 200 steps equals F at 300 to 1e-15 in both run tests; their margins are 3.08 and 0.56)."""
    phi = bj.argmin(problem.f_lower, optax.lbfgs(), steps=200)(theta, phi_init, data[1])
    return float(eqx.filter_jit(problem.f_upper)(theta, phi, data[0]))    # one program, not one per operation


def cross_entropy(z, y):
    """Per-sample softmax cross-entropy of the scores z (NumPy float64: a reference compiles nothing)."""
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(len(y)), y]


# ------------------------------------------------------------------------------------------------ pruning

def test_mask_model_multiplies_only_weight_matrices():
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.PRNGKey(0))
    theta = pr.mask_like(model, 0.5)
    assert [t.shape for t in theta] == [(4, 3), (2, 4)]
    masked = pr.mask_model(model, theta)
    np.testing.assert_allclose(masked.layers[0].weight, 0.5 * model.layers[0].weight)
    np.testing.assert_allclose(masked.layers[1].bias, model.layers[1].bias)
    np.testing.assert_allclose(pr.project_mask((jnp.array([-1.0, 0.3, 2.0]),))[0], [0.0, 0.3, 1.0])
    hard_mask = jax.jit(pr.hard_mask, static_argnames="keep")      # one program, not one per operation
    hard = hard_mask((jnp.array([[0.9, 0.1], [0.5, 0.2]]), jnp.array([[0.8, 0.05]])), keep=0.5)
    np.testing.assert_array_equal(hard[0], [[1, 0], [1, 0]])
    np.testing.assert_array_equal(hard[1], [[1, 0]])
    with pytest.raises(ValueError, match="rho must be > 0"):
        pr.make_problem(rho=0.0)


def test_pruning_objectives_are_eq_8():
    X, y, _ = blobs(20)
    model = eqx.nn.Linear(5, 3, key=jax.random.PRNGKey(1))
    b = pr.pruning(model, (X, y), (X, y), rho=0.1, sparsity=0.2, mask_init=0.3)
    theta = b.theta0
    weight, bias = np.asarray(model.weight), np.asarray(model.bias)
    ce = np.mean(cross_entropy(np.asarray(X) @ (0.3 * weight).T + bias, np.asarray(y)))
    reg = np.sum(weight ** 2) + np.sum(bias ** 2)
    f_lower, f_upper = eqx.filter_jit(b.problem.f_lower), eqx.filter_jit(b.problem.f_upper)   # not op by op
    np.testing.assert_allclose(f_lower(theta, model, b.data[1]), ce + 0.1 * reg, rtol=1e-12)
    np.testing.assert_allclose(f_upper(theta, model, b.data[0]), ce + 0.2 * 0.3, rtol=1e-12)


def test_pruning_run_lowers_the_ul_objective_and_keeps_the_mask_in_the_box():
    X, y, _ = blobs(60, seed=2)
    Xv, yv, _ = blobs(60, seed=3)
    model = eqx.nn.Linear(5, 3, key=jax.random.PRNGKey(2))
    b = pr.pruning(model, (X, y), (Xv, yv), rho=1e-2, sparsity=0.05)
    solve = bj.argmin(b.problem.f_lower, optax.lbfgs(), steps=200)
    phi0 = solve(b.theta0, model, b.data[1])
    alg = bj.algorithms.amigo(b.problem, upper_lr=5.0, lower_lr=0.5, batch_size=None)
    state = alg.init(b.theta0, phi0, jax.random.PRNGKey(0), b.data)
    state, hist = bj.run(alg, state, b.data, num_steps=40, eval_every=40)
    assert int(np.asarray(hist["status"])[-1]) == 0                 # read in NumPy: no eager dispatch per index
    t = np.asarray(state.theta[0])
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert ul_value(b.problem, state.theta, model, b.data) < ul_value(b.problem, b.theta0, model, b.data) - 1e-3


# ------------------------------------------------------------------------------------------------ subset selection

# the budget an argument: one program for the three budgets (eagerly, its loop compiles once per budget)
project_budget = jax.jit(ss.project_budget)


@pytest.mark.parametrize("budget", [1.5, 3.0, 10.0])
def test_budget_projection_matches_scipy(budget):
    from scipy.optimize import minimize
    w = jnp.array([0.9, -0.3, 1.7, 0.4, 0.8, 0.05])
    got = np.asarray(project_budget(w, budget))
    ref = minimize(lambda q: np.sum((q - np.asarray(w)) ** 2), np.full(6, 0.1), jac=lambda q: 2 * (q - np.asarray(w)),
                   bounds=[(0, 1)] * 6, constraints=[{"type": "ineq", "fun": lambda q: budget - q.sum()}],
                   method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    np.testing.assert_allclose(got, ref.x, atol=1e-7)
    assert got.sum() <= budget + 1e-9 and got.min() >= 0 and got.max() <= 1


def test_subset_selection_objective_and_minibatch_scaling():
    X, y, _ = blobs(12)
    b = ss.subset_selection((X, y), (X, y), budget=4)
    (Xv, yv), (Xt, yt, idx) = b.data
    assert Xt.shape == (12, 6) and b.theta0.sum() == pytest.approx(4.0)
    W = np.asarray(jax.random.normal(jax.random.PRNGKey(0), b.phi0.shape))
    w = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (12,)))
    Xt, yt, idx = (np.asarray(a) for a in (Xt, yt, idx))     # references and blocks in NumPy, the objective jitted
    f_lower = jax.jit(b.problem.f_lower)                     # one program per shape, not one per operation
    ce = cross_entropy(Xt @ W.T, yt)
    np.testing.assert_allclose(f_lower(w, W, b.data[1]), np.sum(w * ce) / 4 + 0.01 * np.sum(W ** 2), rtol=1e-12)
    # the mean over all blocks of a minibatch estimate is the full objective
    blocks = [f_lower(w, W, (Xt[i:i + 3], yt[i:i + 3], idx[i:i + 3])) for i in range(0, 12, 3)]
    np.testing.assert_allclose(np.mean(blocks), f_lower(w, W, b.data[1]), rtol=1e-12)


def test_subset_selection_run_lowers_the_ul_objective_within_the_budget():
    X, y, flipped = blobs(60, seed=4, noise=0.4)
    Xv, yv, _ = blobs(60, seed=5)
    b = ss.subset_selection((X, y), (Xv, yv), budget=30)
    solve = bj.argmin(b.problem.f_lower, optax.lbfgs(), steps=200)
    phi0 = solve(b.theta0, b.phi0, b.data[1])
    alg = bj.algorithms.amigo(b.problem, upper_lr=2.0, lower_lr=0.5, batch_size=None)
    state = alg.init(b.theta0, phi0, jax.random.PRNGKey(0), b.data)
    state, hist = bj.run(alg, state, b.data, num_steps=40, eval_every=40)
    assert int(np.asarray(hist["status"])[-1]) == 0                 # read in NumPy: no eager dispatch per index
    w = np.asarray(state.theta)
    assert float(w.sum()) <= 30 + 1e-6 and float(w.min()) >= 0.0
    assert ul_value(b.problem, state.theta, b.phi0, b.data) < ul_value(b.problem, b.theta0, b.phi0, b.data) - 0.1
    np.testing.assert_array_equal(np.sort(np.asarray(ss.select(state.theta, 5))), np.sort(np.argsort(-w)[:5]))


# ------------------------------------------------------------------------------------------------ examples

def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow   # the library path is covered by test_pruning_run_...; `make examples` runs it
def test_pruning_example_quick():
    out = _load("pruning_digits").main(["--quick"])
    assert out["status"] == "ok" and out["finite"]
    assert out["value_final"] < out["value_initial"]
    assert out["acc_pruned"] > out["acc_random_mask"]


@pytest.mark.slow   # covered by test_subset_selection_run_...; `make examples` runs it
def test_subset_selection_example_quick():
    out = _load("subset_selection_digits").main(["--quick"])
    assert out["status"] == "ok" and out["finite"]
    assert out["value_final"] < out["value_initial"]
    assert out["clean_share_selected"] > out["clean_share_all"]

"""Equinox models as the lower-level variable: an `eqx.nn.MLP(..., activation=jnp.tanh)` phi (a
pytree with a function leaf) through every preset, `bj.hypergradient`, `bj.run` and vmap over seeds
with a different model init per seed.

The LL is a regression loss plus exp(theta) ||params||^2 / 2 with exp(theta) ~ 4.5, strongly convex
enough near the init for a few outer steps; the UL is the validation loss. The data and the models
are made in one jit each and the checks run in NumPy: eagerly, each random draw and each operation
would compile a program of its own (per shape).
"""
import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest

import bilevel_jax as bj

NAMES = sorted(bj.algorithms.ALGORITHMS)
N, D = 16, 3


@eqx.filter_jit
def make_mlp(key):
    return eqx.nn.MLP(D, "scalar", width_size=4, depth=1, activation=jnp.tanh, key=key)


def _loss(model, batch):
    x, y = batch
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def f_lower(theta, model, batch):
    params = eqx.filter(model, eqx.is_inexact_array)
    return _loss(model, batch) + 0.5 * jnp.exp(theta) * otu.tree_norm(params, squared=True)


def f_upper(theta, model, batch):
    return _loss(model, batch)


@jax.jit
def _theta0_and_data():
    kx, kw, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (2 * N, D))
    y = jnp.sin(x @ jax.random.normal(kw, (D,)))
    return jnp.asarray(1.5), ((x[N:], y[N:]), (x[:N], y[:N]))


@pytest.fixture(scope="module")
def mlp_setup():
    return bj.BilevelProblem(f_upper, f_lower), *_theta0_and_data()


# per preset: small-cost settings for a few outer steps (full batch unless the method needs batches)
SETTINGS = {name: dict(upper_lr=0.05, lower_lr=0.1) for name in NAMES}
for name in ("ba", "aid_bio", "stocbio", "amigo", "bsa", "alternating", "signsgd_ul", "lancbio", "subbio"):
    SETTINGS[name]["lower_steps"] = 2
for name in ("stocbio", "bsa", "ttsa", "alset", "mrbo", "sustain", "vrbo", "vrbo_single_loop"):
    SETTINGS[name]["neumann_steps"] = 3
for name in ("vrbo", "vrbo_single_loop"):
    SETTINGS[name]["period"] = 2
SETTINGS["vrbo"]["lower_steps"] = 2
for name in ("f2sa", "pzobo", "bsg1"):
    SETTINGS[name]["lower_steps"] = 2
for name in ("bome", "pbgd", "pdbo", "vf_penalty"):
    SETTINGS[name]["tracker_steps"] = 2
SETTINGS["pzobo"]["num_directions"] = 2
SETTINGS["srba"]["period"] = 2
# CDB's penalty gradient beta J c on theta is ~57 at the random init (c = grad_phi f_lower ~ 7.8): a
# smaller beta keeps theta where the LL stays strongly convex (theta = -1.4 after one step at beta = 1)
SETTINGS["cdb"]["penalty"] = 0.01


# Presets whose every library line run by this test (trace, compile and run; the preset's own
# constructor is tested for every preset in test_algorithms_structure.py) is also run by the fast
# presets named, measured with a line tracer over bilevel_jax/: they run with --runslow only.
COVERED_BY = {
    "aid_bio": "momentum, amigo", "alset": "subbio, sustain", "bsa": "subbio, sustain", "mrbo": "vrbo, sustain",
    "optimality_penalty": "ebsa", "signsgd_ul": "alternating", "soba": "saba, sustain, lancbio",
    "srba": "vrbo, saba", "stocbio": "amigo, vrbo", "ttsa": "subbio, sustain", "vf_penalty": "smoothing_pg, f2sa",
    "vrbo_single_loop": "vrbo, saba",
}
PRESETS = [pytest.param(name, marks=pytest.mark.slow(reason=f"its MLP code path is run by {COVERED_BY[name]}"))
           if name in COVERED_BY else name for name in NAMES]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_an_mlp_phi_under_jit(name, mlp_setup):
    problem, theta0, data = mlp_setup
    batch_size = 8 if name == "saba" else None
    alg = bj.algorithms.get(name)(problem, batch_size=batch_size, **SETTINGS[name])
    model = make_mlp(jax.random.PRNGKey(1))

    @eqx.filter_jit
    def go(key):
        return bj.run(alg, alg.init(theta0, model, key, data), data, num_steps=3)

    state, history = go(jax.random.PRNGKey(1))
    assert isinstance(state.phi, eqx.nn.MLP) and state.phi.activation is jnp.tanh
    assert np.all(np.asarray(history["status"]) == bj.status.OK), (name, history["status"])
    chex.assert_tree_all_finite((state.theta, eqx.filter(state.phi, eqx.is_array)))
    # phi moved from its init (every preset moves the LL variable)
    assert np.abs(np.asarray(state.phi.layers[0].weight) - np.asarray(model.layers[0].weight)).max() > 0


@pytest.mark.parametrize("name", ["soba", "amigo", "bome"])
def test_an_mlp_phi_runs_vmapped_over_seeds(name, mlp_setup):
    """vmap over seeds, a different model per seed, inside one jit. Every preset runs vmapped over
    seeds on the quadratic (test_algorithms_convergence.py) and with an MLP phi (above); here one
    preset per kind of step (single-loop, double-loop with a solver, value-function) does both."""
    problem, theta0, data = mlp_setup
    alg = bj.algorithms.get(name)(problem, batch_size=None, **SETTINGS[name])

    @eqx.filter_jit
    def go(seeds):
        def one(seed):
            key = jax.random.PRNGKey(seed)
            state = alg.init(theta0, make_mlp(key), key, data)   # a different model per seed
            return bj.run(alg, state, data, num_steps=3)
        return eqx.filter_vmap(one)(seeds)

    state, history = go(np.arange(2))
    assert isinstance(state.phi, eqx.nn.MLP) and state.phi.activation is jnp.tanh
    assert state.theta.shape == (2,)
    assert np.all(np.asarray(history["status"]) == bj.status.OK), (name, history["status"])
    chex.assert_tree_all_finite((state.theta, eqx.filter(state.phi, eqx.is_array)))
    # the two seeds started from different models and stayed different, and phi moved
    w0 = np.asarray(state.phi.layers[0].weight)
    assert np.abs(w0[0] - w0[1]).max() > 1e-3
    assert np.abs(w0[0] - np.asarray(make_mlp(jax.random.PRNGKey(0)).layers[0].weight)).max() > 0


def test_hypergradient_of_an_mlp_phi_matches_the_dense_solve(mlp_setup):
    """CG on the MLP's LL Hessian vs the dense reference (the flattened Hessian and solve)."""
    problem, theta, data = mlp_setup
    model = make_mlp(jax.random.PRNGKey(1))
    g_cg, info = bj.hypergradient(problem, theta, model, data, bj.linear_solvers.cg(maxiter=200))
    g_dense, info_dense = bj.hypergradient(problem, theta, model, data, bj.linear_solvers.dense())
    assert int(info.status) == bj.status.OK and int(info_dense.status) == bj.status.OK
    chex.assert_trees_all_close(g_cg, g_dense, rtol=1e-8, atol=1e-12)
    chex.assert_trees_all_close(info.v, info_dense.v, rtol=1e-7, atol=1e-10)
    # v is shaped like the model's array part (None at the activation)
    assert jax.tree_util.tree_structure(info.v) == jax.tree_util.tree_structure(eqx.filter(model, eqx.is_inexact_array))


def test_a_random_mlp_breaks_down_undamped_and_the_damped_solve_is_the_proximal_hypergradient(mlp_setup):
    """At a random init with a tiny weight decay the MLP's LL Hessian is indefinite (lambda_min ~
    -0.86): the dense solve reports BREAKDOWN with NaN; `damped(cg, 2)` returns the hypergradient of
    the LL with (2/2) ||params||^2 added (same J, Hessian + 2 I), = the dense reference of that LL."""
    problem, _, data = mlp_setup
    theta, model = jnp.asarray(-8.0), make_mlp(jax.random.PRNGKey(0))
    g, info = bj.hypergradient(problem, theta, model, data, bj.linear_solvers.dense())
    assert int(info.status) & bj.status.BREAKDOWN and not np.isfinite(g)
    g_damped, info = bj.hypergradient(problem, theta, model, data,
                                      bj.linear_solvers.damped(bj.linear_solvers.cg(maxiter=200), 2.0))
    assert int(info.status) == bj.status.OK
    proximal = bj.BilevelProblem(f_upper, lambda t, m, b: f_lower(t, m, b) + otu.tree_norm(
        eqx.filter(m, eqx.is_inexact_array), squared=True))
    g_ref, info_ref = bj.hypergradient(proximal, theta, model, data, bj.linear_solvers.dense())
    assert int(info_ref.status) == bj.status.OK
    chex.assert_trees_all_close(g_damped, g_ref, rtol=1e-8, atol=1e-12)

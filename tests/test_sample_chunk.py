"""`BilevelProblem(..., sample_chunk=c)`: every oracle pass over a minibatch as a scan over its
sub-batches of c samples equals the pass over the whole batch (float64, a nonlinear problem: the
logistic HPO, whose Hessian depends on phi), the counts stay one per pass, and a preset's iterates
do not change. Data and runs (init included) are made in one jit each: eagerly, each random draw
and each operation would compile a program of its own (per shape)."""
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax import oracles


@jax.jit
def _logistic_data():
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    x_val, x_tr = jax.random.normal(k[0], (24, 5)), jax.random.normal(k[1], (24, 5))
    y_val, y_tr = jnp.sign(jax.random.normal(k[2], (24,))), jnp.sign(jax.random.normal(k[3], (24,)))
    return (x_val, y_val), (x_tr, y_tr)


@pytest.fixture(scope="module")
def logistic():
    return bj.problems.logistic_hpo(_logistic_data(), key=1)


def _chunked(problem, c):
    return dataclasses.replace(problem, sample_chunk=c)


def _oracles(problem, theta, phi, data, v, d, mode):
    """The oracles taking a differentiation mode; with "rev", also those that take none (the same
    programs in both modes: traced and checked once)."""
    upper, lower = data
    lin = oracles.linearize_lower(problem, theta, phi, lower, mode)
    out = {"grad_hvp_cross": oracles.grad_hvp_cross(problem, theta, phi, v, lower, mode),
           "linearization": (lin.grad_phi, lin.hvp(v), lin.cross(v), lin.hvp_and_cross(v), lin.cross_transpose(d))}
    if mode == "rev":
        out |= {"upper_grads": oracles.upper_grads(problem, theta, phi, upper),
                "upper_value": oracles.upper_value(problem, theta, phi, upper),
                "lower_grad_phi": oracles.lower_grad_phi(problem, theta, phi, lower),
                "lower_value_and_grads": oracles.lower_value_and_grads(problem, theta, phi, lower)}
    return out


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_every_oracle_equals_the_unchunked_one(logistic, mode):
    theta, phi = logistic.theta0, logistic.phi0
    v = jax.random.normal(jax.random.PRNGKey(5), phi.shape)
    d = jax.random.normal(jax.random.PRNGKey(6), theta.shape)
    run = jax.jit(lambda problem: _oracles(problem, theta, phi, logistic.data, v, d, mode), static_argnums=0)
    whole = run(logistic.problem)
    for c in (1, 8, 24):
        chunked = run(_chunked(logistic.problem, c))
        for name in whole:
            for a, b in zip(jax.tree_util.tree_leaves(whole[name]), jax.tree_util.tree_leaves(chunked[name])):
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=f"{name}, sample_chunk={c}")


def test_counts_stay_one_per_pass(logistic):
    problem = _chunked(logistic.problem, 4)
    theta, phi = logistic.theta0, logistic.phi0
    with oracles.counting() as tally:
        jax.eval_shape(lambda: oracles.grad_hvp_cross(problem, theta, phi, phi, logistic.data[1], "fwd"))
        jax.eval_shape(lambda: oracles.upper_grads(problem, theta, phi, logistic.data[0]))
        jax.eval_shape(lambda: oracles.linearize_lower(problem, theta, phi, logistic.data[1]).hvp(phi))
    assert tuple(int(c) for c in tally.counts) == (1, 1, 2, 1, 0)


@pytest.mark.parametrize("name", ["soba", "stocbio"])
def test_a_preset_takes_the_same_steps(logistic, name):
    kw = dict(upper_lr=0.05, lower_lr=0.5, batch_size=8, sampler="shuffled")
    if name == "stocbio":
        kw.update(lower_steps=3, neumann_steps=4)

    def final(problem):
        alg = bj.algorithms.get(name)(problem, **kw)
        init = lambda key: alg.init(logistic.theta0, logistic.phi0, key, logistic.data)
        return jax.jit(lambda key: bj.run(alg, init(key), logistic.data, num_steps=6)[0])(jax.random.PRNGKey(0))

    whole, chunked = final(logistic.problem), final(_chunked(logistic.problem, 2))
    np.testing.assert_allclose(chunked.theta, whole.theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked.phi, whole.phi, rtol=1e-12, atol=1e-14)
    assert not np.allclose(whole.theta, logistic.theta0)          # the steps moved theta


def test_bad_sample_chunks_are_refused(logistic):
    with pytest.raises(ValueError, match="positive int"):
        _chunked(logistic.problem, 0)
    with pytest.raises(ValueError, match="positive int"):
        _chunked(logistic.problem, True)
    problem = _chunked(logistic.problem, 5)
    with pytest.raises(ValueError, match="does not divide the batch of 24"):
        oracles.upper_grads(problem, logistic.theta0, logistic.phi0, logistic.data[0])


@pytest.fixture(scope="module")
def chunked_quadratic(quad_stoch):
    return quad_stoch._replace(problem=_chunked(quad_stoch.problem, 4))


@pytest.mark.parametrize("name", sorted(bj.algorithms.ALGORITHMS))
def test_every_preset_steps_with_blocks_cut_in_place(name, chunked_quadratic):
    """With `sample_chunk`, the block samplers hand the oracles `sampling.Rows` (blocks not cut
    yet); no objective may receive one (the quadratic's objectives index their batch, so a Rows
    reaching them fails the trace): one outer step of every preset traces."""
    inst = chunked_quadratic
    alg = bj.algorithms.get(name)(inst.problem, upper_lr=0.1, batch_size=16, sampler="shuffled")
    state = eqx.filter_eval_shape(alg.init, inst.theta0, inst.phi0, jax.random.PRNGKey(0), inst.data)
    new, info = eqx.filter_eval_shape(alg.update, state, inst.data)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)


@pytest.mark.parametrize("name,sampler", [("amigo", "shuffled"), ("saba", "partition"), ("f2sa", "shuffled"),
                                          ("pessimistic_penalty", "shuffled")])
def test_blocks_cut_in_place_take_the_same_steps(name, sampler, quad_stoch, chunked_quadratic):
    def final(inst):
        lr = {"follower_lr": 0.2} if name == "pessimistic_penalty" else {"lower_lr": 0.2}
        alg = bj.algorithms.get(name)(inst.problem, upper_lr=0.05, batch_size=16, sampler=sampler, **lr)
        init = lambda key: alg.init(inst.theta0, inst.phi0, key, inst.data)
        return jax.jit(lambda key: bj.run(alg, init(key), inst.data, num_steps=3)[0])(jax.random.PRNGKey(0))

    whole, chunked = final(quad_stoch), final(chunked_quadratic)
    np.testing.assert_allclose(chunked.theta, whole.theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(chunked.phi, whole.phi, rtol=1e-12, atol=1e-14)


def test_an_mlp_phi_gets_the_unchunked_oracles():
    """phi an `eqx.nn.MLP` (a function leaf among its arrays): the chunked passes (both modes) equal
    the whole-batch ones, and keep phi's structure (None at the activation)."""
    params = lambda m: eqx.filter(m, eqx.is_inexact_array)

    @eqx.filter_jit
    def setup():
        kx, ky, km = jax.random.split(jax.random.PRNGKey(7), 3)
        x, y = jax.random.normal(kx, (16, 3)), jax.random.normal(ky, (16,))
        mlp = eqx.nn.MLP(3, "scalar", width_size=4, depth=1, activation=jnp.tanh, key=km)
        return x, y, mlp, jnp.asarray(0.3), jax.tree_util.tree_map(jnp.ones_like, params(mlp))

    def f_lower(theta, model, batch):
        xb, yb = batch
        fit = jnp.mean((jax.vmap(model)(xb) - yb) ** 2)
        return fit + 0.5 * jnp.exp(theta) * sum(jnp.sum(p ** 2) for p in jax.tree_util.tree_leaves(params(model)))

    def f_upper(theta, model, batch):
        xb, yb = batch
        return jnp.mean((jax.vmap(model)(xb) - yb) ** 2)

    problem = bj.BilevelProblem(f_upper, f_lower)
    x, y, mlp, theta, v = setup()

    @eqx.filter_jit
    def passes(problem):
        return {mode: oracles.grad_hvp_cross(problem, theta, mlp, v, (x, y), mode) for mode in ("rev", "fwd")} | \
            {"upper": oracles.upper_grads(problem, theta, mlp, (x, y)),
             "lower": oracles.lower_grads(problem, theta, mlp, (x, y))}

    whole, chunked = passes(problem), passes(_chunked(problem, 4))
    for name in whole:
        assert jax.tree_util.tree_structure(chunked[name]) == jax.tree_util.tree_structure(whole[name]), name
        for a, b in zip(jax.tree_util.tree_leaves(whole[name]), jax.tree_util.tree_leaves(chunked[name])):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=name)
    assert any(np.abs(np.asarray(leaf)).max() > 1e-3 for leaf in jax.tree_util.tree_leaves(whole["fwd"]))

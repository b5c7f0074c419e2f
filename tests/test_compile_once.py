"""Compile once per configuration: a second call of `bj.run`, `bj.hypergradient`,
`bj.hypergrad.solve_lower`, `jax.grad` through `bj.argmin` and `eqx.filter_jit(alg.update)` with an
equal configuration reuses the compiled program. Counted by traces (a Python side effect in the
objective runs only while JAX traces it), not by timing."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj


class Counted:
    """f_lower and f_upper of a ridge HPO that count how often JAX traces f_lower."""

    def __init__(self):
        self.traces = 0
        key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
        X = jax.random.normal(key_x, (20, 3))
        y = X @ jax.random.normal(key_w, (3,))
        self.data = ((X, y), (X, y))
        self.problem = bj.BilevelProblem(self.f_upper, self.f_lower)

    def f_lower(self, theta, w, batch):
        self.traces += 1
        X, y = batch
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(theta) * w @ w

    @staticmethod
    def f_upper(theta, w, batch):
        X, y = batch
        return 0.5 * jnp.mean((X @ w - y) ** 2)

    def traces_of(self, fn):
        """(result, number of traces of f_lower) of one call of fn, its result computed."""
        before = self.traces
        out = jax.block_until_ready(fn())
        return out, self.traces - before


@pytest.fixture()
def counted():
    return Counted()


THETA, PHI0 = jnp.asarray(-1.0), jnp.ones(3)


def test_run_compiles_once_per_configuration(counted):
    alg = bj.algorithms.soba(counted.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(THETA, PHI0, jax.random.PRNGKey(0), counted.data)
    first, n_first = counted.traces_of(lambda: bj.run(alg, state, counted.data, num_steps=20, eval_every=5))
    assert n_first >= 1
    again, n = counted.traces_of(lambda: bj.run(alg, state, counted.data, num_steps=20, eval_every=5))
    assert n == 0
    np.testing.assert_array_equal(again[1]["step"], first[1]["step"])
    np.testing.assert_array_equal(again[0].theta, first[0].theta)
    # a preset built again, with another step size (an array field), and another starting point
    other = bj.algorithms.soba(counted.problem, upper_lr=0.05, lower_lr=0.1, batch_size=None)
    state2 = other.init(THETA + 1.0, PHI0, jax.random.PRNGKey(1), counted.data)
    moved, n = counted.traces_of(lambda: bj.run(other, state2, counted.data, num_steps=20, eval_every=5))
    assert n == 0 and not np.array_equal(moved[0].theta, first[0].theta)
    # check=True has its own program (it tracks the first failing step), compiled once as well
    counted.traces_of(lambda: bj.run(alg, state, counted.data, num_steps=20, eval_every=5, check=True))
    _, n = counted.traces_of(lambda: bj.run(alg, state, counted.data, num_steps=20, eval_every=5, check=True))
    assert n == 0
    # another configuration (num_steps) is another program
    _, n = counted.traces_of(lambda: bj.run(alg, state, counted.data, num_steps=10, eval_every=5))
    assert n >= 1


def test_filter_jit_update_compiles_once_for_equal_algorithms(counted):
    make = lambda lr: bj.algorithms.aid_bio(counted.problem, upper_lr=lr, lower_lr=0.1, lower_steps=3)
    alg = make(0.1)
    state = alg.init(THETA, PHI0, jax.random.PRNGKey(0), counted.data)
    counted.traces_of(lambda: eqx.filter_jit(alg.update)(state, counted.data))
    _, n = counted.traces_of(lambda: eqx.filter_jit(make(0.2).update)(state, counted.data))
    assert n == 0


def test_hypergradient_compiles_once(counted):
    solver = bj.linear_solvers.cg(maxiter=10)
    g1, n_first = counted.traces_of(lambda: bj.hypergradient(counted.problem, THETA, PHI0, counted.data, solver)[0])
    assert n_first >= 1
    g2, n = counted.traces_of(lambda: bj.hypergradient(counted.problem, THETA + 0.5, PHI0, counted.data,
                                                       bj.linear_solvers.cg(maxiter=10))[0])
    assert n == 0 and np.isfinite(g2) and g2 != g1
    # an equal problem (the same functions) is the same configuration
    same = bj.BilevelProblem(counted.f_upper, counted.f_lower)
    _, n = counted.traces_of(lambda: bj.hypergradient(same, THETA, PHI0, counted.data, solver))
    assert n == 0
    # the validation still runs for new structures (it is part of the trace)
    with pytest.raises(ValueError, match="fails on the given structures"):
        bj.hypergradient(counted.problem, THETA, jnp.zeros(4), counted.data, solver)


def test_solve_lower_and_grad_through_argmin_compile_once(counted):
    sgd = optax.sgd(0.3)
    solve_lower = lambda th: bj.hypergrad.solve_lower(counted.problem, sgd, th, PHI0, counted.data[1], steps=200)
    counted.traces_of(lambda: solve_lower(THETA))
    _, n = counted.traces_of(lambda: solve_lower(THETA + 1.0))
    assert n == 0

    def grad(solve, theta):   # a new closure at every call, as a user writes it
        return jax.grad(lambda th: counted.f_upper(th, solve(th, PHI0, counted.data[1]), counted.data[0]))(theta)

    g1, n_first = counted.traces_of(lambda: grad(bj.argmin(counted.f_lower, sgd, 200), THETA))
    assert n_first >= 1
    # another bj.argmin of the same f_lower and optimizer, another theta: no new trace
    g2, n = counted.traces_of(lambda: grad(bj.argmin(counted.f_lower, sgd, 200), THETA + 0.5))
    assert n == 0
    # the values are those of the dense implicit hypergradient at the solution
    for theta, g in ((THETA, g1), (THETA + 0.5, g2)):
        phi = solve_lower(theta)
        dense, _ = bj.hypergradient(counted.problem, theta, phi, counted.data, bj.linear_solvers.dense())
        np.testing.assert_allclose(g, dense, rtol=1e-10)


def test_a_lambda_written_again_is_the_same_configuration(counted):
    """eval_fn and progress compare by code and closure (bj.cache.SameCode): the README's inline
    `eval_fn=lambda s, d: ...` in every call reuses the program; another captured value does not."""
    alg = bj.algorithms.soba(counted.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(THETA, PHI0, jax.random.PRNGKey(0), counted.data)
    rows = []

    def run(scale):
        return bj.run(alg, state, counted.data, num_steps=10, eval_every=5, progress=lambda r: rows.append(r),
                      eval_fn=lambda s, d: {"val": scale * counted.f_upper(s.theta, s.phi, d[0])})

    first, n_first = counted.traces_of(lambda: run(2.0))
    assert n_first >= 1
    again, n = counted.traces_of(lambda: run(2.0))
    assert n == 0 and len(rows) == 4
    np.testing.assert_array_equal(again[1]["val"], first[1]["val"])
    other, n = counted.traces_of(lambda: run(3.0))   # another captured value: another program
    assert n >= 1
    np.testing.assert_allclose(other[1]["val"], 1.5 * first[1]["val"], rtol=1e-12)


def test_same_code_keys():
    from bilevel_jax.cache import SameCode
    make = lambda c: (lambda x: c * x)   # noqa: E731
    a = jnp.ones(2)
    assert SameCode(make(1.0)) == SameCode(make(1.0)) and hash(SameCode(make(1.0))) == hash(SameCode(make(1.0)))
    assert SameCode(make(1.0)) != SameCode(make(2.0)) and SameCode(make(0.0)) != SameCode(make(-0.0))
    assert SameCode(make(a)) == SameCode(make(a)) != SameCode(make(jnp.ones(2)))   # arrays: by identity
    assert SameCode(lambda x: x) != SameCode(lambda x: x)                           # two places: two codes
    assert SameCode(make(2.0))(3.0) == 6.0


def test_an_optax_rule_built_again_is_the_same_configuration(counted):
    """solve_lower and bj.argmin compare the optimizer's functions by code and closure
    (bj.cache.same_code_rule): `optax.lbfgs()` or `optax.sgd(0.3)` written in every call compiles
    once; another learning rate is another program."""
    lower = lambda opt, th: bj.hypergrad.solve_lower(counted.problem, opt, th, PHI0, counted.data[1], steps=20)
    counted.traces_of(lambda: lower(optax.lbfgs(), THETA))
    phi, n = counted.traces_of(lambda: lower(optax.lbfgs(), THETA + 0.5))
    assert n == 0
    _, n = counted.traces_of(lambda: lower(optax.sgd(0.3), THETA))
    assert n >= 1
    _, n = counted.traces_of(lambda: lower(optax.sgd(0.3), THETA))
    assert n == 0
    _, n = counted.traces_of(lambda: lower(optax.sgd(0.2), THETA))
    assert n >= 1
    # the L-BFGS solution is the ridge solution (the rule works as before)
    X, y = counted.data[1]
    A = X.T @ X / X.shape[0] + jnp.exp(THETA + 0.5) * jnp.eye(3)
    np.testing.assert_allclose(phi, jnp.linalg.solve(A, X.T @ y / X.shape[0]), rtol=1e-8)

    grad = lambda th: jax.grad(lambda t: counted.f_upper(
        t, bj.argmin(counted.f_lower, optax.sgd(0.3), 20)(t, PHI0, counted.data[1]), counted.data[0]))(th)
    counted.traces_of(lambda: grad(THETA))
    _, n = counted.traces_of(lambda: grad(THETA + 0.5))
    assert n == 0

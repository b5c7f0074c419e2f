"""The pessimistic bilevel problem: on a box-constrained LL whose solution set is a segment, the
value-gap penalty method reaches the pessimistic theta* and, with the optimistic problem option,
the optimistic theta*; they differ. Closed forms:

    f_lower = 1/2 (phi_1 - theta)^2,  phi in [-10, 10] x [0, 1]    ->  S(theta) = {theta} x [0, 1]
    f_upper = 1/2 (phi_1 - 1)^2 + s phi_2 phi_1 + mu/2 theta^2
    pessimistic: F_p = 1/2 (theta - 1)^2 + s max(0, theta) + mu/2 theta^2  ->  theta* = (1 - s) / (1 + mu), phi_2 = 1
    optimistic:  F_o = 1/2 (theta - 1)^2 + s min(0, theta) + mu/2 theta^2  ->  theta* = 1 / (1 + mu),       phi_2 = 0
The penalty's stationary point is theta_rho = (1 - s) / (1 + mu (rho - 1) / rho): O(1/rho) bias
(5e-4 relative at rho = 1000)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

S, MU = 0.5, 1.0
BOX = bj.constraints.box(jnp.array([-10.0, 0.0]), jnp.array([10.0, 1.0]))


def f_lower(theta, phi, batch):
    return 0.5 * (phi[0] - theta[0]) ** 2


def f_upper(theta, phi, batch):
    return 0.5 * (phi[0] - 1.0) ** 2 + S * phi[1] * phi[0] + 0.5 * MU * theta[0] ** 2


def _solve(pessimistic, seeds=3, steps=500):
    problem = BOX.problem(f_upper, f_lower, pessimistic=pessimistic)
    alg = bj.algorithms.pessimistic_penalty(problem, upper_lr=0.3, penalty=2.0, penalty_rate=0.01,
                                            penalty_power=2.0, penalty_max=1000.0)

    def run(key):
        phi0 = jnp.array([0.0, 0.5]) + 0.1 * jax.random.uniform(key, (2,))
        state = alg.init(jnp.array([0.0]), phi0, key)
        state, _ = bj.run(alg, state, (None, None), num_steps=steps)
        return state

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    states = jax.jit(jax.vmap(run))(keys)
    if pessimistic:   # vmapped over seeds = the seed run alone (the optimistic run is the same code)
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[-1], states), jax.jit(run)(keys[-1]),
                                    rtol=0, atol=1e-12)
    return states


def test_pessimistic_and_optimistic_solutions_differ_and_are_reached():
    """jit + vmap over seeds; the LL's feasible set comes from the problem (built from the box)."""
    pess, opt = _solve(True), _solve(False)
    theta_p, theta_o = (1 - S) / (1 + MU), 1 / (1 + MU)
    np.testing.assert_allclose(pess.theta[:, 0], theta_p, rtol=1e-3)
    np.testing.assert_allclose(opt.theta[:, 0], theta_o, rtol=1e-3)
    assert abs(theta_p - theta_o) > 0.2 and np.all(np.abs(pess.theta - opt.theta) > 0.2)
    np.testing.assert_allclose(pess.phi[:, 1], 1.0, atol=1e-12)   # the worst LL solution
    np.testing.assert_allclose(opt.phi[:, 1], 0.0, atol=1e-12)    # the best one
    np.testing.assert_allclose(pess.z[:, 0], pess.theta[:, 0], atol=1e-6)  # the tracker: phi_1 = theta
    assert np.all(np.asarray(pess.penalty) == 1000.0)


def test_pessimistic_penalty_arguments():
    problem = BOX.problem(f_upper, f_lower, pessimistic=True)
    with pytest.raises(ValueError, match="pessimistic_penalty"):
        bj.algorithms.pessimistic_penalty(problem, follower_steps=0)
    with pytest.raises(TypeError, match="lower_set"):
        bj.algorithms.pessimistic_penalty(problem, lower_set=3)
    bare = bj.BilevelProblem(f_upper, f_lower, lower_inequality=BOX.inequality, pessimistic=True)
    bj.algorithms.pessimistic_penalty(bare)   # the box's own constraint function: its set is found
    bare = bj.BilevelProblem(f_upper, f_lower, lower_inequality=lambda t, p: -p, pessimistic=True)
    with pytest.raises(ValueError, match="pessimistic_penalty: .*lower_set="):
        bj.algorithms.pessimistic_penalty(bare)   # no projection for the constraints
    with pytest.raises(TypeError, match="pessimistic"):
        bj.BilevelProblem(f_upper, f_lower, pessimistic="yes")


def test_entry_points_that_solve_the_optimistic_problem_refuse_a_pessimistic_one():
    """pessimistic=True would be ignored by every preset but pessimistic_penalty and by the
    hypergradients (soba on the README's example ended at 0.399, neither 0.25 nor 0.5): each
    refuses it, naming pessimistic_penalty; every preset not tagged "pessimistic" on a constrained
    pessimistic problem too (tests/test_registries.py)."""
    free = bj.BilevelProblem(f_upper, f_lower, pessimistic=True)
    boxed = BOX.problem(f_upper, f_lower, pessimistic=True)
    for name in sorted(bj.algorithms.ALGORITHMS):
        with pytest.raises(ValueError, match=f"^{name}: .*the problem is pessimistic.*pessimistic_penalty"):
            bj.algorithms.get(name)(free)
    theta, phi = jnp.array([0.5]), jnp.array([0.5, 0.5])
    calls = {"bj.hypergradient": lambda p: bj.hypergradient(p, theta, phi, (None, None)),
             "kkt_hypergradient": lambda p: bj.hypergrad.kkt_hypergradient(p, theta, phi, (None, None)),
             "kkt_argmin": lambda p: bj.hypergrad.kkt_argmin(p, lambda t, p0, b: (p0, None)),
             "unrolled_hypergradient": lambda p: bj.hypergrad.unrolled_hypergradient(
                 p, theta, phi, (None, None), optimizer=optax.sgd(0.1), steps=2),
             "zero_ig_hypergradient": lambda p: bj.hypergrad.zero_ig_hypergradient(p, theta, phi, (None, None),
                                                                                  lower_lr=0.1, steps=2)}
    for where, call in calls.items():
        problem = boxed if where.startswith("kkt") else free
        with pytest.raises(ValueError, match=f"^{where}: the problem is pessimistic.*pessimistic_penalty"):
            call(problem)
    bj.algorithms.pessimistic_penalty(boxed)   # the method that solves it

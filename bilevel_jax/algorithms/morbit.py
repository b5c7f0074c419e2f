"""Robust multi-objective bilevel: MORBiT on a `bj.MultiObjectiveProblem`, and the per-task pieces
(`task_step`, ...) that MMB (`bj.algorithms.mmb`, on a `bj.MinMaxBilevelProblem`) shares.

    min_{theta in Theta} max_{lambda in Delta_n}  sum_i lambda_i F_i(theta) - (mu/2) ||lambda - 1/n||^2,
    F_i(theta) = f_u,i(theta, phi_i*(theta)),   phi_i*(theta) = argmin_phi f_l,i(theta, phi)

(mu = 0 is the worst-objective problem min_theta max_i F_i(theta).) The n tasks are a vmapped
axis (or an unrolled loop when the pairs are lists, see `bj.MultiObjectiveProblem`); every per-task
quantity (phi_i, the LL optimiser state, the linear solver's state, v_i) is stacked on a leading
task axis. Per-task hypergradients are `bj.hypergrad.implicit_direction` of task i's pair:

    g_i = grad_theta f_u,i - J_i v_i,   A_i v_i = grad_phi f_u,i      (eq. 38; any linear solver)

with the sign convention of bilevel_jax (v ~ +A^{-1} grad_phi f_upper).

MORBiT (Gu, Lu, Ram, Weng, "Min-Max Multi-objective Bilevel Optimization with Applications in
Robust Machine Learning", ICLR 2023, arXiv:2203.01924), one outer iteration k (Algorithm 2 of the
notes, in this order):

    phi_i^{k+1}  = phi_i^k - beta_k grad_phi f_l,i(theta^k, phi_i^k)                 for every i
    theta^{k+1}  = P_Theta(theta^k - alpha_k sum_i lambda_i^k g_i(theta^k, phi_i^{k+1}))
    lambda^{k+1} = P_{Delta_n, delta}(lambda^k + gamma_k [f_u,i(theta^{k+1}, phi_i^{k+1}) - mu (lambda_i^k - 1/n)]_i)

P_{Delta_n, delta} is the Euclidean projection onto {lambda : sum lambda = 1, lambda_i >= delta/n}
(`optax.projections.projection_simplex` of lambda - delta/n onto mass 1 - delta, shifted back).
The keywords: alpha `upper_lr`, beta `lower_lr`, gamma `dual_lr` (lambda is the dual, max variable),
mu `dual_reg`, delta `dual_floor`.
The paper's theorem takes alpha, gamma ~ K^{-3/5}, beta ~ K^{-2/5} for K iterations
(`horizon=K`), the rate O(sqrt(n) K^{-2/5}).

Fixed weights (`fixed_weights=lambda`, a user-chosen point of the simplex; `uniform=True` is
lambda = 1/n, the average-objective multi-task baseline): the scalarised problem

    min_{theta in Theta} sum_i lambda_i F_i(theta)

(a domain-specific scalarisation of the n objectives, the single-objective problem that the
worst-case scalarisation above replaces when no lambda is known), solved by the same loop with
the lambda ascent left out: lambda stays where it is given.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool, check_in_range, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State, check_key, step_key
from bilevel_jax.algorithms.loop import BatchSize, check_data, make_samplers
from bilevel_jax.algorithms.steps import (SOLVER_STREAM, Composed, StepRule, apply_step, draw_batches, init_rule,
                                          lower_phase)
from bilevel_jax.hypergrad.implicit import implicit_direction
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.multi_objective import MultiObjectiveProblem, task_slice
from bilevel_jax.sampling import Sampler

PyTree = Any


# ----------------------------------------------------------------------------------------- pieces
def project_simplex(lam: jax.Array, delta=0.0) -> jax.Array:
    """Euclidean projection onto {lambda : sum_i lambda_i = 1, lambda_i >= delta / n} (delta in
    [0, 1); delta = 0 is the simplex Delta_n): substitute mu = lambda - delta/n, project mu onto the
    simplex of mass 1 - delta (optax), shift back."""
    floor = delta / lam.shape[-1]
    return optax.projections.projection_simplex(lam - floor, 1.0 - delta) + floor


def weighted_sum(weights: jax.Array, stacked: PyTree) -> PyTree:
    """sum_i weights_i x_i for a pytree whose leaves carry a leading task axis."""
    return jax.tree_util.tree_map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def any_status(codes: jax.Array) -> jax.Array:
    """The OR of an array of status codes (per-task statuses into one)."""
    codes = jnp.asarray(codes, jnp.int32)
    return jax.lax.reduce(codes, jnp.int32(0), jax.lax.bitwise_or, tuple(range(codes.ndim)))


def task_keys(key: jax.Array, n: int) -> jax.Array:
    """One root key per task (task i's batches and solver draws come from it)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def stacked_init(fn, stacked: PyTree) -> PyTree:
    """`fn(x_i)` for every task, stacked (optimiser and solver states of per-task variables)."""
    return jax.vmap(fn)(stacked)


class TaskStep(NamedTuple):
    """What one task's LL phase and hypergradient give (stacked over tasks by `map_tasks`)."""

    phi: PyTree              # phi_i after the LL step(s)
    lower_opt_state: Any
    g: PyTree                # g_i = grad_theta f_u,i - J_i v_i at (theta, point of the direction)
    solver: Any              # the linear solver's state (v_i = solver.x)
    residual_norm: jax.Array
    status: jax.Array
    upper_batch: PyTree      # the UL batch of the step (for f_u,i at the new theta)


def task_step(pair, theta, phi_i, lower_state_i, solver_state_i, upper_i, lower_i, key_i, *, count,
              samplers: Tuple[Sampler, Sampler], lower_rule: StepRule, lower_steps: int, solver: LinearSolver,
              mode: str, direction_before_step: bool) -> TaskStep:
    """Task i's part of an outer iteration: `lower_steps` LL steps at theta and the implicit
    hypergradient, at the new phi_i (MORBiT) or at the old one (`direction_before_step`: MMB's
    simultaneous update)."""
    batches = draw_batches(samplers, (upper_i, lower_i), key_i, count, lower_steps)
    new_phi, lower_state_i, low_status = lower_phase(pair, lower_rule, theta, phi_i, lower_state_i, lower_steps,
                                                     batches.lower_at, count)
    at = phi_i if direction_before_step else new_phi
    out = implicit_direction(pair, theta, at, batches.upper, batches.lower, solver, solver_state_i,
                             step_key(key_i, count, SOLVER_STREAM), batches.fresh_lower, mode)
    return TaskStep(new_phi, lower_state_i, out.g, out.state, out.info.residual_norm,
                    st.merge(low_status, out.info.status), batches.upper)


def check_task_data(data, samplers) -> None:
    """data = (upper, lower) with a task axis; task 0's slice must fit the samplers."""
    check_data(task_slice(data, 0), samplers)


class TaskComposed(Composed):
    """A `Composed` over tasks stacked on a leading axis (MORBiT's n tasks, MMB's m blocks): the data
    carry the task axis, phi and its optax state are stacked per task, and each task draws its own
    batches from its slice of the data and its key (`task_step`)."""

    def start(self, theta0, phi0, key, data=None) -> Header:
        """The init checks (a PRNG key; task 0's slice of the data fits the samplers) and the
        `Header`: P_Theta(theta0), phi0, count 0, the key, the optax state of theta's rule and of
        every task's phi_i (checking the data against the objectives, `validate`, is the caller's:
        MMB's takes the dual start too)."""
        check_key(key)
        if data is not None:
            check_task_data(data, self.samplers)
        theta0 = self.problem.project(theta0)
        return Header(theta0, phi0, jnp.zeros((), jnp.int32), key, init_rule(self.upper, theta0),
                      stacked_init(lambda x: init_rule(self.lower, x), oracles.differentiable(phi0)))

    def batches(self, state, data, lower_steps: int = 0):
        raise TypeError(f"{self.name}: every task draws its own batches (task_step), not one problem's.")


# ------------------------------------------------------------------------------------------ MORBiT
class MorbitState(State):
    header: Header            # phi and lower_opt_state stacked per task
    lam: jax.Array            # simplex weights, shape (n,)
    lam_opt_state: Any
    solver: Any               # stacked per-task linear-solver states (v_i = solver.x[i])

    @property
    def v(self):
        return self.solver.x


class Morbit(TaskComposed):   # problem (a MultiObjectiveProblem), upper, lower, samplers; check, name
    lam_rule: StepRule
    solver: LinearSolver
    mu: Any                   # mu_lambda, the weight of (mu/2)||lambda - 1/n||^2
    delta: Any                # the floor lambda_i >= delta / n
    lower_steps: int = eqx.field(static=True, default=1)
    weights: Optional[jax.Array] = None   # fixed scalarisation weights (lambda not updated); None: lambda ascent
    mode: str = eqx.field(static=True, default="rev")
    name: str = eqx.field(static=True, default="morbit", kw_only=True)

    def init(self, theta0, phi0, key, data=None) -> MorbitState:
        head = self.start(theta0, phi0, key, data)
        p, n = self.problem, self.problem.num_tasks
        if data is not None:
            p.validate(head.theta, phi0, data)
        lam0 = jnp.full((n,), 1.0 / n, dtype=jnp.result_type(float)) if self.weights is None else self.weights
        return MorbitState(head, lam0, init_rule(self.lam_rule, lam0),
                           stacked_init(self.solver.init, oracles.differentiable(phi0)))

    def update(self, state: MorbitState, data):
        check_task_data(data, self.samplers)
        p, k, n = self.problem, state.count, self.problem.num_tasks
        theta = state.theta

        def one(pair, phi_i, low_i, sol_i, up_i, lo_i, key_i):
            return task_step(pair, theta, phi_i, low_i, sol_i, up_i, lo_i, key_i, count=k, samplers=self.samplers,
                             lower_rule=self.lower, lower_steps=self.lower_steps, solver=self.solver, mode=self.mode,
                             direction_before_step=False)

        with oracles.counting() as tally:
            out = p.map_tasks(one, state.phi, state.lower_opt_state, state.solver, data[0], data[1],
                              task_keys(state.key, n))
            direction = weighted_sum(state.lam, out.g)
            theta, upper_state, up_status = apply_step(self.upper, theta, state.upper_opt_state, direction, k,
                                                       p.project)
            lam, lam_state, lam_status = state.lam, state.lam_opt_state, st.ok()
            if self.weights is None:   # f_upper at theta^{k+1}, one value per task
                values = p.map_tasks(lambda pair, phi_i, batch_i: oracles.upper_value(pair, theta, phi_i, batch_i),
                                     out.phi, out.upper_batch)
                ascent = values - self.mu * (state.lam - 1.0 / n)
                lam, lam_state, lam_status = apply_step(self.lam_rule, state.lam, state.lam_opt_state, -ascent, k,
                                                        lambda l: project_simplex(l, self.delta))
        (theta, phi, lam), info = self.finish((theta, out.phi, lam), tally.counts, jnp.max(out.residual_norm),
                                              (any_status(out.status), up_status, lam_status))
        head = state.header.next(theta, phi, upper_state, out.lower_opt_state)
        return MorbitState(head, lam, lam_state, out.solver), info


def _horizon_steps(horizon, upper_lr, lower_lr, dual_lr):
    """The constant steps of MORBiT's theorem for K = horizon iterations: alpha = upper_lr K^{-3/5},
    beta = lower_lr K^{-2/5}, gamma = dual_lr K^{-3/5}."""
    check_positive_int("horizon", horizon)
    for name, value in (("upper_lr", upper_lr), ("lower_lr", lower_lr), ("dual_lr", dual_lr)):
        if callable(value):
            raise ValueError(f"horizon= sets constant steps from {name}: pass a number, not a schedule.")
        check_step_size(name, value)
    return upper_lr * horizon ** -0.6, lower_lr * horizon ** -0.4, dual_lr * horizon ** -0.6


def _check_simplex_point(name: str, weights, n: int) -> jax.Array:
    """`weights` as a float array of shape (n,) on the simplex (nonnegative, summing to 1 within
    1e-6); clear errors otherwise. A traced value (a swept argument) is checked for its shape only."""
    if isinstance(weights, jax.core.Tracer):
        concrete = None
        shape = weights.shape
    else:
        try:
            concrete = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array of {n} weights, got {type(weights).__name__}.") from e
        shape = concrete.shape
    if shape != (n,):
        raise ValueError(f"{name} must hold one weight per task: shape ({n},), got shape {shape}.")
    if concrete is not None:
        if not np.all(np.isfinite(concrete)) or np.any(concrete < 0):
            raise ValueError(f"{name} must be nonnegative (a point of the simplex), got {concrete.tolist()}.")
        if abs(concrete.sum() - 1.0) > 1e-6:
            raise ValueError(f"{name} must sum to 1 (a point of the simplex), got sum {concrete.sum():.10g}.")
    return jnp.asarray(weights, dtype=jnp.result_type(float))


def _fixed_weights(n: int, uniform: bool, fixed_weights, dual_opt, dual_reg, dual_floor) -> Optional[jax.Array]:
    """The fixed lambda (uniform=True: 1/n; `fixed_weights` checked), or None (lambda ascent)."""
    if fixed_weights is None:
        return jnp.full((n,), 1.0 / n, dtype=jnp.result_type(float)) if uniform else None
    if uniform:
        raise ValueError("give uniform=True (lambda = 1/n) or fixed_weights=, not both.")
    moved = ["dual_opt"] if dual_opt is not None else []
    moved += [name for name, value in (("dual_reg", dual_reg), ("dual_floor", dual_floor))
              if isinstance(value, jax.core.Tracer) or np.any(np.asarray(value) != 0)]
    if moved:
        raise ValueError(f"fixed_weights keeps lambda fixed, so the lambda ascent's {', '.join(moved)} would be "
                         "ignored: leave it out.")
    return _check_simplex_point("fixed_weights", fixed_weights, n)


def _check_problem(problem) -> None:
    if not isinstance(problem, MultiObjectiveProblem):
        raise TypeError(f"problem must be a bj.MultiObjectiveProblem (n objective pairs sharing theta), got "
                        f"{type(problem).__name__}.")


def check_linear_solver(linear_solver, default: Optional[LinearSolver] = None) -> LinearSolver:
    """`linear_solver` (or `default` when it is None), which must be a `bj.linear_solvers` solver."""
    solver = default if linear_solver is None else linear_solver
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {solver!r}.")
    return solver


def morbit(problem: MultiObjectiveProblem, *, upper_lr=0.01, lower_lr=0.1, dual_lr=0.01, upper_opt=None,
           lower_opt=None, dual_opt=None, dual_reg=0.0, dual_floor=0.0, lower_steps: int = 1,
           linear_solver: Optional[LinearSolver] = None, horizon: Optional[int] = None, uniform: bool = False,
           fixed_weights=None, batch_size: BatchSize = None, sampler: str = "iid", mode: str = "rev", check: bool = False) -> Morbit:
    """MORBiT (see the module docstring for the update and the paper).

    Args:
      problem: a `bj.MultiObjectiveProblem`.
      upper_lr, lower_lr, dual_lr: alpha, beta, gamma (floats, arrays or schedules), or whole optax
        rules `upper_opt`, `lower_opt` (one LL optimiser state per task), `dual_opt`.
      dual_reg: the regulariser (mu/2) ||lambda - 1/n||^2 of the lambda ascent (>= 0).
      dual_floor: the floor lambda_i >= dual_floor / n (in [0, 1)).
      lower_steps: LL steps per task and outer iteration (1 in Algorithm 2; the paper's sinusoid
        experiment uses 2).
      linear_solver: the per-task solve of eq. 38 (default cg(10), warm-started per task).
      horizon: K; sets the theorem's constant steps alpha = upper_lr K^-3/5, beta = lower_lr K^-2/5,
        gamma = dual_lr K^-3/5.
      uniform: keep lambda = 1/n (the average-objective multi-task baseline).
      fixed_weights: a user-chosen lambda (n nonnegative weights summing to 1), kept fixed: the
        scalarised problem min_theta sum_i lambda_i F_i(theta) (the module docstring). The lambda
        ascent's own arguments (dual_opt, dual_reg, dual_floor) are then refused; dual_lr is unused.
      batch_size, sampler: per-task minibatches (each task's data has its own sample axis); the
        paper's analysis draws them i.i.d. (`sampler="iid"`, the default).
      mode, check: as in every preset.
    """
    with named("morbit"):
        _check_problem(problem)
        check_in_range("dual_reg", dual_reg, 0.0, float("inf"))
        check_in_range("dual_floor", dual_floor, 0.0, 1.0, closed_high=False)
        check_positive_int("lower_steps", lower_steps)
        check_bool("uniform", uniform)
        weights = _fixed_weights(problem.num_tasks, uniform, fixed_weights, dual_opt, dual_reg, dual_floor)
        oracles.check_mode(mode)
        if horizon is not None:
            upper_lr, lower_lr, dual_lr = _horizon_steps(horizon, upper_lr, lower_lr, dual_lr)
        solver = check_linear_solver(linear_solver, cg(10, warm_start=True))
        return Morbit(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                      make_samplers(batch_size, sampler), rule("dual_lr", dual_lr, dual_opt), solver,
                      as_array(dual_reg), as_array(dual_floor), lower_steps, weights, mode, check=check,
                      name="morbit_uniform" if uniform else "morbit" if weights is None else "morbit_fixed")


MULTI_OBJECTIVE = {"morbit": morbit}

__all__ = ["MULTI_OBJECTIVE", "Morbit", "MorbitState", "TaskComposed", "any_status", "check_linear_solver", "check_task_data",
           "morbit", "project_simplex", "stacked_init", "task_keys", "task_step", "weighted_sum"]

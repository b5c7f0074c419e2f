"""Robust multi-objective bilevel algorithms: MORBiT and MMB, on a `bj.MultiObjectiveProblem`.

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
The paper's theorem takes alpha, gamma ~ K^{-3/5}, beta ~ K^{-2/5} for K iterations
(`horizon=K`), the rate O(sqrt(n) K^{-2/5}). `uniform=True` keeps lambda = 1/n: the
average-objective multi-task baseline from the same code.

MMB: see `mmb`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool, check_in_range, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Algorithm, OracleCounts, check_key, step_key
from bilevel_jax.algorithms.loop import BatchSize, check_data, make_samplers
from bilevel_jax.algorithms.steps import (SOLVER_STREAM, StepRule, apply_step, draw_batches, finish, init_rule,
                                          lower_phase)
from bilevel_jax.hypergrad.implicit import implicit_direction
from bilevel_jax.linear_solvers import LinearSolver, cg, gd
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
    matvecs: jax.Array
    status: jax.Array
    upper_batch: PyTree      # the UL batch of the step (for f_u,i at the new theta)


def task_step(pair, theta, phi_i, lower_state_i, solver_state_i, upper_i, lower_i, key_i, *, count,
              samplers: Tuple[Sampler, Sampler], lower_rule: StepRule, lower_steps: int, solver: LinearSolver,
              mode: str, direction_before_step: bool) -> TaskStep:
    """Task i's part of an outer iteration: `lower_steps` LL steps at theta and the implicit
    hypergradient, at the new phi_i (MORBiT) or at the old one (`direction_before_step`: MMB's
    simultaneous update)."""
    batches = draw_batches(samplers, (upper_i, lower_i), key_i, count, lower_steps)
    new_phi, lower_state_i, _, low_status = lower_phase(pair, lower_rule, theta, phi_i, lower_state_i, lower_steps,
                                                        batches.lower_at, count)
    at = phi_i if direction_before_step else new_phi
    out = implicit_direction(pair, theta, at, batches.upper, batches.lower, solver, solver_state_i,
                             step_key(key_i, count, SOLVER_STREAM), batches.fresh_lower, mode)
    return TaskStep(new_phi, lower_state_i, out.g, out.state, out.info.residual_norm, out.info.num_matvecs,
                    st.merge(low_status, out.info.status), batches.upper)


def _check_task_data(problem: MultiObjectiveProblem, data, samplers) -> None:
    """data = (upper, lower) with a task axis; task 0's slice must fit the samplers."""
    check_data(task_slice(data, 0), samplers)


# ------------------------------------------------------------------------------------------ MORBiT
class MorbitState(NamedTuple):
    theta: PyTree
    phi: PyTree               # stacked per-task LL variables
    lam: jax.Array            # simplex weights, shape (n,)
    count: Any
    key: Any
    upper_opt_state: Any
    lower_opt_state: Any      # stacked per task
    lam_opt_state: Any
    solver: Any               # stacked per-task linear-solver states (v_i = solver.x[i])

    @property
    def v(self):
        return self.solver.x


class Morbit(Algorithm):
    problem: MultiObjectiveProblem = eqx.field(static=True)
    upper: StepRule
    lower: StepRule
    lam_rule: StepRule
    solver: LinearSolver
    mu: Any                   # mu_lambda, the weight of (mu/2)||lambda - 1/n||^2
    delta: Any                # the floor lambda_i >= delta / n
    samplers: Tuple[Sampler, Sampler] = eqx.field(static=True)
    lower_steps: int = eqx.field(static=True, default=1)
    uniform: bool = eqx.field(static=True, default=False)
    mode: str = eqx.field(static=True, default="rev")
    check: bool = eqx.field(static=True, default=False)
    name: str = eqx.field(static=True, default="morbit")

    def init(self, theta0, phi0, key, data=None) -> MorbitState:
        check_key(key)
        p = self.problem
        theta0 = p.project(theta0)
        if data is not None:
            _check_task_data(p, data, self.samplers)
            p.validate(theta0, phi0, data)
        n = p.num_tasks
        phi_d = oracles.differentiable(phi0)
        lam0 = jnp.full((n,), 1.0 / n, dtype=jnp.result_type(float))
        return MorbitState(theta0, phi0, lam0, jnp.zeros((), jnp.int32), key, init_rule(self.upper, theta0),
                           stacked_init(lambda x: init_rule(self.lower, x), phi_d), init_rule(self.lam_rule, lam0),
                           stacked_init(self.solver.init, phi_d))

    def update(self, state: MorbitState, data):
        _check_task_data(self.problem, data, self.samplers)
        p, k, n = self.problem, state.count, self.problem.num_tasks
        theta = state.theta

        def one(pair, phi_i, low_i, sol_i, up_i, lo_i, key_i):
            return task_step(pair, theta, phi_i, low_i, sol_i, up_i, lo_i, key_i, count=k, samplers=self.samplers,
                             lower_rule=self.lower, lower_steps=self.lower_steps, solver=self.solver, mode=self.mode,
                             direction_before_step=False)

        out = p.map_tasks(one, state.phi, state.lower_opt_state, state.solver, data[0], data[1],
                          task_keys(state.key, n))
        weights = jnp.full((n,), 1.0 / n, state.lam.dtype) if self.uniform else state.lam
        direction = weighted_sum(weights, out.g)
        theta, upper_state, up_status = apply_step(self.upper, theta, state.upper_opt_state, direction, k, p.project)

        lam, lam_state, lam_status = state.lam, state.lam_opt_state, st.ok()
        num_values = 0
        if not self.uniform:
            values = p.map_tasks(lambda pair, phi_i, batch_i: pair.f_upper(theta, phi_i, batch_i), out.phi,
                                 out.upper_batch)
            ascent = values - self.mu * (state.lam - 1.0 / n)
            lam, lam_state, lam_status = apply_step(self.lam_rule, state.lam, state.lam_opt_state, -ascent, k,
                                                    lambda l: project_simplex(l, self.delta))
            num_values = n   # f_upper at theta^{k+1}, one per task

        counts = OracleCounts.of(lower_grads=n * self.lower_steps, upper_grads=n, cross=n, values=num_values,
                                 hvps=jnp.sum(out.matvecs))
        (theta, phi, lam), info = finish(
            (theta, out.phi, lam), counts, jnp.max(out.residual_norm),
            (any_status(out.status), up_status, lam_status), check=self.check, where=f"{self.name} outer step")
        return MorbitState(theta, phi, lam, k + 1, state.key, upper_state, out.lower_opt_state, lam_state,
                           out.solver), info


def _horizon_steps(horizon, upper_lr, lower_lr, lam_lr):
    """The constant steps of MORBiT's theorem for K = horizon iterations: alpha = upper_lr K^{-3/5},
    beta = lower_lr K^{-2/5}, gamma = lam_lr K^{-3/5}."""
    check_positive_int("horizon", horizon)
    for name, value in (("upper_lr", upper_lr), ("lower_lr", lower_lr), ("lam_lr", lam_lr)):
        if callable(value):
            raise ValueError(f"horizon= sets constant steps from {name}: pass a number, not a schedule.")
        check_step_size(name, value)
    return upper_lr * horizon ** -0.6, lower_lr * horizon ** -0.4, lam_lr * horizon ** -0.6


def _check_problem(problem) -> None:
    if not isinstance(problem, MultiObjectiveProblem):
        raise TypeError(f"problem must be a bj.MultiObjectiveProblem (n objective pairs sharing theta), got "
                        f"{type(problem).__name__}.")


def _solver(linear_solver, default):
    solver = default if linear_solver is None else linear_solver
    if not isinstance(solver, LinearSolver):
        raise TypeError(f"linear_solver must be a bj.linear_solvers solver, got {solver!r}.")
    return solver


def morbit(problem: MultiObjectiveProblem, *, upper_lr=0.01, lower_lr=0.1, lam_lr=0.01, upper_opt=None,
           lower_opt=None, lam_opt=None, mu_lambda=0.0, delta=0.0, lower_steps: int = 1,
           linear_solver: Optional[LinearSolver] = None, horizon: Optional[int] = None, uniform: bool = False,
           batch_size: BatchSize = None, sampler: str = "iid", mode: str = "rev", check: bool = False) -> Morbit:
    """MORBiT (see the module docstring for the update and the paper).

    Args:
      problem: a `bj.MultiObjectiveProblem`.
      upper_lr, lower_lr, lam_lr: alpha, beta, gamma (floats, arrays or schedules), or whole optax
        rules `upper_opt`, `lower_opt` (one LL optimiser state per task), `lam_opt`.
      mu_lambda: the regulariser (mu/2) ||lambda - 1/n||^2 of the lambda ascent (>= 0).
      delta: the floor lambda_i >= delta / n (in [0, 1)).
      lower_steps: LL steps per task and outer iteration (1 in Algorithm 2; the paper's sinusoid
        experiment uses 2).
      linear_solver: the per-task solve of eq. 38 (default cg(10), warm-started per task).
      horizon: K; sets the theorem's constant steps alpha = upper_lr K^-3/5, beta = lower_lr K^-2/5,
        gamma = lam_lr K^-3/5.
      uniform: keep lambda = 1/n (the average-objective multi-task baseline).
      batch_size, sampler: per-task minibatches (each task's data has its own sample axis); the
        paper's analysis draws them i.i.d. (`sampler="iid"`, the default).
      mode, check: as in every preset.
    """
    with named("morbit"):
        _check_problem(problem)
        check_in_range("mu_lambda", mu_lambda, 0.0, float("inf"))
        check_in_range("delta", delta, 0.0, 1.0, closed_high=False)
        check_positive_int("lower_steps", lower_steps)
        check_bool("uniform", uniform)
        oracles.check_mode(mode)
        if horizon is not None:
            upper_lr, lower_lr, lam_lr = _horizon_steps(horizon, upper_lr, lower_lr, lam_lr)
        solver = _solver(linear_solver, cg(10, warm_start=True))
        return Morbit(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                      rule("lam_lr", lam_lr, lam_opt), solver, as_array(mu_lambda), as_array(delta),
                      make_samplers(batch_size, sampler), lower_steps, uniform, mode, check,
                      "morbit_uniform" if uniform else "morbit")


# --------------------------------------------------------------------------------------------- MMB
class MmbState(NamedTuple):
    theta: PyTree
    phi: PyTree               # stacked per-task LL variables (MMB's z_i)
    lam: jax.Array            # the block duals lambda_i >= 0 (MMB's y_i), shape (n,)
    eta: jax.Array            # the multiplier of sum_i lambda_i = 1, part of the UL variable
    count: Any
    key: Any
    upper_opt_state: Any      # of the UL variable (theta, eta)
    lower_opt_state: Any
    lam_opt_state: Any
    solver: Any
    momentum: PyTree          # the moving average of the UL gradient, shaped like (theta, eta)

    @property
    def v(self):
        return self.solver.x


class MMB(Algorithm):
    problem: MultiObjectiveProblem = eqx.field(static=True)
    upper: StepRule
    lower: StepRule
    lam_rule: StepRule
    solver: LinearSolver
    mu: Any
    beta: Any                 # the moving-average weight of the UL gradient (1: no averaging)
    samplers: Tuple[Sampler, Sampler] = eqx.field(static=True)
    blocks: int = eqx.field(static=True, default=1)
    mode: str = eqx.field(static=True, default="rev")
    check: bool = eqx.field(static=True, default=False)
    name: str = eqx.field(static=True, default="mmb")

    def init(self, theta0, phi0, key, data=None) -> MmbState:
        check_key(key)
        p, n = self.problem, self.problem.num_tasks
        theta0 = p.project(theta0)
        lam0 = jnp.full((n,), 1.0 / n, dtype=jnp.result_type(float))
        eta0 = jnp.zeros((), lam0.dtype)
        if data is not None:
            _check_task_data(p, data, self.samplers)
            p.validate(theta0, phi0, data)
            eta0 = jnp.mean(p.values(theta0, phi0, data)).astype(lam0.dtype)   # a start near the threshold
        x0 = (oracles.differentiable(theta0), eta0)
        phi_d = oracles.differentiable(phi0)
        return MmbState(theta0, phi0, lam0, eta0, jnp.zeros((), jnp.int32), key, init_rule(self.upper, x0),
                        stacked_init(lambda x: init_rule(self.lower, x), phi_d), init_rule(self.lam_rule, lam0),
                        stacked_init(self.solver.init, phi_d), otu.tree_zeros_like(x0))

    def _blocks(self, key, count) -> jax.Array:
        """The sampled blocks I_t: `blocks` task indices drawn without replacement (all, in order,
        when blocks = n)."""
        n = self.problem.num_tasks
        if self.blocks == n:
            return jnp.arange(n)
        return jax.random.permutation(step_key(key, count, 3), n)[:self.blocks]

    def update(self, state: MmbState, data):
        _check_task_data(self.problem, data, self.samplers)
        p, k, n = self.problem, state.count, self.problem.num_tasks
        theta, eta = state.theta, state.eta
        idx = self._blocks(state.key, k)
        # the sampled blocks' slices (a gather on the task axis; every task when blocks = n)
        take = lambda tree: jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0) if eqx.is_array(x) else x, tree)

        def one(pair, phi_i, low_i, sol_i, up_i, lo_i, key_i):
            step = task_step(pair, theta, phi_i, low_i, sol_i, up_i, lo_i, key_i, count=k, samplers=self.samplers,
                             lower_rule=self.lower, lower_steps=1, solver=self.solver, mode=self.mode,
                             direction_before_step=True)
            return step, pair.f_upper(theta, phi_i, step.upper_batch)

        args = (state.phi, state.lower_opt_state, state.solver, data[0], data[1], task_keys(state.key, n))
        if p.shared:
            pair = p.pair()
            out, values = jax.vmap(lambda *a: one(pair, *a))(*take(args))
        else:  # different objectives per task: all are evaluated (unrolled), the sampled ones kept
            out, values = take(p.map_tasks(one, *args))
        lam_sel = jnp.take(state.lam, idx)

        # UL gradient of Phi = (1/n) sum_i f_i, estimated from the B sampled blocks (unbiased)
        scale = n / self.blocks
        g_theta = weighted_sum(scale * lam_sel, out.g)
        g_eta = 1.0 - scale * jnp.sum(lam_sel)
        m = otu.tree_add_scale(otu.tree_scale(1.0 - self.beta, state.momentum), self.beta, (g_theta, g_eta))
        (theta, eta), upper_state, up_status = apply_step(
            self.upper, (theta, eta), state.upper_opt_state, m, k, lambda x: (p.project(x[0]), x[1]))

        # the sampled blocks' dual ascent, projected on lambda_i >= 0
        ascent = jnp.zeros_like(state.lam).at[idx].set(values - state.eta - self.mu * (lam_sel - 1.0 / n))
        lam, lam_state, lam_status = apply_step(self.lam_rule, state.lam, state.lam_opt_state, -ascent, k,
                                                lambda l: jnp.maximum(l, 0.0))
        put = lambda old, new: jax.tree_util.tree_map(
            lambda a, b: a.at[idx].set(b) if eqx.is_array(a) else a, old, new)
        phi, lower_state, solver_state = (put(state.phi, out.phi), put(state.lower_opt_state, out.lower_opt_state),
                                          put(state.solver, out.solver))

        b = self.blocks if p.shared else n
        counts = OracleCounts.of(lower_grads=b, upper_grads=b, cross=b, values=b, hvps=jnp.sum(out.matvecs))
        (theta, phi, lam, eta), info = finish(
            (theta, phi, lam, eta), counts, jnp.max(out.residual_norm),
            (any_status(out.status), up_status, lam_status), check=self.check, where="mmb outer step")
        return MmbState(theta, phi, lam, eta, k + 1, state.key, upper_state, lower_state, lam_state, solver_state,
                        m), info


def mmb(problem: MultiObjectiveProblem, *, upper_lr=0.01, lower_lr=0.1, lam_lr=0.01, upper_opt=None,
        lower_opt=None, lam_opt=None, mu_lambda=1.0, momentum=0.5, blocks: Optional[int] = None,
        linear_solver: Optional[LinearSolver] = None, v_lr=None, batch_size: BatchSize = None,
        sampler: str = "iid", mode: str = "rev", check: bool = False) -> MMB:
    """MMB (Hu, Zhong, Yang, "Multi-block Min-max Bilevel Optimization with Applications in
    Multi-task Deep AUC Maximization", NeurIPS 2022, arXiv:2206.00260) on the robust problem.

    MMB solves  min_x max_{y_i in Y_i} Phi(x, y) = (1/n) sum_i f_i(x, y_i, z_i*(x)),
    z_i*(x) = argmin_z g_i(x, z), with f_i strongly concave in its own dual block y_i and g_i
    strongly convex; each iteration updates only B sampled blocks. The regularised robust problem
    (mu > 0) is of this form by dualising sum_i lambda_i = 1 with a multiplier eta (strong duality:
    the objective is concave in lambda, the constraint linear):

        max_{lambda in Delta_n} sum_i lambda_i F_i - (mu/2)||lambda - 1/n||^2
          = min_eta  max_{lambda >= 0}  (1/n) sum_i f_i,
        f_i(x = (theta, eta), lambda_i, phi_i) = n lambda_i (f_u,i(theta, phi_i) - eta) - (n mu/2)(lambda_i - 1/n)^2 + eta,

    so x = (theta, eta), y_i = lambda_i in Y_i = [0, inf) (strongly concave with modulus n mu),
    z_i = phi_i, g_i = f_l,i. One iteration t, blocks I_t (|I_t| = B, uniform without
    replacement), every block quantity at (x_t, lambda^t, phi^t):

        phi_i    <- phi_i - beta grad_phi f_l,i(theta_t, phi_i)                         i in I_t
        v_i      <- one step of the linear solver on A_i v = grad_phi f_u,i (warm-started)  i in I_t
        lambda_i <- max(0, lambda_i + gamma [(f_u,i(theta_t, phi_i) - eta_t) - mu (lambda_i - 1/n)])   i in I_t
        G_t      = ((n/B) sum_{i in I_t} lambda_i g_i,  1 - (n/B) sum_{i in I_t} lambda_i)   (unbiased for grad_x Phi)
        m_t      = (1 - b) m_{t-1} + b G_t,     (theta, eta) <- (P_Theta(theta - alpha m_t^theta), eta - alpha m_t^eta)

    with g_i = grad_theta f_u,i - J_i v_i (grad_x f_i = n lambda_i g_i: the paper's Hessian-inverse
    estimate s_i solves A_i s_i = n lambda_i grad_phi f_u,i = A_i (n lambda_i v_i), so v_i is
    tracked on the fixed-scale system). Unsampled blocks keep their phi_i, v_i, lambda_i.

    What was verified, and against what: the problem class (multiple blocks of dual variables and
    of strongly convex LL problems, a non-convex strongly-concave upper min-max), the single loop
    that updates a constant number B of sampled blocks per iteration, and the two Hessian-inverse
    estimators (a momentum estimate of the Hessian, or SGD on the quadratic 0.5 s'A s - s'b) are
    from the paper's abstract and summary. Reconstructed (not checked line by line against the
    paper's Algorithm 1): the simultaneous (Jacobi) evaluation at iterate t, the moving average on
    the UL gradient only, and the robust-problem reduction above (ours; the paper's experiments
    are multi-task AUC losses). The default solver is `gd(1, v_lr)` warm-started: the paper's SGD
    variant (one step on the quadratic per iteration); the momentum-Hessian variant is a dense
    d_phi x d_phi matrix per block and is not offered (any matrix-free solver may be passed).

    Args:
      upper_lr (alpha, also eta's step), lower_lr (beta), lam_lr (gamma), or optax rules.
      mu_lambda: mu > 0 (MMB needs a strongly concave dual).
      momentum: b in (0, 1], the moving-average weight (1: plain stochastic gradient; not a value
        from the paper).
      blocks: B, sampled blocks per iteration (default all n).
      batch_size, sampler: per-task minibatches, i.i.d. in the paper's analysis (`sampler="iid"`).
      linear_solver: default `gd(1, v_lr, warm_start=True)`, v_lr defaulting to lower_lr.
    """
    with named("mmb"):
        _check_problem(problem)
        check_step_size("mu_lambda", mu_lambda)
        check_in_range("momentum", momentum, 0.0, 1.0, closed_low=False)
        n = problem.num_tasks
        blocks = n if blocks is None else check_positive_int("blocks", blocks)
        if blocks > n:
            raise ValueError(f"blocks must be <= num_tasks={n}, got {blocks}.")
        oracles.check_mode(mode)
        if linear_solver is None:
            eta_v = lower_lr if v_lr is None else v_lr
            if callable(eta_v):
                raise ValueError("lower_lr is a schedule: pass v_lr= (a number) for the default gd(1) solver.")
            linear_solver = gd(1, eta_v, warm_start=True)
        solver = _solver(linear_solver, None)
        return MMB(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                   rule("lam_lr", lam_lr, lam_opt), solver, as_array(mu_lambda), as_array(momentum),
                   make_samplers(batch_size, sampler), blocks, mode, check)


MULTI_OBJECTIVE = {"morbit": morbit, "mmb": mmb}

__all__ = ["MMB", "MULTI_OBJECTIVE", "MmbState", "Morbit", "MorbitState", "mmb", "morbit", "project_simplex",
           "weighted_sum"]

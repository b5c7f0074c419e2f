"""MMB on the multi-block min-max bilevel problem (`bj.MinMaxBilevelProblem`).

    min_{theta in Theta} max_{y in Y^m}  Phi(theta, y) = (1/m) sum_i f_i(theta, y_i, phi_i*(theta)),
    phi_i*(theta) = argmin_phi g_i(theta, phi)

(Hu, Zhong, Yang, "Multi-block Min-max Bilevel Optimization with Applications in Multi-task Deep
AUC Maximization", NeurIPS 2022, arXiv:2206.00260): m blocks, each with its own dual variable
y_i in Y (f_i strongly concave in y_i) and its own strongly convex lower level g_i; theta shared.

One iteration t draws B blocks I_t (uniformly without replacement; all m, in order, when B = m)
and, for every i in I_t, at the iterate t (theta_t, y_i^t, phi_i^t, v_i^t):

    v_i      <- the linear solver from v_i on A_i v = grad_phi f_i,  A_i = grad^2_phi phi g_i   (warm start)
    g_i       = grad_theta f_i - J_i v_i,  J_i = grad^2_theta phi g_i                (block i's hypergradient)
    y_i      <- P_Y(y_i + gamma grad_y f_i(theta_t, y_i, phi_i))                    (projected ascent)
    phi_i    <- phi_i - beta grad_phi g_i(theta_t, phi_i)                           (one LL step)

(blocks outside I_t keep their y_i, phi_i, v_i), then

    G_t       = (1/B) sum_{i in I_t} g_i                     (unbiased for the full-block average)
    m_t       = a m_{t-1} + (1 - a) G_t,  m_0 = 0             (moving average, a = `upper_momentum`)
    theta    <- P_Theta(theta_t - alpha m_t).

Sign convention of bilevel_jax: v ~ +A^{-1} grad_phi f. Each block is a bilevel pair in the joint
UL variable (theta, y_i) (`MinMaxBilevelProblem.blocks`), so one `task_step` (the per-task step
MORBiT uses: LL step and `bj.hypergrad.implicit_direction`) gives (g_i, grad_y f_i) at once; the y
part has no implicit term because g_i does not depend on y_i.

What was verified, and against what: the problem class (m blocks of dual variables and of
strongly convex LL problems under a non-convex strongly-concave min-max upper level), the single
loop that updates only a constant number of sampled blocks per iteration, and the two
Hessian-inverse estimators (a moving-average estimate of the Hessian, or SGD on the quadratic
0.5 s'A_i s - s'grad_phi f_i) come from the paper's abstract and published summaries. Not checked
line by line against the paper's Algorithm 1 (its text was not available here): the order above
(every block quantity at iterate t, a Jacobi update), the moving average on the UL direction
only and its start m_0 = 0, the unscaled per-block ascent step (grad_y f_i, not (1/m) grad_y f_i:
a constant factor of gamma) and the paper's step-size settings (none are preset: pass your own).
The default solver `gd(1, v_lr)` warm-started is the SGD variant (one step on the quadratic per
iteration); the moving-average Hessian variant stores a dense d_phi x d_phi matrix per block and
is not offered (any matrix-free `bj.linear_solvers` solver may be passed).
"""
from __future__ import annotations

from typing import Any, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_in_range, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State, step_key
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.morbit import (TaskComposed, any_status, check_linear_solver, check_task_data,
                                           stacked_init, task_keys, task_step)
from bilevel_jax.algorithms.steps import StepRule, apply_step, init_rule
from bilevel_jax.linear_solvers import LinearSolver, gd
from bilevel_jax.multi_objective import MinMaxBilevelProblem, check_task_axis

PyTree = Any


class MmbState(State):
    header: Header            # phi (the blocks' LL variables phi_i) and lower_opt_state stacked per block
    y: PyTree                 # the blocks' dual variables y_i, stacked on a leading block axis
    dual_opt_state: Any       # per block, stacked
    solver: Any               # per-block linear-solver states (v_i = solver.x[i])
    momentum: PyTree          # m_t, the moving average of the UL direction (shaped like theta)

    @property
    def v(self):
        return self.solver.x


def sample_blocks(key, count, num_blocks: int, size: int) -> Optional[jax.Array]:
    """I_t: `size` of `num_blocks` block indices drawn uniformly without replacement at iteration
    `count`; None when every block is used (no gather)."""
    if size == num_blocks:
        return None
    return jax.random.permutation(step_key(key, count, 0), num_blocks)[:size]


def _take(tree, idx):
    return tree if idx is None else jax.tree_util.tree_map(
        lambda x: jnp.take(x, idx, axis=0) if eqx.is_array(x) else x, tree)


def _put(old, new, idx):
    return new if idx is None else jax.tree_util.tree_map(
        lambda a, b: a.at[idx].set(b) if eqx.is_array(a) else a, old, new)


class MMB(TaskComposed):   # problem (a MinMaxBilevelProblem), upper, lower, samplers; check, name
    dual: StepRule
    solver: LinearSolver
    upper_momentum: Any       # a in [0, 1), the moving average's weight on m_{t-1} (0: none)
    blocks: int = eqx.field(static=True, default=1)
    mode: str = eqx.field(static=True, default="rev")
    name: str = eqx.field(static=True, default="mmb", kw_only=True)

    def init(self, theta0, phi0, key, data=None, y0=None) -> MmbState:
        """The state at (theta0, y0, phi0); `y0` (the blocks' dual variables, a leading block axis
        of size m) is required: the class fixes no dual start."""
        p = self.problem
        if y0 is None:
            raise ValueError(f"{self.name}: init needs y0=, the blocks' dual variables y_i stacked on a leading axis "
                             f"of size num_blocks={p.num_blocks}.")
        check_task_axis(p.num_blocks, y0=y0, phi0=phi0)
        head = self.start(theta0, phi0, key, data)
        y0 = y0 if p.project_dual is None else jax.vmap(p.project_y)(y0)
        if data is not None:
            p.validate(head.theta, y0, phi0, data)
        return MmbState(head, y0, stacked_init(lambda y: init_rule(self.dual, y), oracles.differentiable(y0)),
                        stacked_init(self.solver.init, oracles.differentiable(phi0)),
                        otu.tree_zeros_like(oracles.differentiable(head.theta)))

    def update(self, state: MmbState, data):
        check_task_data(data, self.samplers)
        p, k, m = self.problem, state.count, self.problem.num_blocks
        blocks, theta = p.blocks, state.theta
        # block sampling draws from the key of a block index that does not exist (m), apart from
        # the blocks' own keys 0..m-1
        idx = sample_blocks(jax.random.fold_in(state.key, m), k, m, self.blocks)

        def one(pair, y_i, phi_i, dual_i, low_i, sol_i, up_i, lo_i, key_i):
            step = task_step(pair, (theta, y_i), phi_i, low_i, sol_i, up_i, lo_i, key_i, count=k,
                             samplers=self.samplers, lower_rule=self.lower, lower_steps=1, solver=self.solver,
                             mode=self.mode, direction_before_step=True)
            g_theta, g_y = step.g
            y_i, dual_i, dual_status = apply_step(self.dual, y_i, dual_i, otu.tree_scale(-1.0, g_y), k, p.project_y)
            return step._replace(g=g_theta), y_i, dual_i, dual_status

        args = (state.y, state.phi, state.dual_opt_state, state.lower_opt_state, state.solver, data[0], data[1],
                task_keys(state.key, m))
        with oracles.counting() as tally:
            if blocks.shared:   # the sampled blocks only, vmapped
                out, y, dual_state, dual_status = blocks.map_tasks(one, *_take(args, idx))
            else:               # different objectives per block: all are evaluated (unrolled), the sampled ones kept
                out, y, dual_state, dual_status = _take(blocks.map_tasks(one, *args), idx)

        direction = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), out.g)
        mom = otu.tree_add_scale(otu.tree_scale(self.upper_momentum, state.momentum), 1.0 - self.upper_momentum,
                                 direction)
        theta, upper_state, up_status = apply_step(self.upper, theta, state.upper_opt_state, mom, k, p.project)
        y, phi = _put(state.y, y, idx), _put(state.phi, out.phi, idx)
        dual_state = _put(state.dual_opt_state, dual_state, idx)
        lower_state = _put(state.lower_opt_state, out.lower_opt_state, idx)
        solver_state = _put(state.solver, out.solver, idx)

        (theta, y, phi), info = self.finish((theta, y, phi), tally.counts, jnp.max(out.residual_norm),
                                            (any_status(out.status), any_status(dual_status), up_status))
        head = state.header.next(theta, phi, upper_state, lower_state)
        return MmbState(head, y, dual_state, solver_state, mom), info


def mmb(problem: MinMaxBilevelProblem, *, upper_lr=0.01, lower_lr=0.1, dual_lr=0.1, upper_opt=None, lower_opt=None,
        dual_opt=None, upper_momentum=0.5, blocks: Optional[int] = None, linear_solver: Optional[LinearSolver] = None,
        v_lr=None, batch_size: BatchSize = None, sampler: str = "iid", mode: str = "rev",
        check: bool = False) -> MMB:
    """MMB (see the module docstring for the update, the paper and what was verified).

    Args:
      problem: a `bj.MinMaxBilevelProblem`.
      upper_lr (alpha), lower_lr (beta), dual_lr (gamma, the ascent step of every y_i): floats,
        arrays or schedules, or whole optax rules `upper_opt`, `lower_opt`, `dual_opt` (one LL and
        one dual optimiser state per block).
      upper_momentum: a in [0, 1), the moving average's weight on the previous average m_{t-1} (the
        vocabulary's momentum, the weight on the previous estimate; 0: none). Before 0.2.0 `momentum`
        was the weight of the new direction, 1 - a (converted, with a FutureWarning).
      blocks: B, the blocks sampled per iteration (default all m).
      linear_solver: the per-block solve (default `gd(1, v_lr, warm_start=True)`, the paper's SGD
        variant; `v_lr` defaults to `lower_lr`).
      batch_size, sampler: per-block minibatches (each block's data has its own sample axis).
      mode, check: as in every preset.

    `init(theta0, phi0, key, data, y0=...)` takes the blocks' dual start y0 (leading block axis).
    """
    with named("mmb"):
        if not isinstance(problem, MinMaxBilevelProblem):
            raise TypeError(f"problem must be a bj.MinMaxBilevelProblem (m blocks f_i(theta, y_i, phi_i), "
                            f"g_i(theta, phi_i)), got {type(problem).__name__}.")
        check_in_range("upper_momentum", upper_momentum, 0.0, 1.0, closed_high=False)
        m = problem.num_blocks
        blocks = m if blocks is None else check_positive_int("blocks", blocks)
        if blocks > m:
            raise ValueError(f"blocks must be <= num_blocks={m}, got {blocks}.")
        oracles.check_mode(mode)
        if linear_solver is None:
            eta_v = lower_lr if v_lr is None else v_lr
            if callable(eta_v) or (v_lr is None and lower_opt is not None):
                raise ValueError("the default gd(1) solver's step is v_lr (default lower_lr): pass v_lr= (a number) "
                                 "when lower_lr is a schedule or lower_opt replaces it.")
            check_step_size("v_lr", eta_v)
            linear_solver = gd(1, eta_v, warm_start=True)
        return MMB(problem, rule("upper_lr", upper_lr, upper_opt), rule("lower_lr", lower_lr, lower_opt),
                   make_samplers(batch_size, sampler), rule("dual_lr", dual_lr, dual_opt),
                   check_linear_solver(linear_solver), as_array(upper_momentum), blocks, mode, check=check)


MIN_MAX = {"mmb": mmb}

__all__ = ["MIN_MAX", "MMB", "MmbState", "mmb", "sample_blocks"]

"""Krylov-subspace presets: SubBiO and LancBiO (Yang, Gao & Yuan, "LancBiO: Dynamic
Lanczos-aided Bilevel Optimization via Krylov Subspace", ICLR 2025, arXiv:2404.03331).

Both are double loops, `bilevel_loop` with the implicit direction rule and a stateful Krylov
solver kept warm across outer steps (the solver state lives in the loop state):

    phi_{k+1} = T gradient steps on f_lower(theta_k, .) from phi_k            (T = lower_steps)
    A_k = grad^2_phiphi f_lower(theta_k, phi_{k+1}),  b_k = grad_phi f_upper(theta_k, phi_{k+1})
    v_k       = SubBiO:  argmin of 1/2 v'A_k v - b_k'v over span{b_k, (I - eta A_k) v_{k-1}}
                LancBiO: v_bar + Q_j T_j^{-1} Q_j'(b_k - w), one dynamic Lanczos step (see
                         `bj.linear_solvers.lanczos`: restart every m steps with w = A v_bar frozen)
    theta_{k+1} = theta_k - lambda (grad_theta f_upper - J_k v_k)

v ~ A^{-1} grad_phi f_upper (the library's one sign convention). Cost per outer step: T LL
gradients, 1 UL gradient, 1 cross product J v, and 3 HVPs (SubBiO) or 1 + 1/m on average
(LancBiO: one Lanczos step, plus one at each restart).

The paper's synthetic problem (`bj.problems.lancbio_synthetic`, n = 10^4, kappa = 1e5) uses
lambda = 1 (upper_lr), theta = 1e-5 (lower_lr), T = 5, and for LancBiO a starting dimension 1,
m <- min(ceil(1.1 m), 80) every 20 outer steps; the presets default to these counts (T = 5 and
the m schedule) and to the library's generic step sizes 0.1 (the paper's step sizes are tied
to that problem's scale). Both methods are deterministic in the paper (full batch:
`batch_size=None` is the default); a minibatch is allowed (then A_k, b_k are sampled).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.algorithms import directions
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import LinearSolver, lanczos, subspace


def _eta(lower_lr, subspace_eta, lower_opt):
    """SubBiO's eta: `subspace_eta`, or lower_lr (a number or an array, and the rule of phi)."""
    if subspace_eta is not None:
        check_step_size("subspace_eta", subspace_eta)
        return subspace_eta
    if lower_opt is not None:
        raise ValueError("subspace_eta defaults to lower_lr, which lower_opt replaces as the rule of phi: pass "
                         "subspace_eta= explicitly.")
    if callable(lower_lr):
        raise ValueError("subspace_eta defaults to lower_lr, a schedule here (a linear solve has no outer count): "
                         "pass subspace_eta= explicitly.")
    check_step_size("lower_lr", lower_lr)
    return lower_lr


class EpochHold(directions.DirectionRule):
    """LancBiO's theorem schedule on the implicit rule: D_theta = 0 (no theta step with plain
    steps) in the first `m0` outer steps of every epoch of the dynamic Lanczos process (while
    `LanczosState.epoch_step`, the solves since the last restart, is <= m0), the implicit
    direction of `rule` otherwise. The solve and the oracles are made at every step."""

    rule: directions.Implicit
    m0: int = eqx.field(static=True, default=0)

    def init(self, theta, phi):
        state = self.rule.init(theta, phi)
        n = sum(np.size(x) for x in jax.tree_util.tree_leaves(state.v))
        if self.m0 >= n:
            raise ValueError(f"lancbio: m0={self.m0} holds theta for the first m0 steps of every epoch, and an "
                             f"epoch has at most n={n} steps (phi's dimension): theta would never move.")
        return state

    def evaluate(self, problem, point, batches, key, mode):
        ev = self.rule.evaluate(problem, point, batches, key, mode)
        hold = ev.rule_state.solver.epoch_step <= self.m0
        g = jax.tree_util.tree_map(lambda x: jnp.where(hold, jnp.zeros_like(x), x), ev.oracles.hypergrad)
        return ev._replace(oracles=ev.oracles._replace(hypergrad=g))

    def directions(self, estimate):
        return self.rule.directions(estimate)

    def advance(self, rule_state, estimate, count):
        return self.rule.advance(rule_state, estimate, count)


def _krylov_loop(preset: str, problem, solver: LinearSolver, upper_lr, lower_lr, upper_opt, lower_opt,
                 lower_steps, batch_size, m0: int = 0, *, options: dict) -> BilevelLoop:
    steps = lower_steps_at_least_one(lower_steps)
    implicit = directions.implicit(solver)
    return bilevel_loop(problem, direction=EpochHold(implicit, m0) if m0 else implicit,
                        upper_opt=rule("upper_lr", upper_lr, upper_opt),
                        lower_opt=rule("lower_lr", lower_lr, lower_opt),
                        lower_steps=steps, batch_size=batch_size, name=preset, **loop_options(options))


def lancbio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 5,
            m_start=1, inc=1.1, every: int = 20, m_max: int = 80, m0: int = 0, correction: str = "galerkin",
            exact_residual: bool = False, batch_size=None, **kw) -> BilevelLoop:
    """LancBiO (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331): T = `lower_steps` warm-started
    gradient steps on phi, one step of the dynamic Lanczos process for v (the subspace kept across
    outer steps, restarted every m steps at v_bar = v_{k-1} with w = A_k v_bar frozen, and the
    residual correction v_k = v_bar + Q_j T_j^{-1} Q_j'(b_k - w)), then
    theta <- theta - lambda (grad_theta f_upper - J v_k).

    The subspace dimension m starts at `m_start` and becomes min(ceil(m * inc), m_max) every `every`
    outer steps (the paper's synthetic setting: 1, 1.1, 20, 80; a fixed m: `m_start=m, m_max=m`),
    never above phi's dimension n (a warning when m_start > n). `m_max` sizes the basis buffer
    (m_max copies of phi). `correction`: "galerkin" (default: T_j s = Q_j'r, the authors' public
    code; CG's iterates for a fixed system, the A-norm-optimal correction, and a loud breakdown
    when the LL Hessian is not positive definite) or "min_residual" (min ||(b_k - A v_bar) - A dv||
    over the subspace, the subproblem as the paper presents it; MINRES's iterates for a fixed
    system): see `bj.linear_solvers.lanczos`. `m0`: the convergence theorem's schedule, no theta
    step in the first m0 outer steps of every epoch (D_theta = 0 while the Lanczos process has made
    <= m0 steps since its restart; the theorem takes m0 ~ log m, with y steps ~ 1/m and theta steps
    ~ 1/m^2 otherwise, step sizes that are the user's `lower_lr`, `upper_lr` here); 0 (default) moves
    theta at every step, as the paper's experiments and code do. (Before 0.2, `m0` named the
    starting dimension, now `m_start`.) Cost per step: T LL gradients,
    1 + 1/m HVPs on average, 1 J v, 1 UL gradient. `exact_residual=True` reports the true
    ||A v - b|| in `step_info.residual_norm` at one more (uncounted) HVP; by default the Lanczos
    estimate (see `bj.linear_solvers.lanczos`). A Lanczos breakdown (non-positive pivot of T:
    the LL Hessian is not positive definite, or drifts too fast) gives NaN and BREAKDOWN.
    `upper_opt`/`lower_opt` take whole optax rules; `**kw`: the loop options (`LOOP_OPTIONS`).
    Sampling: full batch (the paper's deterministic analysis; `batch_size=None`); minibatches are an
    extension."""
    with named("lancbio"):
        solver = lanczos(m_max, m_start=m_start, inc=inc, every=every, exact_residual=exact_residual,
                         correction=correction)
        check_positive_int("m0", m0, minimum=0)
        if not isinstance(m_start, jax.core.Tracer) and np.any(m0 >= np.asarray(m_start)):
            raise ValueError(f"m0={m0} must be below the starting dimension m_start={m_start}: the first epochs "
                             "have m_start steps and theta would not move in them.")
        return _krylov_loop("lancbio", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, lower_steps,
                            batch_size, m0=m0, options=kw)


def subbio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 5,
           subspace_eta=None, batch_size=None, **kw) -> BilevelLoop:
    """SubBiO (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331): T = `lower_steps` warm-started
    gradient steps on phi, then v_k = the minimiser of 1/2 v'A_k v - b_k'v over the two-dimensional
    subspace span{b_k, (I - eta A_k) v_{k-1}} (`bj.linear_solvers.subspace`; eta = `subspace_eta`,
    default `lower_lr`, the paper's theta), then theta <- theta - lambda (grad_theta f_upper - J v_k).
    Cost per step: T LL gradients, 3 HVPs, 1 J v, 1 UL gradient. (The authors' synthetic-problem
    code evaluates A_k (I - eta A_k) at the wrong point, v in place of phi; here A_k is the Hessian at
    (theta_k, phi_{k+1}) throughout.) `**kw`: the loop options (`LOOP_OPTIONS`).
    Sampling: full batch (the paper's deterministic analysis; `batch_size=None`); minibatches are an
    extension."""
    with named("subbio"):
        solver = subspace(_eta(lower_lr, subspace_eta, lower_opt))
        return _krylov_loop("subbio", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, lower_steps,
                            batch_size, options=kw)


__all__ = ["EpochHold", "lancbio", "subbio"]

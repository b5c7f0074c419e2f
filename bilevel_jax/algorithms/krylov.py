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
lambda = 1 (upper_lr), theta = 1e-5 (lower_lr), T = 5, and for LancBiO m0 = 1,
m <- min(ceil(1.1 m), 80) every 20 outer steps; the presets default to these counts (T = 5 and
the m schedule) and to the library's generic step sizes 0.1 (the paper's step sizes are tied
to that problem's scale). Both methods are deterministic in the paper (full batch:
`batch_size=None` is the default); a minibatch is allowed (then A_k, b_k are sampled).
"""
from __future__ import annotations

from bilevel_jax._checks import check_step_size
from bilevel_jax.algorithms import directions
from bilevel_jax.algorithms._common import lower_steps_at_least_one, named, rule
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import LinearSolver, lanczos, subspace


def _eta(lower_lr, eta, lower_opt):
    """SubBiO's eta: given, or lower_lr (a number or an array, and the rule of phi)."""
    if eta is not None:
        return eta
    if lower_opt is not None:
        raise ValueError("eta defaults to lower_lr, which lower_opt replaces as the rule of phi: pass eta= explicitly.")
    if callable(lower_lr):
        raise ValueError("eta defaults to lower_lr, a schedule here (a linear solve has no outer count): pass eta= "
                         "explicitly.")
    check_step_size("lower_lr", lower_lr)
    return lower_lr


def _krylov_loop(preset: str, problem, solver: LinearSolver, upper_lr, lower_lr, upper_opt, lower_opt,
                 lower_steps, batch_size, **kw) -> BilevelLoop:
    steps = lower_steps_at_least_one(lower_steps)
    return bilevel_loop(problem, direction=directions.implicit(solver),
                        upper_opt=rule("upper_lr", upper_lr, upper_opt),
                        lower_opt=rule("lower_lr", lower_lr, lower_opt),
                        lower_steps=steps, batch_size=batch_size, name=preset, **kw)


def lancbio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 5,
            m0=1, inc=1.1, every: int = 20, m_max: int = 80, exact_residual: bool = False, batch_size=None,
            **kw) -> BilevelLoop:
    """LancBiO (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331): T = `lower_steps` warm-started
    gradient steps on phi, one step of the dynamic Lanczos process for v (the subspace kept across
    outer steps, restarted every m steps at v_bar = v_{k-1} with w = A_k v_bar frozen, and the
    residual correction v_k = v_bar + Q_j T_j^{-1} Q_j'(b_k - w)), then
    theta <- theta - lambda (grad_theta f_upper - J v_k).

    The subspace dimension m starts at `m0` and becomes min(ceil(m * inc), m_max) every `every`
    outer steps (the paper's synthetic setting: 1, 1.1, 20, 80; a fixed m: `m0=m, m_max=m`).
    `m_max` sizes the basis buffer (m_max copies of phi). Cost per step: T LL gradients,
    1 + 1/m HVPs on average, 1 J v, 1 UL gradient. `exact_residual=True` reports the true
    ||A v - b|| in `step_info.residual_norm` at one more (uncounted) HVP; by default the Lanczos
    estimate (see `bj.linear_solvers.lanczos`). A Lanczos breakdown (non-positive pivot of T:
    the LL Hessian is not positive definite, or drifts too fast) gives NaN and BREAKDOWN.
    Other arguments as in `bilevel_loop` (`upper_opt`/`lower_opt` take whole optax rules).
    Sampling: full batch (the paper's deterministic analysis; `batch_size=None`); minibatches are an
    extension."""
    with named("lancbio"):
        solver = lanczos(m_max, m0=m0, inc=inc, every=every, exact_residual=exact_residual)
        return _krylov_loop("lancbio", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, lower_steps,
                            batch_size, **kw)


def subbio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 5,
           eta=None, batch_size=None, **kw) -> BilevelLoop:
    """SubBiO (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331): T = `lower_steps` warm-started
    gradient steps on phi, then v_k = the minimiser of 1/2 v'A_k v - b_k'v over the two-dimensional
    subspace span{b_k, (I - eta A_k) v_{k-1}} (`bj.linear_solvers.subspace`; eta defaults to
    `lower_lr`, the paper's theta), then theta <- theta - lambda (grad_theta f_upper - J v_k).
    Cost per step: T LL gradients, 3 HVPs, 1 J v, 1 UL gradient. (The authors' synthetic-problem
    code evaluates A_k (I - eta A_k) at the wrong point, v in place of phi; here A_k is the Hessian at
    (theta_k, phi_{k+1}) throughout.) Other arguments as in `bilevel_loop`.
    Sampling: full batch (the paper's deterministic analysis; `batch_size=None`); minibatches are an
    extension."""
    with named("subbio"):
        solver = subspace(_eta(lower_lr, eta, lower_opt))
        return _krylov_loop("subbio", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, lower_steps,
                            batch_size, **kw)


__all__ = ["lancbio", "subbio"]

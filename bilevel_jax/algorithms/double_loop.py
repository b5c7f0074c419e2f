"""Double-loop presets: T lower-level steps, then one upper-level step (seed 001 "Meta-algorithm:
Double loop"; seed 002 Algorithms 1-3). Each is `bilevel_loop` with its paper defaults.

All take `upper_lr`, `lower_lr` (floats, arrays or optax schedules), `lower_steps`,
`batch_size` (None = full batch), plus `sampler`, `mode` and `check_finite` (see `bilevel_loop`).
"""
from __future__ import annotations

from typing import Optional

from bilevel_jax._checks import check_step_size
from bilevel_jax.algorithms import directions
from bilevel_jax.algorithms._common import sgd, solver_eta
from bilevel_jax.algorithms.loop import bilevel_loop
from bilevel_jax.hypergrad.zero_ig import sign_sgd
from bilevel_jax.linear_solvers import LinearSolver, cg, dense, gd, neumann, stochastic_neumann


def alternating(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 1, batch_size=None, **kw):
    """Alternating (S)GD that ignores the implicit gradient (seed 001/002 baseline):
        phi <- T steps of phi - beta grad_phi f_lower(theta_k, phi);  theta <- theta - alpha grad_theta f_upper.
    Converges to a stationary point of f_upper(., phi*(.)) only when the IG term vanishes."""
    return bilevel_loop(problem, direction=directions.partial(), upper_opt=sgd("upper_lr", upper_lr),
                        lower_opt=sgd("lower_lr", lower_lr), lower_steps=lower_steps, batch_size=batch_size, **kw)


def ba(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 10, linear_solver: Optional[LinearSolver] = None,
       batch_size=None, **kw):
    """BA, Bilevel Approximation (Ghadimi & Wang 2018; seed 002 Alg. 1), deterministic:
        phi_{k+1} = T GD steps from phi_k;  theta_{k+1} = P(theta_k - alpha [grad_theta f_u - J A^{-1} grad_phi f_u])
    with the exact Hessian inverse (`dense()` solver; the paper grows T like log k, here T is fixed)."""
    return bilevel_loop(problem, direction=directions.implicit(linear_solver or dense()),
                        upper_opt=sgd("upper_lr", upper_lr), lower_opt=sgd("lower_lr", lower_lr),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def bsa(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 10, neumann_steps: int = 10,
        neumann_eta=None, batch_size=64, upper_decay: float = 0.5, lower_decay: float = 0.5, **kw):
    """BSA (Ghadimi & Wang 2018; seed 002 Alg. 2): T SGD steps, then the UL step with the HIA
    stochastic Neumann estimate  A^{-1} ~ N eta prod_{i<=p} (I - eta A_{xi_i}),  p ~ U{0..N-1}.
    Steps c/sqrt(k+1) on both levels, k the outer iteration (the T LL steps of iteration k all use
    beta_k; benchmark_bilevel settings), eta = `neumann_eta` (default lower_lr)."""
    eta = solver_eta(lower_lr, neumann_eta)
    return bilevel_loop(problem, direction=directions.implicit(stochastic_neumann(neumann_steps, eta)),
                        upper_opt=sgd("upper_lr", upper_lr, upper_decay),
                        lower_opt=sgd("lower_lr", lower_lr, lower_decay, every=max(lower_steps, 1)),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def aid_bio(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 10,
            linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, batch_size=None, **kw):
    """AID-BiO (Ji, Yang, Liang 2021; seed 002 Alg. 3): D warm-started GD steps, v by N CG steps
    warm-started at v_{k-1}, theta <- theta - alpha (grad_theta f_u - J v). Cost: D LL gradients,
    N(+1) HVPs, 1 J v, 1 UL gradient."""
    return bilevel_loop(problem, direction=directions.implicit(linear_solver or cg(10), warm_start),
                        upper_opt=sgd("upper_lr", upper_lr), lower_opt=sgd("lower_lr", lower_lr),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def stocbio(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 10, neumann_steps: int = 10,
            neumann_eta=None, batch_size=64, **kw):
    """StocBiO (Ji, Yang, Liang 2021): D SGD steps, then v = eta sum_{q<Q} (I - eta A_xi)^q grad_phi f_u
    (the truncated Neumann series, all Q terms — not the authors' code, which drops the q=0 term),
    theta <- theta - alpha (grad_theta f_u - J v)."""
    eta = solver_eta(lower_lr, neumann_eta)
    return bilevel_loop(problem, direction=directions.implicit(neumann(neumann_steps, eta)),
                        upper_opt=sgd("upper_lr", upper_lr), lower_opt=sgd("lower_lr", lower_lr),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def amigo(problem, *, upper_lr=0.1, lower_lr=0.1, lower_steps: int = 10,
          linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, batch_size=64, **kw):
    """AmIGO (Arbel & Mairal 2022): T warm-started SGD steps on phi, M warm-started steps on
    0.5 v'Av - v'b (`gd(M, eta)`, default M = 10, eta = lower_lr) or CG (AmIGO-CG: pass
    `linear_solver=cg(M)`), then theta <- theta - gamma (grad_theta f_u - J v)."""
    solver = linear_solver or gd(10, solver_eta(lower_lr))
    return bilevel_loop(problem, direction=directions.implicit(solver, warm_start),
                        upper_opt=sgd("upper_lr", upper_lr), lower_opt=sgd("lower_lr", lower_lr),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def signsgd_ul(problem, *, upper_lr=0.1, lower_lr=0.01, lower_steps: int = 10, batch_size=None, **kw):
    """SignSGD + UL (Fan, Ram, Liu 2021; seed 000 Alg. 1): T SignSGD steps
    phi <- phi - beta sign(grad_phi f_lower), whose unrolled Jacobian is zero almost surely, so the UL
    step uses the partial gradient only: theta <- theta - alpha grad_theta f_upper(theta_k, phi_{k+1})."""
    check_step_size("lower_lr", lower_lr)
    return bilevel_loop(problem, direction=directions.partial(), upper_opt=sgd("upper_lr", upper_lr),
                        lower_opt=sign_sgd(lower_lr), lower_steps=lower_steps, batch_size=batch_size, **kw)


__all__ = ["alternating", "ba", "bsa", "aid_bio", "stocbio", "amigo", "signsgd_ul"]

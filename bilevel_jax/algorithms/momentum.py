"""Recursive-momentum presets: LL and UL directions with STORM or SARAH estimates that evaluate
the same sample at the current and previous point. The single loops (momentum, mrbo, sustain,
vrbo_single_loop) move phi and theta simultaneously at (theta_k, phi_k):

    d_phi^k   = grad_phi f_lower(z_k; xi) + a_k (d_phi^{k-1} - grad_phi f_lower(z_{k-1}; xi))
    d_theta^k = hgrad(z_k; xi) + a_k (d_theta^{k-1} - hgrad(z_{k-1}; xi))
    phi <- phi - beta_k d_phi,   theta <- theta - alpha_k d_theta

hgrad is the implicit hypergradient with a linear solver (Neumann for MRBO, HIA for SUSTAIN).
VRBO is the double loop of its paper: SARAH recursions through an inner loop over phi (see `vrbo`).
All take `upper_lr`/`lower_lr` or `upper_opt`/`lower_opt`, `batch_size`, `sampler`, `mode`, `check`.
"""
from __future__ import annotations

from typing import Optional

from bilevel_jax._checks import check_in_range
from bilevel_jax.algorithms import directions, estimators
from bilevel_jax.algorithms._common import (loop_options, lower_steps_at_least_one, named, neumann_series, rule,
                                            solver_eta)
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import LinearSolver, cg, stochastic_neumann
from bilevel_jax.schedules import OneMinus, inverse_power


def _storm_loop(preset, problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                decay, *, options: dict) -> BilevelLoop:
    with named(preset):
        return bilevel_loop(problem, direction=directions.implicit(solver, simultaneous=True),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, decay),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt, decay),
                            estimator=estimator, batch_size=batch_size, name=preset, **loop_options(options))


def momentum(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, upper_momentum=0.5,
             lower_momentum=0.5,
             linear_solver: Optional[LinearSolver] = None, batch_size=64, **kw) -> BilevelLoop:
    """The bilevel momentum of Khanduri et al. ("A Near-Optimal Algorithm for Stochastic Bilevel
    Optimization via Double-Momentum", 2021, arXiv:2102.07367):
        h_l^k = (1 - eta_l) grad_phi f_l(z_k) + eta_l (h_l^{k-1} + grad_phi f_l(z_k) - grad_phi f_l(z_{k-1}))
        h_u^k = (1 - eta_u) hgrad(z_k) + eta_u (h_u^{k-1} + hgrad(z_k) - hgrad(z_{k-1}))
    i.e. STORM with momentum eta_u = `upper_momentum`, eta_l = `lower_momentum` (0: none); constant steps; hgrad by `linear_solver` (default cg(10)).
    Sampling: i.i.d. minibatches (the paper's); `sampler="shuffled"` is the zero-copy option."""
    with named("momentum"):
        check_in_range("upper_momentum", upper_momentum, 0.0, 1.0)
        check_in_range("lower_momentum", lower_momentum, 0.0, 1.0)
    estimator = estimators.storm(directions.Joint(hypergrad=upper_momentum, grad_phi=lower_momentum))
    return _storm_loop("momentum", problem, linear_solver or cg(10), upper_lr, lower_lr, upper_opt, lower_opt,
                       estimator, batch_size, 0.0, options=kw)


def _storm_weight(momentum, exponent):
    """a_k = 1 - eta_k with eta_k = (1 - momentum) / (k + 1)^exponent (a_0 = momentum)."""
    check_in_range("momentum", momentum, 0.0, 1.0, closed_high=False)
    return OneMinus(inverse_power(1.0 - momentum, exponent))


def mrbo(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
         neumann_eta=None, shared_batch: bool = False, momentum=0.5, batch_size=64, **kw) -> BilevelLoop:
    """MRBO (Yang, Ji, Liang, "Provably Faster Algorithms for Bilevel Optimization", 2021,
    arXiv:2106.04692): STORM on both levels with the StocBiO Neumann hypergradient (N =
    `neumann_steps` terms, a fresh LL minibatch per factor unless `shared_batch`, see `stocbio`; the
    same factor batches at the current and the previous point); steps ~ (k+1)^{-1/3}, momentum
    a_k = 1 - eta_k, eta_k = eta_0 (k+1)^{-2/3}, eta_0 = 1 - `momentum`; O~(eps^{-3/2}).
    (The authors' code re-assigns the schedule inside the epoch loop so it never decays; not copied.)
    Sampling: i.i.d. minibatches (the paper's)."""
    with named("mrbo"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
        estimator = estimators.storm(_storm_weight(momentum, 2.0 / 3.0))
    return _storm_loop("mrbo", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                       1.0 / 3.0, options=kw)


def sustain(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
            neumann_eta=None, momentum=0.5, batch_size=64, **kw) -> BilevelLoop:
    """SUSTAIN (Khanduri et al. 2021, arXiv:2102.07367): as MRBO with the HIA (stochastic Neumann)
    hypergradient (the same momentum a_k). Sampling: i.i.d. minibatches (the paper's)."""
    with named("sustain"):
        solver = stochastic_neumann(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt))
        # joint: the HIA factors' minibatches are drawn once for the current and the previous point
        estimator = estimators.storm(_storm_weight(momentum, 2.0 / 3.0), joint=True)
    return _storm_loop("sustain", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                       1.0 / 3.0, options=kw)


def vrbo_single_loop(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
                     neumann_eta=None, shared_batch: bool = False, period: int = 32, batch_size=64,
                     **kw) -> BilevelLoop:
    """VRBO's estimator in MRBO's single loop (not a method of the paper; `vrbo` is VRBO): SARAH
    recursions of (grad_phi f_lower, hypergradient) at the current and previous point, refreshed
    with full-data estimates every `period` steps (Yang, Ji, Liang 2021, arXiv:2106.04692; Nguyen
    et al. 2017, arXiv:1703.00102), the Neumann hypergradient (a fresh LL minibatch per factor
    unless `shared_batch`, see `stocbio`), one simultaneous LL step per outer step, constant steps.
    A comparison with `mrbo` isolates the estimator (SARAH with refreshes vs STORM).
    Sampling: i.i.d. minibatches between the full-data refreshes."""
    with named("vrbo_single_loop"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
        estimator = estimators.sarah(period)
    return _storm_loop("vrbo_single_loop", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator,
                       batch_size, 0.0, options=kw)


def vrbo(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
         neumann_steps: int = 10, neumann_eta=None, shared_batch: bool = False, period: int = 32, batch_size=64,
         **kw) -> BilevelLoop:
    """VRBO (Yang, Ji, Liang, "Provably Faster Algorithms for Bilevel Optimization", NeurIPS 2021,
    arXiv:2106.04692, Algorithm 2): a double loop of SARAH/SPIDER recursions with a periodic
    large-batch refresh. With o(x, y; S) = (grad_y g(x, y; S), the Neumann hypergradient
    estimate of `stocbio` on S):

        if k mod q = 0:   (u_k, v_k) = o(x_k, y_k; S_1)                      (full data here)
        x_{k+1} = x_k - alpha v_k
        inner loop, t = 0..m-1, fresh S_2 per t, the same S_2 at both points:
            (u, v) <- (u, v) + o(x_{k+1}, y_t; S_2) - o(z_prev; S_2),  z_prev = (x_k, y_k) at t = 0,
                                                                      (x_{k+1}, y_{t-1}) after
            y_{t+1} = y_t - beta u

    q = `period`, m = `lower_steps`, alpha = `upper_lr`, beta = `lower_lr` (constant, the
    paper's), Q = `neumann_steps` terms of step `neumann_eta` (default `lower_lr`; a fresh LL
    minibatch per factor unless `shared_batch`). Built as `bilevel_loop(lower_recursion=True,
    estimator=estimators.sarah(q))`: outer iteration k runs the inner loop at theta_k first (none
    at k = 0), then the refresh or one more recursion at the loop's last point, then the theta
    step, so the sequence of operations is the paper's (the estimate carried from one outer step
    to the next is the one at the current point: the recursion is never broken). The theorem's
    q, m and batch sizes S_1, S_2 depend on the target accuracy (O~(eps^-3/2) in total); the
    defaults (m = 10, q = 32, batches of 64) are not the paper's and were not verified against
    its experiments.

    Oracle calls (`step_info.oracles`) per outer step: the inner loop 2m evaluations of o (two
    points each; none at k = 0), then one refresh of n/b minibatch evaluations when k mod q = 0
    (one full pass) or 2 otherwise; one evaluation of o = 1 LL gradient, 1 UL gradient, Q HVPs,
    1 cross product. Sampling: i.i.d. minibatches between the full-data refreshes (the paper's)."""
    with named("vrbo"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
        steps = lower_steps_at_least_one(lower_steps)
        return bilevel_loop(problem, direction=directions.implicit(solver, simultaneous=True),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt), lower_opt=rule("lower_lr", lower_lr, lower_opt),
                            lower_steps=steps, estimator=estimators.sarah(period), batch_size=batch_size, name="vrbo",
                            lower_recursion=True, **loop_options(kw))


__all__ = ["momentum", "mrbo", "sustain", "vrbo", "vrbo_single_loop"]

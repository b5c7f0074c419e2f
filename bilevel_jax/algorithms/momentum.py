"""Recursive-momentum presets: simultaneous LL and UL directions at (theta_k, phi_k) with STORM
or SARAH estimates that evaluate the same sample at the current and previous point.

    d_phi^k   = grad_phi f_lower(z_k; xi) + a_k (d_phi^{k-1} - grad_phi f_lower(z_{k-1}; xi))
    d_theta^k = hgrad(z_k; xi) + a_k (d_theta^{k-1} - hgrad(z_{k-1}; xi))
    phi <- phi - beta_k d_phi,   theta <- theta - alpha_k d_theta

hgrad is the implicit hypergradient with a linear solver (Neumann for MRBO, HIA for SUSTAIN).
All take `upper_lr`/`lower_lr` or `upper_opt`/`lower_opt`, `batch_size`, `sampler`, `mode`, `check`.
"""
from __future__ import annotations

from typing import Optional

from bilevel_jax._checks import check_in_range
from bilevel_jax.algorithms import directions, estimators
from bilevel_jax.algorithms._common import loop_options, named, neumann_series, rule, solver_eta
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import LinearSolver, cg, stochastic_neumann
from bilevel_jax.schedules import OneMinus, inverse_power


def _storm_loop(preset, problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                decay, **kw) -> BilevelLoop:
    with named(preset):
        return bilevel_loop(problem, direction=directions.implicit(solver, simultaneous=True),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, decay),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt, decay),
                            estimator=estimator, batch_size=batch_size, name=preset, **loop_options(kw))


def momentum(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, eta_upper=0.5, eta_lower=0.5,
             linear_solver: Optional[LinearSolver] = None, batch_size=64, **kw) -> BilevelLoop:
    """The bilevel momentum of Khanduri et al. ("A Near-Optimal Algorithm for Stochastic Bilevel
    Optimization via Double-Momentum", 2021, arXiv:2102.07367):
        h_l^k = (1 - eta_l) grad_phi f_l(z_k) + eta_l (h_l^{k-1} + grad_phi f_l(z_k) - grad_phi f_l(z_{k-1}))
        h_u^k = (1 - eta_u) hgrad(z_k) + eta_u (h_u^{k-1} + hgrad(z_k) - hgrad(z_{k-1}))
    i.e. STORM with weight a = eta; constant steps; hgrad by `linear_solver` (default cg(10)).
    Sampling: i.i.d. minibatches (the paper's); `sampler="shuffled"` is the zero-copy option."""
    with named("momentum"):
        check_in_range("eta_upper", eta_upper, 0.0, 1.0)
        check_in_range("eta_lower", eta_lower, 0.0, 1.0)
    estimator = estimators.storm(directions.Joint(hypergrad=eta_upper, grad_phi=eta_lower))
    return _storm_loop("momentum", problem, linear_solver or cg(10), upper_lr, lower_lr, upper_opt, lower_opt,
                       estimator, batch_size, 0.0, **kw)


def _storm_weight(eta0, exponent):
    """a_k = 1 - eta_k with eta_k = eta0 / (k + 1)^exponent."""
    check_in_range("eta0", eta0, 0.0, 1.0, closed_low=False)
    return OneMinus(inverse_power(eta0, exponent))


def mrbo(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
         neumann_eta=None, shared_batch: bool = False, eta0=0.5, batch_size=64, **kw) -> BilevelLoop:
    """MRBO (Yang, Ji, Liang, "Provably Faster Algorithms for Bilevel Optimization", 2021,
    arXiv:2106.04692): STORM on both levels with the StocBiO Neumann hypergradient (N =
    `neumann_steps` terms, a fresh LL minibatch per factor unless `shared_batch`, see `stocbio`; the
    same factor batches at the current and the previous point); steps ~ (k+1)^{-1/3}, momentum
    eta_k = eta0 (k+1)^{-2/3} (a_k = 1 - eta_k); O~(eps^{-3/2}).
    (The authors' code re-assigns the schedule inside the epoch loop so it never decays; not copied.)
    Sampling: i.i.d. minibatches (the paper's)."""
    with named("mrbo"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
        estimator = estimators.storm(_storm_weight(eta0, 2.0 / 3.0))
    return _storm_loop("mrbo", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                       1.0 / 3.0, **kw)


def sustain(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
            neumann_eta=None, eta0=0.5, batch_size=64, **kw) -> BilevelLoop:
    """SUSTAIN (Khanduri et al. 2021, arXiv:2102.07367): as MRBO with the HIA (stochastic Neumann)
    hypergradient. Sampling: i.i.d. minibatches (the paper's)."""
    with named("sustain"):
        solver = stochastic_neumann(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt))
        # joint: the HIA factors' minibatches are drawn once for the current and the previous point
        estimator = estimators.storm(_storm_weight(eta0, 2.0 / 3.0), joint=True)
    return _storm_loop("sustain", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                       1.0 / 3.0, **kw)


def vrbo(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
         neumann_eta=None, shared_batch: bool = False, period: int = 32, batch_size=64, **kw) -> BilevelLoop:
    """VRBO (Yang, Ji, Liang 2021, arXiv:2106.04692): SARAH/SPIDER recursions of (grad_phi f_lower,
    hypergradient) refreshed with full-data estimates every `period` steps, Neumann hypergradient
    (a fresh LL minibatch per factor unless `shared_batch`, see `stocbio`), constant steps. (The
    paper also runs recursive LL steps inside each period; here each outer step makes one
    simultaneous LL step.) Sampling: i.i.d. minibatches between the full-data refreshes (the paper's)."""
    with named("vrbo"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
        estimator = estimators.sarah(period)
    return _storm_loop("vrbo", problem, solver, upper_lr, lower_lr, upper_opt, lower_opt, estimator, batch_size,
                       0.0, **kw)


__all__ = ["momentum", "mrbo", "sustain", "vrbo"]

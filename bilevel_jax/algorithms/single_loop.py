"""Single-loop presets: one (stochastic) LL step and one UL step per outer iteration, with the
hypergradient from a stochastic Neumann estimate (TTSA, ALSET) or an amortized v (SOBA family).

All take `upper_lr`, `lower_lr` (floats, arrays or optax schedules) or whole optax rules
`upper_opt=`, `lower_opt=`, `batch_size`, plus `sampler`, `mode` and `check` (see `bilevel_loop`).
"""
from __future__ import annotations

from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.algorithms import directions, estimators
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, rule, solver_eta
from bilevel_jax.algorithms.constrained import amortized_or_kkt, constrained_lower
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import stochastic_neumann


def ttsa(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, neumann_steps: int = 10,
         neumann_eta=None, batch_size=64, strongly_convex: bool = False, horizon=None, upper_decay=None,
         lower_decay=None, **kw) -> BilevelLoop:
    """TTSA (Hong, Wai, Wang, Yang, "A Two-Timescale Framework for Bilevel Optimization", 2020,
    arXiv:2007.05170):
        phi_{k+1} = phi_k - beta_k grad_phi f_lower(theta_k, phi_k; xi)
        theta_{k+1} = P_Theta(theta_k - alpha_k h_k),  h_k the HIA hypergradient at (theta_k, phi_{k+1}).
    Schedules (the paper's Theorems 1 and 2):
      - `horizon=K` (the form of the O(K^{-2/5}) result for a weakly convex UL, Theorem 1):
        constant alpha = upper_lr K^{-3/5}, beta = lower_lr K^{-2/5} for the K iterations; with
        `strongly_convex`, alpha = upper_lr / K, beta = lower_lr K^{-2/3};
      - otherwise the anytime decays alpha_k = upper_lr (k+1)^{-3/5}, beta_k = lower_lr (k+1)^{-2/5}
        (weakly convex UL), or with `strongly_convex` alpha_k ~ 1/(k+1), beta_k ~ (k+1)^{-2/3}
        (O(K^{-2/3}), Theorem 2); `upper_decay`/`lower_decay` override the exponents.
    The number of HIA terms is fixed (`neumann_steps`); the HIA's bias (a truncated Neumann series)
    decays geometrically in it.
    Sampling: i.i.d. minibatches (the paper's)."""
    default_up, default_low = (1.0, 2.0 / 3.0) if strongly_convex else (0.6, 0.4)
    up = default_up if upper_decay is None else upper_decay
    low = default_low if lower_decay is None else lower_decay
    with named("ttsa"):
        if horizon is not None:
            check_positive_int("horizon", horizon)
            if callable(upper_lr) or callable(lower_lr):
                raise ValueError("horizon= sets constant steps from upper_lr and lower_lr: pass numbers, not schedules.")
            check_step_size("upper_lr", upper_lr)
            check_step_size("lower_lr", lower_lr)
            upper_lr, lower_lr, up, low = upper_lr * horizon ** -up, lower_lr * horizon ** -low, 0.0, 0.0
        solver = stochastic_neumann(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt))
        return bilevel_loop(problem, direction=directions.implicit(solver),
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, up),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt, low),
                            lower_steps=1, batch_size=batch_size, name="ttsa", **loop_options(kw))


def alset(problem, *, upper_lr=0.05, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 1,
          neumann_steps: int = 10, neumann_eta=None, batch_size=64, **kw) -> BilevelLoop:
    """ALSET (Chen, Sun, Yin, "Closing the Gap: Tighter Analysis of Alternating Stochastic Gradient
    Methods for Bilevel Problems", 2021, arXiv:2106.13781): alternating SGD with T (default 1) LL
    steps and the HIA hypergradient, constant steps alpha, beta = O(1/sqrt(K)) (pass them).
    Sampling: i.i.d. minibatches (the paper's); `sampler="shuffled"` is the zero-copy option."""
    with named("alset"):
        solver = stochastic_neumann(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt))
        return bilevel_loop(problem, direction=directions.implicit(solver), upper_opt=rule("upper_lr", upper_lr, upper_opt),
                            lower_opt=rule("lower_lr", lower_lr, lower_opt),
                            lower_steps=lower_steps_at_least_one(lower_steps), batch_size=batch_size, name="alset",
                            **loop_options(kw))


def _amortized(preset, problem, upper_lr, lower_lr, v_lr, upper_opt, lower_opt, v_opt, batch_size,
               upper_decay=0.0, lower_decay=0.0, estimator=None, direction=directions.amortized, lower_set=None,
               *, options: dict) -> BilevelLoop:
    """SOBA's directions with step rules for theta, phi and v (v_lr defaults to lower_lr);
    `direction(v_rule)` builds the rule; `options` is the preset's `**kw` (the loop options only)."""
    with named(preset):
        lower = rule("lower_lr", lower_lr, lower_opt, lower_decay)
        v_rule = (lower if (v_lr is None and v_opt is None)
                  else rule("v_lr", lower_lr if v_lr is None else v_lr, v_opt, lower_decay))
        direction = direction(v_rule)
        return bilevel_loop(problem, direction=direction,
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay),
                            lower_opt=constrained_lower(problem, direction, lower, lower_set),
                            estimator=estimator, batch_size=batch_size, name=preset, **loop_options(options))


def soba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, upper_opt=None, lower_opt=None, v_opt=None,
         batch_size=64, upper_decay=0.6, lower_decay=0.4, lower_set=None, **kw) -> BilevelLoop:
    """SOBA (Dagreou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", 2022, arXiv:2201.13409): simultaneous
    steps at (theta_k, phi_k, v_k) with one LL batch i and one UL batch j,
        phi <- phi - rho_k grad_phi f_lower_i,   v <- v - rho_k (A_i v - grad_phi f_upper_j),
        theta <- theta - gamma_k (grad_theta f_upper_j - J_i v),
    one fused vjp for (grad_phi f_lower, A v, J v). Defaults: the decays of the paper's Theorem 1,
    rho_k = lower_lr (k+1)^{-2/5}, gamma_k = upper_lr (k+1)^{-3/5}, whose bound on
    min_{t<T} E||grad h(x_t)||^2 is O(log T T^{-2/5}). (Summaries that quote O(T^{-1/2}), "the sample
    complexity of SGD", refer to constant steps of order T^{-1/2}: pass `upper_decay=lower_decay=0`
    and steps scaled by T^{-1/2}; not checked against the paper here.) v_lr defaults to lower_lr
    (rho). Sampling: i.i.d. minibatches (the paper's); `sampler="shuffled"` is benchmark_bilevel's.
    On a constrained LL: the amortized KKT rule (`bj.algorithms.amortized_kkt`: v is the KKT adjoint,
    moved by v_lr on the normal equations, so v_lr < 2 / sigma_max(K)^2) and phi's steps projected
    onto `lower_set` (default: the `bj.constraints` set the problem was built from)."""
    return _amortized("soba", problem, upper_lr, lower_lr, v_lr, upper_opt, lower_opt, v_opt, batch_size,
                      upper_decay, lower_decay, direction=lambda v_rule: amortized_or_kkt(problem, v_rule),
                      lower_set=lower_set, options=kw)


def saba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, upper_opt=None, lower_opt=None, v_opt=None,
         batch_size=64, saga_init: str = "point", **kw) -> BilevelLoop:
    """SABA (Dagreou et al. 2022, arXiv:2201.13409): SOBA's directions with SAGA variance reduction
    of the five oracles (grad_phi f_lower, A v, J v per LL batch id; grad_phi f_upper, grad_theta
    f_upper per UL batch id), constant steps; O((n+m)^{2/3}/T) convergence. Needs fixed partitions
    (batch ids), read in place. Memories start as the paper's SAGA initialisation, m_i = the oracle
    at the initial point on batch i and S = their mean (`saga_init="point"`, one pass over the
    batches at `init`), or at zero (`saga_init="zero"`, benchmark_bilevel's default).
    Sampling: the paper draws one sample index uniformly per step; here a block id uniformly from fixed
    contiguous blocks (`sampler="partition"`, the default; `"shuffled"` visits the same blocks without
    replacement per epoch)."""
    kw.setdefault("sampler", "partition")
    with named("saba"):
        estimator = estimators.saga(saga_init)
    return _amortized("saba", problem, upper_lr, lower_lr, v_lr, upper_opt, lower_opt, v_opt, batch_size,
                      estimator=estimator, options=kw)


def srba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, upper_opt=None, lower_opt=None, v_opt=None,
         batch_size=64, period: int = 64, **kw) -> BilevelLoop:
    """SRBA (Dagreou, Moreau, Vaiter, Ablin, "A Lower Bound and a Near-Optimal Algorithm for Bilevel
    Empirical Risk Minimization", 2023, arXiv:2302.08766): SOBA's directions with SARAH recursions,
    refreshed with full-batch oracles every `period` steps; constant steps.
    Sampling: i.i.d. minibatches between the full-batch refreshes (the paper's uniform index
    sampling); `sampler="shuffled"` is the zero-copy option."""
    with named("srba"):
        estimator = estimators.sarah(period)
    return _amortized("srba", problem, upper_lr, lower_lr, v_lr, upper_opt, lower_opt, v_opt, batch_size,
                      estimator=estimator, options=kw)


__all__ = ["alset", "saba", "soba", "srba", "ttsa"]

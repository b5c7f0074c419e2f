"""Single-loop presets: one LL step (or a simultaneous LL direction) per UL step.

All take `upper_lr`, `lower_lr` (floats, arrays or optax schedules; a float is decayed by the
paper's exponent, a schedule is used as given), `batch_size`, plus `sampler`, `mode`,
`check_finite` (see `bilevel_loop`).
"""
from __future__ import annotations

from bilevel_jax._checks import check_in_range
from bilevel_jax.algorithms import directions, estimators
from bilevel_jax.algorithms._common import sgd, solver_eta
from bilevel_jax.algorithms.loop import bilevel_loop
from bilevel_jax.linear_solvers import stochastic_neumann


def ttsa(problem, *, upper_lr=0.1, lower_lr=0.1, neumann_steps: int = 10, neumann_eta=None, batch_size=64,
         strongly_convex: bool = False, upper_decay=None, lower_decay=None, **kw):
    """TTSA (Hong, Wai, Wang, Yang 2020/2023; seed 002 Alg. 4, seed 001 eq. 39-52):
        phi_{k+1} = phi_k - beta_k grad_phi f_lower(theta_k, phi_k; xi)
        theta_{k+1} = P_Theta(theta_k - alpha_k h_k),  h_k the HIA hypergradient at (theta_k, phi_{k+1}).
    Two timescales: alpha_k = upper_lr/(k+1)^{3/5}, beta_k = lower_lr/(k+1)^{2/5} (weakly convex UL,
    O(K^{-2/5})), or with `strongly_convex` alpha_k ~ 1/(k+1), beta_k ~ (k+1)^{-2/3} (O(K^{-2/3}))."""
    default_up, default_low = (1.0, 2.0 / 3.0) if strongly_convex else (0.6, 0.4)
    up = default_up if upper_decay is None else upper_decay
    low = default_low if lower_decay is None else lower_decay
    eta = solver_eta(lower_lr, neumann_eta)
    return bilevel_loop(problem, direction=directions.implicit(stochastic_neumann(neumann_steps, eta)),
                        upper_opt=sgd("upper_lr", upper_lr, up), lower_opt=sgd("lower_lr", lower_lr, low),
                        lower_steps=1, batch_size=batch_size, **kw)


def alset(problem, *, upper_lr=0.05, lower_lr=0.1, lower_steps: int = 1, neumann_steps: int = 10,
          neumann_eta=None, batch_size=64, **kw):
    """ALSET (Chen, Sun, Yin 2021): alternating SGD with T (default 1) LL steps and the HIA
    hypergradient, constant steps alpha, beta = O(1/sqrt(K)) (pass them as the step sizes)."""
    eta = solver_eta(lower_lr, neumann_eta)
    return bilevel_loop(problem, direction=directions.implicit(stochastic_neumann(neumann_steps, eta)),
                        upper_opt=sgd("upper_lr", upper_lr), lower_opt=sgd("lower_lr", lower_lr),
                        lower_steps=lower_steps, batch_size=batch_size, **kw)


def soba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, batch_size=64, upper_decay=0.6, lower_decay=0.4, **kw):
    """SOBA (Dagreou, Ablin, Vaiter, Moreau 2022; seed 003): simultaneous steps at (theta_k, phi_k, v_k)
    with one LL batch i and one UL batch j,
        phi <- phi - rho_k grad_phi f_lower_i,   v <- v - rho_k (A_i v - grad_phi f_upper_j),
        theta <- theta - gamma_k (grad_theta f_upper_j - J_i v),
    one fused vjp for (grad_phi f_lower, A v, J v). The theorem's schedules: rho_k ~ k^{-2/5},
    gamma_k ~ k^{-3/5}. v_lr defaults to lower_lr (rho)."""
    rho = sgd("lower_lr", lower_lr, lower_decay)
    return bilevel_loop(problem, direction=directions.amortized(), upper_opt=sgd("upper_lr", upper_lr, upper_decay),
                        lower_opt=rho, v_opt=rho if v_lr is None else sgd("v_lr", v_lr, lower_decay),
                        batch_size=batch_size, **kw)


def saba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, batch_size=64, **kw):
    """SABA (Dagreou et al. 2022; seed 003): SOBA's directions with SAGA variance reduction of the
    five oracles (grad_phi f_lower, A v, J v per LL batch id; grad_phi f_upper, grad_theta f_upper per UL
    batch id), constant steps; O((n+m)^{2/3}/T) convergence. Needs fixed partitions (batch ids)."""
    kw.setdefault("sampler", "partition")
    rho = sgd("lower_lr", lower_lr)
    return bilevel_loop(problem, direction=directions.amortized(), upper_opt=sgd("upper_lr", upper_lr),
                        lower_opt=rho, v_opt=rho if v_lr is None else sgd("v_lr", v_lr),
                        estimator=estimators.saga(), batch_size=batch_size, **kw)


def srba(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, batch_size=64, period: int = 64, **kw):
    """SRBA (Dagreou, Moreau, Vaiter, Ablin 2023): SOBA's directions with SARAH recursions,
    refreshed with full-batch oracles every `period` steps; constant steps."""
    rho = sgd("lower_lr", lower_lr)
    return bilevel_loop(problem, direction=directions.amortized(), upper_opt=sgd("upper_lr", upper_lr),
                        lower_opt=rho, v_opt=rho if v_lr is None else sgd("v_lr", v_lr),
                        estimator=estimators.sarah(period), batch_size=batch_size, **kw)


def fsla(problem, *, upper_lr=0.1, lower_lr=0.1, v_lr=None, momentum_eta=0.5, batch_size=64, **kw):
    """FSLA (Li, Gu, Huang 2022): one SGD step on phi, one step on v (as SOBA), and STORM momentum
    on the UL direction only: d_k = D_theta(z_k) + (1 - eta)(d_{k-1} - D_theta(z_{k-1})), same sample."""
    check_in_range("momentum_eta", momentum_eta, 0.0, 1.0)
    rho = sgd("lower_lr", lower_lr)
    weight = (lambda k: 1.0 - momentum_eta(k)) if callable(momentum_eta) else 1.0 - momentum_eta
    return bilevel_loop(problem, direction=directions.amortized(), upper_opt=sgd("upper_lr", upper_lr),
                        lower_opt=rho, v_opt=rho if v_lr is None else sgd("v_lr", v_lr),
                        estimator=estimators.storm(weight, keys=("g_theta", "cross")), batch_size=batch_size, **kw)

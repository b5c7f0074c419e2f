"""Double-loop presets: T lower-level steps, then one upper-level step. Each is `bilevel_loop`
with its paper's defaults.

All take `upper_lr`, `lower_lr` (floats, arrays or optax schedules) or whole optax rules
`upper_opt=`, `lower_opt=` (e.g. `optax.adam(1e-3)`, `optax.lbfgs()` for the LL), `lower_steps`
(>= 1), `batch_size` (None = full batch), plus `sampler`, `mode` and `check` (see `bilevel_loop`).
"""
from __future__ import annotations

from typing import Optional

import optax

from bilevel_jax._checks import check_step_size
from bilevel_jax.algorithms import directions
from bilevel_jax.algorithms._common import loop_options, lower_steps_at_least_one, named, neumann_series, rule, solver_eta
from bilevel_jax.algorithms.constrained import constrained_lower, implicit_or_kkt
from bilevel_jax.algorithms.loop import BilevelLoop, bilevel_loop
from bilevel_jax.linear_solvers import LinearSolver, cg, dense, gd, stochastic_neumann
from bilevel_jax.schedules import inverse_power


def _double_loop(preset, problem, direction, upper_lr, lower_lr, upper_opt, lower_opt, lower_steps, batch_size,
                 upper_decay=0.0, lower_decay=0.0, lower_transform=None, lower_set=None, *,
                 options: dict) -> BilevelLoop:
    """The double-loop presets' loop; `options` is the preset's `**kw`, the loop options only
    (`loop_options`, checked under the preset's name: nothing reaches this helper's parameters)."""
    with named(preset):
        steps = lower_steps_at_least_one(lower_steps)
        extra = {} if lower_transform is None else {"transform": lower_transform}
        direction = direction()
        lower = rule("lower_lr", lower_lr, lower_opt, lower_decay, every=steps, **extra)
        return bilevel_loop(problem, direction=direction,
                            upper_opt=rule("upper_lr", upper_lr, upper_opt, upper_decay),
                            lower_opt=constrained_lower(problem, direction, lower, lower_set),
                            lower_steps=steps, batch_size=batch_size, name=preset, **loop_options(options))


def alternating(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 1,
                batch_size=None, **kw) -> BilevelLoop:
    """Alternating (S)GD that ignores the implicit gradient (the baseline of the bilevel literature):
        phi <- T steps of phi - beta grad_phi f_lower(theta_k, phi);  theta <- theta - alpha grad_theta f_upper.
    Converges to a stationary point of f_upper(., phi*(.)) only when the implicit term vanishes.
    Sampling: any; full batch by default."""
    return _double_loop("alternating", problem, directions.partial, upper_lr, lower_lr, upper_opt, lower_opt,
                        lower_steps, batch_size, options=kw)


def ba(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
       linear_solver: Optional[LinearSolver] = None, batch_size=None, **kw) -> BilevelLoop:
    """BA, Bilevel Approximation (Ghadimi & Wang, "Approximation Methods for Bilevel Programming",
    2018, arXiv:1802.02246, Alg. 1), deterministic:
        phi_{k+1} = T GD steps from phi_k;  theta_{k+1} = P(theta_k - alpha [grad_theta f_u - J A^{-1} grad_phi f_u])
    with the exact Hessian inverse (`dense()` solver) and a fixed T = `lower_steps`.
    Sampling: full batch (the paper's deterministic BA)."""
    return _double_loop("ba", problem, lambda: directions.implicit(linear_solver or dense()), upper_lr, lower_lr,
                        upper_opt, lower_opt, lower_steps, batch_size, options=kw)


def bsa(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
        neumann_steps: int = 10, neumann_eta=None, batch_size=64, upper_decay: float = 0.5,
        lower_decay: float = 0.5, restart_lower_decay: bool = False, **kw) -> BilevelLoop:
    """BSA (Ghadimi & Wang 2018, arXiv:1802.02246, Alg. 2): T SGD steps, then the UL step with the
    HIA stochastic Neumann estimate  A^{-1} ~ N eta prod_{i<=p} (I - eta A_{xi_i}),  p ~ U{0..N-1}.
    Steps: alpha_k = upper_lr/(k+1)^{upper_decay} on theta; on phi, by default
    beta_k = lower_lr/(k+1)^{lower_decay} with k the outer iteration for all T inner steps of
    iteration k (benchmark_bilevel's settings, which the rate experiments here compare against);
    with `restart_lower_decay=True`, beta_t = lower_lr/(t+1)^{lower_decay} decays over the inner steps
    t = 0..T-1 and restarts at every outer iteration, as Algorithm 2 is written (the inner loop's
    own SGD schedule). eta = `neumann_eta` (default lower_lr); N = `neumann_steps` terms.
    T is fixed here. The complexities quoted for BSA, O(eps^-2) samples of f_upper and O(eps^-3) of
    f_lower, imply inner loops that grow with the outer iteration (about eps^-1, i.e. sqrt(k), LL
    steps over the eps^-2 outer steps); that growth is not reproduced (pass a larger `lower_steps`).
    Sampling: i.i.d. minibatches (the paper's)."""
    with named("bsa"):
        eta = solver_eta(lower_lr, neumann_eta, lower_opt)
        solver = stochastic_neumann(neumann_steps, eta)
        if restart_lower_decay:
            check_step_size("lower_lr", lower_lr)
            lower_lr = inverse_power(lower_lr, lower_decay, cycle=lower_steps_at_least_one(lower_steps))
    return _double_loop("bsa", problem, lambda: directions.implicit(solver), upper_lr, lower_lr, upper_opt,
                        lower_opt, lower_steps, batch_size, upper_decay, lower_decay, options=kw)


def aid_bio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
            linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, batch_size=None,
            lower_set=None, **kw) -> BilevelLoop:
    """AID-BiO (Ji, Yang, Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design",
    2021, arXiv:2010.07962): D warm-started GD steps, v by N CG steps warm-started at v_{k-1},
    theta <- theta - alpha (grad_theta f_u - J v). Cost: D LL gradients, N(+1) HVPs, 1 J v, 1 UL gradient.
    Sampling: full batch (the paper's deterministic AID-BiO, `batch_size=None`); minibatches are an
    extension. On a constrained LL (`lower_inequality`/`lower_equality`): projected LL steps onto
    `lower_set` (default: the `bj.constraints` set the problem was built from) and the KKT adjoint
    by N warm-started MINRES steps (`bj.algorithms.constrained`)."""
    return _double_loop("aid_bio", problem, lambda: implicit_or_kkt(problem, linear_solver, warm_start, lambda: cg(10)),
                        upper_lr, lower_lr, upper_opt, lower_opt, lower_steps, batch_size, lower_set=lower_set,
                        options=kw)


def stocbio(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
            neumann_steps: int = 10, neumann_eta=None, shared_batch: bool = False, batch_size=64,
            upper_decay: float = 0.0, lower_decay: float = 0.0, **kw) -> BilevelLoop:
    """StocBiO (Ji, Yang, Liang 2021, arXiv:2010.07962): D SGD steps, then
        v = eta sum_{q<N} prod_{j<=q} (I - eta A_{xi_j}) grad_phi f_u,   theta <- theta - alpha (grad_theta f_u - J v)
    with N = `neumann_steps` terms (the paper's Q = N - 1) and, as in the paper, an independent LL
    minibatch xi_j per factor (`sampled_neumann`: N - 1 HVPs, unbiased for the truncated series).
    `shared_batch=True` evaluates every factor on the step's one LL batch (`neumann`: N HVPs, the
    last for the residual), which is biased with minibatches; with full batches both are the same
    series. All N terms are summed (the authors' code drops the q=0 term and scales only the last
    by eta; not copied). Steps alpha_k = upper_lr / (k+1)^`upper_decay`, beta_k = lower_lr /
    (k+1)^`lower_decay` for the D steps of outer iteration k (default 0: the paper's constant
    steps; the Neumann eta stays `neumann_eta`, default lower_lr). Sampling: i.i.d. minibatches (the
    paper's)."""
    with named("stocbio"):
        solver = neumann_series(neumann_steps, solver_eta(lower_lr, neumann_eta, lower_opt), batch_size, shared_batch)
    return _double_loop("stocbio", problem, lambda: directions.implicit(solver), upper_lr, lower_lr, upper_opt,
                        lower_opt, lower_steps, batch_size, upper_decay, lower_decay, options=kw)


def amigo(problem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None, lower_steps: int = 10,
          linear_solver: Optional[LinearSolver] = None, warm_start: bool = True, batch_size=64, lower_set=None,
          **kw) -> BilevelLoop:
    """AmIGO (Arbel & Mairal, "Amortized Implicit Differentiation for Stochastic Bilevel
    Optimization", 2022, arXiv:2111.14580): T warm-started SGD steps on phi, M warm-started steps
    on 0.5 v'Av - v'b (`gd(M, eta)`, default M = 10, eta = lower_lr) or CG (AmIGO-CG: pass
    `linear_solver=cg(M)`), then theta <- theta - gamma (grad_theta f_u - J v).
    Sampling: i.i.d. minibatches, a fresh one per step (the paper's); `sampler="shuffled"` is the zero-copy
    option. On a constrained LL: projected LL steps onto `lower_set` (default: the problem's
    `bj.constraints` set) and the indefinite KKT adjoint by M warm-started MINRES steps (default
    `minres(10)`: GD and CG need a positive definite system; `bj.algorithms.constrained`)."""
    with named("amigo"):
        direction = implicit_or_kkt(problem, linear_solver, warm_start,
                                    lambda: gd(10, solver_eta(lower_lr, None, lower_opt)))
    return _double_loop("amigo", problem, lambda: direction, upper_lr, lower_lr,
                        upper_opt, lower_opt, lower_steps, batch_size, lower_set=lower_set, options=kw)


def signsgd_ul(problem, *, upper_lr=0.1, lower_lr=0.01, upper_opt=None, lower_steps: int = 10, batch_size=None,
               **kw) -> BilevelLoop:
    """SignSGD + UL (Fan, Ram, Liu, "Sign-MAML", 2021, arXiv:2109.07497): T SignSGD steps
    phi <- phi - beta sign(grad_phi f_lower), whose unrolled Jacobian is zero almost surely, so the UL
    step uses the partial gradient only: theta <- theta - alpha grad_theta f_upper(theta_k, phi_{k+1}).
    Sampling: full batch by default; the paper draws i.i.d. task minibatches (`sampler="iid"`)."""
    return _double_loop("signsgd_ul", problem, directions.partial, upper_lr, lower_lr, upper_opt, None,
                        lower_steps, batch_size, lower_transform=optax.sign_sgd, options=kw)


__all__ = ["alternating", "ba", "bsa", "aid_bio", "stocbio", "amigo", "signsgd_ul"]

"""One vocabulary of preset keyword names: `VOCABULARY` (name -> meaning), the README table
"Hyperparameter names" lists the same names (a test checks both, and that every preset takes only
these names), and `RENAMES`, the names of 0.1 that 0.2.0 renamed: `translate_renamed` (called where
a preset is built, `parallel.preset_options`, or `accepts_renamed` for morbit and mmb) still accepts an old name whose value converts on its
own (the same value, or 1 - value for a momentum), with a FutureWarning naming the new one, and
refuses the others (a TypeError naming the new name and how to convert).

Conventions: `upper_*` is theta's, `lower_*` phi's, `v_*` the amortized adjoint's, `tracker_*` the
value-function tracker's z ~ argmin_z f_lower(theta, z) (the inner problem's solver), `dual_*` a
multiplier's or another dual (max) variable's (MORBiT's task weights, MMB's y_i); `<var>_lr` a step
size (float, array or schedule), `<var>_opt` an optax rule in its place, `<var>_steps` a number of
steps, `<var>_decay` always a float exponent p of `<var>_lr / (k + 1)^p`. A momentum is the weight a
on the previous estimate (STORM's d_k = g_k + a (d_{k-1} - g_{k-1}); 0: no momentum; the papers' eta
is often 1 - a). A penalty ramp is rho_k = min(`penalty` + `penalty_rate` k^`penalty_power`,
`penalty_max`); a multiplicative one (smoothing_pg) has `penalty_factor` in place of the rate.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping

VOCABULARY: Mapping[str, str] = {
    # step sizes and their rules
    "upper_lr": "theta's step size (float, array or schedule)",
    "lower_lr": "phi's step size",
    "v_lr": "the amortized adjoint v's step size (default lower_lr)",
    "tracker_lr": "the value-function tracker z's step size (default lower_lr)",
    "dual_lr": "the dual (max) variable's ascent step: a multiplier, MORBiT's task weights, MMB's y_i",
    "follower_lr": "the pessimistic follower's step size",
    "upper_opt": "an optax rule for theta in place of upper_lr",
    "lower_opt": "an optax rule for phi in place of lower_lr",
    "v_opt": "an optax rule for v in place of v_lr",
    "tracker_opt": "an optax rule for the tracker z in place of tracker_lr",
    "follower_opt": "an optax rule for the follower in place of follower_lr",
    "dual_opt": "an optax rule for the dual variable in place of dual_lr",
    # decays (float exponents)
    "upper_decay": "p of upper_lr / (k + 1)^p",
    "lower_decay": "p of lower_lr / (k + 1)^p",
    "tracker_decay": "p of tracker_lr / (k + 1)^p",
    "restart_lower_decay": "bool: lower_decay counts the inner steps and restarts every outer step (BSA's Alg. 2)",
    # inner loops
    "lower_steps": "phi's steps per outer step (T)",
    "tracker_steps": "the tracker z's warm-started steps per outer step",
    "follower_steps": "the follower's steps per outer step",
    # momentum
    "momentum": "STORM's weight a on the previous estimate (0: none; mrbo/sustain: a_0, 1 - a_k decays as k^-2/3)",
    "upper_momentum": "momentum of the UL direction (mmb: its moving average's weight on m_{k-1})",
    "lower_momentum": "momentum of the LL direction",
    "hessian_momentum": "momentum of the tracked LL Hessian and cross block",
    # penalty ramp
    "penalty": "the penalty weight rho_0",
    "penalty_rate": "additive growth: rho_k = min(penalty + penalty_rate k^penalty_power, penalty_max)",
    "penalty_power": "the power of k in the additive ramp",
    "penalty_factor": "multiplicative growth rho <- min(penalty_factor rho, penalty_max)",
    "penalty_max": "the cap of the penalty",
    "hinge": "exact penalty rho max{0, q} (False: rho q)",
    "variant": "pbgd's penalty: 'value' (V-PBGD) or 'gradient' (G-PBGD)",
    # dual variables
    "dual_start": "the multiplier's initial value",
    "dual_max": "the multiplier's upper bound",
    "dual_reg": "the regularisation of the dual ascent (MORBiT: mu/2 ||lambda - 1/n||^2)",
    "dual_floor": "MORBiT's floor lambda_i >= dual_floor / n of its task weights",
    # value-function details
    "smoothing": "the value function's smoothing (a1, a2), or mu_0 of smoothing_pg",
    "smoothing_shrink": "smoothing_pg's factor on mu once a smoothed problem is resolved",
    "resolve_tol": "smoothing_pg: a step moving less than resolve_tol mu resolves the smoothed problem",
    "control": "BOME's control 'gradient' (eta ||grad q||^2) or 'value' (eta q)",
    "control_rate": "BOME's eta in its control",
    # linear solvers and hypergradients
    "linear_solver": "the solver of A v = grad_phi f_upper (a bj.linear_solvers solver)",
    "neumann_steps": "terms of the Neumann series",
    "neumann_eta": "the Neumann series' step (default lower_lr)",
    "subspace_eta": "SubBiO's eta of span{b, (I - eta A) v_prev} (default lower_lr)",
    "shared_batch": "every Neumann factor on the step's LL batch",
    "warm_start": "the linear solver starts from its last solution",
    "hessian_tracking": "STABLE's dense recursive Hessian estimates",
    "hessian_floor": "STABLE's projection onto {H >= hessian_floor I}",
    "strongly_convex": "TTSA's strongly convex UL rates",
    "horizon": "the horizon K of the theorem's constant steps (TTSA, MORBiT)",
    "m_start": "LancBiO's initial subspace dimension",
    "inc": "LancBiO's growth factor of the dimension",
    "every": "LancBiO's steps between dimension increases",
    "m_max": "LancBiO's largest dimension",
    "m0": "LancBiO's theta hold per epoch",
    "correction": "LancBiO's 'galerkin' or 'min_residual'",
    "exact_residual": "LancBiO's residual recomputed exactly",
    "delta": "HJFBiO's finite-difference step",
    "eps": "BSG1's regulariser of ||grad_y g||^2",
    "tol": "bsg_constrained's activity tolerance",
    "num_directions": "PZOBO's random directions Q",
    "perturbation": "PZOBO's perturbation size",
    "directions": "PZOBO's direction distribution",
    # variance reduction
    "period": "steps between full-batch refreshes (SARAH)",
    "saga_init": "SABA's initial memories",
    # reformulations
    "barrier": "EBSA's barrier weight mu_0",
    "barrier_power": "EBSA's mu_k = barrier / (k + 1)^barrier_power",
    "barrier_min": "EBSA's floor of mu_k",
    # multi-objective and min-max
    "uniform": "MORBiT's task weights held at 1/n (the average-objective baseline)",
    "fixed_weights": "MORBiT's task weights held at a given point of the simplex",
    "blocks": "MMB's blocks sampled per step (B)",
    # problem and run
    "lower_set": "the LL's feasible set (a bj.constraints set or a projection)",
    "batch_size": "minibatch size (None: full batch; a pair: (upper, lower))",
    "sampler": "'iid', 'shuffled' or 'partition'",
    "mode": "'rev' or 'fwd' second-order products",
    "check": "run-time checks",
    "mesh": "a device mesh for data-parallel runs",
    "shards": "the sampling layout of D shards on one device",
    "precision": "a bj.Precision policy",
}


_VALUE_FUNCTION = ("bome", "pdbo", "vf_penalty", "smoothing_pg", "pbgd")

def _same(value):
    return value


def _complement(value):
    """1 - value for a momentum given as a number (a schedule or an optax rule does not convert)."""
    if callable(value) or isinstance(value, (str, bool)):
        raise TypeError("it does not convert automatically")
    return 1 - value


# (old name, new name, presets, how the value converts, the conversion or None): the renames of 0.2.0
RENAMES = (
    ("momentum_eta", "momentum", ("fsla",), " = 1 - momentum_eta", _complement),
    ("eta0", "momentum", ("mrbo", "sustain"), " = 1 - eta0", _complement),
    ("eta_upper", "upper_momentum", ("momentum",), " (the same value)", _same),
    ("eta_lower", "lower_momentum", ("momentum",), " (the same value)", _same),
    ("tau", "hessian_momentum", ("stable",), " = 1 - tau", _complement),
    ("mu", "hessian_floor", ("stable",), "", _same),
    ("mu", "perturbation", ("pzobo",), "", _same),
    ("inner_lr", "tracker_lr", (*_VALUE_FUNCTION, "f2sa"), "", _same),
    ("inner_opt", "tracker_opt", (*_VALUE_FUNCTION, "f2sa"), "", _same),
    ("lower_steps", "tracker_steps", _VALUE_FUNCTION, " (the tracker's steps)", _same),
    ("inner_decay", "tracker_decay", ("f2sa",), "", _same),
    ("inner_decay", "restart_lower_decay", ("bsa",), " (the same bool)", _same),
    ("gamma", "penalty", ("pbgd",), "", _same),
    ("gamma_max", "penalty_max", ("pbgd",), "", _same),
    ("ramp_steps", "penalty_rate", ("pbgd",), " = (penalty_max - penalty) / ramp_steps", None),
    ("penalty_grow", "penalty_factor", ("smoothing_pg",), "", _same),
    ("eta", "control_rate", ("bome",), "", _same),
    ("eta", "resolve_tol", ("smoothing_pg",), "", _same),
    ("eta", "subspace_eta", ("subbio",), "", _same),
    ("lam_lr", "dual_lr", ("morbit",), "", _same),
    ("lam_opt", "dual_opt", ("morbit",), "", _same),
    ("mu_lambda", "dual_reg", ("morbit",), "", _same),
    ("delta", "dual_floor", ("morbit",), "", _same),
    ("momentum", "upper_momentum", ("mmb",), " = 1 - momentum", _complement),
)
RENAMED: Mapping[tuple, tuple] = {(preset, old): (new, note, convert) for old, new, presets, note, convert in RENAMES
                                  for preset in presets}


def translate_renamed(preset: str, kwargs: dict) -> dict:
    """`kwargs` with the keywords `preset` renamed in 0.2.0 given their new names: a value that
    converts on its own (`RENAMES`) is converted, with a FutureWarning naming the new name; one that
    does not (pbgd's `ramp_steps`, a momentum schedule), or an old name given with its new one,
    raises a TypeError naming the new name. pbgd's `penalty` given a string is the variant, now
    `variant=`."""
    out, refused = dict(kwargs), []
    if preset == "pbgd" and isinstance(out.get("penalty"), str):
        out["variant"] = out.pop("penalty")
        warnings.warn(f"pbgd: penalty={out['variant']!r} (the variant) is deprecated: use variant={out['variant']!r} "
                      "(renamed in 0.2.0).", FutureWarning, stacklevel=3)
    for name in [n for n in kwargs if (preset, n) in RENAMED]:
        new, note, convert = RENAMED[preset, name]
        try:
            if convert is None or new in kwargs:
                raise TypeError("it does not convert automatically" if convert is None else f"{new}= is given too")
            out[new] = convert(out.pop(name))
        except TypeError as why:
            refused.append(f"{name}= is now {new}={note} ({why})")
            continue
        warnings.warn(f"{preset}: {name}= is deprecated (renamed in 0.2.0): use {new}={note}.", FutureWarning,
                      stacklevel=3)
    if refused:
        raise TypeError(f"{preset}: renamed keyword argument(s) (CHANGELOG 0.2.0): {'; '.join(refused)}.")
    return out


def accepts_renamed(build: Callable) -> Callable:
    """`build`, a preset that `parallel.preset_options` does not wrap (morbit, mmb), taking its keywords
    renamed in 0.2.0 as `translate_renamed` does."""
    @functools.wraps(build)
    def preset(*args, **kwargs):
        return build(*args, **translate_renamed(build.__name__, kwargs))

    return preset


__all__ = ["RENAMED", "RENAMES", "VOCABULARY", "accepts_renamed", "translate_renamed"]

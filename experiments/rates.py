"""Empirical convergence rates of TTSA (Hong, Wai, Wang, Yang, SIAM J. Optim. 2023,
arXiv:2007.05170) on the stochastic quadratic problem.

The theory (Hong et al.'s analysis):
  weakly convex UL, with K iterations and alpha = O(K^-3/5), beta = O(K^-2/5) held for all k <= K:
      (1/K) sum_k Delta_phi^k = O~(K^-2/5),  near-stationarity (1/K) sum_k E||grad F||^2 = O~(K^-2/5)
  strongly convex UL, alpha_k ~ 1/k, beta_k ~ k^-2/3:
      Delta_phi^k = E||phi^k - phi*(theta^k-1)||^2 = O~(k^-2/3),  Delta_theta^k = E||theta^k - theta*||^2 = O~(k^-2/3)
(The slides write the gaps without the square; the recursions (42)-(47), Delta_phi ~ beta, are
those of the squared distances, as in Hong et al.)

Three experiments, seeds averaged (E is the mean over seeds):
  A  fixed horizon: for each K in `options.horizons`, TTSA with `horizon=K` (the preset's form of
     Theorem 1: alpha = upper_lr K^-3/5 and beta = lower_lr K^-2/5 constant over the run); every
     iteration is recorded and
     (1/K) sum_{k<K} E||grad F(theta_k)||^2 and (1/K) sum_k E||phi_k - phi*(theta_k)||^2 are
     fitted against log K. Theory -2/5 (the (F_0 - F*)/(alpha K) and beta terms of the bound).
  B  anytime, the preset as is: alpha_k = upper_lr (k+1)^-3/5, beta_k = lower_lr (k+1)^-2/5;
     pointwise E||grad F(theta_k)||^2 and E||phi_k - phi*(theta_k)||^2 fitted over the tail.
  C  strongly convex (`strongly_convex = true`): alpha_k ~ 1/(k+1), beta_k ~ (k+1)^-2/3;
     E||theta_k - theta*||^2 and E||phi_k - phi*(theta_k)||^2 over the tail. Theory -2/3.
A check is "tight" (|slope - theory| <= tolerance) or a "bound" (slope <= theory + tolerance: on a
quadratic the noise in the UL step averages out, so theta converges faster than the worst case).

Config: `[algorithms.ttsa]` (used by A and B) and `[algorithms.ttsa_sc]` (C), `[options]` below.
Writes rates.png and rates.json in the experiment folder and prints the fitted slopes.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, NamedTuple

import numpy as np

from experiments.config import ConfigError, check_names, experiment_dir
from experiments.plotting import _pyplot
from experiments.results import ResultStore, write_json
from experiments import runner
from experiments.runner import is_writer, prepare, run_cells
from experiments.sweep import expand

OPTIONS = {
    "horizons": [512, 1024, 2048, 4096, 8192, 16384],
    "horizon_algorithm": "ttsa",
    "anytime_algorithm": "ttsa",
    "strongly_convex_algorithm": "ttsa_sc",
    "fit_from": 1.0 / 16.0,     # pointwise fits over k in [fit_from * steps, steps]
    "fit_points": 25,           # log-spaced evaluations used by a pointwise fit
    "tolerance": 0.1,
}


class Check(NamedTuple):
    case: str
    quantity: str
    slope: float
    theory: float
    kind: str       # "tight" or "bound"
    tolerance: float = 0.1

    @property
    def ok(self) -> bool:
        if self.kind == "tight":
            return abs(self.slope - self.theory) <= self.tolerance
        return self.slope <= self.theory + self.tolerance

    def verdict(self) -> str:
        if self.kind == "tight":
            return "PASS" if self.ok else "FAIL"
        if not self.ok:
            return "FAIL (slower than the bound)"
        return "PASS (bound holds" + (", faster)" if self.slope < self.theory - self.tolerance else ")")


def options(cfg: dict) -> dict:
    check_names(cfg["options"], OPTIONS, "[options] of figure 'rates'")
    opts = {**OPTIONS, **cfg["options"]}
    for role in ("horizon_algorithm", "anytime_algorithm", "strongly_convex_algorithm"):
        if opts[role] not in cfg["algorithms"]:
            raise ConfigError(f"[options] {role} = {opts[role]!r} is not an [algorithms] table; "
                              f"configured: {', '.join(cfg['algorithms'])}.")
    for m in ("grad_sq", "theta_err", "lower_gap"):
        if m not in cfg["metrics"]:
            raise ConfigError(f"the rates figure needs metric {m!r} in metrics.")
    return opts


def horizon_config(cfg: dict, opts: dict) -> dict:
    """A derived config whose algorithms are the fixed-horizon runs (one label per K)."""
    base = dict(cfg["algorithms"][opts["horizon_algorithm"]])
    preset = base.pop("preset", opts["horizon_algorithm"])
    algs = {}
    for K in opts["horizons"]:   # the preset's horizon form: alpha = upper_lr K^-3/5, beta = lower_lr K^-2/5
        algs[f"horizon_K{K}"] = dict(base, preset=preset, horizon=int(K), steps=int(K), eval_every=1)
    out = copy.deepcopy(cfg)
    out["algorithms"], out["only"] = algs, []
    return out


def anytime_config(cfg: dict, opts: dict) -> dict:
    out = copy.deepcopy(cfg)
    keep = (opts["anytime_algorithm"], opts["strongly_convex_algorithm"])
    out["algorithms"] = {k: v for k, v in cfg["algorithms"].items() if k in keep}
    out["only"] = []
    return out


def fit(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(y) & (y > 0)
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0]) if ok.sum() >= 2 else math.nan


def tail_indices(steps: np.ndarray, start: float, points: int) -> np.ndarray:
    targets = np.geomspace(max(start, steps[1]), steps[-1], points)
    return np.unique(np.clip(np.searchsorted(steps, targets), 1, len(steps) - 1))


def check(cfg: dict) -> dict:
    """The [options] with defaults filled; every table of the config and name in it checked before any work."""
    opts = options(cfg)
    runner.check(cfg)
    return opts


def main(cfg: dict, on_cell_saved=None, log=print) -> dict:
    opts = check(cfg)
    store = ResultStore(experiment_dir(cfg))
    workload, reference = prepare(cfg, store)
    log(f"[{cfg['name']}] {workload.instance.description}")
    hcfg, acfg = horizon_config(cfg, opts), anytime_config(cfg, opts)
    hcells, acells = expand(hcfg), expand(acfg)
    run_cells(hcfg, workload, reference, store, hcells, on_cell_saved=on_cell_saved, log=log)
    run_cells(acfg, workload, reference, store, acells, on_cell_saved=on_cell_saved, log=log)
    if not is_writer():                  # another process of a multi-process job: process 0 reports
        return {}
    tol = opts["tolerance"]

    # A: fixed horizons -> averages over k < K (per seed), mean over seeds
    Ks, avg = [], {"grad_sq": [], "lower_gap": []}
    per_seed = {"grad_sq": [], "lower_gap": []}
    for cell in hcells:
        res = store.load(cell.cell_id)
        Ks.append(res.meta["steps"])
        for m in avg:
            vals = np.asarray(res.history[m], float)[:, :-1].mean(axis=1)   # (seeds,)
            per_seed[m].append(vals)
            avg[m].append(vals.mean())
    checks = [Check("A fixed horizon", "(1/K) sum E||grad F||^2", fit(Ks, avg["grad_sq"]), -0.4, "tight", tol),
              Check("A fixed horizon", "(1/K) sum E||phi - phi*||^2", fit(Ks, avg["lower_gap"]), -0.4, "tight", tol)]

    # B, C: pointwise over the tail
    curves: Dict[str, Dict[str, np.ndarray]] = {}
    for cell, (case, metrics, theory, kinds) in zip(acells, [
            ("B anytime (preset decays)", ("grad_sq", "lower_gap"), -0.4, ("bound", "tight")),
            ("C strongly convex", ("theta_err", "lower_gap"), -2.0 / 3.0, ("bound", "tight"))]):
        res = store.load(cell.cell_id)
        steps = np.asarray(res.history["step"][0], float)
        idx = tail_indices(steps, opts["fit_from"] * steps[-1], opts["fit_points"])
        curves[case] = {"step": steps, "idx": idx}
        for m, kind in zip(metrics, kinds):
            y = np.asarray(res.history[m], float)
            curves[case][m] = y
            name = {"grad_sq": "E||grad F(theta_k)||^2", "lower_gap": "E||phi_k - phi*(theta_k)||^2",
                    "theta_err": "E||theta_k - theta*||^2"}[m]
            checks.append(Check(case, name, fit(steps[idx], y.mean(axis=0)[idx]), theory, kind, tol))
    acells_order = [c.label for c in acells]
    if acells_order != [opts["anytime_algorithm"], opts["strongly_convex_algorithm"]]:
        raise ConfigError(f"rates: expected the anytime and strongly convex tables in this order, got {acells_order}.")

    png = store.path("rates.png")
    _draw(png, Ks, avg, per_seed, curves, checks, cfg, workload.instance.description)
    table = format_checks(checks)
    log(table)
    log(f"figure: {png}")
    write_json(store.path("rates.json"), {"checks": [dict(c._asdict(), ok=c.ok, verdict=c.verdict()) for c in checks],
                                          "horizons": Ks, "averages": avg, "options": opts})
    return {"checks": checks, "figure": png, "table": table}


def format_checks(checks: List[Check]) -> str:
    head = ("case", "quantity", "fitted slope", "theory", "verdict")
    rows = [(c.case, c.quantity, f"{c.slope:+.3f}", f"{c.theory:+.3f}", c.verdict()) for c in checks]
    w = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    line = lambda r: "  ".join(str(x).ljust(n) for x, n in zip(r, w))
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows])


def _draw(path, Ks, avg, per_seed, curves, checks, cfg, description):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    q = cfg["plot"]["quantiles"]
    colors = {"grad_sq": "tab:blue", "lower_gap": "tab:orange", "theta_err": "tab:green"}
    labels = {"grad_sq": r"$\|\nabla F(\theta)\|^2$", "lower_gap": r"$\|\phi - \phi^*(\theta)\|^2$",
              "theta_err": r"$\|\theta - \theta^*\|^2$"}
    slope = {(c.case, c.quantity): c.slope for c in checks}

    ax = axes[0]
    Ks = np.asarray(Ks, float)
    for m, quantity in (("grad_sq", "(1/K) sum E||grad F||^2"), ("lower_gap", "(1/K) sum E||phi - phi*||^2")):
        vals = np.stack(per_seed[m])                      # (K, seeds)
        ax.fill_between(Ks, np.quantile(vals, q[0], axis=1), np.quantile(vals, q[1], axis=1),
                        color=colors[m], alpha=0.2)
        ax.plot(Ks, avg[m], "o-", color=colors[m],
                label=f"avg {labels[m]}: slope {slope[('A fixed horizon', quantity)]:+.2f}")
    ax.plot(Ks, avg["grad_sq"][0] * (Ks / Ks[0]) ** -0.4, "k--", lw=1, label="theory $K^{-2/5}$")
    ax.set_title(r"A: fixed horizon, $\alpha \propto K^{-3/5}$, $\beta \propto K^{-2/5}$", fontsize=10)
    ax.set_xlabel("horizon K (iterations)")

    for ax, case, metrics, theory, tex in (
            (axes[1], "B anytime (preset decays)", ("grad_sq", "lower_gap"), -0.4, "k^{-2/5}"),
            (axes[2], "C strongly convex", ("theta_err", "lower_gap"), -2.0 / 3.0, "k^{-2/3}")):
        c = curves[case]
        k = c["step"][1:]
        for m in metrics:
            y = c[m][:, 1:]
            ax.fill_between(k, np.quantile(y, q[0], axis=0), np.quantile(y, q[1], axis=0), color=colors[m], alpha=0.15)
            s = [ch.slope for ch in checks if ch.case == case][metrics.index(m)]
            ax.plot(k, y.mean(axis=0), color=colors[m], label=f"E {labels[m]}: tail slope {s:+.2f}")
        idx = c["idx"]
        ref = c["lower_gap"].mean(axis=0)[idx[0]]
        kk = c["step"][idx]
        ax.plot(kk, ref * (kk / kk[0]) ** theory, "k--", lw=1.2, label=f"theory ${tex}$")
        ax.axvspan(kk[0], kk[-1], color="0.9", zorder=0)
        title = ("B: preset TTSA, " + r"$\alpha_k \propto k^{-3/5}$, $\beta_k \propto k^{-2/5}$"
                 if case.startswith("B") else
                 "C: strongly convex, " + r"$\alpha_k \propto 1/k$, $\beta_k \propto k^{-2/3}$")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration k (shaded: fitted tail)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    n_seeds = len(np.stack(per_seed["grad_sq"])[0])
    fig.suptitle(f"{cfg['title'] or 'TTSA rates'}\n{description}; mean over {n_seeds} seeds, "
                 f"{int(q[0] * 100)}-{int(q[1] * 100)}% band", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


__all__ = ["Check", "OPTIONS", "fit", "format_checks", "horizon_config", "main"]

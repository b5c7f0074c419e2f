"""LancBiO's synthetic-problem figures (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331, section 4):

    make fig-lancbio       configs/lancbio.toml      LancBiO, SubBiO, AmIGO-GD/CG, SOBA, TTSA, StocBiO
    make fig-lancbio-dim   configs/lancbio_dim.toml  LancBiO with m in {10, 20, 50, 80, 150} vs AmIGO-GD/CG(3, 10)

Problem: `[problem] name = "lancbio_synthetic"` (`experiments.problems.lancbio_synthetic`:
`bj.problems.lancbio_synthetic`, deterministic, every method full batch), drawn per seed (G, D1,
D2, D3 and the starting point from the seed). The cells run through `experiments.runner` like
every figure's: all seeds of a method in one compiled `jit(vmap(bj.run))` (the seeds' problems
stacked with the rows), the iterates theta, phi, v recorded every `eval_every` outer steps, the
metrics computed after the run from them (dense closed forms):

- `hypergrad_norm`: ||grad Phi(theta_k)||, the true hypergradient: phi*(theta_k) by Newton steps
  with the dense LL Hessian from phi_k, v* by a dense solve;
- `residual`: ||A v_k - b|| with A, b at the state's (theta, phi) and the method's v_k;
- `lower_grad_norm`: ||grad_phi f_lower(theta_k, phi_k)||;   `value`: f_upper(theta_k, phi*(theta_k)).

The time axis is `step x seconds_per_step` from the runner's timing pass: an un-batched run of
the first seed, the fastest of `timing_repeats` (compile excluded, `block_until_ready`), with no
metric: the paper's wall time excludes evaluation too. An un-batched run pays LancBiO's restart
HVP only at restarts (under `vmap` a `lax.cond` computes both branches).

Config: `[problem]` n, kappa, newton_steps; `[algorithms.<label>]` preset = "<bj.algorithms name>"
(default: the label), its keyword arguments (a `linear_solver = {name = "cg", maxiter = 5}` table
builds `bj.linear_solvers.<name>(...)`), optional `steps` (this algorithm's run length; the
paper runs SOBA 3x longer), one curve per table (no grid axes); `[options]` claims = "comparison"
| "dimension" (what the summary checks). Every cell (one label, all seeds) is saved atomically
under `results/<name>/cells/`; a rerun computes only the missing ones. Outputs: `<name>.png`,
`summary.md` (the seed's claims next to the measured numbers) and `summary.json`.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from experiments import runner
from experiments.config import ConfigError, check_names, experiment_dir, seed_list
from experiments.convergence import curve_of
from experiments.plotting import METRIC_LABELS, Curve, band, plot_grid
from experiments.results import CellResult, ResultStore, fmt, write_json
from experiments.runner import one_cell_per_label, prepare, run_labelled

CLAIMS = ("comparison", "dimension")

METRIC_LABELS.setdefault("hypergrad_norm", r"$\|\nabla\Phi(\theta_k)\|$")
METRIC_LABELS.setdefault("residual", r"residual $\|A_k v_k - b_k\|$")
METRIC_LABELS.setdefault("lower_grad_norm", r"$\|\nabla_\phi g(\theta_k, \phi_k)\|$")


def check(cfg: dict) -> None:
    """Every table of the config and name in it checked before any work."""
    if cfg["problem"]["name"] != "lancbio_synthetic":
        raise ConfigError(f"figure lancbio runs the problem 'lancbio_synthetic', got {cfg['problem']['name']!r}.")
    check_names(cfg["options"], ("claims",), "[options] of figure 'lancbio'")
    claims = cfg["options"].get("claims", "comparison")
    if claims not in CLAIMS:
        raise ConfigError(f"[options]: claims = one of {CLAIMS}; got {claims!r}.")
    runner.check(cfg)
    one_cell_per_label(cfg, "lancbio")


def _at_time(curve: Curve, metric: str, t: float) -> float:
    """The median over seeds of `metric` at the last evaluation no later than time t."""
    med, _, _ = band(curve.y[metric])
    idx = int(np.searchsorted(curve.x["time"], t, side="right")) - 1
    return float(med[max(idx, 0)])


def summarize(cfg: dict, results: Dict[str, CellResult], curves: List[Curve]) -> tuple:
    """(markdown, json) of the run: per algorithm the cost and the metrics, then the claims."""
    budget = min(float(c.x["time"][-1]) for c in curves)
    rows, table = [], {}
    for c in curves:
        h = results[c.label].history
        steps = float(h["step"][0, -1])
        hvps = float(np.median(h["hvps"][:, -1])) / max(steps, 1)
        entry = {"seconds_per_step": float(c.x["time"][-1]) / max(steps, 1), "hvps_per_step": hvps,
                 "final_time": float(c.x["time"][-1]), "steps": int(steps),
                 "status_ok": bool(np.all(np.asarray(h["status"])[:, -1] == 0))}
        common = min(float(cc.x["step"][-1]) for cc in curves)
        for m in ("hypergrad_norm", "residual"):
            if m in c.y:
                med = band(c.y[m])[0]
                entry[f"{m}_final"] = float(med[-1])
                entry[f"{m}_at_budget"] = _at_time(c, m, budget)
                at = int(np.searchsorted(c.x["step"], common, side="right")) - 1
                entry[f"{m}_at_step_{int(common)}"] = float(med[max(at, 0)])
        table[c.label] = entry
        rows.append(f"| {c.label} | {entry['steps']} | {1e3 * entry['seconds_per_step']:.3f} | {hvps:.3f} | "
                    f"{fmt(entry.get('hypergrad_norm_at_budget', np.nan))} | {fmt(entry.get('residual_at_budget', np.nan))} | "
                    f"{fmt(entry.get('hypergrad_norm_final', np.nan))} | {fmt(entry.get('residual_final', np.nan))} | "
                    f"{'ok' if entry['status_ok'] else 'FAILED'} |")
    lines = [f"# {cfg.get('title') or cfg['name']}", "",
             f"Problem: {json.dumps(cfg['problem'])}; seeds {seed_list(cfg)}; medians over seeds.",
             f"Common time budget (the shortest run): {budget:.3g} s.", "",
             "| algorithm | steps | ms / step | HVPs / step | ||grad Phi|| at budget | residual at budget | "
             "||grad Phi|| final | residual final | status |",
             "|---|---|---|---|---|---|---|---|---|", *rows, ""]
    claims = _claims(cfg["options"].get("claims", "comparison"), table)
    lines += ["## Claims of the paper vs this run", ""] + [f"- {c}" for c in claims] + [""]
    return "\n".join(lines), {"budget_s": budget, "algorithms": table, "claims": claims}


def _claims(kind: str, table: dict) -> List[str]:
    out = []
    lanc = {k: v for k, v in table.items() if k.lower().startswith("lancbio")}
    if kind == "comparison" and lanc:
        name = next(iter(lanc))
        for metric, what in (("residual", "the lowest residual ||A v - b||"),
                             ("hypergrad_norm", "the lowest hypergradient norm")):
            key = f"{metric}_at_budget"
            vals = {k: v[key] for k, v in table.items() if np.isfinite(v.get(key, np.nan))}
            if name not in vals:
                out.append(f"\"LancBiO reaches {what}\": no finite value for {name}.")
                continue
            best = min(vals, key=vals.get)
            others = {k: v for k, v in vals.items() if k != name}
            runner = min(others, key=others.get) if others else None
            holds = best == name
            out.append(f"\"LancBiO reaches {what}\" (at the common time budget): {name} {fmt(vals[name])}, "
                       f"best other {runner} {fmt(others.get(runner, np.nan))} -> "
                       f"{'holds' if holds else 'does not hold'} here.")
        common = min(v["steps"] for v in table.values())
        per_step = {k: v.get(f"residual_at_step_{common}", np.nan) for k, v in table.items()}
        finite = {k: v for k, v in per_step.items() if np.isfinite(v)}
        if finite:
            order = sorted(finite, key=finite.get)
            out.append(f"Per outer iteration instead of wall time (residual at step {common}, independent of the "
                       f"timing): " + ", ".join(f"{k} {fmt(finite[k])}" for k in order) + ".")
        hv = lanc[name]["hvps_per_step"]
        out.append(f"\"HVPs average 1 + 1/m per outer step\": {name} made {hv:.3f} HVPs per step "
                   f"(m grows from m_start to m_max by the schedule).")
    if kind == "dimension" and lanc:
        def dim(label):
            digits = "".join(ch for ch in label.split("m")[-1] if ch.isdigit())
            return int(digits) if digits else 0
        order = sorted(lanc, key=dim)
        res = [lanc[k]["residual_at_budget"] for k in order]
        mono = all(b <= a for a, b in zip(res, res[1:]))
        pairs = ", ".join(f"m={dim(k)}: {fmt(r)}" for k, r in zip(order, res))
        out.append(f"\"Increases in m enhance the convergence of the residual norm\" (residual at the common "
                   f"time budget): {pairs} -> {'holds (monotone in m)' if mono else 'does not hold (not monotone in m)'} here.")
        common = min(v["steps"] for v in table.values())
        at_step = [lanc[k].get(f"residual_at_step_{common}", np.nan) for k in order]
        mono_step = all(b <= a for a, b in zip(at_step, at_step[1:]))
        out.append(f"The same per outer iteration (residual at step {common}, independent of the timing): "
                   + ", ".join(f"m={dim(k)}: {fmt(r)}" for k, r in zip(order, at_step))
                   + f" -> {'monotone' if mono_step else 'not monotone'} in m.")
        grads = ", ".join(f"m={dim(k)}: {fmt(lanc[k]['hypergrad_norm_at_budget'])}" for k in order)
        out.append(f"\"When m = 50, the estimate of v* is sufficiently accurate\" (||grad Phi|| at the budget): {grads}.")
        amigo = {k: v for k, v in table.items() if k not in lanc}
        if amigo:
            best = min(amigo, key=lambda k: amigo[k]["residual_at_budget"])
            lbest = min(lanc, key=lambda k: lanc[k]["residual_at_budget"])
            out.append(f"Lowest residual at the budget: LancBiO {lbest} {fmt(lanc[lbest]['residual_at_budget'])} vs "
                       f"{best} {fmt(amigo[best]['residual_at_budget'])}.")
    return out


def main(cfg: dict, log=print) -> dict:
    check(cfg)
    store = ResultStore(experiment_dir(cfg))
    workload, reference = prepare(cfg, store)
    log(f"[{cfg['name']}] {workload.instance.description} (drawn per seed)")
    stats, results = run_labelled(cfg, workload, reference, store, "lancbio", log=log)
    if results is None:                  # another process of a multi-process job: process 0 reports
        return {"stats": stats}
    curves = [curve_of(r, label, cfg["metrics"]) for label, r in results.items()]
    root = experiment_dir(cfg)
    path = plot_grid(curves, cfg["plot"]["metrics"], cfg["plot"]["x"],
                     os.path.join(root, cfg["plot"]["file"] or f"{cfg['name']}.png"),
                     title=cfg["plot"]["title"] or cfg.get("title", ""), logy=cfg["plot"]["logy"],
                     quantiles=cfg["plot"]["quantiles"], ylim=cfg["plot"]["ylim"])
    text, summary = summarize(cfg, results, curves)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(root, "summary.json"), summary)
    log(text)
    log(f"[{cfg['name']}] figure: {path}")
    return {"figure": path, "summary": summary, "text": text, "stats": stats, "results": results}


__all__ = ["CLAIMS", "check", "main", "summarize"]

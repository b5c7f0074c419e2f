"""LancBiO's synthetic-problem figures (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331, section 4):

    make fig-lancbio       configs/lancbio.toml      LancBiO, SubBiO, AmIGO-GD/CG, SOBA, TTSA, StocBiO
    make fig-lancbio-dim   configs/lancbio_dim.toml  LancBiO with m in {10, 20, 50, 80, 150} vs AmIGO-GD/CG(3, 10)

Problem: `bj.problems.lancbio_synthetic` (deterministic; every method full batch), regenerated per
seed (G, D1, D2, D3 and the starting point drawn from the seed). Each algorithm is compiled once
(one seed's run, `bj.run`, recording the iterates theta, phi, v every `eval_every` outer steps and
nothing else) and run seed after seed; the metrics of the recorded iterates are computed after the
run (one jitted, vmapped evaluation shared by all algorithms):

- `hypergrad_norm`: ||grad Phi(theta_k)||, the true hypergradient: phi*(theta_k) by Newton steps
  with the dense LL Hessian from phi_k, v* by a dense solve (closed forms of the problem module);
- `residual`: ||A v_k - b|| with A, b at the state's (theta, phi) and the method's v_k;
- `lower_grad_norm`: ||grad_phi f_lower(theta_k, phi_k)||;   `value`: f_upper(theta_k, phi*(theta_k)).

The time axis is `step x seconds_per_step`, from the wall time of those single-seed runs (the
fastest of the seeds' runs and `timing_repeats - 1` more runs of the first seed; compile
excluded, `block_until_ready`), which contain no metric: the paper's wall
time excludes evaluation too. Runs are not batched over seeds, so LancBiO's restart HVP is paid
only at restarts (under `vmap` a `lax.cond` computes both branches).

Config: `[problem]` n, kappa, newton_steps; `[algorithms.<label>]` preset = "<bj.algorithms name>"
(default: the label), its keyword arguments (a `linear_solver = {name = "cg", maxiter = 5}` table
builds `bj.linear_solvers.<name>(...)`), optional `steps` (this algorithm's run length; the
paper runs SOBA 3x longer); `[options]` claims = "comparison" | "dimension" (what the summary
checks). Every cell (one label, all seeds) is saved atomically under `results/<name>/cells/`; a rerun
computes only the missing ones. Outputs: `<name>.png`, `summary.md` (the seed's claims next to the
measured numbers) and `summary.json`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import numpy as np

from experiments.config import ConfigError, check_names, experiment_dir, seed_list
from experiments.curves import build_algorithm, check_curves, check_metrics, check_problem, results_of
from experiments.plotting import METRIC_LABELS, Curve, band, plot_grid
from experiments.results import ResultStore, environment, fmt, write_json

METRICS = ("hypergrad_norm", "residual", "lower_grad_norm", "value")
PROBLEM_KEYS = {"name": "lancbio_synthetic", "n": 200, "kappa": 1e3, "newton_steps": 6}
CLAIMS = ("comparison", "dimension")

METRIC_LABELS.setdefault("hypergrad_norm", r"$\|\nabla\Phi(\theta_k)\|$")
METRIC_LABELS.setdefault("residual", r"residual $\|A_k v_k - b_k\|$")
METRIC_LABELS.setdefault("lower_grad_norm", r"$\|\nabla_\phi g(\theta_k, \phi_k)\|$")


def _synthetic():
    """The problem module (`bj.problems.lancbio_synthetic` is its factory function)."""
    import importlib
    return importlib.import_module("bilevel_jax.problems.lancbio_synthetic")


def check(cfg: dict) -> dict:
    """The [problem] table with defaults filled; every table of the config and name in it checked before any work."""
    problem = check_problem(cfg, PROBLEM_KEYS, "lancbio_synthetic", "lancbio")
    check_metrics(cfg, METRICS)
    check_names(cfg["options"], ("claims",), "[options] of figure 'lancbio'")
    claims = cfg["options"].get("claims", "comparison")
    if claims not in CLAIMS:
        raise ConfigError(f"[options]: claims = one of {CLAIMS}; got {claims!r}.")
    check_curves(cfg)
    return problem


_EVALUATORS: dict = {}


def evaluator(newton_steps: int, n: int):
    """The metrics of recorded iterates, jitted once per figure: `(data, theta, phi, v) -> dict`
    over a leading axis of evaluations (one seed's data), in chunks whose dense n x n Hessians
    take about 1.6 GB (all at once at the small sizes, 2 at a time at n = 10^4)."""
    if (newton_steps, n) in _EVALUATORS:
        return _EVALUATORS[newton_steps, n]
    import jax
    import jax.numpy as jnp
    syn = _synthetic()

    def one(data, theta, phi, v):
        star = syn.phi_star(data, theta, phi, newton_steps)
        return {"hypergrad_norm": jnp.linalg.norm(syn.hypergradient(data, theta, star)),
                "residual": syn.residual(data, theta, phi, v),
                "lower_grad_norm": jnp.linalg.norm(syn.lower_grad(data, theta, phi)),
                "value": syn.f_upper(theta, star, data[0])}

    chunk = max(1, int(2e8) // (n * n))
    fn = jax.jit(lambda data, theta, phi, v: jax.lax.map(lambda t: one(data, *t), (theta, phi, v), batch_size=chunk))
    _EVALUATORS[newton_steps, n] = fn
    return fn


def _record(state, data):
    """The iterates kept every `eval_every` steps (metrics are computed after the run)."""
    import jax.numpy as jnp
    v = state.v
    return {"theta": state.theta, "phi": state.phi, "v": jnp.full_like(state.phi, jnp.nan) if v is None else v}


def run_cell(cfg: dict, problem_cfg: dict, label: str, table: dict) -> tuple:
    """(history, meta) of one algorithm over all seeds.

    One compiled single-seed program (the run with the iterates recorded every `eval_every`
    steps, no metric inside), run once per seed and timed (block_until_ready; the fastest seed
    gives seconds_per_step); then the metrics of the recorded iterates, one vmapped call per seed."""
    import jax
    import jax.numpy as jnp
    import bilevel_jax as bj
    syn = _synthetic()

    dtype = jnp.float64 if cfg["x64"] else jnp.float32
    n, kappa = int(problem_cfg["n"]), float(problem_cfg["kappa"])
    steps = int(table.get("steps", cfg["steps"]))
    alg = build_algorithm(syn.PROBLEM, label, table)
    seeds = seed_list(cfg)
    evaluate = evaluator(int(problem_cfg["newton_steps"]), n)

    def one(key, data, theta0, phi0):
        state = alg.init(theta0, phi0, key, data)
        return bj.run(alg, state, data, num_steps=steps, eval_every=cfg["eval_every"], eval_fn=_record)[1]

    compiled, compile_s = None, 0.0
    histories, times, repeats = [], [], []
    for i, seed in enumerate(seeds):   # one seed's data at a time (G is n x n)
        key = jax.random.PRNGKey(seed)
        prob = syn.synthetic_data(key, n, kappa, dtype)
        if compiled is None:
            start = time.perf_counter()
            compiled = jax.jit(one).lower(key, *prob).compile()
            compile_s = time.perf_counter() - start
        t0 = time.perf_counter()
        h = jax.block_until_ready(compiled(key, *prob))
        times.append(time.perf_counter() - t0)
        if i == 0 and cfg["timing"]:  # more runs of the first seed: the fastest run gives the time per step
            for _ in range(max(int(cfg["timing_repeats"]) - 1, 0)):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(key, *prob))
                repeats.append(time.perf_counter() - t0)
        metrics = evaluate(prob[0], h.pop("theta"), h.pop("phi"), h.pop("v"))
        histories.append({**{k: np.asarray(v) for k, v in h.items()},
                          **{k: np.asarray(v) for k, v in metrics.items()}})
        del prob
    history = {k: np.stack([h[k] for h in histories]) for k in histories[0]}
    timing = {"seconds_per_step": min(times + repeats) / steps, "run_s": sum(times), "compile_s": compile_s,
              "seed_run_s": times, "repeat_run_s": repeats}
    meta = {"label": label, "preset": table.get("preset", label), "hyperparameters": table, "steps": steps,
            "seeds": seeds, "problem": problem_cfg, "timings": timing, "environment": environment()}
    return history, meta


def _curves(results: Dict[str, tuple], metrics) -> List[Curve]:
    curves = []
    for label, (h, meta) in results.items():
        steps = np.asarray(h["step"][0], dtype=float)
        per_step = meta["timings"]["seconds_per_step"] or meta["timings"]["run_s"] / max(meta["steps"], 1)
        oracles = sum(np.asarray(h[k], float) for k in ("lower_grads", "upper_grads", "hvps", "cross"))
        x = {"step": steps, "time": steps * per_step, "oracles": np.median(oracles, axis=0)}
        finite = np.asarray(h["finite"], bool)
        y = {m: np.where(finite, np.asarray(h[m], float), np.nan) for m in metrics}
        curves.append(Curve(label, x, y))
    return curves


def _at_time(curve: Curve, metric: str, t: float) -> float:
    """The median over seeds of `metric` at the last evaluation no later than time t."""
    med, _, _ = band(curve.y[metric])
    idx = int(np.searchsorted(curve.x["time"], t, side="right")) - 1
    return float(med[max(idx, 0)])


def summarize(cfg: dict, results: Dict[str, tuple], curves: List[Curve]) -> tuple:
    """(markdown, json) of the run: per algorithm the cost and the metrics, then the claims."""
    budget = min(float(c.x["time"][-1]) for c in curves)
    rows, table = [], {}
    for c in curves:
        h, meta = results[c.label]
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


def main(cfg: dict) -> None:
    import jax
    jax.config.update("jax_enable_x64", bool(cfg["x64"]))
    problem_cfg = check(cfg)
    root = experiment_dir(cfg)

    def run_label(label, table):
        t0 = time.perf_counter()
        history, meta = run_cell(cfg, problem_cfg, label, table)
        if cfg["progress"]:
            t = meta["timings"]
            print(f"[{cfg['name']}] {label}: {time.perf_counter() - t0:.1f} s (compile {t['compile_s']:.1f} s, "
                  f"{1e3 * (t['seconds_per_step'] or float('nan')):.3f} ms/step)", flush=True)
        return history, meta

    results = results_of(cfg, problem_cfg, ResultStore(root), run_label)
    metrics = [m for m in cfg["plot"]["metrics"]]
    curves = _curves(results, cfg["metrics"])
    path = plot_grid(curves, metrics, cfg["plot"]["x"], os.path.join(root, cfg["plot"]["file"] or f"{cfg['name']}.png"),
                     title=cfg["plot"]["title"] or cfg.get("title", ""), logy=cfg["plot"]["logy"],
                     quantiles=cfg["plot"]["quantiles"], ylim=cfg["plot"]["ylim"])
    text, summary = summarize(cfg, results, curves)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(root, "summary.json"), summary)
    print(text)
    print(f"[{cfg['name']}] figure: {path}")


__all__ = ["build_algorithm", "main", "run_cell", "summarize"]

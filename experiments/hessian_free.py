"""Hessian-free and value-function methods against second-order ones (make fig-hessian-free):

    configs/hessian_free_quadratic.toml   stochastic quadratic, ||grad F(theta)||^2
    configs/hessian_free_logreg.toml      logistic-regression HPO (IJCNN1-shaped), h(theta) - h*

The runs are those of the convergence figure (`experiments.runner`: one jit(vmap(bj.run)) per
group of cells, best grid point per label); only the x axes and the summary differ. Oracle calls
are split by order, from the cumulative counts of `bj.run`'s history:

    first_order   = lower_grads + upper_grads + values   (gradients and function values)
    second_order  = hvps + cross                          (Hessian- and Jacobian-vector products)
    all_oracles   = first_order + second_order

(`experiments.convergence` counts gradients + HVPs + cross and leaves the value calls out). The
time axis and ms/step are those of `experiments.convergence`: the timing pass (an un-batched
single-seed run), or with `timing = false` the batched run's wall time per step. The
figure's columns are `[options] x` (default: time, first_order, all_oracles); the summary gives
per algorithm the calls of each kind per outer step and to the target, then the papers' claims
(no second-order oracle; more first-order calls; a penalty bias) next to the measured numbers.

`[options]`: x (the axes), hessian_free (the labels counted as Hessian-free in the claims),
penalty (the labels of penalty / value-function methods, whose bias the claims check).
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np

from experiments import convergence
from experiments.config import ConfigError, check_names, experiment_dir
from experiments.plotting import AXIS_LABELS, Curve, band, plot_grid
from experiments.results import ResultStore, failure_text, fmt
from experiments import runner
from experiments.runner import is_writer, prepare, run_cells
from experiments.sweep import expand

AXES = ("time", "step", "first_order", "second_order", "all_oracles")
OPTIONS = {"x": ["time", "first_order", "all_oracles"],
           "hessian_free": ["hjfbio", "pzobo", "bsg1", "f2sa", "bome", "pbgd", "pdbo", "vf_penalty"],
           "penalty": ["f2sa", "bome", "pbgd", "pdbo", "vf_penalty"]}
LABELS = {"first_order": "first-order oracle calls (LL + UL gradients + function values)",
          "second_order": "second-order oracle calls (HVPs + cross products)",
          "all_oracles": "all oracle calls (gradients + values + HVPs + cross)"}


def options(cfg: dict) -> dict:
    check_names(cfg["options"], OPTIONS, "[options] of figure 'hessian_free'")
    opts = {**OPTIONS, **cfg["options"]}
    bad = [x for x in opts["x"] if x not in AXES]
    if bad:
        raise ConfigError(f"[options] x: unknown axes {bad}; valid: {', '.join(AXES)}.")
    return opts


def counts(history) -> Dict[str, np.ndarray]:
    """(seeds, evals) cumulative calls of each kind."""
    h = {k: np.asarray(history[k], dtype=float) if k in history else 0.0
         for k in ("lower_grads", "upper_grads", "values", "hvps", "cross")}
    first = h["lower_grads"] + h["upper_grads"] + h["values"]
    second = h["hvps"] + h["cross"]
    return {"gradients": h["lower_grads"] + h["upper_grads"], "values": np.broadcast_to(h["values"], first.shape),
            "first_order": first, "second_order": np.broadcast_to(second, first.shape), "all_oracles": first + second}


def curve_of(result, label: str, metrics) -> Curve:
    c = convergence.curve_of(result, label, metrics)
    x = dict(c.x)
    x.update({k: np.median(v, axis=0) for k, v in counts(result.history).items()})
    return c._replace(x=x)


def rows_of(results, labels, metric, target, quantiles) -> List[dict]:
    out = []
    for res, label in zip(results, labels):
        c = curve_of(res, label, [metric])
        med, lo, hi = band(c.y[metric], quantiles)
        steps = float(c.x["step"][-1])
        n = int(np.asarray(res.history["finite"]).shape[0])
        per = {k: float(c.x[k][-1]) / steps for k in ("gradients", "values", "second_order")}
        out.append(dict(label=label, failed=failure_text(res.history) or f"0/{n}", final=float(med[-1]),
                        lo=float(lo[-1]), hi=float(hi[-1]), per_step=per,
                        time=convergence.reach(c.x["time"], med, target),
                        first=convergence.reach(c.x["first_order"], med, target),
                        second=convergence.reach(c.x["second_order"], med, target),
                        total=convergence.reach(c.x["all_oracles"], med, target),
                        ms=float(c.x["time"][-1]) / steps * 1e3, hyper=convergence.hp_text(res)))
    return out


def table_of(rows: List[dict], metric: str, target) -> str:
    t = fmt(target)
    head = ["algorithm", "seeds failed", f"final {metric} median [20%, 80%]", "grads/step", "values/step",
            "HVP+cross/step", f"time to {t} (s)", f"1st-order calls to {t}", f"HVP+cross to {t}",
            f"all calls to {t}", "ms/step", "hyperparameters"]
    body = [[r["label"], r["failed"],
             f"{fmt(r['final'])} [{fmt(r['lo'])}, {fmt(r['hi'])}]" if np.isfinite(r["final"]) else "no finite run",
             fmt(r["per_step"]["gradients"]), fmt(r["per_step"]["values"]), fmt(r["per_step"]["second_order"]),
             fmt(r["time"]), fmt(r["first"]), fmt(r["second"]), fmt(r["total"]), fmt(r["ms"], ".3f"),
             r["hyper"]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def claims(rows: List[dict], opts: dict, metric: str, target) -> List[str]:
    """The papers' claims, each followed by what this run measured."""
    hf = [r for r in rows if r["label"] in opts["hessian_free"]]
    so = [r for r in rows if r["label"] not in opts["hessian_free"]]
    pen = [r for r in hf if r["label"] in opts["penalty"]]
    out = []
    if hf:
        used = [f"{r['label']} {r['per_step']['second_order']:.3g}" for r in hf]
        none = all(r["per_step"]["second_order"] == 0 for r in hf)
        out.append("Claim (all Hessian-free papers): no second-order oracle (HVP / cross product). Measured HVP+cross "
                   f"per step: {', '.join(used)} -> {'holds' if none else 'does NOT hold for every method'}; "
                   "second-order methods: " + ", ".join(f"{r['label']} {r['per_step']['second_order']:.3g}" for r in so)
                   + ".")
    if hf and so:
        best_so = min(so, key=lambda r: r["first"])
        reached = [r for r in hf if np.isfinite(r["first"])]
        more = [r for r in reached if r["first"] > best_so["first"]]
        verdict = (f"{len(more)}/{len(hf)} need more first-order calls than {best_so['label']}"
                   if np.isfinite(best_so["first"]) else
                   f"no second-order method stays below the target, {len(reached)}/{len(hf)} Hessian-free ones do")
        out.append(f"Claim: the price is more first-order calls. Measured first-order calls to {fmt(target)}: best "
                   f"second-order method {best_so['label']} {fmt(best_so['first'])} (+ {fmt(best_so['second'])} "
                   f"HVP+cross); Hessian-free: " + ", ".join(f"{r['label']} {fmt(r['first'])}" for r in hf)
                   + f" -> {verdict}, {len(hf) - len(reached)}/{len(hf)} never stay below the target.")
        best_all = min(rows, key=lambda r: (r["total"], r["time"]))
        fastest = min(rows, key=lambda r: (r["time"], r["total"]))
        out.append(f"Counting every oracle as one call, the fewest to {fmt(target)}: {best_all['label']} "
                   f"({fmt(best_all['total'])}); the least wall time: {fastest['label']} ({fmt(fastest['time'])} s)."
                   if np.isfinite(best_all["total"]) else f"No method stays below {fmt(target)}.")
    if pen and so:
        best_so_final = min(r["final"] for r in so if np.isfinite(r["final"])) if any(
            np.isfinite(r["final"]) for r in so) else math.nan
        out.append(f"Claim (penalty / value-function methods): an O(1/lambda) (or O(step)) bias at a fixed penalty. "
                   f"Measured final {metric} (median): " + ", ".join(f"{r['label']} {fmt(r['final'])}" for r in pen)
                   + f" vs the best second-order method's {fmt(best_so_final)}.")
    bad = [f"{r['label']} {r['failed']}" for r in rows if not r["failed"].startswith("0/")]
    out.append("Diverged / failed seeds: " + (", ".join(bad) if bad else "none") + ".")
    return out


def check(cfg: dict) -> dict:
    """The [options] with defaults filled; every table of the config and name in it checked before any work."""
    opts = options(cfg)
    runner.check(cfg)
    return opts


def main(cfg: dict, log=print) -> dict:
    opts = check(cfg)
    store = ResultStore(experiment_dir(cfg))
    workload, reference = prepare(cfg, store)
    log(f"[{cfg['name']}] {workload.instance.description}")
    cells = expand(cfg)
    run_cells(cfg, workload, reference, store, cells, log=log)
    if not is_writer():                  # another process of a multi-process job: process 0 reports
        return {}
    results = store.load_many(c.cell_id for c in cells)
    ref_note = convergence.check_reference(results, reference)
    plot = cfg["plot"]
    chosen, labels, scores = convergence.select(cfg, results)
    curves = [curve_of(r, lab, plot["metrics"]) for r, lab in zip(chosen, labels)]
    png = store.path(plot["file"] or f"{cfg['name']}.png")
    notes = workload.notes
    title = convergence.title_of(cfg, workload.instance.description, workload.synthetic, notes)
    labels_x = {**AXIS_LABELS, **LABELS}
    if not cfg["timing"]:
        labels_x["time"] = "wall time (s) [the batched run: grid x seeds at once, metrics excluded]"
    plot_grid(curves, plot["metrics"], opts["x"], png, title, logy=plot["logy"], logx=plot["logx"],
              quantiles=plot["quantiles"], ylim=plot["ylim"], axis_labels=labels_x,
              note=f"{len(results[0].meta['seeds'])} seed(s), {cfg['steps']} steps")
    metric = plot["metrics"][0]
    rows = rows_of(chosen, labels, metric, plot["target"], plot["quantiles"])
    table = table_of(rows, metric, plot["target"])
    lines = claims(rows, opts, metric, plot["target"])
    with open(store.path("summary.md"), "w") as f:
        f.write(f"# {title.splitlines()[0]}\n\n{workload.instance.description}\n\n" + (f"{notes}\n\n" if notes else "")
                + (f"{ref_note}\n\n" if ref_note else "") + table + "\n\n## Claims vs this run\n\n"
                + "\n".join(f"- {c}" for c in lines) + "\n")
    convergence.write_sweep_csv(store.path("sweep.csv"), results, scores, plot["select_by"])
    log(table)
    for c in lines:
        log(f"- {c}")
    if ref_note:
        log(ref_note)
    log(f"figure: {png}")
    return {"figure": png, "rows": rows, "table": table, "claims": lines}


__all__ = ["OPTIONS", "claims", "counts", "curve_of", "main", "rows_of", "table_of"]

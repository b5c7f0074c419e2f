"""Robust multi-task learning with MORBiT (the robust multi-objective bilevel
problem of Gu, Lu, Ram, Weng, ICLR 2023, arXiv:2203.01924).

(a) Sinusoid robust meta-regression (Gu, Lu, Ram, Weng, "Min-Max Multi-objective Bilevel
    Optimization with Applications in Robust Machine Learning", ICLR 2023, arXiv:2203.01924):
    n training tasks y = a sin(b x + c), a shared ReLU MLP embedding h_theta (1-80-80-10, an
    equinox model) as theta and a linear head w_i per task as phi_i (`[problem] name =
    "sinusoid"`, `experiments.problems.sinusoid`). MORBiT (lambda on the simplex, (dual_reg / 2)
    ||lambda - 1/n||^2) against the same code with uniform weights (`uniform = true`, the usual
    multi-task objective). Metrics every `eval_every` outer iterations, at the closed-form ridge
    heads of the current embedding (`bj.problems.multitask.task_losses`): the maximum and the mean
    query loss over the training tasks, and over unseen test tasks whose heads are fitted on
    `shots` samples. Median and a quantile band over `seeds` repeats (each repeat draws its own
    tasks and initialisation).

(b) Robust multi-task representation learning on Fashion-MNIST binary tasks (the paper's pairs
    (0,6), (0,9), (1,7), (2,4), (2,7), (2,9), (3,7), (3,9)): a shared linear map 784 -> D as theta,
    per-task logistic heads as phi_i (ridge-regularised, strongly convex), test-set max and mean
    loss at heads fitted on the training samples of each task (`experiments.problems.fmnist_pairs`;
    the same [algorithms] tables without their `lower_opt`, `[options]` fmnist_*). Runs when
    `bj.datasets.fashion_mnist` finds the IDX files (Debian's dataset-fashion-mnist), else it is
    skipped with a message.

Both run through `experiments.runner` like every figure (the presets built from
`bj.algorithms.MULTI_OBJECTIVE`; all repeats of a method in one jit(vmap(bj.run)), the seeds'
tasks stacked with the rows; cells cached in results/<name>/cells/, a rerun computes only the
missing ones). An [algorithms.<label>] table is the preset's keyword arguments (`preset =
"morbit"`), `label` (the curve's name), optax rules as `upper_opt = {name = "sgd", clip = 1.0}`
(learning rate: the table's `upper_lr`) or `lower_opt = {name = "adam"}`.

The summary puts the paper's claim (the robust solution lowers the worst task's loss at some cost
in the mean) next to the measured final numbers.
"""
from __future__ import annotations

import copy
from typing import Dict

import numpy as np

import bilevel_jax as bj
from experiments import runner
from experiments.config import ConfigError, check_names, experiment_dir, seed_list
from experiments.plotting import Curve, plot_grid
from experiments.problems import FMNIST_METRICS, FMNIST_PAIRS, SINUSOID_METRICS
from experiments.results import ResultStore, environment, write_json
from experiments.runner import is_writer, one_cell_per_label, prepare, run_cells

CLAIM = ("Gu et al. 2023 (robust multi-objective bilevel): optimising for the worst-case scalarisation "
         "finds theta so that all objectives are good; the robust solution lowers the worst task's loss at some "
         "cost in the mean (MORBiT paper, sinusoid meta-regression: lower maximum task loss than uniform "
         "weights, with a comparable or slightly higher mean).")

OPTIONS = {
    "quantiles": [0.2, 0.8],
    "fashion_mnist": True,  # run (b) when the IDX files are there
    "fmnist_steps": 300,
    "fmnist_dim": 32,
    "fmnist_samples": 256,  # training samples per task and level
    "fmnist_seeds": 2,
}
METRICS = SINUSOID_METRICS


def options(cfg: dict) -> dict:
    check_names(cfg["options"], OPTIONS, "[options] of figure 'morbit'")
    return {**OPTIONS, **cfg["options"]}


def fmnist_config(cfg: dict, opts: dict) -> dict:
    """The config of (b): the Fashion-MNIST problem, its run length and seeds from [options], the
    same [algorithms] tables without `lower_opt` (plain SGD steps of `lower_lr` on the heads)."""
    out = copy.deepcopy(cfg)
    steps = int(opts["fmnist_steps"])
    out.update(steps=steps, eval_every=max(steps // 10, 1), seeds=int(opts["fmnist_seeds"]),
               metrics=list(FMNIST_METRICS), only=[])
    if steps % out["eval_every"]:
        raise ConfigError(f"[options] fmnist_steps = {steps} must be a multiple of 10 (one evaluation every tenth).")
    out["problem"] = {"name": "fmnist_pairs", "samples": opts["fmnist_samples"], "dim": opts["fmnist_dim"],
                      **({"reg": cfg["problem"]["reg"]} if "reg" in cfg["problem"] else {})}
    out["algorithms"] = {label: {k: v for k, v in table.items() if k != "lower_opt"}
                         for label, table in cfg["algorithms"].items() if not cfg["only"] or label in cfg["only"]}
    return out


def check(cfg: dict) -> dict:
    """The [options] with defaults filled; the [problem], [algorithms.*] tables of (a) and (b)
    checked (unknown keys and optimizer names name the closest valid one) before any work."""
    opts = options(cfg)
    if cfg["problem"]["name"] != "sinusoid":
        raise ConfigError(f"figure 'morbit' needs [problem] name = \"sinusoid\", got {cfg['problem']['name']!r}.")
    runner.check(cfg)
    one_cell_per_label(cfg, "morbit")
    if opts["fashion_mnist"]:
        runner.check(fmnist_config(cfg, opts))
    return opts


def _histories(cfg: dict, store: ResultStore, log) -> Dict[str, tuple]:
    """Run the missing cells of `cfg` and return {curve label: (history, meta)} (process 0; {} on
    the other processes of a multi-process job)."""
    workload, reference = prepare(cfg, store)
    log(f"[{cfg['name']}] {workload.instance.description} (drawn per seed)")
    cells = one_cell_per_label(cfg, "morbit")
    run_cells(cfg, workload, reference, store, cells, log=log)
    if not is_writer():
        return {}
    return {c.spec.get("label", c.label): (r.history, r.meta) for c, r in
            ((c, store.load(c.cell_id)) for c in cells)}


def _final(hist, metric):
    v = hist[metric][:, -1]
    return float(np.median(v)), float(np.quantile(v, 0.2)), float(np.quantile(v, 0.8))


def _table(results: Dict[str, Dict[str, np.ndarray]], metrics) -> str:
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, hist in results.items():
        cells = []
        for m in metrics:
            med, lo, hi = _final(hist, m)
            cells.append(f"{med:.4g} [{lo:.3g}, {hi:.3g}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(results, prefix: str) -> str:
    labels = list(results)
    robust = next((l for l in labels if "uniform" not in l), labels[0])
    uniform = next((l for l in labels if "uniform" in l), labels[-1])
    rm, um = _final(results[robust], f"{prefix}_max")[0], _final(results[uniform], f"{prefix}_max")[0]
    ra, ua = _final(results[robust], f"{prefix}_mean")[0], _final(results[uniform], f"{prefix}_mean")[0]
    worst = "lower" if rm < um else "NOT lower"
    mean = "higher (a cost in the mean)" if ra > ua else "not higher (no cost in the mean here)"
    return (f"{prefix} tasks: robust max {rm:.4g} vs uniform {um:.4g} ({worst}, ratio {rm / um:.3f}); "
            f"robust mean {ra:.4g} vs uniform {ua:.4g} ({mean}).")


def main(cfg: dict, log=print) -> dict:
    opts = check(cfg)
    store = ResultStore(experiment_dir(cfg))
    runs = _histories(cfg, store, log)
    fmnist = opts["fashion_mnist"] and bj.datasets.fashion_mnist_dir() is not None
    fm_runs = _histories(fmnist_config(cfg, opts), store, log) if fmnist else {}
    if not is_writer():                  # another process of a multi-process job: process 0 reports
        return {}
    results = {label: h for label, (h, _) in runs.items()}
    times = {label: meta["timings"]["run_s"] for label, (_, meta) in runs.items()}
    seeds = seed_list(cfg)
    steps = next(iter(results.values()))["step"][0]
    curves = [Curve(label, {"step": steps}, {m: h[m] for m in METRICS}) for label, h in results.items()]
    title = f"{next(iter(runs.values()))[1]['problem_description']}, {len(seeds)} repeats"
    plot_grid(curves, METRICS, ["step"], store.path("morbit.png"), title=title, quantiles=opts["quantiles"], logy=True)

    summary = [f"# {cfg.get('title') or 'MORBiT'}", "", f"Claim: {CLAIM}", "",
               f"## (a) Sinusoid meta-regression ({len(seeds)} repeats, {cfg['steps']} outer iterations)", "",
               "Final task losses (median [20%, 80%] over repeats), at the closed-form ridge heads:", "",
               _table(results, METRICS), "", "Measured: " + _verdict(results, "train"), "",
               "Measured: " + _verdict(results, "test"), "",
               "Run time (all repeats in one compiled call): "
               + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), ""]
    record = {"config": cfg, "environment": environment(), "times": times,
              "final": {l: {m: _final(h, m) for m in METRICS} for l, h in results.items()}}

    summary += ["## (b) Fashion-MNIST binary tasks", ""]
    if not opts["fashion_mnist"]:
        summary.append("Skipped (options.fashion_mnist = false).")
    elif not fmnist:
        msg = ("Skipped: Fashion-MNIST IDX files not found (install Debian's dataset-fashion-mnist, or set "
               "$BILEVEL_JAX_FASHION_MNIST).")
        log(f"[morbit] (b) {msg}")
        summary.append(msg)
    else:
        fm = {label: h for label, (h, _) in fm_runs.items()}
        fsteps = next(iter(fm.values()))["step"][0]
        plot_grid([Curve(l, {"step": fsteps}, {m: h[m] for m in FMNIST_METRICS}) for l, h in fm.items()],
                  list(FMNIST_METRICS), ["step"], store.path("morbit_fmnist.png"),
                  title=next(iter(fm_runs.values()))[1]["problem_description"], quantiles=opts["quantiles"], logy=False)
        summary += [f"{len(FMNIST_PAIRS)} tasks {FMNIST_PAIRS}, {opts['fmnist_samples']} samples per task and level, "
                    f"{opts['fmnist_steps']} steps, {opts['fmnist_seeds']} repeats; test loss at heads refitted on the "
                    "LL samples:", "", _table(fm, FMNIST_METRICS), "", "Measured: " + _verdict(fm, "test"), ""]
        record["fmnist_final"] = {l: {m: _final(h, m) for m in FMNIST_METRICS} for l, h in fm.items()}
    with open(store.path("summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    write_json(store.path("morbit.json"), record)
    log("\n".join(summary))
    return {"summary": summary, "record": record, "results": results}


__all__ = ["CLAIM", "OPTIONS", "check", "fmnist_config", "main"]

"""Data hyper-cleaning on Fashion-MNIST (`make fig-hyperclean`, configs/hyperclean.toml).

The hyper-cleaning experiment of Yang, Gao, Yuan, "Tackling the Hessian-Inverse Approximations in
Bilevel Optimization via Subspace Techniques" (SubBiO/LancBiO), ICLR 2025, arXiv:2404.03331,
section 4, on `bj.problems.hyperclean` (per-sample weights sigmoid(lambda_i) on the training
loss of a linear 10 x 785 classifier, L2 0.01; 5000 train / 5000 validation / 10000 test images,
a fraction p of the training labels made wrong):

    h(lambda) = validation cross-entropy of W*(lambda),
    W*(lambda) = argmin_W 1/n sum_i sigmoid(lambda_i) CE(W x_i, y~_i) + 0.01 ||W||^2.

Every `[algorithms.<label>]` table is one curve: `preset` (default: the label) and its keyword
arguments (`linear_solver = {name = "cg", maxiter = 5}` builds the solver), `steps` (this
method's run length), `batch_size` ("full" = None; the default). All seeds of one method run as
one compiled `jit(vmap(bj.run))` (the images are shared; each seed draws its own corruption,
initial weights and PRNG key), recording (lambda, W, v) every `eval_every` steps; the metrics
are computed after the run from the recorded iterates:

    test_accuracy, test_loss   of W_k on the 10000 test images
    residual                   ||A_k v_k - b_k|| (A = grad^2_WW f_lower, b = grad_W f_upper at the
                               iterate; only for methods that carry v)
    downweighted               share of corrupted training samples with sigmoid(lambda_i) < 1/2

The time axis is the wall time of that batched run (all seeds together, block_until_ready,
compile excluded) at each evaluation: steps x (run seconds / steps). A seed whose iterates became
non-finite, or whose status is not ok, is counted: the legend, the table and summary.md say
"k/n diverged", and the curves are medians over the surviving seeds (the legend says how many).

Outputs in results/<name>/: `<name>.png`, `<name>.json` (the figure's metadata: per curve the
seeds requested, drawn and failed), `summary.md` (final test accuracy per method next to the
paper's Fashion-MNIST range, the down-weighted share) and cells/ (one NPZ + JSON per method;
a rerun computes only the missing ones).
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

import numpy as np

from experiments.config import ConfigError, check_names, experiment_dir, seed_list
from experiments.curves import (build_algorithm, check_curves, check_metrics, check_problem, results_of,
                                selected_labels)
from experiments.plotting import METRIC_LABELS, Curve, plot_grid
from experiments.results import ResultStore, environment, failure_text, failed_seeds, write_json

METRICS = ("test_accuracy", "test_loss", "residual", "downweighted", "val_loss")
PROBLEM_KEYS = {"name": "hyperclean", "data": "fashion_mnist", "path": "", "corruption": 0.5, "n_train": 5000,
                "n_val": 5000, "n_test": 10000, "model": "linear", "hidden": 64, "depth": 1, "reg": 0.01,
                "data_seed": 0}
# the paper's reported range for Fashion-MNIST at p = 0.5 (arXiv:2404.03331, section 4 figure)
PAPER_RANGE = {0.5: (0.80, 0.815)}

METRIC_LABELS.setdefault("test_accuracy", "test accuracy of $W_k$")
METRIC_LABELS.setdefault("residual", r"residual $\|A_k v_k - b_k\|$")
METRIC_LABELS.setdefault("downweighted", r"corrupted samples with $\sigma(\lambda_i) < 1/2$")


def check(cfg: dict) -> dict:
    """The [problem] table with defaults filled; every name checked before any work."""
    problem = check_problem(cfg, PROBLEM_KEYS, "hyperclean", "hyperclean")
    check_names(cfg["options"], (), "[options] of figure 'hyperclean'")
    if problem["data"] not in ("fashion_mnist",):
        raise ConfigError(f"[problem] data must be 'fashion_mnist', got {problem['data']!r}.")
    check_metrics(cfg, METRICS)
    check_curves(cfg)
    return problem


def load_problem(problem_cfg: dict):
    """The base bundle (data seed `data_seed`); a FileNotFoundError saying how to get the data."""
    from bilevel_jax.problems import hyperclean as hc
    return hc.fashion_mnist_hyper_cleaning(
        float(problem_cfg["corruption"]), int(problem_cfg["data_seed"]), n_train=int(problem_cfg["n_train"]),
        n_val=int(problem_cfg["n_val"]), n_test=int(problem_cfg["n_test"]), path=problem_cfg["path"] or None,
        model=problem_cfg["model"], hidden=int(problem_cfg["hidden"]), depth=int(problem_cfg["depth"]),
        reg=float(problem_cfg["reg"]))


def seed_inputs(bundle, problem_cfg: dict, seeds: List[int]):
    """Per seed: the corrupted labels, the corruption mask, the initial W and the run's key."""
    import jax
    import jax.numpy as jnp
    from bilevel_jax.problems import hyperclean as hc
    labels, masks, phis, keys = [], [], [], []
    for s in seeds:
        k_noise, k_init, k_run = jax.random.split(jax.random.PRNGKey(1000 + s), 3)
        noisy, mask = hc.corrupt_labels(bundle.clean_labels, float(problem_cfg["corruption"]), k_noise)
        labels.append(noisy.astype(np.int32))
        masks.append(mask)
        phis.append(_init_like(bundle.phi0, k_init))
        keys.append(k_run)
    stack = lambda xs: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *xs)   # noqa: E731
    return jnp.asarray(np.stack(labels)), jnp.asarray(np.stack(masks)), stack(phis), jnp.stack(keys)


def _init_like(phi0, key):
    """A fresh Kaiming-normal draw with phi0's structure (fan-in = last axis of each matrix)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    leaves, treedef = jax.tree_util.tree_flatten(eqx.filter(phi0, eqx.is_inexact_array))
    keys = jax.random.split(key, max(len(leaves), 1))
    new = [jax.random.normal(k, x.shape, x.dtype) * jnp.sqrt(2.0 / x.shape[-1]) if x.ndim == 2 else jnp.zeros_like(x)
           for k, x in zip(keys, leaves)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), phi0)


def run_cell(cfg: dict, bundle, inputs, label: str, table: dict):
    """(history, meta) of one method over all seeds: one compiled vmapped run, then the metrics."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import bilevel_jax as bj
    from bilevel_jax.problems import hyperclean as hc

    steps = int(table.get("steps", cfg["steps"]))
    alg = build_algorithm(bundle.problem, label, table)
    (Xv, yv), (X, _, idx) = bundle.data
    labels, masks, phis, keys = inputs

    def record(state, data):
        v = getattr(state, "v", None)
        return {"theta": state.theta, "phi": state.phi,
                "v": jax.tree_util.tree_map(lambda p: jnp.full_like(p, jnp.nan), eqx.filter(state.phi, eqx.is_inexact_array))
                if v is None else v}

    def one(y, phi0, key, X, Xv, yv):
        data = ((Xv, yv), (X, y, idx))
        state = alg.init(bundle.theta0, phi0, key, data)
        return bj.run(alg, state, data, num_steps=steps, eval_every=cfg["eval_every"], eval_fn=record)[1]

    batched = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, None)))
    start = time.perf_counter()
    compiled = batched.lower(labels, phis, keys, X, Xv, yv).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    hist = jax.block_until_ready(compiled(labels, phis, keys, X, Xv, yv))
    run_s = time.perf_counter() - start

    metrics = cfg["metrics"]
    test = bundle.test

    def evaluate(theta, phi, v, y, mask):
        data = ((Xv, yv), (X, y, idx))
        out = {}
        if "test_accuracy" in metrics:
            out["test_accuracy"] = hc.accuracy(phi, test)
        if "test_loss" in metrics:
            out["test_loss"] = hc.loss(phi, test)
        if "val_loss" in metrics:
            out["val_loss"] = hc.loss(phi, (Xv, yv))
        if "residual" in metrics:
            out["residual"] = hc.residual(bundle.problem, theta, phi, v, data)
        if "downweighted" in metrics:
            out["downweighted"] = hc.downweighted(theta, mask)[0]
        return out

    per_eval = jax.vmap(evaluate, in_axes=(0, 0, 0, None, None))                 # evaluations of one seed
    evaluate_seed = jax.jit(per_eval)
    values = [evaluate_seed(*(jax.tree_util.tree_map(lambda a: a[i], (hist["theta"], hist["phi"], hist["v"]))),
                            labels[i], masks[i]) for i in range(labels.shape[0])]
    history = {k: np.asarray(v) for k, v in hist.items() if k not in ("theta", "phi", "v")}
    history.update({k: np.stack([np.asarray(v[k]) for v in values]) for k in values[0]})
    final_theta = np.asarray(hist["theta"][:, -1])
    history["final_weights_below_half_clean"] = np.asarray(
        [(final_theta[i] < 0)[~np.asarray(masks[i])].mean() for i in range(final_theta.shape[0])])
    timing = {"seconds_per_step": run_s / steps, "run_s": run_s, "compile_s": compile_s,
              "batched_seeds": int(labels.shape[0])}
    meta = {"label": label, "preset": table.get("preset", label), "hyperparameters": table, "steps": steps,
            "seeds": [int(s) for s in seed_list(cfg)], "timings": timing, "environment": environment()}
    return history, meta


def curves_of(results: Dict[str, tuple], metrics) -> List[Curve]:
    curves = []
    for label, (h, meta) in results.items():
        steps = np.asarray(h["step"][0], dtype=float)
        x = {"step": steps, "time": steps * meta["timings"]["seconds_per_step"]}
        finite = np.asarray(h["finite"], bool)
        y = {m: np.where(finite, np.asarray(h[m], float), np.nan) for m in metrics if m in h}
        if "residual" in y and not np.any(np.isfinite(y["residual"])):
            del y["residual"]              # a method without v (F2SA): no residual curve
        curves.append(Curve(label, x, y, seeds=int(finite.shape[0]), failed=failure_text(h)))
    return curves


def _f(x, spec=".4f"):
    return "-" if x is None or not np.isfinite(x) else format(x, spec)


def summarize(cfg: dict, problem_cfg: dict, description: str, results: Dict[str, tuple]):
    """(markdown, json): per method the final test accuracy (median [min, max] over surviving
    seeds), failures, cost, the down-weighted share; then the paper's range next to the best."""
    p = float(problem_cfg["corruption"])
    rows, table = [], {}
    for label, (h, meta) in results.items():
        bad = failed_seeds(h)
        ok = ~bad
        acc = np.asarray(h["test_accuracy"], float)[ok, -1] if "test_accuracy" in h else np.array([])
        loss = np.asarray(h["test_loss"], float)[ok, -1] if "test_loss" in h else np.array([])
        down = np.asarray(h["downweighted"], float)[ok, -1] if "downweighted" in h else np.array([])
        res = np.asarray(h["residual"], float)[ok, -1] if "residual" in h else np.array([])
        entry = {
            "seeds": int(bad.size), "failed": int(bad.sum()), "failure": failure_text(h) or "none",
            "test_accuracy": float(np.median(acc)) if acc.size else None,
            "test_accuracy_range": [float(acc.min()), float(acc.max())] if acc.size else None,
            "test_loss": float(np.median(loss)) if loss.size else None,
            "downweighted": float(np.median(down)) if down.size else None,
            "clean_below_half": float(np.median(np.asarray(h["final_weights_below_half_clean"])[ok]))
            if ok.any() else None,
            "residual": float(np.median(res)) if res.size and np.all(np.isfinite(res)) else None,
            "steps": int(meta["steps"]), "run_s": float(meta["timings"]["run_s"]),
            "ms_per_step": 1e3 * float(meta["timings"]["seconds_per_step"]),
            "compile_s": float(meta["timings"]["compile_s"]),
        }
        table[label] = entry
        rng = entry["test_accuracy_range"]
        rows.append(f"| {label} | {entry['failed']}/{entry['seeds']} {'diverged' if entry['failed'] else 'ok'} | "
                    f"{_f(entry['test_accuracy'])} [{_f(rng[0]) if rng else '-'}, {_f(rng[1]) if rng else '-'}] | "
                    f"{_f(entry['test_loss'])} | {_f(entry['downweighted'], '.3f')} | "
                    f"{_f(entry['clean_below_half'], '.3f')} | {_f(entry['residual'], '.2e')} | {entry['steps']} | "
                    f"{entry['run_s']:.1f} | {entry['ms_per_step']:.1f} | {_f(entry['compile_s'], '.1f')} | "
                    f"{_hp(meta['hyperparameters'])} |")
    lines = [f"# {cfg.get('title') or cfg['name']}", "", description, "",
             "h(lambda) = validation cross-entropy of W*(lambda); sigmoid(lambda_i) weighs training sample i in the "
             "lower level. Medians over the seeds that did not diverge ([min, max] in brackets); all seeds of a "
             "method run together (vmap), time = that batched run.", "",
             "| method | seeds failed | final test accuracy | final test loss | corrupted with weight < 1/2 | "
             "clean with weight < 1/2 | residual ||Av - b|| | steps | run (s) | ms/step | compile (s) | hyperparameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    ok_rows = {k: v for k, v in table.items() if v["test_accuracy"] is not None}
    claim = {}
    if ok_rows:
        best = max(ok_rows, key=lambda k: ok_rows[k]["test_accuracy"])
        acc = ok_rows[best]["test_accuracy"]
        paper = PAPER_RANGE.get(p)
        claim = {"best": best, "test_accuracy": acc, "paper_range": paper,
                 "downweighted": ok_rows[best]["downweighted"]}
        if paper:
            lo, hi = paper
            within = lo - 0.02 <= acc <= hi + 0.02
            claim["within_0.02"] = within
            lines += ["## Against the paper", "",
                      f"- LancBiO paper (arXiv:2404.03331, Fashion-MNIST, p = {p:g}): test accuracy about "
                      f"{lo:.3f}-{hi:.3f} after 3000 outer steps (60 s on a GPU). Here: best {best} "
                      f"{acc:.4f} after {ok_rows[best]['steps']} steps -> "
                      f"{'within' if within else 'NOT within'} 0.02 of that range.",
                      f"- {best} gives weight < 1/2 to {100 * (ok_rows[best]['downweighted'] or 0):.1f}% of the "
                      f"corrupted samples (and to {100 * (ok_rows[best]['clean_below_half'] or 0):.1f}% of the clean ones).",
                      "- Differences from the paper's setting: float64 on CPU at a shorter budget (the default size "
                      "runs each method for a fraction of the paper's 3000 outer steps; `full=true` runs 3000); the "
                      "validation images are drawn from the training split without overlapping the 5000 training "
                      "images (the paper's code may draw overlapping ones); each seed draws its own corruption.", ""]
        else:
            lines += [f"Best: {best} {acc:.4f} (no paper number at p = {p:g} on Fashion-MNIST).", ""]
    return "\n".join(lines), {"algorithms": table, "claim": claim, "problem": problem_cfg}


def _hp(table: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in table.items() if k != "preset") or "defaults"


def main(cfg: dict) -> dict:
    import jax
    jax.config.update("jax_enable_x64", bool(cfg["x64"]))
    problem_cfg = check(cfg)
    labels = selected_labels(cfg)
    root = experiment_dir(cfg)
    seeds = seed_list(cfg)
    loaded = {}

    def run_label(label, table):
        if not loaded:
            start = time.perf_counter()
            loaded["bundle"] = load_problem(problem_cfg)
            loaded["inputs"] = seed_inputs(loaded["bundle"], problem_cfg, seeds)
            print(f"[{cfg['name']}] {loaded['bundle'].description} (loaded in {time.perf_counter() - start:.1f} s)",
                  flush=True)
        t0 = time.perf_counter()
        history, meta = run_cell(cfg, loaded["bundle"], loaded["inputs"], label, table)
        if cfg["progress"]:
            t = meta["timings"]
            print(f"[{cfg['name']}] {label}: {time.perf_counter() - t0:.1f} s (compile {t['compile_s']:.1f} s, "
                  f"{1e3 * t['seconds_per_step']:.1f} ms/step, {len(seeds)} seeds)"
                  + (f" -- {failure_text(history)}" if failure_text(history) else ""), flush=True)
        return history, meta

    results = results_of(cfg, problem_cfg, ResultStore(root), run_label)
    bundle = loaded.get("bundle")
    description = (bundle.description if bundle is not None else
                   f"data hyper-cleaning on Fashion-MNIST: n_train={problem_cfg['n_train']}, n_val={problem_cfg['n_val']}, "
                   f"n_test={problem_cfg['n_test']}, corruption p={problem_cfg['corruption']:g}, {problem_cfg['model']} "
                   f"model, reg={problem_cfg['reg']:g}")
    curves = curves_of(results, cfg["metrics"])
    title = cfg["plot"]["title"] or cfg.get("title") or cfg["name"]
    if cfg["only"]:
        title += f" [only: {', '.join(labels)}]"
    title += (f"\n{description} (Debian dataset-fashion-mnist / IDX files)\nh(lambda) = validation CE of "
              r"W*(lambda); lower level: $\frac{1}{n}\sum_i \sigma(\lambda_i) CE_i + 0.01\|W\|^2$")
    path = plot_grid(curves, cfg["plot"]["metrics"], cfg["plot"]["x"],
                     os.path.join(root, cfg["plot"]["file"] or f"{cfg['name']}.png"), title=title,
                     logy=[m for m in ("residual", "test_loss") if cfg["plot"]["logy"]], quantiles=cfg["plot"]["quantiles"], ylim=cfg["plot"]["ylim"],
                     note=f"{len(seeds)} seed(s); time: all seeds in one vmapped run",
                     axis_labels={"time": "wall time (s) [all seeds in one vmapped run, metrics excluded]"})
    text, summary = summarize(cfg, problem_cfg, description, results)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(root, "summary.json"), summary)
    print(text)
    print(f"[{cfg['name']}] figure: {path}")
    return {"figure": path, "summary": summary, "text": text}


__all__ = ["build_algorithm", "check", "curves_of", "main", "run_cell", "summarize"]

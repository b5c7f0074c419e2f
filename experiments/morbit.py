"""Robust multi-task learning with MORBiT (the robust multi-objective bilevel
problem of Gu, Lu, Ram, Weng, ICLR 2023, arXiv:2203.01924).

(a) Sinusoid robust meta-regression (Gu, Lu, Ram, Weng, "Min-Max Multi-objective Bilevel
    Optimization with Applications in Robust Machine Learning", ICLR 2023, arXiv:2203.01924):
    n training tasks y = a sin(b x + c), a shared ReLU MLP embedding h_theta (1-80-80-10, an
    equinox model) as theta and a linear head w_i per task as phi_i. MORBiT (lambda on the simplex,
    mu_lambda ||lambda - 1/n||^2) against the same code with uniform weights (`uniform=True`, the
    usual multi-task objective). Metrics every `eval_every` outer iterations, at the closed-form
    ridge heads of the current embedding (`bj.problems.multitask.task_losses`): the maximum and
    the mean query loss over the training tasks, and over unseen test tasks whose heads are fitted
    on `shots` samples. Median and a quantile band over `seeds` repeats (each repeat draws its own
    tasks and initialisation). All repeats of one method run as one jit(vmap(bj.run)).

(b) Robust multi-task representation learning on Fashion-MNIST binary tasks (the paper's pairs
    (0,6), (0,9), (1,7), (2,4), (2,7), (2,9), (3,7), (3,9)): a shared linear map 784 -> D as theta,
    per-task logistic heads as phi_i (ridge-regularised, strongly convex), test-set max and mean
    loss at heads fitted on the training samples of each task. Runs when `bj.datasets.fashion_mnist`
    finds the IDX files (Debian's dataset-fashion-mnist), else it is skipped with a message.

The summary puts the paper's claim (the robust solution lowers the worst task's loss at some cost
in the mean) next to the measured final numbers.
"""
from __future__ import annotations

import os
import time
from typing import Dict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel_jax as bj
from bilevel_jax.problems import multitask as mt
from experiments.config import ConfigError, check_names, experiment_dir, seed_list
from experiments.plotting import Curve, plot_grid
from experiments.results import environment, write_json

CLAIM = ("Gu et al. 2023 (robust multi-objective bilevel): optimising for the worst-case scalarisation "
         "finds theta so that all objectives are good; the robust solution lowers the worst task's loss at some "
         "cost in the mean (MORBiT paper, sinusoid meta-regression: lower maximum task loss than uniform "
         "weights, with a comparable or slightly higher mean).")

OPTIONS = {
    "test_tasks": 10,       # unseen sinusoid tasks (heads fitted on `shots` samples)
    "shots": 10,
    "support": 100,         # LL sample pool per training task (minibatches of `batch_size` shots)
    "query": 100,           # UL sample pool per task
    "embed_dim": 10,
    "width": 80,
    "depth": 2,
    "reg": 0.1,             # the heads' ridge (reg/2)||w||^2
    "quantiles": [0.2, 0.8],
    "fashion_mnist": True,  # run (b) when the IDX files are there
    "fmnist_steps": 300,
    "fmnist_dim": 32,
    "fmnist_samples": 256,  # training samples per task and level
    "fmnist_seeds": 2,
}
ALGORITHM_KEYS = ("upper_lr", "upper_clip", "lower_lr", "lam_lr", "lower_opt", "mu_lambda", "delta", "lower_steps", "uniform",
                  "batch_size", "label", "linear_solver_maxiter")
METRICS = ("train_max", "train_mean", "test_max", "test_mean")
PROBLEM_KEYS = {"name": "sinusoid", "tasks": 20}
# lower_opt names: the LL rule on the heads with step lower_lr ("sgd": the preset's own steps)
LOWER_OPTIMIZERS = {"sgd": None, "adam": optax.adam}


def options(cfg: dict) -> dict:
    check_names(cfg["options"], OPTIONS, "[options] of figure 'morbit'")
    return {**OPTIONS, **cfg["options"]}


def check(cfg: dict) -> dict:
    """The [options] with defaults filled; the [problem] and [algorithms.*] tables checked (unknown
    keys and optimizer names name the closest valid one) before any work."""
    opts = options(cfg)
    check_names(cfg["problem"], PROBLEM_KEYS, "[problem] of figure 'morbit'")
    if cfg["problem"]["name"] != PROBLEM_KEYS["name"]:
        raise ConfigError(f"figure 'morbit' needs [problem] name = \"sinusoid\", got {cfg['problem']['name']!r}.")
    tasks = cfg["problem"].get("tasks", PROBLEM_KEYS["tasks"])
    if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 2:
        raise ConfigError(f"[problem] tasks must be an int >= 2, got {tasks!r}.")
    for label, spec in cfg["algorithms"].items():
        lower_options(spec, f"algorithms.{label}")
    return opts


def lower_options(spec: dict, where: str) -> dict:
    """The table's keys checked; the preset keywords of its LL rule (`lower_opt`, `lower_lr`)."""
    check_names(spec, ALGORITHM_KEYS, where)
    name = spec.get("lower_opt", "sgd")
    check_names([name], LOWER_OPTIMIZERS, f"{where}.lower_opt", what="optimizer")
    if LOWER_OPTIMIZERS[name] is None:
        return {"lower_lr": spec["lower_lr"]} if "lower_lr" in spec else {}
    return {"lower_opt": LOWER_OPTIMIZERS[name](spec.get("lower_lr", 0.005))}


def build(problem, spec: dict, where: str = "algorithms"):
    """A morbit preset from an [algorithms.<label>] table."""
    kw = {k: spec[k] for k in ("upper_lr", "lam_lr", "mu_lambda", "delta", "lower_steps", "uniform",
                               "batch_size") if k in spec}
    kw.update(lower_options(spec, where))
    if "upper_clip" in spec:   # SGD on the UL direction clipped to a global norm (see the config)
        kw["upper_opt"] = optax.chain(optax.clip_by_global_norm(spec["upper_clip"]), optax.sgd(kw.pop("upper_lr", 0.007)))
    kw["linear_solver"] = bj.linear_solvers.cg(int(spec.get("linear_solver_maxiter", 10)), warm_start=True)
    return bj.algorithms.morbit(problem, **kw)


# ------------------------------------------------------------------------------------ (a) sinusoids
def sinusoid_run(cfg: dict, opts: dict, spec: dict, seeds, where: str) -> Dict[str, np.ndarray]:
    n = int(cfg["problem"].get("tasks", 20))
    steps, every = cfg["steps"], cfg["eval_every"]
    template = mt.sinusoid_tasks(jax.random.PRNGKey(0), n, opts["support"], opts["query"], opts["reg"])
    alg = build(template.problem, spec, where)

    def one(seed):
        k_train, k_test, k_init = jax.random.split(jax.random.PRNGKey(seed), 3)
        tasks = mt.sinusoid_tasks(k_train, n, opts["support"], opts["query"], opts["reg"])
        test = mt.sinusoid_tasks(k_test, opts["test_tasks"], opts["shots"], opts["query"], opts["reg"])
        theta0 = mt.embedding_mlp(k_init, opts["embed_dim"], opts["width"], opts["depth"])
        phi0 = jnp.zeros((n, opts["embed_dim"]))

        def metrics(state, data):
            train = mt.task_losses(state.theta, data, opts["reg"])
            unseen = mt.task_losses(state.theta, test.data, opts["reg"])
            return {"train_max": jnp.max(train), "train_mean": jnp.mean(train), "test_max": jnp.max(unseen),
                    "test_mean": jnp.mean(unseen), "lam_max": jnp.max(state.lam)}

        state = alg.init(theta0, phi0, jax.random.fold_in(k_init, 1), tasks.data)
        _, hist = bj.run(alg, state, tasks.data, steps, every, eval_fn=metrics)
        return hist

    hist = eqx.filter_jit(eqx.filter_vmap(one))(jnp.asarray(seeds))
    return {k: np.asarray(v) for k, v in hist.items()}


# --------------------------------------------------------------------------- (b) Fashion-MNIST pairs
PAIRS = [(0, 6), (0, 9), (1, 7), (2, 4), (2, 7), (2, 9), (3, 7), (3, 9)]


def _logistic(theta, w, batch):
    x, y = batch
    z = (x @ theta) @ w
    return jnp.mean(jax.nn.softplus(-y * z))


class FmnistLower(eqx.Module):
    reg: float = eqx.field(static=True, default=0.01)

    def __call__(self, theta, w, batch):
        return _logistic(theta, w, batch) + 0.5 * self.reg * w @ w


def fmnist_tasks(m: int, rs: np.random.RandomState):
    """Per task (a class pair), m training samples per level and the test samples (labels +-1)."""
    Xtr, ytr = bj.datasets.fashion_mnist(split="train")
    Xte, yte = bj.datasets.fashion_mnist(split="test")
    Xtr = Xtr.reshape(len(Xtr), -1) / 255.0
    Xte = Xte.reshape(len(Xte), -1) / 255.0
    mean = Xtr.mean(0)
    up, lo, te = [], [], []
    n_test = min(int(np.sum((yte == a) | (yte == b))) for a, b in PAIRS)
    for a, b in PAIRS:
        idx = rs.permutation(np.nonzero((ytr == a) | (ytr == b))[0])[:2 * m]
        tidx = np.nonzero((yte == a) | (yte == b))[0][:n_test]
        lab = lambda y: np.where(y == a, 1.0, -1.0)
        up.append((Xtr[idx[:m]] - mean, lab(ytr[idx[:m]])))
        lo.append((Xtr[idx[m:]] - mean, lab(ytr[idx[m:]])))
        te.append((Xte[tidx] - mean, lab(yte[tidx])))
    stack = lambda parts: tuple(jnp.asarray(np.stack([p[j] for p in parts])) for j in range(2))
    return stack(up), stack(lo), stack(te)


def fmnist_run(cfg: dict, opts: dict, spec: dict, seeds, where: str) -> Dict[str, np.ndarray]:
    m, D = opts["fmnist_samples"], opts["fmnist_dim"]
    upper, lower, test = fmnist_tasks(m, np.random.RandomState(0))
    n = len(PAIRS)
    problem = bj.MultiObjectiveProblem(_logistic, FmnistLower(opts["reg"]), num_tasks=n)
    alg = build(problem, {k: v for k, v in spec.items() if k != "lower_opt"}, where)
    data = (upper, lower)

    def fit_heads(theta):
        # heads at the current map: 100 GD steps on the (strongly convex) task LL objectives
        def one(batch):
            f = lambda w: FmnistLower(opts["reg"])(theta, w, batch)
            w = jax.lax.fori_loop(0, 100, lambda _, w: w - 1.0 * jax.grad(f)(w), jnp.zeros(D))
            return w
        return jax.vmap(one)(lower)

    def one(seed):
        theta0 = jax.random.normal(jax.random.PRNGKey(seed), (784, D)) / np.sqrt(784)

        def metrics(state, d):
            losses = jax.vmap(_logistic, in_axes=(None, 0, 0))(state.theta, fit_heads(state.theta), test)
            return {"test_max": jnp.max(losses), "test_mean": jnp.mean(losses)}

        state = alg.init(theta0, jnp.zeros((n, D)), jax.random.PRNGKey(seed + 1000), data)
        every = max(opts["fmnist_steps"] // 10, 1)
        _, hist = bj.run(alg, state, data, opts["fmnist_steps"], every, eval_fn=metrics)
        return hist

    hist = eqx.filter_jit(eqx.filter_vmap(one))(jnp.arange(opts["fmnist_seeds"]))
    return {k: np.asarray(v) for k, v in hist.items()}


# ------------------------------------------------------------------------------------------- main
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


def main(cfg: dict) -> None:
    opts = check(cfg)
    out = experiment_dir(cfg)
    os.makedirs(out, exist_ok=True)
    seeds = seed_list(cfg)
    jax.config.update("jax_enable_x64", bool(cfg["x64"]))
    results, times = {}, {}
    for label, spec in cfg["algorithms"].items():
        if cfg["only"] and label not in cfg["only"]:
            continue
        start = time.perf_counter()
        results[spec.get("label", label)] = sinusoid_run(cfg, opts, spec, seeds, f"algorithms.{label}")
        times[label] = time.perf_counter() - start
        print(f"[morbit] (a) {label}: {len(seeds)} repeats x {cfg['steps']} steps in {times[label]:.1f} s", flush=True)
    steps = next(iter(results.values()))["step"][0]
    curves = [Curve(label, {"step": steps}, {m: h[m] for m in METRICS}) for label, h in results.items()]
    title = (f"sinusoid robust meta-regression: {cfg['problem'].get('tasks', 20)} train / {opts['test_tasks']} test "
             f"tasks, {len(seeds)} repeats")
    plot_grid(curves, METRICS, ["step"], os.path.join(out, "morbit.png"), title=title,
              quantiles=opts["quantiles"], logy=True)

    summary = [f"# {cfg.get('title') or 'MORBiT'}", "", f"Claim: {CLAIM}", "",
               f"## (a) Sinusoid meta-regression ({len(seeds)} repeats, {cfg['steps']} outer iterations)", "",
               "Final task losses (median [20%, 80%] over repeats), at the closed-form ridge heads:", "",
               _table(results, METRICS), "", "Measured: " + _verdict(results, "train"), "",
               "Measured: " + _verdict(results, "test"), "",
               "Run time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), ""]
    record = {"config": cfg, "environment": environment(), "times": times,
              "final": {l: {m: _final(h, m) for m in METRICS} for l, h in results.items()}}

    summary += ["## (b) Fashion-MNIST binary tasks", ""]
    if not opts["fashion_mnist"]:
        summary.append("Skipped (options.fashion_mnist = false).")
    elif bj.datasets.fashion_mnist_dir() is None:
        msg = ("Skipped: Fashion-MNIST IDX files not found (install Debian's dataset-fashion-mnist, or set "
               "$BILEVEL_JAX_FASHION_MNIST).")
        print(f"[morbit] (b) {msg}")
        summary.append(msg)
    else:
        fm = {}
        for label, spec in cfg["algorithms"].items():
            if cfg["only"] and label not in cfg["only"]:
                continue
            start = time.perf_counter()
            fm[spec.get("label", label)] = fmnist_run(cfg, opts, spec, seeds, f"algorithms.{label}")
            print(f"[morbit] (b) {label}: {time.perf_counter() - start:.1f} s", flush=True)
        fsteps = next(iter(fm.values()))["step"][0]
        plot_grid([Curve(l, {"step": fsteps}, {m: h[m] for m in ("test_max", "test_mean")}) for l, h in fm.items()],
                  ["test_max", "test_mean"], ["step"], os.path.join(out, "morbit_fmnist.png"),
                  title=f"Fashion-MNIST: {len(PAIRS)} binary tasks, linear map 784->{opts['fmnist_dim']}",
                  quantiles=opts["quantiles"], logy=False)
        summary += [f"{len(PAIRS)} tasks {PAIRS}, {opts['fmnist_samples']} samples per task and level, "
                    f"{opts['fmnist_steps']} steps, {opts['fmnist_seeds']} repeats; test loss at heads refitted on the "
                    "LL samples:", "", _table(fm, ("test_max", "test_mean")), "", "Measured: " + _verdict(fm, "test"), ""]
        record["fmnist_final"] = {l: {m: _final(h, m) for m in ("test_max", "test_mean")} for l, h in fm.items()}
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    write_json(os.path.join(out, "morbit.json"), record)
    print("\n".join(summary))


__all__ = ["CLAIM", "main"]

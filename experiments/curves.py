"""Config checks and algorithm building shared by the figures that draw one curve per
[algorithms.<label>] table and run their own loop (`experiments.lancbio`, `experiments.hyperclean`):
no grids, an optional per-label `steps`, a `preset` name (default: the label) and the preset's
keyword arguments (a `linear_solver = {name = ..., ...}` table builds the solver)."""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Dict, Sequence, Tuple

from experiments.config import ConfigError, check_names, seed_list

SPECIAL = ("preset", "steps", "label")


def check_problem(cfg: dict, defaults: dict, name: str, figure: str) -> dict:
    """The [problem] table with `defaults` filled in; unknown keys and another problem are errors."""
    check_names(cfg["problem"], defaults, f"[problem] of figure {figure!r}")
    problem = {**defaults, **cfg["problem"]}
    if problem["name"] != name:
        raise ConfigError(f"figure {figure} runs the problem {name!r}, got {problem['name']!r}.")
    return problem


def check_metrics(cfg: dict, valid: Sequence[str]) -> None:
    bad = [m for m in cfg["metrics"] if m not in valid]
    if bad:
        raise ConfigError(f"unknown metrics {bad}; valid: {', '.join(valid)}.")


def check_curves(cfg: dict) -> None:
    """Every [algorithms.<label>] table names a known preset, runs a positive multiple of
    `eval_every` steps, holds no list (one curve per label) and builds (on a placeholder problem:
    an unknown key is an error that names the closest valid one)."""
    import bilevel_jax as bj
    from experiments.sweep import placeholder_problem
    for label, table in cfg["algorithms"].items():
        preset = table.get("preset", label)
        if preset not in bj.algorithms.ALGORITHMS:
            raise ConfigError(f"algorithms.{label}: unknown algorithm {preset!r}; valid names: "
                              f"{', '.join(sorted(bj.algorithms.ALGORITHMS))}.")
        steps = table.get("steps", cfg["steps"])
        if not isinstance(steps, int) or steps < 1 or steps % cfg["eval_every"]:
            raise ConfigError(f"algorithms.{label}.steps must be a positive multiple of eval_every "
                              f"({cfg['eval_every']}), got {steps!r}.")
        for key, value in table.items():
            if isinstance(value, list):
                raise ConfigError(f"algorithms.{label}.{key}: this figure draws one curve per label (no grids).")
        build_algorithm(placeholder_problem(), label, table)


def build_algorithm(problem, label: str, table: dict):
    """`bj.algorithms.<preset>(problem, **kwargs)` of an [algorithms.<label>] table (full batch
    unless `batch_size` is given; `batch_size = "full"` says so); errors name the table."""
    from experiments import sweep
    kw = {"batch_size": "full", **{k: v for k, v in table.items() if k not in SPECIAL}}
    return sweep.build_algorithm(problem, table.get("preset", label), kw, f"algorithms.{label}")


def cell_id(label: str, table: dict, problem: dict, cfg: dict) -> str:
    """The store id of one label's cell: the label and a hash of everything its result depends on."""
    steps = int(table.get("steps", cfg["steps"]))
    key = json.dumps([label, table, problem, cfg["x64"], seed_list(cfg), steps, cfg["eval_every"], cfg["metrics"]],
                     sort_keys=True, default=str)
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def selected_labels(cfg: dict):
    return [k for k in cfg["algorithms"] if not cfg["only"] or k in cfg["only"]]


def results_of(cfg: dict, problem: dict, store, run_label: Callable[[str, dict], Tuple[dict, dict]]) -> Dict[str, tuple]:
    """`{label: (history, meta)}` of the selected labels: a finished cell is loaded from `store`,
    a missing one is `run_label(label, table)` and saved (atomically) before the next one runs."""
    results = {}
    for label in selected_labels(cfg):
        table = cfg["algorithms"][label]
        cell = cell_id(label, table, problem, cfg)
        if store.has(cell):
            r = store.load(cell)
            results[label] = (r.history, r.meta)
            continue
        history, meta = run_label(label, table)
        store.save(cell, history, meta)
        results[label] = (history, meta)
    return results


__all__ = ["SPECIAL", "build_algorithm", "cell_id", "check_curves", "check_metrics", "check_problem", "results_of",
           "selected_labels"]

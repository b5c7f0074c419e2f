"""The resumable driver shared by all figures: build the problem, compute its reference values
once, run the missing cells group by group, save each finished cell atomically.

    workload, reference = prepare(cfg, store)
    stats = run_cells(cfg, workload, reference, store, cells)  # skips finished cells
    if not is_writer():                                        # a multi-process job's other processes
        return                                                 # are done: process 0 reports

Multi-process jobs (`jax.distributed`, joined by `python -m experiments`): every process runs the
same figure module on the same config; the batched calls are collectives over the devices of all
processes (`experiments.sweep`). Process 0 is the only one that writes: it decides which cells
are missing from its store, before any other collective, and broadcasts that to the others
(`finished_cells`), so all of them compute the same cells, also after a restart; it computes the
reference values, evaluates the metrics of the gathered histories and saves each finished cell
(atomically, once). The other processes need the config, the code and the data, not the results
folder; after their last `run_cells` call they have nothing left to do (`is_writer()` is False).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments import problems
from experiments.config import ConfigError, seed_list
from experiments.results import ResultStore, environment, write_json
from experiments.sweep import (BatchedRunner, Cell, MetricEvaluator, check_algorithm, expand, local_mesh, make_mesh,
                               run_length, traced_values)


REFERENCE_VERSION = 2     # bump when a reference computation changes (v2: h* over the runs' feasible box)


class RunStats(NamedTuple):
    computed: List[str]      # cell ids computed by this call
    skipped: List[str]       # finished before (loaded from disk)
    seconds: float


def configure_jax(cfg: dict) -> None:
    """x64 as configured, and a persistent compilation cache under the results folder (a rerun
    after a kill does not recompile what it already compiled)."""
    jax.config.update("jax_enable_x64", bool(cfg["x64"]))
    if cfg.get("compile_cache", True) and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(cfg["results_dir"], ".jax-cache")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check(cfg: dict) -> None:
    """Every name in the config (problem, its keys, metrics, algorithms, their keys) before any work."""
    problems.check(cfg["problem"], cfg["metrics"])
    for label, table in cfg["algorithms"].items():
        check_algorithm(label, table)


def one_cell_per_label(cfg: dict, figure: str) -> List[Cell]:
    """The cells of a figure that draws one curve per [algorithms.<label>] table (no grid axes)."""
    cells = expand(cfg)
    labels = [c.label for c in cells]
    grids = sorted({label for label in labels if labels.count(label) > 1})
    if grids:
        raise ConfigError(f"figure {figure!r} draws one curve per [algorithms] table; {', '.join(grids)} "
                          "give(s) a list (a grid axis): give one value.")
    return cells


def run_labelled(cfg: dict, workload, reference: dict, store: ResultStore, figure: str, log=print):
    """Run (or load) a figure's cells, one per [algorithms.<label>] table: `(stats, results)`,
    results {label: CellResult}, or None in a process that does not write (`is_writer`)."""
    cells = one_cell_per_label(cfg, figure)
    stats = run_cells(cfg, workload, reference, store, cells, log=log)
    if not is_writer():                  # another process of a multi-process job: process 0 reports
        return stats, None
    return stats, {c.label: store.load(c.cell_id) for c in cells}


def is_writer() -> bool:
    """Whether this process writes results: always in a single-process run, process 0 only in a
    multi-process job (see the module docstring)."""
    return jax.process_index() == 0


def prepare(cfg: dict, store: ResultStore):
    """(workload, reference): the problem instance, its metrics and its reference values (cached in
    the experiment folder; None on the processes of a multi-process job that do not write, which
    never use them)."""
    configure_jax(cfg)
    check(cfg)
    workload = problems.build(cfg["problem"])
    if not is_writer():
        return workload, None
    tag = hashlib.sha256(json.dumps([cfg["problem"], cfg["x64"], REFERENCE_VERSION], sort_keys=True).encode()).hexdigest()[:10]
    path = store.path(f"reference-{tag}.json")
    if os.path.isfile(path):
        with open(path) as f:
            reference = json.load(f)
    else:
        start = time.perf_counter()
        reference = workload.compute_reference()
        reference["seconds"] = time.perf_counter() - start
        write_json(path, dict(reference, problem=cfg["problem"]))
    return workload, reference


def _progress(total: int, enabled: bool, desc: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return None
    return tqdm(total=total, desc=desc, unit="cell", file=sys.stderr, dynamic_ncols=True)


def add_metrics(hist: dict, evaluator) -> dict:
    """Replace the recorded iterates (cells, seeds, evals, dim) by the metrics (cells, seeds, evals),
    all seeds at once or, for a problem drawn per seed, seed by seed; theta and phi are kept when
    small (below a million numbers each)."""
    theta, phi, v = hist.pop("theta"), hist.pop("phi"), hist.pop("v")
    flat = lambda x: x.reshape(-1, x.shape[-1])   # noqa: E731
    if evaluator.per_seed:
        per = [evaluator(flat(theta[:, j]), flat(phi[:, j]), flat(v[:, j]), seed=j) for j in range(theta.shape[1])]
        values = {k: np.stack([p[k].reshape(theta.shape[0], theta.shape[2]) for p in per], axis=1) for k in per[0]}
    else:
        values = {k: x.reshape(theta.shape[:3]) for k, x in evaluator(flat(theta), flat(phi), flat(v)).items()}
    hist.update(values)
    for name, arr in (("theta", theta), ("phi", phi)):   # kept when small (a few MB at most)
        if arr.size <= 1_000_000:
            hist[name] = arr
    return hist


def finished_cells(store: ResultStore, cells: Sequence[Cell]) -> List[bool]:
    """Which of `cells` have a result in `store`, as process 0 sees it. In a multi-process job this
    is the collective every `run_cells` starts with: the processes first check that their configs
    expand to the same cell ids, then process 0's answer is broadcast to all of them, so they
    compute the same missing cells (and the others never read the store)."""
    if jax.process_count() > 1:
        digest = hashlib.sha256("\n".join(c.cell_id for c in cells).encode()).digest()
        try:
            multihost_utils.assert_equal(np.frombuffer(digest, np.uint8))
        except AssertionError:
            raise ConfigError(f"process {jax.process_index()}: the processes' configs expand to different cells; "
                              "give every process the same config file and overrides.") from None
    found = np.array([is_writer() and store.has(c.cell_id) for c in cells], np.int32)
    return [bool(x) for x in multihost_utils.broadcast_one_to_all(found)]


def run_cells(cfg: dict, workload, reference: dict, store: ResultStore, cells: Optional[Sequence[Cell]] = None,
              on_cell_saved: Optional[Callable[[Cell], None]] = None, log: Callable = print) -> RunStats:
    """Compute the cells of `cfg` (default: all) that have no result file yet, and save them.
    In a multi-process job every process calls this with the same arguments; process 0 saves the
    cells (and calls `on_cell_saved`, `log`), the others compute with it (see the module docstring)."""
    start = time.perf_counter()
    cells = expand(cfg) if cells is None else list(cells)
    found = finished_cells(store, cells) if cells else []
    todo = [c for c, f in zip(cells, found) if not f]
    done = [c.cell_id for c, f in zip(cells, found) if f]
    writer = is_writer()
    if not writer:
        log = lambda *a: None   # noqa: E731 - process 0 reports
    if done:
        log(f"[{cfg['name']}] {len(done)} finished cell(s) found in {store.cells_dir}; "
            f"{len(todo)} to compute.")
    if not todo:
        return RunStats([], done, time.perf_counter() - start)
    n_dev = None if cfg["devices"] == "auto" else int(cfg["devices"])
    mesh = make_mesh(n_dev, cfg["mesh"].get("data", 1))
    runner = BatchedRunner(workload, cfg, mesh)
    if writer:
        evaluator = MetricEvaluator(workload, cfg["metrics"], reference, local_mesh(mesh), rows=cfg["eval_rows"],
                                    seeds=seed_list(cfg))
        env = environment()
        env["mesh_devices"] = int(mesh.devices.size)
    seeds = seed_list(cfg)
    computed = []
    bar = _progress(len(todo), cfg["progress"] and writer, cfg["name"])
    try:
        for chunk in runner.groups(todo, cfg["chunk"]):
            size = cfg["chunk"] * len(seeds) if cfg["chunk"] else None
            labels = ",".join(dict.fromkeys(c.label for c in chunk))
            if bar is not None:
                bar.set_postfix_str(f"{labels} ({len(chunk)}x{len(seeds)})")
            hist, timings = runner.run(chunk, seeds, size)
            if not writer:
                computed.extend(c.cell_id for c in chunk)
                continue
            hist = add_metrics(hist, evaluator)
            for i, cell in enumerate(chunk):
                meta = {
                    "experiment": cfg["name"], "full": cfg["full"], "label": cell.label, "preset": cell.preset,
                    "hyperparameters": cell.spec, "traced": traced_values(runner.split(cell).dyn),
                    "point": cell.point, "seeds": seeds,
                    "steps": run_length(cell, cfg)[0], "eval_every": run_length(cell, cfg)[1],
                    "metrics": cfg["metrics"],
                    "problem": cfg["problem"], "problem_description": workload.instance.description,
                    "synthetic_data": workload.synthetic, "reference": reference,
                    "timings": dict(timings._asdict(), cells_in_call=len(chunk),
                                    metrics_compile_s=evaluator.compile_s),
                    "environment": env, "config": cfg,
                }
                store.save(cell.cell_id, {k: v[i] for k, v in hist.items()}, meta)
                computed.append(cell.cell_id)
                if bar is not None:
                    bar.update(1)
                if on_cell_saved is not None:
                    on_cell_saved(cell)
            if bar is None:
                log(f"[{cfg['name']}] {labels}: {len(chunk)} cell(s) x {len(seeds)} seeds in "
                    f"{timings.run_s:.1f} s (compile {timings.compile_s:.1f} s, {timings.n_devices} device(s))")
    finally:
        if bar is not None:
            bar.close()
    return RunStats(computed, done, time.perf_counter() - start)


__all__ = ["ConfigError", "RunStats", "check", "configure_jax", "finished_cells", "is_writer", "one_cell_per_label",
           "prepare", "run_cells"]

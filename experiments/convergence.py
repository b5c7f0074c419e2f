"""The default figure: convergence curves of the configured algorithms (fig-hpo-logreg,
fig-quadratic, fig-inner-accuracy, the demo).

Runs the missing cells, then for each algorithm label keeps its best grid point (`curves =
"best"`: lowest upper quantile (80%) over seeds of the mean log-metric over the last 20% of
evaluations of `plot.select_by`; diverged runs rank last) or every cell (`curves = "all"`), draws metric rows
against the x axes, writes `<name>.png`, `summary.md` and `sweep.csv` in the experiment folder,
and prints the summary table (final value, time and oracle calls to reach `plot.target`).

The time axis is `step x seconds_per_step`, the per-step wall time of an un-batched single-seed
run without metric evaluations (see `experiments.sweep`); oracle calls are the cumulative counts
of `bj.run` (LL gradients + UL gradients + HVPs + cross products, all minibatch oracles).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional

import numpy as np

from experiments.config import ConfigError, check_names, experiment_dir
from experiments.plotting import Curve, band, plot_grid, stationarity_metrics
from experiments.results import CellResult, ResultStore, failure_text, fmt, seconds_per_step
from experiments import runner
from experiments.runner import is_writer, prepare, run_cells
from experiments.sweep import expand

OPTIONS: Dict[str, type] = {}   # this figure has no [options]


def oracle_calls(history) -> np.ndarray:
    """(seeds, evals) total oracle calls."""
    return sum(np.asarray(history[k], dtype=float) for k in ("lower_grads", "upper_grads", "hvps", "cross"))


def curve_of(result: CellResult, label: str, metrics) -> Curve:
    h, meta = result.history, result.meta
    steps = np.asarray(h["step"][0], dtype=float)
    x = {"step": steps, "time": steps * seconds_per_step(meta), "oracles": np.median(oracle_calls(h), axis=0)}
    y = {}
    for m in metrics:
        arr = np.asarray(h[m], dtype=float)
        bad = ~np.asarray(h["finite"], dtype=bool)
        y[m] = np.where(bad, np.nan, arr)
    return Curve(label, x, y, seeds=int(np.asarray(h["finite"]).shape[0]), failed=failure_text(h))


def score(result: CellResult, metric: str, log: bool = True, quantile: float = 0.8) -> float:
    """The `quantile` over seeds (default 80%: a bad seed counts) of the mean (log-)metric over the
    last 20% of evaluations; inf if a run diverged."""
    y = np.asarray(result.history[metric], dtype=float)
    if not np.all(result.history["finite"]) or not np.all(np.isfinite(y)):
        return math.inf
    tail = y[:, -max(1, y.shape[1] // 5):]
    if log:
        tail = np.log10(np.maximum(tail, 1e-300))
    return float(np.quantile(tail.mean(axis=1), quantile))


def _value_text(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "name" in v:
        return f"{v['name']}(" + ",".join(f"{a}={_value_text(b)}" for a, b in v.items() if a != "name") + ")"
    return str(v)


def hp_text(result: CellResult) -> str:
    meta = result.meta
    items = meta["hyperparameters"]
    return " ".join(f"{k}={_value_text(v)}" for k, v in items.items())


def flat_keys(result: CellResult) -> dict:
    """The cell's settings with nested keys joined by underscores (for `plot.label`)."""
    out = {"label": result.meta["label"], "preset": result.meta["preset"]}
    for k, v in result.meta["hyperparameters"].items():
        if isinstance(v, dict):
            out.update({f"{k}_{a}": b for a, b in v.items()})
        out[k] = _value_text(v)
    return out


class Row(NamedTuple):
    label: str
    failed: str              # "0/3" or e.g. "2/3 diverged": the final values are over the others
    hyper: str
    final: float
    final_lo: float
    final_hi: float
    time_to_target: float
    oracles_to_target: float
    oracles_total: float
    seconds_per_step: float
    compile_s: float


def reach(x: np.ndarray, y_median: np.ndarray, target: Optional[float]) -> float:
    """The first x after which the curve stays at or below `target` (an oscillating curve that
    crosses and comes back above does not count until its last crossing); inf if it ends above
    the target or non-finite."""
    if target is None:
        return math.nan
    y = np.asarray(y_median, dtype=float)
    above = np.nonzero(~(y <= target))[0]          # NaN counts as above
    if not above.size:
        return float(x[0])
    last = above[-1]
    return float(x[last + 1]) if last + 1 < y.size else math.inf


def summary_rows(results: List[CellResult], labels: List[str], metric: str, target, quantiles) -> List[Row]:
    rows = []
    for res, label in zip(results, labels):
        c = curve_of(res, label, [metric])
        med, lo, hi = band(c.y[metric], quantiles)
        n = int(np.asarray(res.history["finite"]).shape[0])
        rows.append(Row(label, failure_text(res.history) or f"0/{n}", hp_text(res), med[-1], lo[-1], hi[-1],
                        reach(c.x["time"], med, target),
                        reach(c.x["oracles"], med, target), float(c.x["oracles"][-1]),
                        res.meta["timings"]["seconds_per_step"], res.meta["timings"]["compile_s"]))
    return rows


def _final_text(r: Row) -> str:
    if not np.isfinite(r.final):
        return "no finite run"
    return f"{fmt(r.final)} [{fmt(r.final_lo)}, {fmt(r.final_hi)}]"


def format_table(rows: List[Row], metric: str, target) -> str:
    head = ["algorithm", "seeds failed", f"final {metric} (median [20%, 80%] of the others)",
            f"time to stay <= {fmt(target)} (s)", f"oracles to stay <= {fmt(target)}", "oracles total", "ms/step",
            "compile (s)", "hyperparameters"]
    body = [[r.label, r.failed, _final_text(r), fmt(r.time_to_target, ".3g"),
             fmt(r.oracles_to_target, ".3g"), fmt(r.oracles_total, ".3g"), fmt(r.seconds_per_step * 1e3, ".3f"),
             fmt(r.compile_s, ".1f"), r.hyper] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def select(cfg: dict, results: List[CellResult]):
    """(chosen results, their curve labels) by the plot's `curves` rule; all scores for sweep.csv."""
    plot = cfg["plot"]
    scores = {r.cell_id: score(r, plot["select_by"], plot["logy"], plot["quantiles"][1]) for r in results}
    if plot["curves"] == "all":
        labels = []
        for r in results:
            point = r.meta["point"]
            if plot["label"]:
                try:
                    labels.append(plot["label"].format_map(flat_keys(r)))
                    continue
                except (KeyError, IndexError, ValueError) as e:
                    raise ConfigError(f"[plot] label {plot['label']!r}: unknown field {e}; fields: "
                                      f"{', '.join(sorted(flat_keys(r)))}.") from e
            labels.append(r.meta["label"] + (" " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
                                             if point else ""))
        return results, labels, scores
    chosen, labels = [], []
    for label in dict.fromkeys(r.meta["label"] for r in results):
        members = [r for r in results if r.meta["label"] == label]
        chosen.append(min(members, key=lambda r: scores[r.cell_id]))
        labels.append(label)
    return chosen, labels, scores


def write_sweep_csv(path: str, results: List[CellResult], scores: dict, metric: str) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "cell_id", "hyperparameters", f"score(log10 {metric}, tail mean)"])
        for r in results:
            w.writerow([r.meta["label"], r.cell_id, hp_text(r), scores[r.cell_id]])


def title_of(cfg: dict, description: str, synthetic: bool, notes: str = "") -> str:
    """The config's title (with the labels actually run when `only=` filters them), the problem
    and data source, and what the plotted quantity means (`Workload.notes`)."""
    title = cfg["plot"]["title"] or cfg["title"] or cfg["name"]
    if cfg["only"]:
        title += f" [only: {', '.join(cfg['only'])}]"
    source = description + (" [SYNTHETIC stand-in data]" if synthetic else "")
    return "\n".join(t for t in (title, source, notes) if t)


def check_reference(results: List[CellResult], reference: dict) -> str:
    """Make every `value_gap` = h(theta_t) - h* refer to one h* that no run beats.

    Each cell's gaps are first re-based to `reference` (a cell saved with an older h* is shifted
    by the difference). If a run reached a value below h* (the reference solver stopped short),
    h* is lowered to the best value any run reached and every gap is shifted by the same amount,
    so gaps are never negative; `reference` gets `value_star_checked` and the returned note says
    what happened ("" when there is no value_gap metric)."""
    if "value_star" not in reference or not any("value_gap" in r.history for r in results):
        return ""
    h_star = float(reference["value_star"])
    lowest = math.inf
    for r in results:
        if "value_gap" not in r.history:
            continue
        saved = (r.meta.get("reference") or {}).get("value_star", h_star)
        gap = np.asarray(r.history["value_gap"], dtype=float) + (float(saved) - h_star)
        r.history["value_gap"] = gap
        finite = gap[np.isfinite(gap) & np.asarray(r.history["finite"], bool)]
        if finite.size:
            lowest = min(lowest, float(finite.min()))
    if lowest < 0.0:
        for r in results:
            if "value_gap" in r.history:
                r.history["value_gap"] = r.history["value_gap"] - lowest
        reference["value_star_checked"] = h_star + lowest
        return (f"h* lowered from {h_star:.6g} ({reference.get('value_star_method', 'reference solver')}) to "
                f"{h_star + lowest:.6g}, the best value a run reached.")
    reference["value_star_checked"] = h_star
    return (f"h* = {h_star:.6g} ({reference.get('value_star_method', 'reference solver')}) is at least as good "
            f"as every point the runs reached (best gap {lowest:.3g}).")


def report(cfg: dict, store: ResultStore, cells, workload, log=print, reference: Optional[dict] = None) -> dict:
    """Figure + summary from the saved cells of `cells`."""
    results = store.load_many(c.cell_id for c in cells)
    if not results:
        raise RuntimeError(f"no results found in {store.cells_dir}.")
    reference_note = check_reference(results, reference) if reference is not None else ""
    histories = [r.history for r in results]   # a constrained UL: its gradient mapping in place of ||grad h||^2
    plot = dict(cfg["plot"], metrics=stationarity_metrics(cfg["plot"]["metrics"], histories),
                select_by=stationarity_metrics([cfg["plot"]["select_by"]], histories)[0])
    chosen, labels, scores = select(dict(cfg, plot=plot), results)
    curves = [curve_of(r, lab, plot["metrics"]) for r, lab in zip(chosen, labels)]
    png = store.path(plot["file"] or f"{cfg['name']}.png")
    notes = workload.notes
    plot_grid(curves, plot["metrics"], plot["x"], png, title_of(cfg, workload.instance.description, workload.synthetic, notes),
              logy=plot["logy"], logx=plot["logx"], quantiles=plot["quantiles"], ylim=plot["ylim"],
              note=f"{len(results[0].meta['seeds'])} seed(s), {cfg['steps']} steps")
    metric = plot["metrics"][0]
    rows = summary_rows(chosen, labels, metric, plot["target"], plot["quantiles"])
    table = format_table(rows, metric, plot["target"])
    failures = [f"- {r.label}: {r.failed} (the curve and the final value are over the other seeds)"
                for r in rows if not r.failed.startswith("0/")]
    with open(store.path("summary.md"), "w") as f:
        f.write(f"# {title_of(cfg, workload.instance.description, workload.synthetic).splitlines()[0]}\n\n{workload.instance.description}\n\n"
                + (f"{notes}\n\n" if notes else "") + (f"{reference_note}\n\n" if reference_note else "")
                + f"{table}\n"
                + ("\nFailed seeds:\n" + "\n".join(failures) + "\n" if failures else ""))
    write_sweep_csv(store.path("sweep.csv"), results, scores, plot["select_by"])
    log(table)
    if reference_note:
        log(reference_note)
    log(f"figure: {png}")
    return {"figure": png, "rows": rows, "table": table, "results": results, "reference_note": reference_note}


def check(cfg: dict) -> None:
    """Every table of the config (no [options] here) and name in it, before any work."""
    check_names(cfg["options"], OPTIONS, "[options] of figure 'convergence'")
    runner.check(cfg)


def main(cfg: dict, on_cell_saved=None, log=print) -> dict:
    check(cfg)
    store = ResultStore(experiment_dir(cfg))
    workload, reference = prepare(cfg, store)
    log(f"[{cfg['name']}] {workload.instance.description}")
    cells = expand(cfg)
    stats = run_cells(cfg, workload, reference, store, cells, on_cell_saved=on_cell_saved, log=log)
    if not is_writer():                  # another process of a multi-process job: process 0 reports
        return {"stats": stats}
    out = report(cfg, store, cells, workload, log=log, reference=reference)
    out["stats"] = stats
    out["reference"] = reference
    return out


__all__ = ["OPTIONS", "check", "check_reference", "curve_of", "reach", "title_of", "format_table", "main", "report", "score", "select", "summary_rows"]

"""Figures (matplotlib, Agg backend): median over seeds with a quantile band (default 20-80%).

    plot_grid(curves, metrics=["value_gap"], x_axes=["time", "oracles"], path="fig.png", title=...)

`curves` is a list of `Curve`s: one label, x arrays per axis ("time", "oracles", "step"; one
value per evaluation) and y arrays per metric of shape (seeds, evaluations). Rows of the figure
are metrics, columns are x axes.
"""
from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

AXIS_LABELS = {
    "time": "wall time (s) [one run, metrics excluded]",
    "oracles": "oracle calls (gradients + HVPs + cross products)",
    "step": "outer iteration",
}
METRIC_LABELS = {
    "value_gap": r"$h(\theta_t) - h^*$",
    "value": r"$h(\theta_t)$",
    "grad_sq": r"$\|\nabla h(\theta_t)\|^2$",
    "grad_map_sq": r"gradient mapping $\|G_1(\theta_t)\|^2$",
    "theta_err": r"$\|\theta_t - \theta^*\|^2$",
    "lower_gap": r"$\|\phi_t - \phi^*(\theta_t)\|^2$",
    "val_loss": "validation loss of $\\phi_t$",
    "train_loss": "training loss of $\\phi_t$",
    "val_error": "validation error of $\\phi_t$",
    "test_loss": "test loss of $\\phi_t$",
    "test_value": r"test loss of $\phi^*(\theta_t)$",
    "test_error": "test error of $\\phi_t$",
}


# metric -> the stationarity measure of a constrained UL drawn in its place (`stationarity_metrics`)
CONSTRAINED_STATIONARITY = {"grad_sq": "grad_map_sq"}


def stationarity_metrics(metrics: Sequence[str], histories: Sequence[dict]) -> List[str]:
    """`metrics` with ||grad h||^2 replaced by the gradient mapping ||G_1(theta)||^2 where every
    run recorded it (`experiments.problems` records it next to grad_sq when theta is projected):
    on a constrained UL ||grad h|| need not vanish at a solution, the gradient mapping does
    (`bj.stationarity`)."""
    def drawn(m):
        alt = CONSTRAINED_STATIONARITY.get(m)
        return alt if alt is not None and histories and all(alt in h for h in histories) else m

    return [drawn(m) for m in metrics]


class Curve(NamedTuple):
    label: str
    x: Dict[str, np.ndarray]      # axis -> (evaluations,)
    y: Dict[str, np.ndarray]      # metric -> (seeds, evaluations); failed seeds are NaN rows
    seeds: int = 0                # seeds requested (0: the rows of y)
    failed: str = ""              # e.g. "2/3 diverged" (`experiments.results.failure_text`)


def drawn_from(curve: Curve, metric: str) -> int:
    """How many seeds have a finite final value of `metric` (the curve's end is their median)."""
    y = np.asarray(curve.y[metric], dtype=float)
    return int(np.sum(np.isfinite(y[:, -1]))) if y.ndim == 2 else int(np.isfinite(y[-1]))


def legend_label(curve: Curve, metric: str) -> str:
    """The label, plus what a reader must know: failed seeds, and a curve drawn from fewer seeds
    than requested ("amigo [2/3 diverged; median of 1 of 3 seeds]")."""
    requested = curve.seeds or np.asarray(curve.y[metric]).shape[0]
    drawn = drawn_from(curve, metric)
    notes = [curve.failed] if curve.failed else []
    if drawn < requested:
        notes.append(f"ends as the median of {drawn} of {requested} seeds" if drawn else f"no finite run of {requested}")
    return curve.label + (f" [{'; '.join(notes)}]" if notes else "")


def figure_metadata(curves: List[Curve], metrics: Sequence[str]) -> dict:
    """Per curve: seeds requested, seeds drawn per metric, the failure text (written next to the PNG)."""
    return {"curves": [{"label": c.label, "seeds": c.seeds or int(np.asarray(next(iter(c.y.values()))).shape[0]),
                        "failed": c.failed,
                        "drawn": {m: drawn_from(c, m) for m in metrics if m in c.y},
                        "legend": legend_label(c, next(m for m in metrics if m in c.y)) if any(m in c.y for m in metrics)
                        else c.label} for c in curves]}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def band(y: np.ndarray, quantiles: Sequence[float] = (0.2, 0.8)):
    """(median, low, high) over the seed axis, ignoring NaNs (all-NaN columns stay NaN)."""
    y = np.asarray(y, dtype=float)
    with np.errstate(all="ignore"), _quiet():
        med = np.nanmedian(y, axis=0)
        lo = np.nanquantile(y, quantiles[0], axis=0)
        hi = np.nanquantile(y, quantiles[1], axis=0)
    return med, lo, hi


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def plot_grid(curves: List[Curve], metrics: Sequence[str], x_axes: Sequence[str], path: str, title: str = "",
              logy=True, logx: bool = False, quantiles: Sequence[float] = (0.2, 0.8),
              note: Optional[str] = None, ylim: Sequence[float] = (), axis_labels: Optional[dict] = None) -> str:
    """Draw the figure and save it as PNG at `path` (returned), with `<path without .png>.json`
    beside it (`figure_metadata`: seeds requested, drawn and failed per curve; also in the PNG's
    "Description" text chunk). `logy`: a bool, or the metrics drawn on a log scale. Legend
    labels name failed seeds and curves drawn from fewer seeds than requested (`legend_label`);
    a seed that failed is marked with an x at its last finite value."""
    plt = _pyplot()
    rows, cols = len(metrics), len(x_axes)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 2.2, 3.6 * rows), squeeze=False)
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    styles = ["-", "--", "-.", ":"]
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(x_axes):
            ax = axes[i][j]
            log_here = logy if isinstance(logy, bool) else metric in logy
            for k, c in enumerate(curves):
                color = colors[k % len(colors)]
                style = styles[(k // len(colors)) % len(styles)]
                if metric not in c.y:      # e.g. a residual for a method without v: legend entry only
                    ax.plot([], [], style, color=color, lw=1.6, label=legend_label(c, next(iter(c.y))))
                    continue
                y = np.asarray(c.y[metric], dtype=float)
                if log_here:
                    y = np.where(y > 0, y, np.nan)
                med, lo, hi = band(y, quantiles)
                x = np.asarray(c.x[axis], dtype=float)
                ax.plot(x, med, style, color=color, lw=1.6, label=legend_label(c, metric))
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
                raw = np.asarray(c.y[metric], dtype=float).reshape(-1, x.size)
                for row in raw:            # a seed that stops early (NaN from some point): x at its end
                    ok = np.nonzero(np.isfinite(row))[0]
                    if ok.size and ok[-1] < row.size - 1:
                        ax.plot(x[ok[-1]], row[ok[-1]], "x", color=color, ms=7, mew=2)
            if log_here:
                ax.set_yscale("log")
            if logx:
                ax.set_xscale("log")
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_xlabel({**AXIS_LABELS, **(axis_labels or {})}.get(axis, axis))
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    q = f"median over seeds, {int(quantiles[0] * 100)}-{int(quantiles[1] * 100)}% band"
    if any(c.failed for c in curves):
        q += "; x: a failed seed's last finite value"
    fig.suptitle("\n".join(t for t in (title, q + (f"; {note}" if note else "")) if t), fontsize=10)
    fig.tight_layout()
    meta = figure_metadata(curves, metrics)
    import json
    fig.savefig(path, dpi=130, bbox_inches="tight", metadata={"Description": json.dumps(meta)})
    plt.close(fig)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(dict(meta, title=title, metrics=list(metrics), x=list(x_axes)), f, indent=1)
    return path


__all__ = ["AXIS_LABELS", "CONSTRAINED_STATIONARITY", "Curve", "METRIC_LABELS", "band", "drawn_from", "figure_metadata",
           "legend_label", "plot_grid", "stationarity_metrics"]

"""Figures (matplotlib, Agg backend): median over seeds with a quantile band (default 20-80%).

    plot_grid(curves, metrics=["value_gap"], x_axes=["time", "oracles"], path="fig.png", title=...)

`curves` is a list of `Curve`s: one label, x arrays per axis ("time", "oracles", "step"; one
value per evaluation) and y arrays per metric of shape (seeds, evaluations). Rows of the figure
are metrics, columns are x axes.
"""
from __future__ import annotations

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
    "theta_err": r"$\|\theta_t - \theta^*\|^2$",
    "lower_gap": r"$\|\phi_t - \phi^*(\theta_t)\|^2$",
    "val_loss": "validation loss of $\\phi_t$",
    "train_loss": "training loss of $\\phi_t$",
    "val_error": "validation error of $\\phi_t$",
    "test_loss": "test loss of $\\phi_t$",
    "test_value": r"test loss of $\phi^*(\theta_t)$",
    "test_error": "test error of $\\phi_t$",
}


class Curve(NamedTuple):
    label: str
    x: Dict[str, np.ndarray]      # axis -> (evaluations,)
    y: Dict[str, np.ndarray]      # metric -> (seeds, evaluations)


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
              logy: bool = True, logx: bool = False, quantiles: Sequence[float] = (0.2, 0.8),
              note: Optional[str] = None, ylim: Sequence[float] = ()) -> str:
    """Draw the figure and save it as PNG at `path` (returned)."""
    plt = _pyplot()
    rows, cols = len(metrics), len(x_axes)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 2.2, 3.6 * rows), squeeze=False)
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    styles = ["-", "--", "-.", ":"]
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(x_axes):
            ax = axes[i][j]
            for k, c in enumerate(curves):
                y = np.asarray(c.y[metric], dtype=float)
                if logy:
                    y = np.where(y > 0, y, np.nan)
                med, lo, hi = band(y, quantiles)
                x = np.asarray(c.x[axis], dtype=float)
                color = colors[k % len(colors)]
                ax.plot(x, med, styles[(k // len(colors)) % len(styles)], color=color, lw=1.6, label=c.label)
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
            if logy:
                ax.set_yscale("log")
            if logx:
                ax.set_xscale("log")
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_xlabel(AXIS_LABELS.get(axis, axis))
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    q = f"median over seeds, {int(quantiles[0] * 100)}-{int(quantiles[1] * 100)}% band"
    fig.suptitle("\n".join(t for t in (title, q + (f"; {note}" if note else "")) if t), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


__all__ = ["AXIS_LABELS", "Curve", "METRIC_LABELS", "band", "plot_grid"]

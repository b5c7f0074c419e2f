"""Results that are never lost: one NPZ + one JSON per finished cell, written atomically.

    results/<experiment>/cells/<cell_id>.npz    histories, arrays of shape (seeds, evaluations)
    results/<experiment>/cells/<cell_id>.json   config, hyperparameters, versions, device, timings

Each file is written to a temporary name in the same folder and moved into place with
`os.replace` (atomic on POSIX); the JSON is written last and marks the cell finished, so a sweep
killed at any point leaves only whole cells, and a rerun computes only the missing ones.
"""
from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import subprocess
import tempfile
from typing import Dict, Iterable, List, NamedTuple, Optional

import numpy as np

PACKAGES = ("bilevel_jax", "jax", "jaxlib", "optax", "equinox", "numpy", "scikit-learn", "matplotlib")


class CellResult(NamedTuple):
    cell_id: str
    history: Dict[str, np.ndarray]   # name -> (seeds, evaluations)
    meta: dict


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True, default=_jsonable).encode()))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def versions() -> Dict[str, Optional[str]]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Package versions, devices (of all processes of the job) and host, recorded in every cell."""
    import jax
    devices = jax.devices()
    return {"versions": versions(), "git_commit": git_commit(), "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "n_devices": len(devices), "processes": jax.process_count(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "x64": bool(jax.config.jax_enable_x64)}


def seconds_per_step(meta: dict) -> float:
    """A cell's wall time per outer step: the timing pass's (an un-batched single-seed run), or
    without one (`timing = false`) the batched run's seconds over its steps (all seeds at once)."""
    per_step = meta["timings"].get("seconds_per_step")
    if per_step is None or not np.isfinite(per_step):
        per_step = meta["timings"]["run_s"] / max(meta["steps"], 1)
    return float(per_step)


def fmt(x, spec: str = ".3g") -> str:
    """A number as the tables and summaries of every figure write it: `format(x, spec)`, "-" for
    None or NaN (nothing to report), "not reached" for inf (a target a run never stays below)."""
    if x is None or (isinstance(x, (float, np.floating)) and np.isnan(x)):
        return "-"
    if isinstance(x, (float, np.floating)) and np.isinf(x):
        return "not reached"
    return format(x, spec)


# --------------------------------------------------------------------------------------------------
# failures: never hidden

def failed_seeds(history: Dict[str, np.ndarray]) -> np.ndarray:
    """(seeds,) bool: the seeds whose run went wrong: a non-finite iterate at any evaluation
    (`finite` False) or a status other than ok (`bj.status`: breakdown, non-finite, invalid step)."""
    finite = np.asarray(history["finite"], bool)
    bad = ~np.all(finite.reshape(finite.shape[0], -1), axis=1)
    if "status" in history:
        status = np.asarray(history["status"])
        bad |= np.any(status.reshape(status.shape[0], -1) != 0, axis=1)
    return bad


def failure_text(history: Dict[str, np.ndarray]) -> str:
    """"" when every seed ran through, else e.g. "2/3 diverged" (non-finite iterates) or
    "1/3 failed (breakdown)" (a status without non-finite iterates)."""
    bad = failed_seeds(history)
    if not bad.any():
        return ""
    finite = np.asarray(history["finite"], bool)
    diverged = ~np.all(finite.reshape(finite.shape[0], -1), axis=1)
    parts = []
    if diverged.any():
        parts.append(f"{int(diverged.sum())}/{bad.size} diverged")
    other = bad & ~diverged
    if other.any():
        from bilevel_jax.status import describe
        status = np.asarray(history["status"]).reshape(bad.size, -1)
        codes = sorted({describe(int(np.bitwise_or.reduce(status[i]))) for i in np.nonzero(other)[0]})
        parts.append(f"{int(other.sum())}/{bad.size} failed ({'; '.join(codes)})")
    return ", ".join(parts)


class ResultStore:
    """The cells of one experiment folder."""

    def __init__(self, root: str):
        self.root = root
        self.cells_dir = os.path.join(root, "cells")

    def _paths(self, cell_id: str):
        base = os.path.join(self.cells_dir, cell_id)
        return base + ".npz", base + ".json"

    def has(self, cell_id: str) -> bool:
        npz, meta = self._paths(cell_id)
        return os.path.isfile(npz) and os.path.isfile(meta)

    def save(self, cell_id: str, history: Dict[str, np.ndarray], meta: dict) -> None:
        npz, meta_path = self._paths(cell_id)
        arrays = {k: np.asarray(v) for k, v in history.items()}
        _atomic_write(npz, lambda f: np.savez(f, **arrays))
        meta = dict(meta, cell_id=cell_id, saved_at=datetime.datetime.now().isoformat(timespec="seconds"),
                    arrays=sorted(arrays))
        write_json(meta_path, meta)

    def load(self, cell_id: str) -> CellResult:
        npz, meta_path = self._paths(cell_id)
        with np.load(npz) as z:
            history = {k: z[k] for k in z.files}
        with open(meta_path) as f:
            meta = json.load(f)
        return CellResult(cell_id, history, meta)

    def load_many(self, cell_ids: Iterable[str]) -> List[CellResult]:
        return [self.load(c) for c in cell_ids if self.has(c)]

    def path(self, name: str) -> str:
        os.makedirs(self.root, exist_ok=True)
        return os.path.join(self.root, name)


__all__ = ["CellResult", "ResultStore", "environment", "failed_seeds", "failure_text", "fmt", "seconds_per_step", "versions",
           "write_json"]

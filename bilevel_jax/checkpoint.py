"""Long runs in chunks, with a checkpoint after each: `bj.run_chunked`.

    state, history = bj.run_chunked(alg, state, data, num_steps=100_000, eval_every=100,
                                    chunk=10_000, directory="ckpt/run1")

runs `bj.run` for `chunk` outer steps at a time and after each chunk writes the algorithm state
(equinox serialisation, `eqx.tree_serialise_leaves`: equinox models in the state included) and
the history so far to `directory`, atomically (write to a temporary file, then `os.replace`).
Called again with the same arguments after the process was killed, it loads the last checkpoint
and runs only the remaining chunks. Because every step's randomness derives from the state's
root key and step count (`bj.algorithms.base.step_key`, the samplers' draw counters), the resumed
run computes the same iterates as an uninterrupted one (bitwise on CPU).

The given `state` is the initial state and the template for loading (structure, shapes, dtypes).
The checkpoint records `num_steps`, `eval_every` and `chunk`; loading one made with other values
is an error, not a silent mix.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import equinox as eqx
import jax
import numpy as np

from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.base import Algorithm
from bilevel_jax.run import run

STATE_FILE, HISTORY_FILE, META_FILE = "state.eqx", "history.npz", "meta.json"


def _replace_atomically(path: str, write: Callable[[str], None]) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save(directory: str, state, history: dict, meta: dict) -> None:
    """Write a checkpoint: state, history, then the metadata that marks it complete."""
    os.makedirs(directory, exist_ok=True)
    _replace_atomically(os.path.join(directory, STATE_FILE), lambda p: eqx.tree_serialise_leaves(p, state))

    def write_history(p):
        with open(p, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in history.items()})

    _replace_atomically(os.path.join(directory, HISTORY_FILE), write_history)
    _replace_atomically(os.path.join(directory, META_FILE), lambda p: open(p, "w").write(json.dumps(meta)))


def load(directory: str, like):
    """`(state, history, meta)` of the checkpoint in `directory`, or None when there is none."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    state = eqx.tree_deserialise_leaves(os.path.join(directory, STATE_FILE), like)
    with np.load(os.path.join(directory, HISTORY_FILE)) as npz:
        history = {k: npz[k] for k in npz.files}
    return state, history, meta


def _append(history: Optional[dict], new: dict) -> dict:
    """The history so far followed by a chunk's rows, the chunk's cumulative counts offset by the
    totals so far and its status OR-ed with the status so far (its row 0 repeats the last row)."""
    new = {k: np.asarray(v) for k, v in new.items()}
    if history is None:
        return new
    counts = ("lower_grads", "upper_grads", "hvps", "cross", "values")
    out = {}
    for key, rows in new.items():
        rows = rows[1:]
        if key in counts:
            rows = rows + history[key][-1]
        elif key == "status":
            rows = rows | history[key][-1]
        elif key == "finite":
            rows = rows & history[key][-1]
        out[key] = np.concatenate([history[key], rows])
    return out


def run_chunked(alg: Algorithm, state, data, num_steps: int, *, chunk: int, directory: str,
                eval_every: Optional[int] = None, eval_fn: Optional[Callable] = None,
                progress: Optional[Callable] = None, on_checkpoint: Optional[Callable[[int], None]] = None):
    """`bj.run` in chunks of `chunk` outer steps, checkpointed to `directory` after each chunk and
    resumed from it when it exists (see the module docstring). `on_checkpoint(steps_done)` is
    called after each checkpoint is written. Returns `(final_state, history)` like `bj.run`."""
    check_positive_int("num_steps", num_steps)
    check_positive_int("chunk", chunk)
    eval_every = chunk if eval_every is None else check_positive_int("eval_every", eval_every)
    if chunk % eval_every or num_steps % chunk:
        raise ValueError(f"chunk={chunk} must be a multiple of eval_every={eval_every} and divide "
                         f"num_steps={num_steps}.")
    meta = {"num_steps": num_steps, "eval_every": eval_every, "chunk": chunk, "steps_done": 0}
    history = None
    loaded = load(directory, state)
    if loaded is not None:
        state, history, saved = loaded
        mismatch = {k: (saved.get(k), v) for k, v in meta.items() if k != "steps_done" and saved.get(k) != v}
        if mismatch:
            raise ValueError(f"the checkpoint in {directory} was made with other settings (saved, given): {mismatch}.")
        meta["steps_done"] = saved["steps_done"]
    one_chunk = eqx.filter_jit(lambda s: run(alg, s, data, chunk, eval_every, eval_fn, progress=progress))
    while meta["steps_done"] < num_steps:
        state, new = one_chunk(state)
        history = _append(history, jax.device_get(new))
        meta["steps_done"] += chunk
        save(directory, state, history, meta)
        if on_checkpoint is not None:
            on_checkpoint(meta["steps_done"])
    return state, history


__all__ = ["load", "run_chunked", "save"]

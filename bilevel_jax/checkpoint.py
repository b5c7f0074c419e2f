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

Called with a larger `num_steps` on a finished directory, it extends the run: the stored state
goes on for the missing steps (the last chunk may be shorter than `chunk`). With
`batched=True`, `state` holds independent runs stacked on a leading axis (seeds: `jax.vmap(lambda
k: alg.init(theta0, phi0, k, data))(keys)`, `eqx.filter_vmap` for a model in the state); each chunk
runs them together under `vmap` and the history's values get the same leading axis.

The given `state` is the initial state and the template for loading (structure, shapes, dtypes).
The checkpoint records a fingerprint of the run (`fingerprint`): the algorithm's configuration
(its static fields, the functions of the problem and the optax rules described by name, code
and closure) and array fields (step sizes ...), the data's shapes, dtypes and a SHA-256 of its
contents, theta0, phi0, the key and the rest of the initial state, and `eval_every`. A resume
whose fingerprint differs is refused with an error that names what differs, never a silent mix
of two runs.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import os
import types
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.base import Algorithm, header
from bilevel_jax.cache import same_code
from bilevel_jax.run import raise_callback_errors, run

STATE_FILE, HISTORY_FILE, META_FILE = "state.eqx", "history.npz", "meta.json"
FORMAT = 2   # meta.json layout: settings, fingerprint, steps_done


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

    def write_meta(p):
        with open(p, "w") as f:
            json.dump(meta, f)

    _replace_atomically(os.path.join(directory, HISTORY_FILE), write_history)
    _replace_atomically(os.path.join(directory, META_FILE), write_meta)


def load_meta(directory: str) -> Optional[dict]:
    """The metadata of the checkpoint in `directory`, or None when there is none."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load(directory: str, like):
    """`(state, history, meta)` of the checkpoint in `directory`, or None when there is none."""
    meta = load_meta(directory)
    if meta is None:
        return None
    state = eqx.tree_deserialise_leaves(os.path.join(directory, STATE_FILE), like)
    with np.load(os.path.join(directory, HISTORY_FILE)) as npz:
        history = {k: npz[k] for k in npz.files}
    return state, history, meta


# ---- fingerprint ------------------------------------------------------------------------------

def _array_text(x) -> str:
    """dtype, shape and the SHA-256 of the contents of an array (a PRNG key by its key data)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.ascontiguousarray(jax.device_get(x))
    return f"{x.dtype}{list(x.shape)}:{hashlib.sha256(x.view(np.uint8).reshape(-1)).hexdigest()}"


def _describe(obj: Any, memo: Optional[dict] = None, depth: int = 0) -> str:
    """A text that is the same in every process for equal configurations (no `id`, no memory
    address, no set order): arrays by content hash, functions by module, name, bytecode, defaults
    and closure (an optax rule's learning rate lives in its closure), dataclasses (equinox Modules,
    the problem) by their fields, containers by their items, other objects by their attributes
    (down to a fixed depth). An object met again is described once (`memo`), a cycle as such."""
    memo = {} if memo is None else memo
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        return repr(obj)
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = "<cycle>"
    memo[id(obj)] = text = _describe_new(obj, functools.partial(_describe, memo=memo, depth=depth + 1), depth)
    return text


_MAX_DEPTH = 24


def _describe_new(obj: Any, rec: Callable[[Any], str], depth: int) -> str:
    """`_describe` of an object not met before; `rec` describes its parts."""
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, (jax.Array, np.ndarray, np.generic)):
        return _array_text(obj)
    if isinstance(obj, enum.Enum):
        return f"{name}.{obj.name}"
    if isinstance(obj, functools.partial):
        return f"partial({rec(obj.func)}, {rec(obj.args)}, {rec(obj.keywords)})"
    if isinstance(obj, types.MethodType):
        return f"method({rec(obj.__func__)}, {rec(obj.__self__)})"
    if isinstance(obj, types.FunctionType):
        cells = tuple(c.cell_contents for c in obj.__closure__ or () if _filled(c))
        return (f"function {obj.__module__}.{obj.__qualname__}({rec(obj.__code__)}, {rec(obj.__defaults__)}, "
                f"{rec(obj.__kwdefaults__)}, {rec(cells)})")
    if isinstance(obj, types.CodeType):
        return f"code({hashlib.sha256(obj.co_code).hexdigest()}, {rec(obj.co_consts)})"
    if isinstance(obj, (types.ModuleType, type)) or inspect.isroutine(obj):
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__qualname__}({', '.join(rec(x) for x in obj)})"
    if isinstance(obj, dict):
        return "{" + ", ".join(sorted(f"{rec(k)}: {rec(v)}" for k, v in obj.items())) + "}"
    if isinstance(obj, (set, frozenset)):
        return "{" + ", ".join(sorted(rec(x) for x in obj)) + "}"
    if depth > _MAX_DEPTH:
        return name
    if dataclasses.is_dataclass(obj):
        return f"{name}({', '.join(f'{f.name}={rec(getattr(obj, f.name, None))}' for f in dataclasses.fields(obj))})"
    if hasattr(obj, "__dict__"):
        return f"{name}{rec(vars(obj))}"
    return name


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:   # an empty cell (a closure variable not yet bound)
        return False
    return True


def _digest(obj: Any) -> str:
    return hashlib.sha256(_describe(obj).encode()).hexdigest()


def fingerprint(alg: Algorithm, state, data) -> dict:
    """What identifies a run, as SHA-256 digests by part: the algorithm (configuration and array
    fields), the data (structure, shapes, dtypes, contents), theta0, phi0, the key and the whole
    initial state. Equal in every process for equal inputs (see `_describe`)."""
    head = header(state)
    return {"algorithm": _digest(alg), "data": _digest(data), "theta0": _digest(head.theta),
            "phi0": _digest(head.phi), "key": _digest(head.key), "initial state": _digest(state)}


# ---- the chunked run ----------------------------------------------------------------------------

def _append(history: Optional[dict], new: dict, axis: int) -> dict:
    """The history so far followed by a chunk's rows (along `axis`: 0, or 1 for a batched run),
    the chunk's cumulative counts offset by the totals so far and its status OR-ed with the status
    so far (its row 0 repeats the last row)."""
    new = {k: np.asarray(v) for k, v in new.items()}
    if history is None:
        return new
    counts = ("lower_grads", "upper_grads", "hvps", "cross", "values")
    out = {}
    for key, rows in new.items():
        rows = np.delete(rows, 0, axis=axis)
        last = np.take(history[key], [-1], axis=axis)
        if key in counts:
            rows = rows + last
        elif key == "status":
            rows = rows | last
        elif key == "finite":
            rows = rows & last
        out[key] = np.concatenate([history[key], rows], axis=axis)
    return out


@eqx.filter_jit
def _run_batched(alg, state, data, num_steps, eval_every, eval_fn, progress):
    """`bj.run` of the runs stacked on `state`'s leading axis, under `vmap` (one compiled program)."""
    return eqx.filter_vmap(lambda s: run(alg, s, data, num_steps, eval_every, eval_fn, progress=progress))(state)


def _check_resume(directory: str, saved: dict, settings: dict, prints: dict, num_steps: int) -> None:
    """Raise when the checkpoint in `directory` belongs to another run."""
    if saved.get("format") != FORMAT:
        raise ValueError(f"the checkpoint in {directory} has no run fingerprint (written by an older "
                         "bilevel_jax): it cannot be checked against this run. Delete it or use another directory.")
    other = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
    if other:
        raise ValueError(f"the checkpoint in {directory} was made with other settings (saved, given): {other}. "
                         "Use the saved ones, another directory, or delete it to start over.")
    differ = [k for k, v in prints.items() if saved["fingerprint"].get(k) != v]
    if differ:
        raise ValueError(f"the checkpoint in {directory} belongs to another run: its {', '.join(differ)} "
                         f"differ{'s' if len(differ) == 1 else ''} from the given one{'s' if len(differ) > 1 else ''} "
                         "(resuming would mix two runs). Pass the same algorithm, data and initial state, "
                         "use another directory, or delete it to start over.")
    if saved["steps_done"] > num_steps:
        raise ValueError(f"the checkpoint in {directory} holds {saved['steps_done']} steps, more than "
                         f"num_steps={num_steps}: pass num_steps >= {saved['steps_done']} (a larger one extends "
                         "the run).")


def run_chunked(alg: Algorithm, state, data, num_steps: int, *, chunk: int, directory: str,
                eval_every: Optional[int] = None, eval_fn: Optional[Callable] = None,
                progress: Optional[Callable] = None, on_checkpoint: Optional[Callable[[int], None]] = None,
                batched: bool = False):
    """`bj.run` in chunks of `chunk` outer steps, checkpointed to `directory` after each chunk and
    resumed from it when it exists (see the module docstring).

    Args:
      alg, state, data, eval_fn, progress: as for `bj.run` (`state` is the initial state).
      num_steps: the run's total length; larger than a finished checkpoint's, it extends the run.
      chunk: outer steps between checkpoints (a multiple of `eval_every`; the last chunk may be shorter).
      directory: where the checkpoint lives.
      eval_every: steps between history rows (default `chunk`); must divide `num_steps`.
      on_checkpoint: `on_checkpoint(steps_done)` after each checkpoint is written.
      batched: `state` holds independent runs on a leading axis (seeds), run together under `vmap`;
        the history's values then have that leading axis too (rows on axis 1).

    Returns `(final_state, history)` like `bj.run`. Raises ValueError when the checkpoint in
    `directory` was made by another run (algorithm, data, initial state or `eval_every`).
    """
    if not isinstance(alg, Algorithm):
        raise TypeError(f"alg must be a bj.Algorithm (e.g. bj.algorithms.soba(problem)), got {type(alg).__name__}.")
    check_positive_int("num_steps", num_steps)
    check_positive_int("chunk", chunk)
    eval_every = chunk if eval_every is None else check_positive_int("eval_every", eval_every)
    if chunk % eval_every or num_steps % eval_every:
        raise ValueError(f"chunk={chunk} and num_steps={num_steps} must be multiples of eval_every={eval_every}.")
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be a bool, got {batched!r}.")
    settings = {"eval_every": eval_every, "batched": batched}
    prints = fingerprint(alg, state, data)
    meta = {"format": FORMAT, "settings": settings, "fingerprint": prints, "steps_done": 0}
    history = None
    saved = load_meta(directory)
    if saved is not None:
        _check_resume(directory, saved, settings, prints, num_steps)
        state, history, _ = load(directory, state)
        meta["steps_done"] = saved["steps_done"]
    while meta["steps_done"] < num_steps:
        steps = min(chunk, num_steps - meta["steps_done"])
        if batched:
            state, new = raise_callback_errors(progress, _run_batched, alg, state, data, steps, eval_every,
                                               same_code(eval_fn), same_code(progress))
        else:
            state, new = run(alg, state, data, steps, eval_every, eval_fn, progress=progress)
        history = _append(history, jax.device_get(new), axis=1 if batched else 0)
        meta["steps_done"] += steps
        save(directory, state, history, meta)
        if on_checkpoint is not None:
            on_checkpoint(meta["steps_done"])
    return state, history


__all__ = ["fingerprint", "load", "load_meta", "run_chunked", "save"]

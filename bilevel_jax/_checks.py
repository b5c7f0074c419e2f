"""Input checks run before tracing: clear errors for bad hyperparameters.

Traced values (inside `jit`/`vmap`, e.g. a swept step size) cannot be checked before tracing and
are let through; Python numbers and concrete arrays are checked.
"""
from __future__ import annotations

import numbers

import jax
import numpy as np


def _concrete(value):
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, numbers.Number):
        return np.asarray(value)
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    return None


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """A static count (iterations, steps, batch size): a Python int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int (a static loop length), got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_bool(name: str, value) -> bool:
    """A static flag: a Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a Python bool (a static flag), got {value!r}.")
    return value


def check_step_size(name: str, value) -> None:
    """A step size: float, array or optax schedule (callable). Concrete values must be > 0."""
    if callable(value):
        return
    arr = _concrete(value)
    if arr is None:
        if isinstance(value, jax.core.Tracer):
            return
        raise TypeError(f"{name} must be a float, an array or an optax schedule, got {type(value).__name__}.")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a positive step size, got {value!r}.")


def check_in_range(name: str, value, low: float, high: float, *, closed_low=True, closed_high=True) -> None:
    """A concrete scalar hyperparameter within [low, high] (momentum weights, tolerances)."""
    if callable(value):
        return
    arr = _concrete(value)
    if arr is None:
        return
    lo_ok = np.all(arr >= low) if closed_low else np.all(arr > low)
    hi_ok = np.all(arr <= high) if closed_high else np.all(arr < high)
    if not (lo_ok and hi_ok):
        lb = "[" if closed_low else "("
        rb = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in {lb}{low}, {high}{rb}, got {value!r}.")


def as_array(value):
    """A Python number as a (weakly typed) JAX array, so it becomes a sweepable array field of a
    Module; arrays, tracers and callables are returned as they are."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return jax.numpy.asarray(value)
    return value

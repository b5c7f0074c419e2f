"""JAX's persistent compilation cache, switched on for bilevel_jax runs.

    import bilevel_jax as bj
    bj.enable_compilation_cache()          # ~/.cache/bilevel_jax, or $BILEVEL_JAX_CACHE

A jitted `bj.run` of a preset compiles for seconds on CPU; with the cache on, a second process
that builds the same program (same algorithm, shapes, dtypes, jax version and backend) loads the
executable from disk instead of compiling it. The cache is trusted code: do not point it at a
directory that others can write to.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import types
from typing import Any, Callable, Optional

import jax
import optax

CACHE_ENV = "BILEVEL_JAX_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "bilevel_jax")


def enable_compilation_cache(path: Optional[str] = None, *, min_compile_time_secs: float = 0.0,
                             min_entry_size_bytes: int = 0) -> str:
    """Turn JAX's persistent compilation cache on, in `path`.

    Args:
      path: the cache directory (created if missing); default `$BILEVEL_JAX_CACHE`, else
        `~/.cache/bilevel_jax`.
      min_compile_time_secs: only programs that took at least this long to compile are written
        (JAX's own default is 1 s; 0 caches every program, which suits the many 0.1-3 s compiles
        of bilevel runs on CPU).
      min_entry_size_bytes: only executables at least this large are written.

    Returns the absolute cache directory. May be called after earlier compilations: the cache is
    re-initialised, so later compilations use the new directory.
    """
    if min_compile_time_secs < 0:
        raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs}.")
    if min_entry_size_bytes < 0:
        raise ValueError(f"min_entry_size_bytes must be >= 0, got {min_entry_size_bytes}.")
    if path is None:
        path = os.environ.get(CACHE_ENV) or DEFAULT_DIR
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", int(min_entry_size_bytes))
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # pick the directory up even if a compilation already ran
    return path


class SameCode:
    """A function as a static argument of a compiled program, equal to another `SameCode` of a
    function with the same code, defaults and closure: a lambda written again at the same place
    (`eval_fn=lambda s, d: ...` in every call of `bj.run`) is the same configuration, so the
    compiled program is reused. Closure values compare by value for numbers, strings and tuples of
    them, by identity otherwise (arrays, lists, modules), recursively for functions; as for
    `jax.jit`, mutating a captured object does not retrace. Calling it calls the function."""

    __slots__ = ("fn", "key")

    def __init__(self, fn: Callable):
        self.fn = fn
        self.key = _code_key(fn, frozenset())

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other) -> bool:
        return isinstance(other, SameCode) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def same_code(fn: Optional[Callable]) -> Optional[SameCode]:
    """`fn` as a `SameCode` (None stays None; a `SameCode` is returned as it is)."""
    return fn if fn is None or isinstance(fn, SameCode) else SameCode(fn)


def same_code_rule(optimizer):
    """An optax transform with its `init` and `update` as `SameCode`: `optax.adam(1e-3)` built
    again is the same static argument of a compiled program (another learning rate is not).
    Anything else is returned as it is."""
    if not isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return optimizer._replace(init=same_code(optimizer.init), update=same_code(optimizer.update))


def _code_key(obj: Any, seen: frozenset) -> tuple:
    """The comparison key of `SameCode`: code, globals, defaults and closure values of a function."""
    if isinstance(obj, (bool, int, str, bytes, type(None))):
        return (type(obj), obj)
    if isinstance(obj, (float, complex)):
        return (type(obj), repr(obj))   # -0.0 and 0.0 differ, nan equals nan
    if isinstance(obj, tuple):
        return (tuple, tuple(_code_key(x, seen) for x in obj))
    if isinstance(obj, functools.partial):
        keywords = tuple(sorted((k, _code_key(v, seen)) for k, v in obj.keywords.items()))
        return (functools.partial, _code_key(obj.func, seen), _code_key(obj.args, seen), keywords)
    if isinstance(obj, types.FunctionType) and id(obj) not in seen:
        seen = seen | {id(obj)}
        cells = tuple(_code_key(_cell_value(c), seen) for c in obj.__closure__ or ())
        kwdefaults = tuple(sorted((k, _code_key(v, seen)) for k, v in (obj.__kwdefaults__ or {}).items()))
        return (types.FunctionType, obj.__code__, id(obj.__globals__), _code_key(obj.__defaults__, seen),
                kwdefaults, cells)
    return ("id", id(obj))   # alive as long as the function that holds it (SameCode.fn)


_EMPTY_CELL = object()


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:   # a closure variable not bound yet
        return _EMPTY_CELL


def static_equal(a, b) -> bool:
    """Equality of two parts of a static configuration (a compile key): `a is b`, or `a == b` when
    that is a plain bool. A part without a boolean `==` (an equinox bound method whose Module
    holds arrays, e.g. a constraint set's `box.project`, compares with arrays, or with tracers
    inside a trace) is equal only to itself."""
    if a is b:
        return True
    try:
        equal = a == b
    except Exception:  # noqa: BLE001 - no boolean equality: not the same part
        return False
    return equal if isinstance(equal, bool) else False


def static_hash(x) -> int:
    """`hash(x)`, or its identity when it is not hashable (consistent with `static_equal`)."""
    try:
        return hash(x)
    except TypeError:
        return id(x)


class StaticFields:
    """Mixin for frozen dataclasses that key compiled programs: equal when their fields are
    (`static_equal`, field by field), hashed consistently (`static_hash`)."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(static_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    def __hash__(self):
        return hash(tuple(static_hash(getattr(self, f.name)) for f in dataclasses.fields(self)))


__all__ = ["CACHE_ENV", "DEFAULT_DIR", "SameCode", "StaticFields", "enable_compilation_cache", "same_code",
           "same_code_rule", "static_equal", "static_hash"]

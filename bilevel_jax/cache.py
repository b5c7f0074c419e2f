"""JAX's persistent compilation cache, switched on for bilevel_jax runs.

    import bilevel_jax as bj
    bj.enable_compilation_cache()          # ~/.cache/bilevel_jax, or $BILEVEL_JAX_CACHE

A jitted `bj.run` of a preset compiles for seconds on CPU; with the cache on, a second process
that builds the same program (same algorithm, shapes, dtypes, jax version and backend) loads the
executable from disk instead of compiling it. The cache is trusted code: do not point it at a
directory that others can write to.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

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


__all__ = ["CACHE_ENV", "DEFAULT_DIR", "enable_compilation_cache"]

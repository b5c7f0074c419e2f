"""Run an experiment config: `python -m experiments <config.toml> [key=value ...]`.

Examples:

    python -m experiments configs/quadratic.toml                       # default (small) size
    python -m experiments configs/hpo_logreg.toml full=true            # the paper's sizes
    python -m experiments configs/hpo_logreg.toml steps=2000 seeds=2 only=soba,saba \\
        algorithms.soba.step=[0.0625,0.125] problem.path=/data/ijcnn1
    python -m experiments configs/rates.toml progress=false

Overrides use dotted keys and TOML values (a value that is not TOML is a string); a list value of
an algorithm hyperparameter is a grid axis. `full=true` applies the config's [paper] table first.
Unknown keys or names stop the run with the list of valid ones.

Outputs go to `results/<name>/` (`results/<name>-full/` with full=true): one NPZ + JSON per
finished cell under `cells/` (a rerun computes only the missing cells), the figure `<name>.png`,
`summary.md` and `sweep.csv`. `make fig-<name>` runs `configs/<name>.toml`.

Devices: the batch axis (grid points x seeds) is sharded over all devices JAX exposes (all GPUs or
TPUs; on CPU one device, or N with `devices=N`). Caveat for N host devices on a machine with
fewer than about 2N cores: jaxlib's batched LAPACK kernels (linalg.solve/cholesky under vmap, used
by the `ba`/`stable` presets) wait inside the shared CPU thread pool and can deadlock when every
pool thread does so; metric evaluation therefore always runs on one device on CPU.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

USAGE = "usage: python -m experiments <config.toml> [key=value ...]   (see the module docstring)"


def set_host_devices(devices) -> None:
    """Before the backend starts: `devices=N` asks for N CPU devices (used when JAX runs on CPU;
    XLA_FLAGS=--xla_force_host_platform_device_count=N does the same). `auto` keeps what JAX
    exposes: all GPUs/TPUs, or one CPU device (see the caveat in the module docstring)."""
    if devices == "auto" or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax
    jax.config.update("jax_num_cpu_devices", max(1, int(devices)))


def figure_module(cfg: dict):
    name = cfg["figure"]
    try:
        return importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        from experiments.config import ConfigError
        raise ConfigError(f"unknown figure {name!r}: no module experiments.{name} "
                          "(valid: convergence, rates).") from e


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE)
        return 0 if argv else 2
    from experiments.config import ConfigError, load
    try:
        cfg = load(argv[0], argv[1:])
        set_host_devices(cfg["devices"])
        module = figure_module(cfg)
        start = time.perf_counter()
        module.main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{cfg['name']}] done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

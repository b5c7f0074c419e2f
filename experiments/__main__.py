"""Run an experiment config: `python -m experiments <config.toml> [key=value ...] [job flags]`.

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

Several processes and hosts, with JAX's own runtime (`jax.distributed`): start the same command
on every host, naming the coordinator (host 0's address and a free port), the number of
processes and this process's id, as flags or in the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID:

    # on host i = 0 .. N-1 (host 0 is 10.0.0.1)
    python -m experiments configs/hpo_logreg.toml --coordinator-address=10.0.0.1:1234 \
        --num-processes=N --process-id=i

Every process first prints a line naming the coordinator and the processes it waits for; if
not all of them have joined within `--init-timeout` seconds (or $BILEVEL_INIT_TIMEOUT, or the
config's `init_timeout`; default 300), it stops with exit status 2 and an error that says which
process waited for what (instead of JAX aborting the process after its own deadline).

Under Slurm or Open MPI, `--distributed` alone lets JAX read all three from the cluster
(`srun python -m experiments configs/hpo_logreg.toml --distributed`). The batch axis is then
sharded over the devices of all processes (`devices=N`: the first N of each); process 0 decides
which cells are missing and writes every finished cell, once, atomically (the other processes
need no results folder), so a restarted job computes only the missing cells. On CPU hosts the
collectives are JAX's CPU collectives (gloo, JAX's default; `jax_cpu_collectives_implementation`
selects another); give each process several host devices with `devices=N` or
XLA_FLAGS=--xla_force_host_platform_device_count=N. Every figure runs its cells through
`experiments.runner`, so every figure spans processes (process 0 alone then draws the figure and
writes the summary; the hyper-cleaning baselines, plain training, run on it alone too).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import threading
import time

USAGE = ("usage: python -m experiments <config.toml> [key=value ...] [--coordinator-address=HOST:PORT "
         "--num-processes=N --process-id=I | --distributed] [--init-timeout=SECONDS]   (see the module docstring)")


def set_host_devices(devices) -> None:
    """Before the backend starts: `devices=N` asks for N CPU devices (used when JAX runs on CPU;
    XLA_FLAGS=--xla_force_host_platform_device_count=N does the same). `auto` keeps what JAX
    exposes: all GPUs/TPUs, or one CPU device (see the caveat in the module docstring)."""
    if devices == "auto" or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax
    jax.config.update("jax_num_cpu_devices", max(1, int(devices)))


FIGURES = ("convergence", "hessian_free", "hyperclean", "lancbio", "morbit", "rates")


def figure_module(cfg: dict):
    """The module `experiments.<figure>` that runs the config (one of FIGURES)."""
    name = cfg["figure"]
    if name not in FIGURES:
        from experiments.config import ConfigError
        close = difflib.get_close_matches(str(name), FIGURES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown figure {name!r}.{hint} Valid: {', '.join(FIGURES)}.")
    return importlib.import_module(f"experiments.{name}")


def parse_args(argv):
    """(config path, overrides, job flags) of the command line; a ConfigError for a bad flag."""
    from experiments.config import ConfigError

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise ConfigError(f"{message} ({USAGE})")

    parser = Parser(prog="python -m experiments", add_help=False)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"))
    parser.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    parser.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--init-timeout", type=int, default=_env_int("BILEVEL_INIT_TIMEOUT"))
    return parser.parse_intermixed_args(argv)


def _env_int(name: str):
    from experiments.config import ConfigError
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {value!r}.") from None


def job_text(args) -> str:
    """Who this process is and whom it waits for (the startup line of a multi-process job)."""
    if args.coordinator_address is None and args.num_processes is None and args.process_id is None:
        return "coordinator, process count and id from the cluster (Slurm / Open MPI)"
    n, i = args.num_processes, args.process_id
    where = "this process" if i == 0 else "process 0"
    return (f"process {i} of {n}: coordinator {args.coordinator_address or '(not given)'} ({where}); "
            f"waiting for all {n} processes (ids 0..{n - 1 if isinstance(n, int) else '?'})")


def _timed_out(args, timeout: int) -> None:
    """The watchdog's end of a join that did not complete: a clear error, exit status 2."""
    if args.process_id == 0:
        what = (f"not all {args.num_processes} processes connected to the coordinator at "
                f"{args.coordinator_address} (this process)")
    elif args.process_id is None:
        what = "the job the cluster describes did not assemble"
    else:
        what = (f"process {args.process_id} got no answer from the coordinator at {args.coordinator_address} "
                "(process 0), or not every process joined")
    print(f"error: the multi-process job did not start within {timeout} s: {what}. Start every process with "
          "the same --coordinator-address and --num-processes and a distinct --process-id in 0..N-1, or raise "
          "--init-timeout.", file=sys.stderr, flush=True)
    os._exit(2)


def join_job(args, timeout: int = 300) -> None:
    """`jax.distributed.initialize` when any job setting is given (or `--distributed`: all of them
    from the cluster, Slurm or Open MPI); a single-process run otherwise. Before any JAX work.

    Prints the startup line (`job_text`). A watchdog ends the process with a clear error when the
    job has not assembled after `timeout` seconds (JAX's own deadline, set a little later, aborts
    the process without a Python exception)."""
    given = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                 process_id=args.process_id)
    if not args.distributed and all(x is None for x in given.values()):
        return
    import jax
    from experiments.config import ConfigError
    if timeout < 1:
        raise ConfigError(f"the initialisation timeout must be >= 1 s, got {timeout}.")
    print(f"[job] {job_text(args)}; timeout {timeout} s", flush=True)
    watchdog = threading.Timer(timeout, _timed_out, (args, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**given, initialization_timeout=timeout + 30)
    except ValueError as e:   # a missing or bad setting: JAX's message
        raise ConfigError(f"cannot join the multi-process job: {e}") from None
    finally:
        watchdog.cancel()
    print(f"[job] joined: process {jax.process_index()} of {jax.process_count()}", flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__ if argv else USAGE)
        return 0 if argv else 2
    import jax
    from experiments.config import ConfigError, load
    try:
        args = parse_args(argv)
        cfg = load(args.config, args.overrides)
        join_job(args, args.init_timeout if args.init_timeout is not None else cfg["init_timeout"])
        set_host_devices(cfg["devices"])
        module = figure_module(cfg)
        start = time.perf_counter()
        module.main(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job = f" (process {jax.process_index()} of {jax.process_count()})" if jax.process_count() > 1 else ""
    print(f"[{cfg['name']}] done in {time.perf_counter() - start:.1f} s{job}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

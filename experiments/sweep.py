"""Sweeps: seeds x hyperparameter grid in one compiled, sharded call per algorithm.

A *cell* is one algorithm label at one grid point (all seeds of it). Cells that share their
static settings (preset, integer counts, solver spec, ...) form a *group*: one function

    vmap over the batch axis  (grid point x seed)  of  alg = preset(problem, **hp); bj.run(alg, ...)

is jitted once per group, with the algorithm built *inside* the vmapped function so the swept
float hyperparameters (step sizes, momentum weights, ...) are traced arrays. The batch axis is
sharded over all devices (`NamedSharding` over a 1-D mesh "batch"; the batch is padded to a
multiple of the device count with copies of its last element); the data are replicated.

Which hyperparameters are traced: numbers whose preset default is a float or None, except the
decay exponents (`*_decay`) and the names listed in the table's `static = [...]`. Integers
(step counts, batch sizes, periods), booleans, strings and tables (`linear_solver = {name = "cg",
maxiter = 10}`) are static: a grid over them makes one group per value.

Special keys of an `[algorithms.<label>]` table: `preset` (default: the label), `step` and
`ratio` (the benchmark parametrisation lower_lr = step, upper_lr = step / ratio),
`static` (force names static), `lr_decay = p` (pass the step sizes as the schedules
lr / (k + 1)^p, for presets with constant steps), `steps` / `eval_every` (this algorithm's own
run length, e.g. fewer outer steps for double-loop methods). `batch_size = "full"` means None
(full batch), `batch_size = {upper = 64, lower = 128}` a per-level pair.

Metrics are not computed inside the runs: `bj.run` records the iterates (theta, phi) every
`eval_every` steps and `MetricEvaluator` evaluates the configured metrics on all of them after
the run, in one compiled function shared by every algorithm of the experiment (the expensive
references, e.g. a Newton solve for w*(theta), are compiled once, and the runs' wall time
contains no metric work).

Timing (see `Timings`): compile time is measured ahead of time (`lower().compile()`), the run
with `jax.block_until_ready`; a separate un-batched single-seed run without metrics gives the
seconds per outer step used for the wall-time axis of the figures.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bilevel_jax as bj
from experiments.config import ALGORITHM_SPECIAL, ConfigError, seed_list

LOOP_KWARGS = ("sampler", "mode", "check_finite")   # bilevel_loop options every preset forwards
STATIC_NAMES = ("batch_size", "upper_decay", "lower_decay")   # numbers that are never traced
SOLVERS = {"cg": bj.linear_solvers.cg, "dense": bj.linear_solvers.dense, "gd": bj.linear_solvers.gd,
           "neumann": bj.linear_solvers.neumann, "stochastic_neumann": bj.linear_solvers.stochastic_neumann}


class Cell(NamedTuple):
    label: str            # the [algorithms.<label>] table
    preset: str           # bj.algorithms name
    static: dict          # static keyword arguments (JSON-able spec)
    traced: dict          # float keyword arguments (incl. step/ratio), vmapped
    point: dict           # the grid coordinates of this cell (varying keys only)
    cell_id: str

    @property
    def kwargs(self) -> dict:
        return {**self.static, **self.traced}

    def group_key(self) -> str:
        return json.dumps([self.label, self.preset, self.static, sorted(self.traced)], sort_keys=True)


# --------------------------------------------------------------------------------------------------
# expansion of the config into cells

def _flatten(table: dict, prefix: str = "") -> List[Tuple[str, Any]]:
    out = []
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "batch_size":
            out.extend(_flatten(value, path + "."))
        else:
            out.append((path, value))
    return out


def _unflatten(items) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def preset_params(preset: str) -> Dict[str, inspect.Parameter]:
    fn = bj.algorithms.get(preset)
    sig = inspect.signature(fn).parameters
    params = {k: p for k, p in sig.items() if k != "problem" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):   # forwarded to bilevel_loop
        for k in LOOP_KWARGS:
            params.setdefault(k, inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None))
    return params


def _is_traced(name: str, value, params, forced_static) -> bool:
    if name in ("step", "ratio"):
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)) or name not in params:
        return False
    if name in forced_static or name in STATIC_NAMES or name.endswith("_decay"):
        return False
    p = params[name]
    if isinstance(p.default, bool) or (isinstance(p.default, int) and p.default is not None):
        return False
    return "int" not in str(p.annotation) or "float" in str(p.annotation)


def check_algorithm(label: str, table: dict) -> Tuple[str, dict]:
    """Validate one [algorithms.<label>] table: (preset name, valid parameters)."""
    preset = table.get("preset", label)
    if preset not in bj.algorithms.ALGORITHMS:
        raise ConfigError(f"algorithms.{label}: unknown algorithm {preset!r}; valid names: "
                          f"{', '.join(sorted(bj.algorithms.ALGORITHMS))} (use preset = \"...\" to give "
                          "a table another label).")
    params = preset_params(preset)
    unknown = sorted(set(table) - set(params) - set(ALGORITHM_SPECIAL))
    if unknown:
        raise ConfigError(f"algorithms.{label}: unknown key(s) {unknown} for {preset!r}; valid keys: "
                          f"{', '.join(sorted(set(params) | set(ALGORITHM_SPECIAL)))}.")
    for name in table.get("static", []):
        if name not in params:
            raise ConfigError(f"algorithms.{label}.static: {name!r} is not a parameter of {preset!r}.")
    if "linear_solver" in table:
        spec = table["linear_solver"]
        if not isinstance(spec, dict) or spec.get("name") not in SOLVERS:
            raise ConfigError(f"algorithms.{label}.linear_solver must be a table with name one of "
                              f"{', '.join(sorted(SOLVERS))}, got {spec!r}.")
        sp = inspect.signature(SOLVERS[spec["name"]]).parameters
        bad = sorted(set(spec) - {"name"} - set(sp))
        if bad:
            raise ConfigError(f"algorithms.{label}.linear_solver: unknown key(s) {bad} for {spec['name']!r}; "
                              f"valid keys: {', '.join(sorted(sp))}.")
    return preset, params


def _slug(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def experiment_key(cfg: dict) -> dict:
    """What a cell's numbers depend on besides its own hyperparameters."""
    return {"problem": cfg["problem"], "seeds": seed_list(cfg), "steps": cfg["steps"],
            "eval_every": cfg["eval_every"], "metrics": list(cfg["metrics"]), "x64": cfg["x64"]}


def expand(cfg: dict) -> List[Cell]:
    """All cells of a config (the `only` labels, if given), in config order."""
    cells = []
    base = experiment_key(cfg)
    for label, table in cfg["algorithms"].items():
        if cfg["only"] and label not in cfg["only"]:
            continue
        preset, params = check_algorithm(label, table)
        forced = set(table.get("static", []))
        items = [(k, v) for k, v in _flatten({k: v for k, v in table.items()
                                              if k not in ("preset", "static")})]
        for key in ("steps", "eval_every"):
            if key in table and (not isinstance(table[key], int) or table[key] < 1):
                raise ConfigError(f"algorithms.{label}.{key} must be a positive int, got {table[key]!r}.")
        axes = [(k, v if isinstance(v, list) else [v]) for k, v in items]
        varying = [k for k, vals in axes if len(vals) > 1]
        for combo in itertools.product(*(vals for _, vals in axes)):
            point_items = list(zip((k for k, _ in axes), combo))
            kwargs = _unflatten(point_items)
            static = {k: v for k, v in kwargs.items() if not _is_traced(k, v, params, forced)}
            traced = {k: float(v) for k, v in kwargs.items() if _is_traced(k, v, params, forced)}
            point = {k: v for k, v in point_items if k in varying}
            digest = hashlib.sha256(json.dumps([base, label, preset, static, traced], sort_keys=True)
                                    .encode()).hexdigest()[:10]
            name = "-".join([label] + [f"{k}={_slug(v)}" for k, v in point.items()] + [digest])
            cells.append(Cell(label, preset, static, traced, point, name[:180]))
    return cells


# --------------------------------------------------------------------------------------------------
# building an algorithm from a cell

def run_length(cell: Cell, cfg: dict) -> Tuple[int, int]:
    """(steps, eval_every) of a cell: the algorithm table's own, else the experiment's."""
    steps = cell.static.get("steps", cfg["steps"])
    every = cell.static.get("eval_every", cfg["eval_every"])
    if steps % every:
        raise ConfigError(f"algorithms.{cell.label}: steps={steps} is not a multiple of eval_every={every}.")
    return steps, every


def _static_kwargs(static: dict) -> dict:
    out = {}
    for key, value in static.items():
        if key in ("steps", "eval_every", "lr_decay"):
            continue
        if key == "linear_solver":
            spec = dict(value)
            value = SOLVERS[spec.pop("name")](**spec)
        elif key == "batch_size":
            if value == "full":
                value = None
            elif isinstance(value, dict):
                value = (value.get("upper"), value.get("lower"))
        out[key] = value
    return out


def _traced_kwargs(hp: dict, lr_decay=None) -> dict:
    hp = dict(hp)
    if "step" in hp:
        step, ratio = hp.pop("step"), hp.pop("ratio")
        hp["lower_lr"], hp["upper_lr"] = step, step / ratio
    if lr_decay:
        for key in ("upper_lr", "lower_lr", "v_lr"):
            if key in hp:
                hp[key] = bj.schedules.inverse_power(hp[key], lr_decay)
    return hp


def record_iterates(state, data):
    """What `bj.run` records at each evaluation: the flattened iterates (metrics come after the
    run, from these, in one compiled evaluator shared by all algorithms; see `MetricEvaluator`)."""
    del data
    return {"theta": ravel_pytree(state.theta)[0], "phi": ravel_pytree(state.phi)[0]}


def make_single_run(setup, cell: Cell, steps: int, eval_every: int, eval_fn=record_iterates) -> Callable:
    """`(hp: dict of scalars, key, data) -> history` for one seed (vmapped by `BatchedRunner`)."""
    preset = bj.algorithms.get(cell.preset)
    static = _static_kwargs(cell.static)

    def one(hp, key, data):
        alg = preset(setup.problem, **static, **_traced_kwargs(hp, cell.static.get("lr_decay")))
        state = alg.init(setup.theta0, setup.phi0, key, data)
        _, history = bj.run(alg, state, data, num_steps=steps, eval_every=eval_every, eval_fn=eval_fn)
        return history

    return one


def make_mesh(n_devices: Optional[int] = None) -> Mesh:
    devices = jax.devices()
    if n_devices is not None:
        if n_devices > len(devices):
            raise ConfigError(f"devices={n_devices} but only {len(devices)} are available: {devices}.")
        devices = devices[:n_devices]
    return Mesh(np.asarray(devices), ("batch",))


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def batch_inputs(cells: Sequence[Cell], seeds: Sequence[int], size: int, dtype):
    """Flattened (grid point x seed) hyperparameter arrays and keys, padded to `size` rows."""
    n = len(cells) * len(seeds)
    rows = [(c, s) for c in cells for s in seeds]
    rows += [rows[-1]] * (size - n)
    hp = {k: jnp.asarray([c.traced[k] for c, _ in rows], dtype) for k in cells[0].traced}
    keys = jnp.stack([jax.random.PRNGKey(s) for _, s in rows])
    return hp, keys


class Timings(NamedTuple):
    compile_s: float          # ahead-of-time compilation of the batched call
    run_s: float              # execution of the batched call (block_until_ready)
    batch: int                # rows of the batched call (padded)
    n_devices: int
    seconds_per_step: float   # un-batched single-seed run without metrics (NaN if timing is off)
    timing_compile_s: float


class MetricEvaluator:
    """The configured metrics of many recorded iterates: one compiled, sharded function of a fixed
    number of rows (`rows` per device), called on padded chunks, so it compiles once per run."""

    def __init__(self, setup, metrics: Sequence[str], reference: dict, mesh: Mesh, rows: int = 64):
        if mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1:
            # jaxlib's batched LAPACK kernels block inside the shared CPU pool: one device only
            mesh = Mesh(mesh.devices.flat[:1], ("batch",))
        self.mesh = mesh
        self.rows = rows * mesh.devices.size
        self.sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.data = jax.device_put(setup.data, NamedSharding(mesh, PartitionSpec()))
        eval_fn = setup.make_eval(list(metrics), reference)
        unravel_theta = ravel_pytree(setup.theta0)[1]
        unravel_phi = ravel_pytree(setup.phi0)[1]

        def evaluate(theta, phi, data):
            return jax.vmap(lambda t, p: eval_fn(Iterate(unravel_theta(t), unravel_phi(p)), data))(theta, phi)

        self._fn = jax.jit(evaluate, in_shardings=(self.sharding, self.sharding, NamedSharding(mesh, PartitionSpec())),
                           out_shardings=self.sharding)
        self.compile_s = 0.0
        self._compiled = None

    def __call__(self, theta: np.ndarray, phi: np.ndarray) -> Dict[str, np.ndarray]:
        """theta (N, d_theta), phi (N, d_phi) -> {metric: (N,)}."""
        n = theta.shape[0]
        outs = []
        for start in range(0, n, self.rows):
            t, p = theta[start:start + self.rows], phi[start:start + self.rows]
            pad = self.rows - t.shape[0]
            t = np.concatenate([t, np.repeat(t[-1:], pad, 0)]) if pad else t
            p = np.concatenate([p, np.repeat(p[-1:], pad, 0)]) if pad else p
            t, p = jax.device_put(t, self.sharding), jax.device_put(p, self.sharding)
            if self._compiled is None:
                begin = time.perf_counter()
                self._compiled = self._fn.lower(t, p, self.data).compile()
                self.compile_s = time.perf_counter() - begin
            outs.append({k: np.asarray(v)[:self.rows - pad] for k, v in self._compiled(t, p, self.data).items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


class Iterate(NamedTuple):
    """What a metric sees: the iterates at an evaluation (metrics are functions of theta and phi)."""
    theta: Any
    phi: Any


class BatchedRunner:
    """Compiles and runs chunks of a group; keeps compiled executables for reuse."""

    def __init__(self, setup, cfg: dict, mesh: Mesh):
        self.setup, self.cfg, self.mesh = setup, cfg, mesh
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.data = jax.device_put(setup.data, self.replicated)
        self.dtype = jnp.asarray(setup.theta0).dtype
        self._compiled: Dict[Tuple[str, int], Any] = {}
        self._per_step: Dict[str, Tuple[float, float]] = {}

    def _executable(self, cell: Cell, size: int):
        key = (cell.group_key(), size)
        if key in self._compiled:
            return self._compiled[key], 0.0
        one = make_single_run(self.setup, cell, *run_length(cell, self.cfg))
        fn = jax.jit(jax.vmap(one, in_axes=(0, 0, None)),
                     in_shardings=(self.batch_sharding, self.batch_sharding, self.replicated),
                     out_shardings=self.batch_sharding)
        hp, keys = batch_inputs([cell], [0], size, self.dtype)
        start = time.perf_counter()
        compiled = fn.lower(hp, keys, self.data).compile()
        elapsed = time.perf_counter() - start
        self._compiled[key] = compiled
        return compiled, elapsed

    def seconds_per_step(self, cell: Cell) -> Tuple[float, float]:
        """(seconds per outer step, compile seconds) of one un-batched seed, metrics off."""
        if not self.cfg["timing"]:
            return float("nan"), 0.0
        gk = cell.group_key()
        if gk not in self._per_step:
            steps = min(self.cfg["timing_steps"], run_length(cell, self.cfg)[0])
            one = make_single_run(self.setup, cell, steps, steps, None)
            device = self.mesh.devices.flat[0]
            data = jax.device_put(self.setup.data, device)
            hp = {k: jnp.asarray(v, self.dtype) for k, v in cell.traced.items()}
            key = jax.random.PRNGKey(0)
            start = time.perf_counter()
            compiled = jax.jit(one).lower(hp, key, data).compile()
            compile_s = time.perf_counter() - start
            jax.block_until_ready(compiled(hp, key, data))        # warm-up (allocations)
            best = math.inf
            for _ in range(self.cfg["timing_repeats"]):           # the least disturbed of a few runs
                start = time.perf_counter()
                jax.block_until_ready(compiled(hp, key, data))
                best = min(best, time.perf_counter() - start)
            self._per_step[gk] = (best / steps, compile_s)
        return self._per_step[gk]

    def run(self, cells: Sequence[Cell], seeds: Sequence[int], size: Optional[int] = None):
        """Histories `{name: array (len(cells), len(seeds), n_evals)}` and the `Timings`."""
        n_dev = self.mesh.devices.size
        size = _pad(size or len(cells) * len(seeds), n_dev)
        compiled, compile_s = self._executable(cells[0], size)
        hp, keys = batch_inputs(cells, seeds, size, self.dtype)
        hp = jax.device_put(hp, self.batch_sharding)
        keys = jax.device_put(keys, self.batch_sharding)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(hp, keys, self.data))
        run_s = time.perf_counter() - start
        n = len(cells) * len(seeds)
        hist = {k: np.asarray(v)[:n].reshape((len(cells), len(seeds)) + v.shape[1:]) for k, v in out.items()}
        per_step, timing_compile = self.seconds_per_step(cells[0])
        return hist, Timings(compile_s, run_s, size, n_dev, per_step, timing_compile)


def groups(cells: Sequence[Cell], chunk: int = 0) -> List[List[Cell]]:
    """Cells grouped by static settings (config order), each split into chunks of <= `chunk`."""
    by_key: Dict[str, List[Cell]] = {}
    for c in cells:
        by_key.setdefault(c.group_key(), []).append(c)
    out = []
    for members in by_key.values():
        step = chunk or len(members)
        out.extend(members[i:i + step] for i in range(0, len(members), step))
    return out


__all__ = ["BatchedRunner", "Cell", "Timings", "batch_inputs", "check_algorithm", "expand", "experiment_key",
           "groups", "Iterate", "MetricEvaluator", "make_mesh", "make_single_run", "record_iterates",
           "preset_params", "run_length"]

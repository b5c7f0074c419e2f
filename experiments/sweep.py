"""Sweeps: seeds x hyperparameter grid in one compiled, sharded call per group of cells.

A *cell* is one algorithm label at one grid point (all seeds of it). Each cell's algorithm is
built concretely from its config keyword arguments (`build_algorithm`) and split by the library's
own declaration of what is a hyperparameter:

    dyn, static = eqx.partition(alg, eqx.is_array)

Traced (swept inside one compiled function) are exactly the array fields of the built algorithm:
step sizes, momentum weights, the constants c and p of `bj.schedules.inverse_power` schedules
(including the presets' decay exponents `upper_decay`/`lower_decay`), linear-solver step sizes
and tolerances; every Python float (and a float written as an int, `upper_lr = 1`) that a preset
turns into an array. Everything else is static: loop lengths, batch sizes, samplers, solver
iteration counts, flags, the problem. Whether a key is one or the other is decided by the preset,
not by this module: a grid over `upper_lr` shares one compilation, a grid over `lower_steps`,
`batch_size` or `linear_solver.maxiter` compiles once per value.

Cells whose static parts are equal (and whose array fields have the same structure, shapes and
dtypes, and whose runs have the same length) form a *group*, also across algorithm labels: one
function

    vmap over the batch axis (grid point x seed) of  alg = eqx.combine(dyn, static); bj.run(alg, ...)

is jitted once per group, called with the cells' `dyn` parts stacked along the batch axis. The
batch axis is sharded over all devices (`NamedSharding` over a 1-D mesh "batch"; the batch is
padded to a multiple of the device count with copies of its last row); the data are replicated.
A problem that draws its data or start per seed (`Workload.for_seed`: LancBiO's synthetic
problem, hyper-cleaning's corruption, MORBiT's tasks) is split by `PerSeed`: the arrays every
seed shares are passed once (replicated), those that differ are stacked along the batch axis
with the rows. In a multi-process job (`jax.distributed`, see `experiments.__main__`) "all devices" are those of
every process: each process builds the same inputs, `jax.device_put` places its own devices'
shards (JAX checks that the processes' values agree), and the histories are gathered back to
every process (`multihost_utils.process_allgather`) after the call.

Keys of an `[algorithms.<label>]` table are the preset's keyword arguments (read from its
signature, `keywords`), plus the special keys `preset` (default: the label; single-objective and
`bj.algorithms.MULTI_OBJECTIVE` presets), `label` (the figure's name for the curve), `step` and
`ratio` (the benchmark parametrisation lower_lr = step, upper_lr = step / ratio), `lr_decay = p`
(pass upper_lr, lower_lr, v_lr as the schedules `bj.schedules.inverse_power(lr, p)`, for presets
with constant steps), `steps` / `eval_every` (this algorithm's own run length, e.g. fewer outer
steps for double-loop methods). `batch_size = "full"` means None (full batch), `batch_size =
{upper = 64, lower = 128}` an (upper, lower) pair, `linear_solver = {name = "cg", maxiter = 10}`
the solver `bj.linear_solvers.cg(maxiter=10)`, `linear_solver = {name = "damped", damping = 0.01,
solver = {name = "cg", maxiter = 10}}` damps it, and `lower_opt = {name = "adam"}` (any
`<level>_opt`) the optax rule `optax.adam(lower_lr)` (`make_optimizer`; `clip = 1.0` clips the
step's global norm first). A key the preset's (solver's, optax rule's) signature does not name is
`UnknownKeys` listing the closest valid ones; `check_algorithm` then builds every grid point (with
a placeholder problem), so a bad value is a one-line `ConfigError` before any work.

Cell ids are a readable prefix (label and varying grid coordinates) and a hash of the experiment
settings, the label, the preset and the cell's config keyword arguments, so they depend on the
config only.

Metrics are not computed inside the runs: `bj.run` records the iterates (theta, phi and v, the
flattened inexact arrays; `record_iterates`) every `eval_every` steps and `MetricEvaluator`
evaluates the configured metrics on all of them after the run, in one compiled function shared by every algorithm of the experiment (the expensive
references, e.g. a Newton solve for w*(theta), are compiled once, and the runs' wall time
contains no metric work).

Timing (see `Timings`): compile time is measured ahead of time (`lower().compile()`), the run
with `jax.block_until_ready`; a separate un-batched single-seed run without metrics gives the
seconds per outer step used for the wall-time axis of the figures.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import math
import re
import time
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bilevel_jax as bj
from bilevel_jax.cache import same_code_rule
from experiments.config import ALGORITHM_SPECIAL, ConfigError, check_keywords, check_names, seed_list

RUN_KEYS = ("steps", "eval_every")                   # the run's length, not preset arguments
LR_KEYS = ("upper_lr", "lower_lr", "v_lr")           # the step sizes `lr_decay` turns into schedules


class Cell(NamedTuple):
    label: str            # the [algorithms.<label>] table
    preset: str           # bj.algorithms name
    spec: dict            # the config's keyword arguments at this grid point (JSON-able, special keys kept)
    point: dict           # the grid coordinates of this cell (varying keys only)
    cell_id: str


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


def _grid(table: dict) -> Tuple[List[Tuple[str, list]], List[str]]:
    """The grid axes `[(dotted key, values)]` of an algorithm table and the varying keys."""
    items = _flatten({k: v for k, v in table.items() if k != "preset"})
    axes = [(k, v if isinstance(v, list) else [v]) for k, v in items]
    return axes, [k for k, vals in axes if len(vals) > 1]


def _points(table: dict):
    """(config keyword arguments, varying coordinates) of every grid point, in config order."""
    axes, varying = _grid(table)
    for combo in itertools.product(*(vals for _, vals in axes)):
        items = list(zip((k for k, _ in axes), combo))
        yield _unflatten(items), {k: v for k, v in items if k in varying}


# --------------------------------------------------------------------------------------------------
# building an algorithm from its config keyword arguments

def keywords(fn: Callable, skip: int = 0, forwarded: Sequence[str] = ()) -> Tuple[str, ...]:
    """The keyword arguments `fn` takes, from its signature: every named parameter after the first
    `skip` positional ones (`inspect.signature` follows `functools.wraps` to the wrapped builder
    and a preset's own `__signature__`), and `forwarded` when `fn` has a `**kwargs` (the options a
    preset passes on to its loop, `bj.algorithms.LOOP_OPTIONS`)."""
    params = list(inspect.signature(fn).parameters.values())
    named = [p.name for p in params[skip:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        named += list(forwarded)
    return tuple(dict.fromkeys(named))


def _build(build: Callable[..., Any], kwargs: dict, where: str):
    """`build(**kwargs)` (whose keys are checked), with a bad value turned into a one-line
    ConfigError that names `where` (the config table)."""
    try:
        return build(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def linear_solvers() -> Dict[str, Callable]:
    """The linear-solver factories by name (`bj.linear_solvers.REGISTRY`)."""
    return {name: entry.build for name, entry in sorted(bj.linear_solvers.REGISTRY.items())}


def make_linear_solver(spec, where: str):
    """`bj.linear_solvers.<name>(**kw)` of a `linear_solver = {name = ..., ...}` table; a wrapper (tag
    "wrapper": damped, normal) takes its inner solver as a table, `{name = "damped", damping = ...,
    solver = {name = ..., ...}}`."""
    solvers = linear_solvers()
    if not isinstance(spec, dict) or spec.get("name") not in solvers:
        raise ConfigError(f"{where} must be a table with name one of {', '.join(solvers)}, got {spec!r}.")
    if "wrapper" in bj.linear_solvers.REGISTRY[spec["name"]].tags:
        wrap = solvers[spec["name"]]
        check_keywords(spec, ["name", "solver", *keywords(wrap, skip=1)], where, repr(spec["name"]))
        inner = make_linear_solver(spec.get("solver"), f"{where}.solver")
        return _build(lambda **kw: wrap(inner, **kw), {k: v for k, v in spec.items() if k not in ("name", "solver")},
                      where)
    factory = solvers[spec["name"]]
    check_keywords(spec, ["name", *keywords(factory)], where, repr(spec["name"]))
    return _build(factory, {k: v for k, v in spec.items() if k != "name"}, where)


@functools.lru_cache(maxsize=None)
def optimizers() -> Dict[str, Callable]:
    """The optax step rules by name: the public optax functions that take a `learning_rate`
    (from their signatures: sgd, adam, adamw, rmsprop, lion, ...)."""
    out = {}
    for name in dir(optax):
        fn = getattr(optax, name)
        if name.startswith("_") or not inspect.isfunction(fn):
            continue
        try:
            takes_lr = "learning_rate" in inspect.signature(fn).parameters
        except (TypeError, ValueError):   # no introspectable signature
            continue
        if takes_lr:
            out[name] = fn
    return dict(sorted(out.items()))


def make_optimizer(spec, learning_rate, where: str):
    """`optax.<name>(**kw)` of a `<level>_opt = {name = ..., ...}` table (`upper_opt`, `lower_opt`,
    `v_opt`, `dual_opt`, ...): its `learning_rate` defaults to the table's `<level>_lr`; `clip = c`
    chains `optax.clip_by_global_norm(c)` before the rule. Equal tables build equal rules
    (`bj.cache.same_code_rule`), so their cells share one compiled function."""
    rules = optimizers()
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where} must be a table {{name = <optax rule>, ...}}, e.g. {{name = \"adam\"}}; "
                          f"got {spec!r}.")
    check_names([spec["name"]], rules, where, what="optimizer")
    factory = rules[spec["name"]]
    check_keywords(spec, ["name", "clip", *keywords(factory)], where, repr(spec["name"]))
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "clip")}
    if "learning_rate" not in kwargs and learning_rate is not None:
        kwargs["learning_rate"] = learning_rate
    rule = _build(factory, kwargs, where)
    if "clip" in spec:
        rule = optax.chain(_build(optax.clip_by_global_norm, {"max_norm": spec["clip"]}, f"{where}.clip"), rule)
    return same_code_rule(rule)


def _batch_size(value):
    if value == "full":
        return None
    if isinstance(value, dict):
        return (value.get("upper"), value.get("lower"))
    return value


def algorithm_kwargs(spec: dict, where: str) -> dict:
    """The preset keyword arguments of a cell's config keyword arguments: step/ratio -> lower_lr,
    upper_lr; lr_decay -> inverse_power schedules; batch_size "full"/{upper, lower}; a
    linear_solver table -> the solver; a `<level>_opt` table -> the optax rule (`make_optimizer`);
    the run keys (steps, eval_every) and the label left out."""
    kw = {k: v for k, v in spec.items() if k not in RUN_KEYS + ("lr_decay", "label")}
    if "step" in kw:
        step, ratio = kw.pop("step"), kw.pop("ratio")
        try:
            kw["lower_lr"], kw["upper_lr"] = step, step / ratio
        except (TypeError, ZeroDivisionError) as e:
            raise ConfigError(f"{where}: step = {step!r}, ratio = {ratio!r}: {e}") from None
    if "batch_size" in kw:
        kw["batch_size"] = _batch_size(kw["batch_size"])
    if "linear_solver" in kw:
        kw["linear_solver"] = make_linear_solver(kw["linear_solver"], f"{where}.linear_solver")
    decay = spec.get("lr_decay")
    if decay:
        for key in LR_KEYS:
            if key in kw:
                try:
                    kw[key] = bj.schedules.inverse_power(kw[key], decay)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{where}: lr_decay: {e}") from None
    for key in [k for k in kw if k.endswith("_opt") and isinstance(kw[k], dict)]:
        kw[key] = make_optimizer(kw[key], kw.get(key[:-len("_opt")] + "_lr"), f"{where}.{key}")
    return kw


def preset_keys(preset: str) -> Tuple[str, ...]:
    """The keys an [algorithms.<label>] table of `preset` may set: the preset's keyword arguments
    (`keywords` of its signature) and the special keys (`ALGORITHM_SPECIAL`)."""
    return (*keywords(bj.algorithms.get(preset), skip=1, forwarded=bj.algorithms.LOOP_OPTIONS), *ALGORITHM_SPECIAL)


def build_algorithm(problem, preset: str, spec: dict, where: str = "algorithm") -> bj.Algorithm:
    """The algorithm of a cell, built concretely: `bj.algorithms.<preset>(problem, **kwargs)`.
    A key the preset does not take raises `UnknownKeys` (the closest valid keys named), a bad
    value a one-line ConfigError naming `where`."""
    check_keywords(spec, preset_keys(preset), where, repr(preset))
    factory = bj.algorithms.get(preset)
    return _build(lambda **kw: factory(problem, **kw), algorithm_kwargs(spec, where), where)


PRESETS = {**bj.algorithms.MULTI_OBJECTIVE, **bj.algorithms.ALGORITHMS}   # every name `bj.algorithms.get` knows


def placeholder_problem(preset: str = "soba"):
    """A problem `preset` accepts (a `bj.MultiObjectiveProblem` for the multi-objective presets),
    to build a table's algorithm before the real problem is loaded; presets store it, never call it."""
    zero = lambda theta, phi, batch: 0.0   # noqa: E731
    if preset in bj.algorithms.MULTI_OBJECTIVE and preset not in bj.algorithms.ALGORITHMS:
        return bj.MultiObjectiveProblem(zero, zero, num_tasks=2)
    return bj.BilevelProblem(zero, zero)


def check_algorithm(label: str, table: dict) -> str:
    """Validate one [algorithms.<label>] table by building every grid point of it (with a
    placeholder problem): the preset name, its keys (unknown ones listed with the valid ones) and
    values. Returns the preset name."""
    preset = table.get("preset", label)
    if preset not in PRESETS:
        raise ConfigError(f"algorithms.{label}: unknown algorithm {preset!r}; valid names: "
                          f"{', '.join(sorted(PRESETS))} (use preset = \"...\" to give a table another label).")
    for key in RUN_KEYS:
        if key in table and (isinstance(table[key], bool) or not isinstance(table[key], int) or table[key] < 1):
            raise ConfigError(f"algorithms.{label}.{key} must be a positive int, got {table[key]!r}.")
    problem = placeholder_problem(preset)
    for spec, point in _points(table):
        where = f"algorithms.{label}" + (f" at {point}" if point else "")
        build_algorithm(problem, preset, spec, where)
    return preset


def _slug(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")


def experiment_key(cfg: dict) -> dict:
    """What a cell's numbers depend on besides its own hyperparameters."""
    return {"problem": cfg["problem"], "seeds": seed_list(cfg), "steps": cfg["steps"],
            "eval_every": cfg["eval_every"], "metrics": list(cfg["metrics"]), "x64": cfg["x64"]}


def expand(cfg: dict) -> List[Cell]:
    """All cells of a config (the `only` labels, if given), in config order; each table is
    validated first (`check_algorithm`)."""
    cells = []
    base = experiment_key(cfg)
    for label, table in cfg["algorithms"].items():
        if cfg["only"] and label not in cfg["only"]:
            continue
        preset = check_algorithm(label, table)
        for spec, point in _points(table):
            digest = hashlib.sha256(json.dumps([base, label, preset, spec], sort_keys=True)
                                    .encode()).hexdigest()[:10]
            name = "-".join([label] + [f"{k}={_slug(v)}" for k, v in point.items()] + [digest])
            cells.append(Cell(label, preset, spec, point, name[:180]))
    return cells


def run_length(cell: Cell, cfg: dict) -> Tuple[int, int]:
    """(steps, eval_every) of a cell: the algorithm table's own, else the experiment's."""
    steps = cell.spec.get("steps", cfg["steps"])
    every = cell.spec.get("eval_every", cfg["eval_every"])
    if steps % every:
        raise ConfigError(f"algorithms.{cell.label}: steps={steps} is not a multiple of eval_every={every}.")
    return steps, every


# --------------------------------------------------------------------------------------------------
# splitting a built algorithm into its traced and static parts, and grouping

def _as_float(x):
    """An integer array field is a float hyperparameter written as an int (`upper_lr = 1`): made a
    float (weak type kept), so it stacks with the float values of a grid."""
    return x * 1.0 if jnp.issubdtype(x.dtype, jnp.integer) else x


class Split(NamedTuple):
    """A cell's algorithm as `eqx.partition(alg, eqx.is_array)`, and its group key."""

    dyn: Any              # the array fields (traced, stacked along the batch axis)
    static: Any           # everything else (hashable; equal for equal static settings)
    key: Hashable         # (static, structure/shapes/dtypes of dyn, steps, eval_every)


def split(cell: Cell, problem: bj.BilevelProblem, cfg: dict, mesh: Optional[Mesh] = None) -> Split:
    """Build the cell's algorithm for `problem` and partition it (see the module docstring); with
    a `mesh` that has a "data" axis, the algorithm runs data-parallel over it (`bj.data_parallel`)."""
    alg = build_algorithm(problem, cell.preset, cell.spec, f"algorithms.{cell.label}")
    if mesh is not None and DATA in mesh.axis_names:
        try:
            alg = bj.data_parallel(alg, mesh=mesh, axis=DATA)
        except ValueError as e:
            raise ConfigError(f"algorithms.{cell.label}: mesh.data = {mesh.shape[DATA]}: {e}") from None
    dyn, static = eqx.partition(alg, eqx.is_array)
    dyn = jax.tree_util.tree_map(_as_float, dyn)
    leaves, treedef = jax.tree_util.tree_flatten(dyn)
    avals = tuple((x.shape, str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)
    try:
        hash(static)
    except TypeError as e:
        raise ConfigError(f"algorithms.{cell.label}: the static part of {cell.preset!r} is not hashable "
                          f"({e}); it cannot key a compiled function.") from None
    return Split(dyn, static, (static, treedef, avals, run_length(cell, cfg)))


def traced_values(dyn) -> Dict[str, Any]:
    """The array fields of an algorithm as `{path: value}` (what a cell's sweep traced), JSON-able."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(dyn):
        arr = np.asarray(x)
        out[jax.tree_util.keystr(path).lstrip(".")] = arr.item() if arr.ndim == 0 else arr.tolist()
    return out


def _group(cells: Sequence[Cell], key_of: Callable[[Cell], Hashable], chunk: int) -> List[List[Cell]]:
    by_key: Dict[Hashable, List[Cell]] = {}
    for c in cells:
        by_key.setdefault(key_of(c), []).append(c)
    out = []
    for members in by_key.values():
        step = chunk or len(members)
        out.extend(members[i:i + step] for i in range(0, len(members), step))
    return out


def groups(cells: Sequence[Cell], problem: bj.BilevelProblem, cfg: dict, chunk: int = 0) -> List[List[Cell]]:
    """Cells grouped by equal static parts (`split(...).key`; order of first appearance; a group
    may hold several labels), each split into chunks of <= `chunk` cells."""
    return _group(cells, lambda c: split(c, problem, cfg).key, chunk)


def _flat(tree) -> jax.Array:
    """The inexact arrays of a pytree (an equinox model included) as one vector."""
    return ravel_pytree(eqx.filter(tree, eqx.is_inexact_array))[0]


def unflattener(like) -> Callable:
    """The inverse of `_flat` for pytrees shaped like `like` (its other leaves taken from `like`)."""
    arrays, rest = eqx.partition(like, eqx.is_inexact_array)
    unravel = ravel_pytree(arrays)[1]
    return lambda flat: eqx.combine(unravel(flat), rest)


def record_iterates(state, data):
    """What `bj.run` records at each evaluation: the flattened iterates theta, phi and v (the
    state's linear-system variable when it has phi's size, else NaN); metrics come after the run,
    from these, in one compiled evaluator shared by all algorithms (see `MetricEvaluator`)."""
    del data
    phi = _flat(state.phi)
    v = getattr(state, "v", None)
    v = _flat(v) if v is not None else None
    return {"theta": _flat(state.theta), "phi": phi,
            "v": v if v is not None and v.shape == phi.shape else jnp.full_like(phi, jnp.nan)}


class PerSeed(NamedTuple):
    """Pytrees of one structure, one per seed (each seed's `(data, theta0, phi0)`, or whole
    instances), as the array leaves every seed shares (passed once) and those that differ
    (stacked over the seeds, `(seeds, ...)`); `tree` puts one seed's pytree back together."""

    rest: Any                   # the non-array part (seed 0's)
    treedef: Any                # of the array leaves
    shared_index: Tuple[int, ...]
    shared: tuple               # the arrays every seed has (compared by value)
    varying_index: Tuple[int, ...]
    varying: tuple              # the others, stacked over the seeds

    @classmethod
    def of(cls, trees: Sequence[Any]) -> "PerSeed":
        parts = [eqx.partition(t, eqx.is_array) for t in trees]
        leaves, treedef = jax.tree_util.tree_flatten(parts[0][0])
        columns = [[x] for x in leaves]
        for arrays, _ in parts[1:]:
            more, other = jax.tree_util.tree_flatten(arrays)
            if other != treedef:
                raise ValueError(f"the seeds' instances differ in structure: {treedef} and {other}.")
            for column, x in zip(columns, more):
                column.append(x)
        same = [all(_equal(c[0], x) for x in c[1:]) for c in columns]
        return cls(parts[0][1], treedef, tuple(i for i, e in enumerate(same) if e),
                   tuple(c[0] for c, e in zip(columns, same) if e), tuple(i for i, e in enumerate(same) if not e),
                   tuple(np.stack([np.asarray(x) for x in c]) for c, e in zip(columns, same) if not e))

    def at(self, index) -> tuple:
        """The varying leaves of the seeds at positions `index` (an int, or an array: one per row)."""
        return tuple(v[index] for v in self.varying)

    def tree(self, shared: Sequence[Any], varying: Sequence[Any]):
        """The pytree of one seed from the shared leaves and that seed's varying leaves."""
        leaves = [None] * (len(self.shared_index) + len(self.varying_index))
        for i, x in zip(self.shared_index, shared):
            leaves[i] = x
        for i, x in zip(self.varying_index, varying):
            leaves[i] = x
        return eqx.combine(jax.tree_util.tree_unflatten(self.treedef, leaves), self.rest)


def _equal(a, b) -> bool:
    if a is b:
        return True
    if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def starts_of(instances: Sequence[Any]) -> PerSeed:
    """`PerSeed` of the seeds' `(data, theta0, phi0)`: what a run needs besides its algorithm."""
    return PerSeed.of([(i.data, i.theta0, i.phi0) for i in instances])


def make_single_run(starts: PerSeed, static, steps: int, eval_every: int, eval_fn=record_iterates) -> Callable:
    """`(dyn, key, varying, shared) -> history` for one seed: its `(data, theta0, phi0)` from
    `starts` (shared leaves and the seed's varying ones), `alg = eqx.combine(dyn, static)`, its
    init and `bj.run` (vmapped over dyn, key and varying by `BatchedRunner`)."""

    def one(dyn, key, varying, shared):
        data, theta0, phi0 = starts.tree(shared, varying)
        alg = eqx.combine(dyn, static)
        state = alg.init(theta0, phi0, key, data)
        _, history = bj.run(alg, state, data, num_steps=steps, eval_every=eval_every, eval_fn=eval_fn)
        return history

    return one


DATA = "data"   # the mesh axis that splits every run's samples (config `mesh = {data = N}`)


def make_mesh(n_devices: Optional[int] = None, data: int = 1) -> Mesh:
    """The mesh over the devices of every process of the job (`jax.devices()`), or over the first
    `n_devices` of each process: 1-D "batch" (the cells x seeds rows), or with `data` > 1 the 2-D
    ("batch", "data") mesh whose rows of `data` consecutive devices (those of one process first,
    then the next process's) each run one row data-parallel."""
    devices = jax.devices()
    if n_devices is not None:
        local = jax.local_devices()
        if n_devices > len(local):
            where = " per process" if jax.process_count() > 1 else ""
            raise ConfigError(f"devices={n_devices} but only {len(local)} are available{where}: {local}.")
        by_process: Dict[int, list] = {}
        for d in devices:
            by_process.setdefault(d.process_index, []).append(d)
        devices = [d for mine in by_process.values() for d in mine[:n_devices]]
    if data == 1:
        return Mesh(np.asarray(devices), ("batch",))
    if len(devices) % data:
        raise ConfigError(f"mesh.data = {data} does not divide the job's {len(devices)} devices.")
    return Mesh(np.asarray(devices).reshape(-1, data), ("batch", DATA))


def local_mesh(mesh: Mesh) -> Mesh:
    """The devices of `mesh` that this process drives (all of them in a single-process run), as a
    1-D "batch" mesh: for work that one process does alone, such as the metrics of the cells it writes."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return Mesh(np.asarray(mine), ("batch",))


def shared_shardings(mesh: Mesh, starts: PerSeed, data) -> tuple:
    """Where the shared leaves of `starts` live: a leaf of the problem's `data` is split along its
    sample axis over "data" (replicated over the rows) when the mesh has that axis, every other
    leaf is replicated. Data that differ per seed cannot be split so (a ConfigError)."""
    n_data = len(jax.tree_util.tree_leaves(eqx.filter(data, eqx.is_array)))
    split = DATA in mesh.axis_names
    if split and any(i < n_data for i in starts.varying_index):
        raise ConfigError(f"mesh.data = {mesh.shape[DATA]} splits the data every seed shares, but this problem "
                          "draws its data per seed; run it without mesh.data.")
    return tuple(NamedSharding(mesh, PartitionSpec(DATA) if split and i < n_data and np.ndim(x) else PartitionSpec())
                 for i, x in zip(starts.shared_index, starts.shared))


def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def batch_inputs(dyns: Sequence[Any], seeds: Sequence[int], size: int, positions: Optional[Sequence[int]] = None):
    """The cells' `dyn` parts stacked over (cell x seed) rows, the rows' PRNG keys and the rows'
    seed positions (`positions[j]` for seed j, default j: where the seed's varying leaves are in a
    `PerSeed`), padded to `size` rows with copies of the last."""
    positions = range(len(seeds)) if positions is None else positions
    rows = [(d, s, p) for d in dyns for s, p in zip(seeds, positions)]
    rows += [rows[-1]] * (size - len(rows))
    dyn = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *(d for d, _, _ in rows))
    keys = jnp.stack([jax.random.PRNGKey(s) for _, s, _ in rows])
    return dyn, keys, np.asarray([p for _, _, p in rows])


class Timings(NamedTuple):
    compile_s: float          # ahead-of-time compilation of the batched call (0 when reused)
    run_s: float              # execution of the batched call (block_until_ready)
    batch: int                # rows of the batched call (padded)
    n_devices: int
    seconds_per_step: float   # un-batched single-seed run without metrics (NaN if timing is off)
    timing_compile_s: float


class MetricEvaluator:
    """The configured metrics of many recorded iterates: one compiled, sharded function of a fixed
    number of rows (`rows` per device), called on padded chunks, so it compiles once per run. The
    instance is an argument of that function: a problem drawn per seed (`Workload.for_seed`) is
    evaluated seed by seed (`per_seed`), each seed's rows with its own instance."""

    def __init__(self, workload, metrics: Sequence[str], reference: dict, mesh: Mesh, rows: int = 64,
                 seeds: Sequence[int] = (0,)):
        if mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1:
            # jaxlib's batched LAPACK kernels block inside the shared CPU pool: one device only
            mesh = Mesh(mesh.devices.flat[:1], ("batch",))
        self.mesh = mesh
        self.rows = rows * mesh.devices.size
        self.sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        instances = workload.instances(seeds)
        self.instances = PerSeed.of(instances)
        self.shared = jax.device_put(self.instances.shared, self.replicated)
        eval_fn = workload.make_eval(list(metrics), reference)
        theta_of, phi_of = unflattener(instances[0].theta0), unflattener(instances[0].phi0)

        def evaluate(theta, phi, v, varying, shared):
            inst = self.instances.tree(shared, varying)
            return jax.vmap(lambda t, p, w: eval_fn(Iterate(theta_of(t), phi_of(p), phi_of(w)), inst))(theta, phi, v)

        self._fn = jax.jit(evaluate, in_shardings=(self.sharding,) * 3 + (self.replicated, self.replicated),
                           out_shardings=self.sharding)
        self.compile_s = 0.0
        self._compiled = None

    @property
    def per_seed(self) -> bool:
        """Whether the seeds' instances differ (then `__call__` takes one seed's rows at a time)."""
        return bool(self.instances.varying)

    def __call__(self, theta: np.ndarray, phi: np.ndarray, v: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
        """theta (N, d_theta), phi and v (N, d_phi) of the seed at position `seed` -> {metric: (N,)}."""
        varying = jax.device_put(self.instances.at(seed), self.replicated)
        n = theta.shape[0]
        outs = []
        for start in range(0, n, self.rows):
            chunk = [x[start:start + self.rows] for x in (theta, phi, v)]
            pad = self.rows - chunk[0].shape[0]
            chunk = [jax.device_put(np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x, self.sharding)
                     for x in chunk]
            if self._compiled is None:
                begin = time.perf_counter()
                self._compiled = self._fn.lower(*chunk, varying, self.shared).compile()
                self.compile_s = time.perf_counter() - begin
            values = self._compiled(*chunk, varying, self.shared)
            outs.append({k: np.asarray(x)[:self.rows - pad] for k, x in values.items()})
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


class Iterate(NamedTuple):
    """What a metric sees: the iterates at an evaluation (metrics are functions of theta, phi and
    v, shaped like phi; v is NaN for an algorithm without one)."""
    theta: Any
    phi: Any
    v: Any = None


def check_init(cell: Cell, part: Split, starts: PerSeed, shared) -> None:
    """Trace the cell's `init` on the first seed's data (`eqx.filter_eval_shape`: no computation),
    so what `init` rejects (a batch size larger than the data, data the objectives refuse) is a one-line
    ConfigError naming the algorithm table before any run, not a traceback from inside `jit`."""
    alg = eqx.combine(part.dyn, part.static)
    data, theta0, phi0 = starts.tree(shared, starts.at(0))
    try:
        eqx.filter_eval_shape(lambda key: alg.init(theta0, phi0, key, data), jax.random.PRNGKey(0))
    except ValueError as e:
        raise ConfigError(f"algorithms.{cell.label}: {e}") from None


class BatchedRunner:
    """Builds and splits the cells' algorithms, compiles one executable per (group, batch size)
    and runs chunks of a group; keeps the compiled executables for reuse. The seeds' starts
    (`(data, theta0, phi0)` of each seed's instance, `starts_of`) are split into the arrays every
    seed shares (placed once, `shared_shardings`) and those stacked with the rows."""

    def __init__(self, workload, cfg: dict, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.seeds = seed_list(cfg)
        instances = workload.instances(self.seeds)
        self.instance = instances[0]
        self.starts = starts_of(instances)
        self.batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.shared_shardings = shared_shardings(mesh, self.starts, self.instance.data)
        self.shared = jax.device_put(self.starts.shared, self.shared_shardings)
        self._splits: Dict[str, Split] = {}
        self._checked: set = set()
        self._compiled: Dict[Tuple[Hashable, int], Any] = {}
        self._per_step: Dict[Hashable, Tuple[float, float]] = {}

    def split(self, cell: Cell) -> Split:
        """The cell's `Split`; the first cell of each group also has its `init` checked on the
        data (`check_init`)."""
        if cell.cell_id not in self._splits:
            part = split(cell, self.instance.problem, self.cfg, self.mesh)
            if part.key not in self._checked:
                check_init(cell, part, self.starts, self.starts.shared)
                self._checked.add(part.key)
            self._splits[cell.cell_id] = part
        return self._splits[cell.cell_id]

    def groups(self, cells: Sequence[Cell], chunk: int = 0) -> List[List[Cell]]:
        """`groups` of these cells for this runner's problem (the splits are kept for `run`)."""
        return _group(cells, lambda c: self.split(c).key, chunk)

    @property
    def num_compiled(self) -> int:
        """Batched executables compiled so far (one per group and batch size)."""
        return len(self._compiled)

    def _executable(self, part: Split, dyn, keys, varying):
        key = (part.key, keys.shape[0])
        if key in self._compiled:
            return self._compiled[key], 0.0
        one = make_single_run(self.starts, part.static, *part.key[-1])
        fn = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)),
                     in_shardings=(self.batch_sharding,) * 3 + (self.shared_shardings,),
                     out_shardings=self.batch_sharding)
        start = time.perf_counter()
        compiled = fn.lower(dyn, keys, varying, self.shared).compile()
        elapsed = time.perf_counter() - start
        self._compiled[key] = compiled
        return compiled, elapsed

    def seconds_per_step(self, cell: Cell) -> Tuple[float, float]:
        """(seconds per outer step, compile seconds) of one un-batched seed, metrics off, on this
        process's first device of the mesh (a run of this process alone)."""
        if not self.cfg["timing"]:
            return float("nan"), 0.0
        part = self.split(cell)
        if part.key not in self._per_step:
            steps = min(self.cfg["timing_steps"], run_length(cell, self.cfg)[0])
            one = make_single_run(self.starts, part.static, steps, steps, None)
            if DATA in self.mesh.axis_names:   # a data-parallel run: over its mesh (every process takes part)
                shared, args = self.shared, jax.device_put((part.dyn, self.starts.at(0)), self.replicated)
            else:
                device = local_mesh(self.mesh).devices.flat[0]
                shared, args = jax.device_put((self.starts.shared, (part.dyn, self.starts.at(0))), device)
            dyn, varying = args
            key = jax.random.PRNGKey(self.seeds[0])
            start = time.perf_counter()
            compiled = jax.jit(one).lower(dyn, key, varying, shared).compile()
            compile_s = time.perf_counter() - start
            jax.block_until_ready(compiled(dyn, key, varying, shared))        # warm-up (allocations)
            best = math.inf
            for _ in range(self.cfg["timing_repeats"]):           # the least disturbed of a few runs
                start = time.perf_counter()
                jax.block_until_ready(compiled(dyn, key, varying, shared))
                best = min(best, time.perf_counter() - start)
            self._per_step[part.key] = (best / steps, compile_s)
        return self._per_step[part.key]

    def _positions(self, seeds: Sequence[int]) -> List[int]:
        """Where each seed's varying leaves are in `starts` (any seeds when every seed shares the
        problem; the config's seeds when it is drawn per seed)."""
        if not self.starts.varying:
            return [0] * len(seeds)
        missing = [s for s in seeds if s not in self.seeds]
        if missing:
            raise ValueError(f"seeds {missing} are not the config's {self.seeds}: their instances were not drawn.")
        return [self.seeds.index(s) for s in seeds]

    def run(self, cells: Sequence[Cell], seeds: Sequence[int], size: Optional[int] = None):
        """Histories `{name: array (len(cells), len(seeds), n_evals)}` and the `Timings` of one
        compiled call over all (cell x seed) rows; the cells must form (part of) one group.
        In a multi-process job every process calls this with the same cells (it is a collective)
        and gets all the histories; the timing pass runs on process 0 only (the process that
        records it), the others report NaN."""
        parts = [self.split(c) for c in cells]
        if any(p.key != parts[0].key for p in parts[1:]):
            raise ValueError("BatchedRunner.run: the cells differ in their static parts; split them with groups().")
        n_dev = self.mesh.devices.size
        size = _pad(size or len(cells) * len(seeds), n_dev)
        dyn, keys, rows = batch_inputs([p.dyn for p in parts], seeds, size, self._positions(seeds))
        dyn, keys, varying = jax.device_put((dyn, keys, self.starts.at(rows)), self.batch_sharding)
        compiled, compile_s = self._executable(parts[0], dyn, keys, varying)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(dyn, keys, varying, self.shared))
        run_s = time.perf_counter() - start
        n = len(cells) * len(seeds)
        out = multihost_utils.process_allgather(out, tiled=True)     # np.asarray in a single process
        hist = {k: v[:n].reshape((len(cells), len(seeds)) + v.shape[1:]) for k, v in out.items()}
        timed = jax.process_index() == 0 or DATA in self.mesh.axis_names   # a data-parallel run is a collective
        per_step, timing_compile = self.seconds_per_step(cells[0]) if timed else (math.nan, 0.0)
        if jax.process_index() != 0:
            per_step = math.nan
        return hist, Timings(compile_s, run_s, size, n_dev, per_step, timing_compile)


__all__ = ["BatchedRunner", "Cell", "DATA", "Iterate", "MetricEvaluator", "PRESETS", "PerSeed", "Split", "Timings",
           "algorithm_kwargs", "batch_inputs", "build_algorithm", "check_algorithm", "check_init", "expand",
           "experiment_key", "groups", "keywords", "linear_solvers", "local_mesh", "make_linear_solver", "make_mesh",
           "make_optimizer", "make_single_run", "optimizers", "placeholder_problem", "preset_keys", "record_iterates",
           "run_length", "shared_shardings", "split", "starts_of", "traced_values", "unflattener"]

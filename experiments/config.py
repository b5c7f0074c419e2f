"""Experiment configs: TOML files with a fixed schema, dotted `key=value` overrides, validation.

A config (see `configs/*.toml`) has top-level settings, a `[problem]` table, one
`[algorithms.<label>]` table per compared method, a `[plot]` table, an `[options]` table for
figure modules with custom logic, and a `[paper]` table of dotted overrides applied when
`full = true` (the paper's sizes). A list value of an algorithm hyperparameter is a grid axis.

    cfg = load("configs/quadratic.toml", ["steps=200", "algorithms.soba.upper_lr=[0.1, 0.3]"])

Overrides are parsed as TOML values (`steps=200`, `full=true`, `x=[1, 2]`, `s="a"`); a value that
is not valid TOML is taken as a string (`problem.path=/data/ijcnn1`). Precedence: file < `[paper]`
(when full) < command line. This module is pure Python: names that need the library (problems,
presets, metrics) are checked by `experiments.problems` / `experiments.sweep`, with the same kind
of error message (the valid names listed).
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Dict, Iterable, List, Tuple

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


def did_you_mean(names: Iterable[str], valid: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the first of `names` with a close valid spelling, else ""."""
    valid = [str(v) for v in valid]
    for name in names:
        close = difflib.get_close_matches(str(name), valid, n=1)
        if close:
            return f" Did you mean {close[0]!r}?"
    return ""


class ConfigError(ValueError):
    """A config or override that does not fit the schema; the message lists the valid choices."""


class UnknownKeys(ConfigError):
    """Names a config table gives that are not valid there, as data: `where` (the table),
    `unknown`, `valid` (both sorted) and `closest` ({unknown name: the valid names nearest to it,
    best first}); the message says the same in one line."""

    def __init__(self, message: str, where: str, unknown: Iterable[str], valid: Iterable[str]):
        super().__init__(message)
        self.where, self.unknown, self.valid = where, sorted(unknown), sorted(valid)
        self.closest = {u: difflib.get_close_matches(u, self.valid, n=3) for u in self.unknown}


def check_names(names: Iterable[str], valid: Iterable[str], where: str, what: str = "key") -> None:
    """`UnknownKeys` for the `names` that are not `valid`, with the closest valid spelling and the
    valid ones listed (`what`: "key", "optimizer", ...)."""
    valid = sorted(str(v) for v in valid)
    unknown = sorted(set(map(str, names)) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise UnknownKeys(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                          f"{where}.{did_you_mean(unknown, valid)} Valid {what}s: {listed}.", where, unknown, valid)


def check_keywords(given: Iterable[str], valid: Iterable[str], where: str, what: str) -> None:
    """`UnknownKeys` for the keys of a table (`where`) that the callable it builds (`what`, e.g.
    "'soba'") does not take, listing the valid ones."""
    valid = sorted(set(valid))
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise UnknownKeys(f"{where}: unknown key(s) {unknown} for {what}.{did_you_mean(unknown, valid)} "
                          f"Valid keys: {', '.join(valid)}.", where, unknown, valid)


# key -> (accepted types, default). `None` default: required or derived (see `_fill_defaults`).
TOP_LEVEL: Dict[str, Tuple[tuple, Any]] = {
    "name": ((str,), None),            # results go to <results_dir>/<name>[-full]/
    "title": ((str,), ""),
    "description": ((str,), ""),
    "figure": ((str,), "convergence"),  # module experiments.<figure> runs the config
    "seeds": ((int, list), 3),          # an int n means seeds 0..n-1
    "steps": ((int,), None),
    "eval_every": ((int,), None),
    "metrics": ((list,), None),
    "x64": ((bool,), True),
    "full": ((bool,), False),
    "devices": ((int, str), "auto"),    # CPU only: host devices to shard the batch over
    "mesh": ((dict,), {}),              # {data = N}: every cell data-parallel over N devices (bj.data_parallel)
    "timing": ((bool,), True),          # a separate single-run timing pass (the time axis)
    "timing_steps": ((int,), 1000),     # length of the timing run (time per step is constant)
    "timing_repeats": ((int,), 3),      # the timing run's minimum over this many repeats
    "results_dir": ((str,), "results"),
    "only": ((list, str), []),          # run/plot only these algorithm labels
    "chunk": ((int,), 0),               # grid points per compiled call (0: all of a group)
    "eval_rows": ((int,), 64),          # recorded iterates per metric-evaluation call
    "progress": ((bool,), True),
    "compile_cache": ((bool,), True),   # persistent XLA cache in <results_dir>/.jax-cache
    "init_timeout": ((int,), 300),      # multi-process job: seconds to wait for every process to join
    "problem": ((dict,), None),
    "algorithms": ((dict,), None),
    "defaults": ((dict,), {}),          # keys merged into every [algorithms.*] table (which wins)
    "plot": ((dict,), {}),
    "options": ((dict,), {}),
    "paper": ((dict,), {}),
}

PLOT_KEYS: Dict[str, Tuple[tuple, Any]] = {
    "metrics": ((list,), None),         # rows of the figure (default: the first metric)
    "x": ((list,), ["time", "oracles"]),  # columns: "time", "oracles", "step"
    "curves": ((str,), "best"),         # "best": best grid point per algorithm; "all": every cell
    "select_by": ((str,), None),        # metric that ranks grid points (default: first plot metric)
    "logy": ((bool,), True),
    "logx": ((bool,), False),
    "target": ((float, int), None),     # threshold of the summary's time/oracles-to-target
    "title": ((str,), ""),
    "file": ((str,), None),             # PNG name (default <name>.png)
    "label": ((str,), None),            # curve label, str.format of {label} and the cell's keys
                                        # (dots as underscores), e.g. "CG({linear_solver_maxiter})"
    "quantiles": ((list,), [0.2, 0.8]),
    "ylim": ((list,), []),              # [low, high] of the y axes (empty: automatic)
}
X_AXES = ("time", "oracles", "step")
CURVES = ("best", "all")

# keys of an [algorithms.<label>] table that are not preset keyword arguments ("label": the name
# the figure's legend and tables give the curve, default the table's label)
ALGORITHM_SPECIAL = ("preset", "label", "step", "ratio", "steps", "eval_every", "lr_decay")


def parse_value(text: str) -> Any:
    """A command-line value as TOML (`3`, `0.1`, `true`, `[1, 2]`, `"s"`), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> Tuple[List[str], Any]:
    """`"a.b.c=value"` -> (["a", "b", "c"], parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. steps=200).")
    key, text = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {item!r} has an empty key.")
    return path, parse_value(text.strip())


def _set(cfg: dict, path: List[str], value: Any, where: str) -> None:
    node = cfg
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(path[:i + 1])} is a value, not a table.")
        node = child
    node[path[-1]] = value


def _check_keys(table: dict, schema: dict, where: str) -> None:
    check_names(table, schema, where)
    for key, value in table.items():
        types = schema[key][0]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: {key} must be {names}, got {value!r}.")


def apply_overrides(cfg: dict, overrides: Iterable[str], where: str = "command line") -> dict:
    """A copy of `cfg` with each dotted `key=value` override set (the top-level key is checked)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        path, value = parse_override(item) if isinstance(item, str) else item
        if path[0] not in TOP_LEVEL:
            raise ConfigError(f"unknown key {path[0]!r} in override {'.'.join(path)}={value!r} ({where})."
                              f"{did_you_mean([path[0]], TOP_LEVEL)} Valid keys: {', '.join(sorted(TOP_LEVEL))}.")
        _set(cfg, path, value, where)
    return cfg


def _paper_overrides(paper: dict, prefix=()) -> List[Tuple[List[str], Any]]:
    """The [paper] table (nested tables or dotted keys) flattened to (path, value) pairs."""
    out = []
    for key, value in paper.items():
        path = list(prefix) + key.split(".")
        if isinstance(value, dict) and path[0] != "options" and not _is_leaf_table(path):
            out.extend(_paper_overrides(value, path))
        else:
            out.append((path, value))
    return out


def _is_leaf_table(path: List[str]) -> bool:
    """Tables that are values (a linear-solver spec `{name = "cg", ...}`), not nesting."""
    return len(path) >= 3 and path[0] == "algorithms" and (path[-1] == "linear_solver" or path[-1].endswith("_opt"))


def _fill_defaults(cfg: dict, source: str) -> dict:
    for key, (_, default) in TOP_LEVEL.items():
        if key not in cfg and default is not None:
            cfg[key] = copy.deepcopy(default)
    if "name" not in cfg:
        cfg["name"] = os.path.splitext(os.path.basename(source))[0]
    for key in ("steps", "eval_every", "metrics", "problem", "algorithms"):
        if key not in cfg:
            raise ConfigError(f"{source}: missing required key {key!r}.")
    return cfg


def validate(cfg: dict, source: str = "config") -> dict:
    """Check the schema (types, unknown keys, positive counts); returns `cfg` with defaults filled."""
    _check_keys(cfg, TOP_LEVEL, source)
    cfg = _fill_defaults(cfg, source)
    for key in ("steps", "eval_every", "timing_steps", "timing_repeats", "init_timeout"):
        if cfg[key] < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {cfg[key]}.")
    if cfg["steps"] % cfg["eval_every"]:
        raise ConfigError(f"{source}: steps={cfg['steps']} must be a multiple of eval_every={cfg['eval_every']}.")
    if isinstance(cfg["seeds"], int):
        if cfg["seeds"] < 1:
            raise ConfigError(f"{source}: seeds must be >= 1, got {cfg['seeds']}.")
    elif not cfg["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                     for s in cfg["seeds"]):
        raise ConfigError(f"{source}: seeds must be a count or a non-empty list of ints >= 0.")
    if not cfg["metrics"] or not all(isinstance(m, str) for m in cfg["metrics"]):
        raise ConfigError(f"{source}: metrics must be a non-empty list of metric names.")
    if isinstance(cfg["only"], str):
        cfg["only"] = [s for s in cfg["only"].split(",") if s]
    if isinstance(cfg["devices"], str) and cfg["devices"] != "auto":
        raise ConfigError(f"{source}: devices must be an int or \"auto\", got {cfg['devices']!r}.")
    if cfg["chunk"] < 0:
        raise ConfigError(f"{source}: chunk must be >= 0, got {cfg['chunk']}.")
    check_names(cfg["mesh"], ("data",), f"{source}: [mesh]")
    data_axis = cfg["mesh"].get("data", 1)
    if isinstance(data_axis, bool) or not isinstance(data_axis, int) or data_axis < 1:
        raise ConfigError(f"{source}: mesh.data must be an int >= 1 (devices per data-parallel run), got {data_axis!r}.")
    problem = cfg["problem"]
    if "name" not in problem or not isinstance(problem["name"], str):
        raise ConfigError(f"{source}: [problem] needs a name (e.g. name = \"quadratic\").")
    if not cfg["algorithms"]:
        raise ConfigError(f"{source}: [algorithms] is empty; add e.g. [algorithms.soba].")
    for label, table in cfg["algorithms"].items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: algorithms.{label} must be a table, got {table!r}.")
    if cfg["defaults"]:
        cfg["algorithms"] = {label: {**copy.deepcopy(cfg["defaults"]), **table}
                             for label, table in cfg["algorithms"].items()}
    for label, table in cfg["algorithms"].items():
        if ("step" in table or "ratio" in table) and not ("step" in table and "ratio" in table):
            raise ConfigError(f"{source}: algorithms.{label}: give both step and ratio "
                              "(lower_lr = step, upper_lr = step / ratio) or neither.")
        if "step" in table and ({"upper_lr", "lower_lr"} & set(table)):
            raise ConfigError(f"{source}: algorithms.{label}: step/ratio and upper_lr/lower_lr are exclusive.")
    unknown = sorted(set(cfg["only"]) - set(cfg["algorithms"]))
    if unknown:
        raise ConfigError(f"{source}: only= names unknown algorithm labels {unknown}; "
                          f"configured: {', '.join(sorted(cfg['algorithms']))}.")
    plot = dict(cfg["plot"])
    _check_keys(plot, PLOT_KEYS, f"{source} [plot]")
    for key, (_, default) in PLOT_KEYS.items():
        plot.setdefault(key, copy.deepcopy(default))
    plot["metrics"] = plot["metrics"] or [cfg["metrics"][0]]
    plot["select_by"] = plot["select_by"] or plot["metrics"][0]
    for m in plot["metrics"] + [plot["select_by"]]:
        if m not in cfg["metrics"]:
            raise ConfigError(f"{source} [plot]: metric {m!r} is not recorded; recorded metrics: "
                              f"{', '.join(cfg['metrics'])}.")
    bad = [x for x in plot["x"] if x not in X_AXES]
    if bad or not plot["x"]:
        raise ConfigError(f"{source} [plot]: unknown x axis {bad}; valid axes: {', '.join(X_AXES)}.")
    if plot["curves"] not in CURVES:
        raise ConfigError(f"{source} [plot]: curves must be one of {', '.join(CURVES)}, got {plot['curves']!r}.")
    cfg["plot"] = plot
    return cfg


def load(path: str, overrides: Iterable[str] = ()) -> dict:
    """Read, override and validate a config file (see the module docstring for precedence)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no config file {path!r}.")
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return from_dict(raw, overrides, source=path)


def from_dict(raw: dict, overrides: Iterable[str] = (), source: str = "config") -> dict:
    """As `load`, from an already parsed table."""
    overrides = [parse_override(o) if isinstance(o, str) else o for o in overrides]
    _check_keys({k: v for k, v in raw.items()}, TOP_LEVEL, source)
    cfg = apply_overrides(raw, overrides)
    if cfg.get("full", False):
        paper = _paper_overrides(cfg.get("paper", {}))
        cfg = apply_overrides(cfg, paper, where=f"{source} [paper]")
        cfg = apply_overrides(cfg, overrides)
    return validate(cfg, source)


def seed_list(cfg: dict) -> List[int]:
    seeds = cfg["seeds"]
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def experiment_dir(cfg: dict) -> str:
    """`<results_dir>/<name>` (`-full` appended for the paper-size runs)."""
    return os.path.join(cfg["results_dir"], cfg["name"] + ("-full" if cfg["full"] else ""))


__all__ = ["ConfigError", "UnknownKeys", "apply_overrides", "check_keywords", "check_names", "experiment_dir", "from_dict", "load", "parse_override",
           "parse_value", "seed_list", "validate"]

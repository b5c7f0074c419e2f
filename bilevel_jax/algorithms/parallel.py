"""Data-parallel runs: one bilevel run over the devices of a mesh, no collective that moves samples.

    data = bj.shard(data, mesh)                                    # every leaf split along its sample axis
    alg = bj.algorithms.soba(problem, batch_size=256, mesh=mesh)   # or bj.data_parallel(alg, mesh=mesh)
    state, history = bj.run(alg, alg.init(theta0, phi0, key, data), data, num_steps=1000)

With D devices on the mesh axis `"data"`, device d holds samples d n/D .. (d+1) n/D - 1 and draws
batch_size / D of them per step (`bj.sampling`: `iid`, `shuffled` and `partition` keep their
meaning per shard; the block samplers draw the same block position on every shard, so SAGA
memories per batch id are unchanged). Every objective is the mean over the global batch,

    f(theta, phi; B) = (1/D) sum_d f(theta, phi; B_d)        (equal local batch sizes),

so an oracle is its local value on the local samples followed by a `pmean` over the devices
(`bj.sharding`): the whole outer iteration runs in `jax.shard_map` with the objectives wrapped in
`lax.pmean`; gradients, Hessian- and Jacobian-vector products and values cross the devices as
parameter-sized (or scalar) all-reduces, the samples never do. Iterates, solver, estimator and
optimiser states are replicated (or split over a second mesh axis, `model_axis=`).

`shards=D` without a mesh is the same sampling layout on one device (the D local batches one
after the other): the iterates of `mesh=` with D devices equal those of `shards=D` up to the
order of floating-point sums (1e-12 in float64), which is how the sharded path is tested.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Optional

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding

from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.base import Algorithm, Wrapper
from bilevel_jax.algorithms.vocabulary import translate_renamed
from bilevel_jax.precision import Precision, with_precision
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.rebuild import rebuild
from bilevel_jax.sampling import Sampler
from bilevel_jax.sharding import DATA_AXIS, check_mesh, local_problem, model_spec, shard, shard_model, sharded

PyTree = Any


def replace_parts(alg: Any, on_problem: Callable, on_sampler: Callable) -> Any:
    """`alg` (and the modules it holds, static fields included: `bj.rebuild`) with every
    `BilevelProblem` replaced by `on_problem(problem)` and every `Sampler` by `on_sampler(sampler)`."""
    def replace(x):
        if isinstance(x, BilevelProblem):
            return on_problem(x)
        if isinstance(x, Sampler):
            return on_sampler(x)
        if _is_multi_objective(x):
            raise ValueError("data-parallel runs apply to single-problem presets; a MultiObjectiveProblem's data has "
                             "a task axis first (shard the tasks with vmap instead).")
        return x

    return rebuild(alg, replace)


def _is_multi_objective(x) -> bool:
    return type(x).__name__ == "MultiObjectiveProblem"


def with_shards(alg: Algorithm, shards: int) -> Algorithm:
    """`alg` with every sampler drawing batch_size / shards samples from each of `shards` shards."""
    check_positive_int("shards", shards)

    def set_shards(sampler: Sampler) -> Sampler:
        if sampler.shards not in (1, shards):
            raise ValueError(f"the algorithm's samplers already use shards={sampler.shards}, not {shards}.")
        return dataclasses.replace(sampler, shards=shards)

    return replace_parts(alg, lambda p: p, set_shards)


def localize(alg: Algorithm, axis: str) -> Algorithm:
    """The per-device view of a sharded `alg` inside `shard_map`: samplers draw from the local
    shard (`axis_name`) and the objectives are `AxisMean`s over `axis`."""
    return replace_parts(alg, lambda p: local_problem(p, axis), lambda s: dataclasses.replace(s, axis_name=axis))


class DataParallel(Wrapper):
    """An algorithm whose outer iterations run data-parallel over `mesh`'s axis `axis` (see the
    module docstring). `init` is the wrapped algorithm's (the global view); `update` runs the
    step in `jax.shard_map`, manual over `axis` only, data split along its sample axis.

    With `model_axis` (a second mesh axis), the large leaves of the state (phi, v, momenta,
    optimiser states: `model_spec`) are split over it, FSDP-style, and XLA's partitioner inserts
    the gathers the oracles need; otherwise the state is replicated."""

    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True, default=DATA_AXIS)
    model_axis: Optional[str] = eqx.field(static=True, default=None)

    def init(self, theta0, phi0, key, data=None):
        return self.algorithm.init(theta0, phi0, key, data)

    def update(self, state, data):
        step = sharded(lambda alg, state, data: alg.update(state, data), self.mesh, self.axis)
        new, info = step(localize(self.algorithm, self.axis), self._place(state), data)
        return self._place(new), info

    def _place(self, tree):
        if self.model_axis is None:
            return tree
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, model_spec(x, self.mesh, self.model_axis))) if eqx.is_array(x) else x, tree)


def data_parallel(alg: Algorithm, *, mesh: Optional[Mesh] = None, shards: Optional[int] = None,
                  axis: str = DATA_AXIS, model_axis: Optional[str] = None) -> Algorithm:
    """`alg` run data-parallel: over `mesh`'s axis `axis` (place the data with `bj.shard`), or
    with the same sampling layout on one device (`shards=D`, unsharded data); with `model_axis`
    (another axis of `mesh`) the large state leaves are split over it (`shard_model`). See the
    module docstring; raises when `shards` and the mesh disagree or batch sizes are not divisible."""
    if not isinstance(alg, Algorithm):
        raise TypeError(f"data_parallel takes a bj.Algorithm, got {type(alg).__name__}.")
    if mesh is None and shards is None:
        return alg
    if mesh is not None:
        check_mesh(mesh, axis)
        size = mesh.shape[axis]
        if shards is not None and shards != size:
            raise ValueError(f"shards={shards} differs from the {size} devices of mesh axis {axis!r}.")
        shards = size
        if model_axis is not None:
            check_mesh(mesh, model_axis)
    elif model_axis is not None:
        raise ValueError("model_axis needs a mesh.")
    alg = with_shards(alg, shards)
    return alg if mesh is None else DataParallel(alg, mesh, axis, model_axis)


def preset_options(build: Callable) -> Callable:
    """A preset that also takes `mesh=` and `shards=` (data-parallel runs, `data_parallel`) and
    `precision=` (a `bj.Precision` policy, `bj.precision.with_precision`); a keyword renamed in 0.2.0
    is translated with a FutureWarning, or refused naming its new name (`vocabulary.translate_renamed`)."""
    @functools.wraps(build)
    def preset(*args, mesh: Optional[Mesh] = None, shards: Optional[int] = None,
               precision: Optional[Precision] = None, **kwargs):
        alg = with_precision(build(*args, **translate_renamed(build.__name__, kwargs)), precision)
        return data_parallel(alg, mesh=mesh, shards=shards)

    sig = inspect.signature(build)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("mesh", "shards", "precision")
             if n not in sig.parameters]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    preset.__signature__ = sig.replace(parameters=params)
    return preset


__all__ = ["DataParallel", "data_parallel", "localize", "preset_options", "replace_parts", "shard", "shard_model", "with_shards"]

"""Data-parallel runs: one bilevel run over the devices of a mesh, no collective that moves samples.

    data = bj.shard(data, mesh)                                    # every leaf split along its sample axis
    alg = bj.algorithms.soba(problem, batch_size=256, mesh=mesh)   # or bj.data_parallel(alg, mesh=mesh)
    state, history = bj.run(alg, alg.init(theta0, phi0, key, data), data, num_steps=1000)

With D devices on the mesh axis `"data"`, device d holds samples d n/D .. (d+1) n/D - 1 and draws
batch_size / D of them per step (`bj.sampling`: `iid`, `shuffled` and `partition` keep their
meaning per shard; the block samplers draw the same block position on every shard, so SAGA
memories per batch id are unchanged). Every objective is the mean over the global batch,

    f(theta, phi; B) = (1/D) sum_d f(theta, phi; B_d)        (equal local batch sizes),

so an oracle is its local value on the local samples followed by a `pmean` over the devices: the
whole outer iteration runs in `jax.shard_map` with the objectives wrapped in `lax.pmean`, and
reverse-mode derivatives of the replicated parameters come back summed by the `pvary`/`psum` pair
that shard_map's varying-axes typing inserts (an explicit `psum` of a gradient would count it D
times). Gradients, Hessian- and Jacobian-vector products and values therefore cross the devices
as parameter-sized (or scalar) all-reduces; the samples never do. Iterates, solver, estimator
and optimiser states are replicated.

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bilevel_jax._checks import check_positive_int
from bilevel_jax.algorithms.base import Algorithm
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sampling import Sampler

PyTree = Any
DATA_AXIS = "data"


def shard(data: PyTree, mesh: Mesh, axis: str = DATA_AXIS) -> PyTree:
    """`data` with every array leaf split along its leading (sample) axis over the mesh axis
    `axis` (other mesh axes replicate it); None and scalar leaves are left as they are."""
    _check_mesh(mesh, axis)
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    size = mesh.shape[axis]

    def place(x):
        if not eqx.is_array_like(x) or jax.numpy.ndim(x) == 0:
            return x
        if x.shape[0] % size:
            raise ValueError(f"bj.shard: a leaf with {x.shape[0]} samples is not divisible by the {size} devices "
                             f"of mesh axis {axis!r}; drop or pad the last samples.")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(place, data)


class AxisMean(eqx.Module):
    """`fn(theta, phi, batch)` averaged over the devices of mesh axis `axis` (inside shard_map):
    the global mean objective from each device's local batch."""

    fn: Callable = eqx.field(static=True)
    axis: str = eqx.field(static=True)

    def __call__(self, theta, phi, batch):
        return jax.lax.pmean(self.fn(theta, phi, batch), self.axis)


def rebuild(tree: Any, on_problem: Callable, on_sampler: Callable) -> Any:
    """`tree` (an algorithm and the modules it holds, static fields included) with every
    `BilevelProblem` replaced by `on_problem(problem)` and every `Sampler` by
    `on_sampler(sampler)`; unchanged parts are kept as they are."""
    if isinstance(tree, BilevelProblem):
        return on_problem(tree)
    if isinstance(tree, Sampler):
        return on_sampler(tree)
    if _is_multi_objective(tree):
        raise ValueError("data-parallel runs and precision policies apply to single-problem presets; a "
                         "MultiObjectiveProblem's data has a task axis first (shard the tasks with vmap instead).")
    if isinstance(tree, eqx.Module):
        changes = {}
        for field in dataclasses.fields(tree):
            old = getattr(tree, field.name, None)
            new = rebuild(old, on_problem, on_sampler)
            if new is not old:
                changes[field.name] = new
        return dataclasses.replace(tree, **changes) if changes else tree
    if type(tree) in (tuple, list):
        items = [rebuild(x, on_problem, on_sampler) for x in tree]
        return type(tree)(items) if any(a is not b for a, b in zip(items, tree)) else tree
    return tree


def _is_multi_objective(x) -> bool:
    return type(x).__name__ == "MultiObjectiveProblem"


def with_shards(alg: Algorithm, shards: int) -> Algorithm:
    """`alg` with every sampler drawing batch_size / shards samples from each of `shards` shards."""
    check_positive_int("shards", shards)

    def set_shards(sampler: Sampler) -> Sampler:
        if sampler.shards not in (1, shards):
            raise ValueError(f"the algorithm's samplers already use shards={sampler.shards}, not {shards}.")
        return dataclasses.replace(sampler, shards=shards)

    return rebuild(alg, lambda p: p, set_shards)


def localize(alg: Algorithm, axis: str) -> Algorithm:
    """The per-device view of a sharded `alg` inside `shard_map`: samplers draw from the local
    shard (`axis_name`) and the objectives are `AxisMean`s over `axis`."""
    def local_problem(problem: BilevelProblem) -> BilevelProblem:
        return dataclasses.replace(problem, f_upper=AxisMean(problem.f_upper, axis),
                                   f_lower=AxisMean(problem.f_lower, axis))

    return rebuild(alg, local_problem, lambda s: dataclasses.replace(s, axis_name=axis))


def _check_mesh(mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; the sample axis {axis!r} is not one of them.")


def model_spec(x, mesh: Mesh, axis: str, min_size: int = 1024) -> PartitionSpec:
    """Where a state leaf lives on the mesh axis `axis` (FSDP-style): split along its first
    dimension divisible by the axis size when it has at least `min_size` elements, replicated
    otherwise (scalars, biases, step counts)."""
    size = mesh.shape[axis]
    if not eqx.is_array(x) or x.size < min_size:
        return PartitionSpec()
    for dim, n in enumerate(x.shape):
        if n % size == 0:
            return PartitionSpec(*([None] * dim), axis)
    return PartitionSpec()


def shard_model(tree: PyTree, mesh: Mesh, axis: str = "model") -> PyTree:
    """`tree` (phi, or a whole algorithm state) with its large leaves split over the mesh axis
    `axis` (`model_spec`): the per-device bytes of phi-sized state fall like 1 / mesh.shape[axis]."""
    _check_mesh(mesh, axis)
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, model_spec(x, mesh, axis))) if eqx.is_array(x) else x, tree)


class DataParallel(Algorithm):
    """An algorithm whose outer iterations run data-parallel over `mesh`'s axis `axis` (see the
    module docstring). `init` is the wrapped algorithm's (the global view); `update` runs the
    step in `jax.shard_map`, manual over `axis` only, data split along its sample axis.

    With `model_axis` (a second mesh axis), the large leaves of the state (phi, v, momenta,
    optimiser states: `model_spec`) are split over it, FSDP-style, and XLA's partitioner inserts
    the gathers the oracles need; otherwise the state is replicated."""

    algorithm: Algorithm
    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True, default=DATA_AXIS)
    model_axis: Optional[str] = eqx.field(static=True, default=None)

    def __getattr__(self, name):   # the wrapped algorithm's configuration (problem, lower_steps, name, ...)
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.algorithm, name)

    def init(self, theta0, phi0, key, data=None):
        return self.algorithm.init(theta0, phi0, key, data)

    def update(self, state, data):
        local = localize(self.algorithm, self.axis)
        (alg_dyn, state_dyn), static = eqx.partition((local, state), eqx.is_array)
        data_dyn, data_static = eqx.partition(data, eqx.is_array)
        replicated, split = PartitionSpec(), PartitionSpec(self.axis)

        def step(alg_dyn, state_dyn, data_dyn):
            alg, current = eqx.combine((alg_dyn, state_dyn), static)
            new, info = alg.update(current, eqx.combine(data_dyn, data_static))
            return eqx.partition(new, eqx.is_array)[0], info

        data_specs = jax.tree_util.tree_map(lambda x: split if x.ndim else replicated, data_dyn)
        state_dyn = self._place(state_dyn)
        new_dyn, info = jax.shard_map(step, mesh=self.mesh, in_specs=(replicated, replicated, data_specs),
                                      out_specs=replicated, axis_names=frozenset({self.axis}))(
            alg_dyn, state_dyn, data_dyn)
        return eqx.combine(self._place(new_dyn), static[1]), info

    def _place(self, tree):
        if self.model_axis is None:
            return tree
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, model_spec(x, self.mesh, self.model_axis))), tree)


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
        _check_mesh(mesh, axis)
        size = mesh.shape[axis]
        if shards is not None and shards != size:
            raise ValueError(f"shards={shards} differs from the {size} devices of mesh axis {axis!r}.")
        shards = size
        if model_axis is not None:
            _check_mesh(mesh, model_axis)
    elif model_axis is not None:
        raise ValueError("model_axis needs a mesh.")
    alg = with_shards(alg, shards)
    return alg if mesh is None else DataParallel(alg, mesh, axis, model_axis)


def preset_options(build: Callable) -> Callable:
    """A preset that also takes `mesh=` and `shards=` (data-parallel runs, `data_parallel`)."""
    @functools.wraps(build)
    def preset(*args, mesh: Optional[Mesh] = None, shards: Optional[int] = None, **kwargs):
        return data_parallel(build(*args, **kwargs), mesh=mesh, shards=shards)

    sig = inspect.signature(build)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("mesh", "shards")
             if n not in sig.parameters]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    preset.__signature__ = sig.replace(parameters=params)
    return preset


__all__ = ["AxisMean", "DATA_AXIS", "DataParallel", "data_parallel", "localize", "model_spec", "preset_options", "rebuild",
           "shard", "shard_model", "with_shards"]

"""Sharding over a device mesh: data split along its sample axis, objectives averaged over it.

    placed = bj.shard(data, mesh)                   # every leaf split along its sample axis ("data")
    problem_d = local_problem(problem)              # f_upper / f_lower = lax.pmean of the local value
    g, info = sharded(fn, mesh)(theta, phi, placed) # fn(theta, phi, local data) in jax.shard_map

With D devices on the mesh axis, device d holds samples d n/D .. (d+1) n/D - 1. An objective that
is a mean over its batch is the mean of the D local means (equal local sizes), so inside
`jax.shard_map` the local value followed by `lax.pmean` is the global objective, and every
derivative of it (gradients, Hessian- and Jacobian-vector products) is the global one: reverse-mode
derivatives of the replicated parameters come back summed by the `pvary`/`psum` pair that
shard_map's varying-axes typing inserts (an explicit `psum` of a gradient would count it D times).
Only parameter-sized (or scalar) all-reduces cross the devices; the samples never do.

`model_spec` / `shard_model` split large parameter-shaped leaves over a second mesh axis (FSDP).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bilevel_jax.problem import BilevelProblem

PyTree = Any
DATA_AXIS = "data"


def shard(data: PyTree, mesh: Mesh, axis: str = DATA_AXIS) -> PyTree:
    """`data` with every array leaf split along its leading (sample) axis over the mesh axis
    `axis` (other mesh axes replicate it); None and scalar leaves are left as they are."""
    check_mesh(mesh, axis)
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
    vary: bool = eqx.field(static=True, default=True)

    def __call__(self, theta, phi, batch):
        # `vary`: theta and phi enter as device-varying values, so the all-reduce of a derivative is
        # placed at their cotangents (theta- and phi-sized) and not at an intermediate that the
        # objective forms from them before it meets the samples (phi phi' in a quadratic form, say)
        if self.vary:
            theta, phi = jax.tree_util.tree_map(lambda x: _vary(x, self.axis), (theta, phi))
        return jax.lax.pmean(self.fn(theta, phi, batch), self.axis)


def _vary(x, axis: str):
    if eqx.is_inexact_array(x) and axis not in getattr(jax.typeof(x), "vma", frozenset()):
        return jax.lax.pcast(x, axis, to="varying")
    return x


def local_problem(problem: BilevelProblem, axis: str = DATA_AXIS, vary: bool = True) -> BilevelProblem:
    """`problem` with its objectives averaged over the devices of `axis` (`AxisMean`): its
    oracles on a device's shard inside `shard_map` are those of the whole data. `vary=False`
    keeps theta and phi invariant inside the objectives (for `lax.custom_linear_solve`, whose
    output takes the varying axes of its linearization point; the all-reduces may then carry an
    intermediate the objective builds from theta and phi alone, still independent of the samples)."""
    return dataclasses.replace(problem, f_upper=AxisMean(problem.f_upper, axis, vary),
                               f_lower=AxisMean(problem.f_lower, axis, vary))


def check_mesh(mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; the sample axis {axis!r} is not one of them.")


def sharded(fn: Callable, mesh: Mesh, axis: str = DATA_AXIS) -> Callable:
    """`fn(*args, data)` run in `jax.shard_map`, manual over `axis` only: `args` replicated,
    every array leaf of `data` split along its leading (sample) axis, the output replicated (its
    non-array parts are kept as traced). `fn` sees the local shard of `data`: its objectives must
    average over `axis` (`local_problem`, `localize`)."""
    check_mesh(mesh, axis)

    def call(*args):
        *replicated, data = args
        arrays, static = eqx.partition((replicated, data), eqx.is_array)
        out_static = []

        def body(arrays):
            replicated, data = eqx.combine(arrays, static)
            out = fn(*replicated, data)
            out_arrays, rest = eqx.partition(out, eqx.is_array)
            out_static.append(rest)
            return out_arrays

        split = jax.tree_util.tree_map(lambda x: PartitionSpec(axis) if x.ndim else PartitionSpec(), arrays[1])
        specs = ((jax.tree_util.tree_map(lambda _: PartitionSpec(), arrays[0]), split),)
        out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(),
                            axis_names=frozenset({axis}))(arrays)
        return eqx.combine(out, out_static[0])

    return call


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
    check_mesh(mesh, axis)
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(x, NamedSharding(mesh, model_spec(x, mesh, axis))) if eqx.is_array(x) else x, tree)


__all__ = ["AxisMean", "DATA_AXIS", "local_problem", "model_spec", "shard", "shard_model", "sharded"]

"""Minibatch samplers that run inside `lax.scan`.

A sampler is stateless: `sample(data, key, draw) -> (batch, batch_id)` where `key` is the level's
root key (constant over a run) and `draw` the number of draws already made from this level, so a
run is reproducible and needs no sampler state in the carry. Kinds:

- `full()`           : the whole data set (deterministic problems; `batch_size=None`).
- `iid(b)`           : b indices drawn uniformly with replacement.
- `shuffled(b)`      : epochs over a fresh permutation; batch `draw` of epoch `draw // (n // b)`.
- `partition(b)`     : the data cut into n // b fixed contiguous batches; one drawn uniformly.
                       `batch_id` indexes the SAGA-style memories of SABA/SRBA.

`data` is a pytree whose leaves share a leading sample axis (or None: `full` returns None).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Optional, Tuple

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax._checks import check_positive_int

PyTree = Any


class Sampler(eqx.Module):
    """Base class: `sample(data, key, draw) -> (batch, batch_id)`; `batch_size` None = full data.

    Samplers are Modules with static fields only, so two equal samplers compare equal (an
    algorithm holding one crosses `jit` without recompiling).
    """

    batch_size: Optional[int] = eqx.field(static=True, default=None)
    kind: ClassVar[str] = "full"

    def __check_init__(self):
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)

    @abc.abstractmethod
    def sample(self, data: PyTree, key: jax.Array, draw) -> Tuple[PyTree, jax.Array]:
        """The batch of draw number `draw` (a traced int) from the level's root `key`."""


def num_samples(data: PyTree, name: str = "data") -> Optional[int]:
    """The common leading size of `data`'s leaves (None for None data); a clear error otherwise."""
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        return None
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), data)
        raise ValueError(f"{name}: all leaves must share a leading sample axis, got shapes {shapes}.")
    return sizes.pop()


def num_batches(sampler: Sampler, data: PyTree) -> int:
    """How many distinct batch ids `sampler` draws from `data` (1 for full and i.i.d. batches)."""
    n = num_samples(data)
    if sampler.kind != "partition" or n is None:
        return 1
    return n // sampler.batch_size


def check_fits(sampler: Sampler, data: PyTree, name: str) -> None:
    n = num_samples(data, name)
    if sampler.batch_size is not None and n is not None and sampler.batch_size > n:
        raise ValueError(f"batch_size={sampler.batch_size} is larger than {name}'s {n} samples.")
    if sampler.batch_size is not None and n is None:
        raise ValueError(f"batch_size={sampler.batch_size} was given but {name} is None.")


def _take(data, idx):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


class Full(Sampler):
    """The whole data set (deterministic problems; `batch_size=None`)."""

    kind: ClassVar[str] = "full"

    def sample(self, data, key, draw):
        return data, jnp.zeros((), jnp.int32)

    def block(self, data, batch_id):
        """The only block: the whole data."""
        return data


class IID(Sampler):
    """b indices drawn uniformly with replacement: the sampling of the convergence theorems;
    a gather (a copy of the minibatch) per draw."""

    kind: ClassVar[str] = "iid"

    def sample(self, data, key, draw):
        n = num_samples(data)
        idx = jax.random.randint(jax.random.fold_in(key, draw), (self.batch_size,), 0, n)
        return _take(data, idx), jnp.zeros((), jnp.int32)


class Shuffled(Sampler):
    """Epochs over a fresh permutation of the samples; batch `draw` of epoch `draw // (n // b)`."""

    kind: ClassVar[str] = "shuffled"

    def sample(self, data, key, draw):
        b = self.batch_size
        n = num_samples(data)
        epoch, pos = jnp.divmod(draw, n // b)
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
        idx = jax.lax.dynamic_slice(perm, (pos * b,), (b,))
        return _take(data, idx), pos.astype(jnp.int32)


class Partition(Sampler):
    """The data cut into n // b fixed contiguous blocks, one drawn uniformly and read in place
    (`lax.dynamic_slice`, no gather); the block index is the batch id of SAGA-type memories."""

    kind: ClassVar[str] = "partition"

    def sample(self, data, key, draw):
        n = num_samples(data)
        batch_id = jax.random.randint(jax.random.fold_in(key, draw), (), 0, n // self.batch_size).astype(jnp.int32)
        return self.block(data, batch_id), batch_id

    def block(self, data, batch_id):
        """Block `batch_id` (samples batch_id * b ... batch_id * b + b - 1), read in place."""
        b = self.batch_size
        return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, batch_id * b, b, axis=0), data)


def full() -> Sampler:
    return Full()


def iid(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return IID(batch_size)


def shuffled(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return Shuffled(batch_size)


def partition(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return Partition(batch_size)


SAMPLERS = {"iid": iid, "shuffled": shuffled, "partition": partition}


def make_sampler(batch_size: Optional[int], kind: str = "iid") -> Sampler:
    """`batch_size=None` means full batch; otherwise a sampler of the given kind."""
    if batch_size is None:
        return full()
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {sorted(SAMPLERS)}.")
    return SAMPLERS[kind](batch_size)

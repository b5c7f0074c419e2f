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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bilevel_jax._checks import check_positive_int

PyTree = Any


class Sampler(NamedTuple):
    sample: Callable          # (data, key, draw) -> (batch, batch_id)
    batch_size: Optional[int]
    kind: str


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


def full() -> Sampler:
    return Sampler(lambda data, key, draw: (data, jnp.zeros((), jnp.int32)), None, "full")


def iid(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)

    def sample(data, key, draw):
        n = num_samples(data)
        idx = jax.random.randint(jax.random.fold_in(key, draw), (batch_size,), 0, n)
        return _take(data, idx), jnp.zeros((), jnp.int32)

    return Sampler(sample, batch_size, "iid")


def shuffled(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)

    def sample(data, key, draw):
        n = num_samples(data)
        per_epoch = n // batch_size
        epoch, pos = jnp.divmod(draw, per_epoch)
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
        idx = jax.lax.dynamic_slice(perm, (pos * batch_size,), (batch_size,))
        return _take(data, idx), pos.astype(jnp.int32)

    return Sampler(sample, batch_size, "shuffled")


def partition(batch_size: int) -> Sampler:
    check_positive_int("batch_size", batch_size)

    def sample(data, key, draw):
        n = num_samples(data)
        batch_id = jax.random.randint(jax.random.fold_in(key, draw), (), 0, n // batch_size)
        idx = batch_id * batch_size + jnp.arange(batch_size)
        return _take(data, idx), batch_id.astype(jnp.int32)

    return Sampler(sample, batch_size, "partition")


SAMPLERS = {"iid": iid, "shuffled": shuffled, "partition": partition}


def make_sampler(batch_size: Optional[int], kind: str = "iid") -> Sampler:
    """`batch_size=None` means full batch; otherwise a sampler of the given kind."""
    if batch_size is None:
        return full()
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {sorted(SAMPLERS)}.")
    return SAMPLERS[kind](batch_size)

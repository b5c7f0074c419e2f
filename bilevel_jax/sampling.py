"""Minibatch samplers that run inside `lax.scan`.

A sampler is stateless: `sample(data, key, draw) -> (batch, batch_id)` where `key` is the level's
root key (constant over a run) and `draw` the number of draws already made from this level, so a
run is reproducible and needs no sampler state in the carry. Kinds:

- `full()`           : the whole data set (deterministic problems; `batch_size=None`).
- `shuffled(b)`      : epochs over the n // b contiguous blocks of b samples, in a fresh random
                       order per epoch (each block once per epoch), every block read in place
                       (`lax.dynamic_slice`, no gather): random reshuffling, as benchmark_bilevel
                       does it. The fast choice on CPU and GPU.
- `partition(b)`     : the same n // b blocks, one drawn uniformly (with replacement) per draw,
                       read in place.
- `iid(b)`           : b indices drawn uniformly with replacement: the sampling of the convergence
                       theorems. A gather (a copy of the minibatch) and b random indices per draw:
                       the slowest on CPU (on a dense-data problem the gather can cost more than
                       the oracles).

For `shuffled` and `partition`, `batch_id` is the block index (the row of SAGA-style memories:
SABA, SRBA); for `iid` and `full` it is 0. Samples n - (n // b) * b .. n - 1 (the tail that does
not fill a block) are never drawn by the block samplers; every algorithm's `init` warns when
there are such samples (`check_fits`).

`data` is a pytree whose leaves share a leading sample axis (or None: `full` returns None).
"""
from __future__ import annotations

import abc
import functools
import warnings
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
    blocks: ClassVar[bool] = False   # draws contiguous blocks with a batch id (`block(data, id)`)

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
    """How many distinct batch ids `sampler` draws from `data` (n // b for the block samplers, 1
    for full and i.i.d. batches)."""
    n = num_samples(data)
    if not sampler.blocks or n is None:
        return 1
    return n // sampler.batch_size


def check_fits(sampler: Sampler, data: PyTree, name: str) -> None:
    """A clear error when `sampler` cannot draw from `data`; a warning when a block sampler leaves
    out the tail of n samples that does not fill a block (n not a multiple of the batch size)."""
    n = num_samples(data, name)
    if sampler.batch_size is not None and n is not None and sampler.batch_size > n:
        raise ValueError(f"batch_size={sampler.batch_size} is larger than {name}'s {n} samples.")
    if sampler.batch_size is not None and n is None:
        raise ValueError(f"batch_size={sampler.batch_size} was given but {name} is None.")
    if sampler.blocks and n % sampler.batch_size:
        left = n % sampler.batch_size
        warnings.warn(f"{sampler.kind}(batch_size={sampler.batch_size}) on {name}'s {n} samples: {n} is not a "
                      f"multiple of {sampler.batch_size}, the last {left} samples ({n - left}..{n - 1}) are never "
                      "drawn; use a batch size that divides n, or the iid sampler.", stacklevel=2)


def _take(data, idx):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


def _block(data, batch_id, b: int):
    """Samples batch_id * b ... batch_id * b + b - 1 of every leaf, read in place."""
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, batch_id * b, b, axis=0), data)


# ------------------------------------------------------------------------------------------------
# The per-epoch block order of `shuffled`: a keyed pseudo-random permutation of {0, ..., m - 1},
# evaluated at one position. Sorting m random keys at every draw (`jax.random.permutation`) costs
# a sort per step (about 100 us for m = 781 blocks on XLA:CPU); this costs one threefry call and
# `_rounds(m)` rounds of a dozen scalar integer operations (about 1 us on CPU), for any m.
#
# Each round is a shift x -> (x + c_r) mod m followed by a "swap-or-not" step (Hoang, Morris and
# Rogaway, "An enciphering scheme based on a card shuffle", CRYPTO 2012): x is paired with
# k_r - x (mod m) and the pair is swapped when a keyed hash of the larger element is odd. Both are
# bijections of {0, ..., m - 1} for every m, so every block appears exactly once per epoch. With
# `_rounds(m)` rounds (16 up to m = 256 blocks, two more per doubling above) the orders pass the
# checks of `tests/test_sampling.py` for uniform permutations (position marginals, consecutive
# pairs, all 120 orders of 5 blocks).

_GOLDEN = 0x9E3779B9
_ODD = (2 * _GOLDEN + 1) & 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply finaliser; uint32 in, uint32 out)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=None)
def _rounds(num_blocks: int) -> int:
    return max(16, 2 * int(num_blocks - 1).bit_length())


def _key_words(key) -> jax.Array:
    """The uint32 words of a PRNG key (typed or raw)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return jnp.ravel(key).astype(jnp.uint32)


def block_order(key: jax.Array, epoch, position, num_blocks: int) -> jax.Array:
    """The block at `position` (0 .. num_blocks - 1) of epoch `epoch`'s random order of
    `num_blocks` blocks under `key`: for a fixed (key, epoch), a permutation of the positions."""
    m = int(num_blocks)
    if m == 1:
        return jnp.zeros(jnp.shape(position), jnp.int32)
    words = _key_words(jax.random.fold_in(key, epoch))   # one threefry call: the epoch's seed
    seed = words[0] ^ _mix32(words[-1] + jnp.uint32(_GOLDEN))
    r = jnp.arange(_rounds(m), dtype=jnp.uint32)
    shift_hash = _mix32(seed ^ (r * jnp.uint32(_ODD) + jnp.uint32(1)))
    pair_hash = _mix32(shift_hash + jnp.uint32(0x85EBCA77))
    mod = jnp.uint32(m)
    shifts, pivots = shift_hash % mod, pair_hash % mod
    x = jnp.asarray(position).astype(jnp.uint32) % mod

    def one_round(i, x):
        x = (x + shifts[i]) % mod
        partner = (pivots[i] + mod - x) % mod
        swap = (_mix32(jnp.maximum(x, partner) ^ pair_hash[i]) & jnp.uint32(1)) == 1
        return jnp.where(swap, partner, x)

    # unrolled where a loop costs kernel launches (GPU/TPU: the chain fuses into one kernel);
    # rolled on CPU, where it costs ~50 ns a round and unrolling only lengthens compilation
    unroll = jax.default_backend() != "cpu"
    return jax.lax.fori_loop(0, _rounds(m), one_round, x, unroll=unroll).astype(jnp.int32)


class Full(Sampler):
    """The whole data set (deterministic problems; `batch_size=None`)."""

    kind: ClassVar[str] = "full"

    def sample(self, data, key, draw):
        return data, jnp.zeros((), jnp.int32)

    def block(self, data, batch_id):
        """The only block: the whole data."""
        return data


class IID(Sampler):
    """b indices drawn uniformly with replacement: the sampling of the convergence theorems.
    Each draw generates b random indices and gathers (copies) the b samples: on CPU the slowest
    sampler (see the module docstring); `shuffled` and `partition` read blocks in place."""

    kind: ClassVar[str] = "iid"

    def sample(self, data, key, draw):
        n = num_samples(data)
        idx = jax.random.randint(jax.random.fold_in(key, draw), (self.batch_size,), 0, n)
        return _take(data, idx), jnp.zeros((), jnp.int32)


class Shuffled(Sampler):
    """Random reshuffling of contiguous blocks: the data cut into m = n // b blocks of b samples;
    epoch e = draw // m visits every block once, in the order `block_order(key, e, .)`, a fresh
    pseudo-random permutation per epoch (as benchmark_bilevel's sampler, which permutes its batch
    order at every epoch); each block is read in place (`lax.dynamic_slice`, no gather). The batch
    id is the block index, so SAGA-type memories (SABA, SRBA) work with it."""

    kind: ClassVar[str] = "shuffled"
    blocks: ClassVar[bool] = True

    def sample(self, data, key, draw):
        m = num_samples(data) // self.batch_size
        epoch, position = jnp.divmod(jnp.asarray(draw, jnp.int32), m)
        batch_id = block_order(key, epoch, position, m)
        return self.block(data, batch_id), batch_id

    def block(self, data, batch_id):
        """Block `batch_id` (samples batch_id * b ... batch_id * b + b - 1), read in place."""
        return _block(data, batch_id, self.batch_size)


class Partition(Sampler):
    """The data cut into n // b fixed contiguous blocks, one drawn uniformly (with replacement) at
    every draw and read in place (`lax.dynamic_slice`, no gather); the block index is the batch id
    of SAGA-type memories."""

    kind: ClassVar[str] = "partition"
    blocks: ClassVar[bool] = True

    def sample(self, data, key, draw):
        n = num_samples(data)
        batch_id = jax.random.randint(jax.random.fold_in(key, draw), (), 0, n // self.batch_size).astype(jnp.int32)
        return self.block(data, batch_id), batch_id

    def block(self, data, batch_id):
        """Block `batch_id` (samples batch_id * b ... batch_id * b + b - 1), read in place."""
        return _block(data, batch_id, self.batch_size)


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
BLOCK_SAMPLERS = ("shuffled", "partition")   # batch ids for SAGA-type memories


def make_sampler(batch_size: Optional[int], kind: str = "iid") -> Sampler:
    """`batch_size=None` means full batch; otherwise a sampler of the given kind."""
    if batch_size is None:
        return full()
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {sorted(SAMPLERS)}.")
    return SAMPLERS[kind](batch_size)

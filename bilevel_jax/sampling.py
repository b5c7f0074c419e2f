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

For a problem whose oracles run over sub-batches (`BilevelProblem(sample_chunk=)`) the block
samplers return their block uncut (`sample(..., rows=True)`: a `Rows`), and the oracles cut each
sub-batch from the data set in place; `read(batch)` gives the batch itself.

Shards (data-parallel sampling). A sampler with `shards=D` sees the n samples as D contiguous
shards of n / D and draws batch_size / D samples from each shard: `iid` draws each shard's indices
with its own key (`fold_in(key, shard)`), the block samplers cut every shard into the same
(n / D) / (b / D) = n / b blocks and draw the same block position on every shard, so a global
batch id still names one fixed set of b samples (SAGA memories per batch id keep their meaning).
The batch of a draw is the D local batches, shard after shard. With `axis_name` set the sampler
runs inside `jax.shard_map` on one device's shard (`lax.axis_index(axis_name)` is the shard) and
returns only the local batch: the same draws as `shards=D` on one device, no sample crosses
devices (`bj.data_parallel`).
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
    shards: int = eqx.field(static=True, default=1)
    axis_name: Optional[str] = eqx.field(static=True, default=None)
    kind: ClassVar[str] = "full"
    blocks: ClassVar[bool] = False   # draws contiguous blocks with a batch id (`block(data, id)`)

    def __check_init__(self):
        if self.batch_size is not None:
            check_positive_int("batch_size", self.batch_size)
        check_positive_int("shards", self.shards)
        if self.batch_size is not None and self.batch_size % self.shards:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by shards={self.shards}: every shard "
                             "draws batch_size / shards samples; use a batch size that is a multiple of the number "
                             "of devices.")

    @property
    def local_batch_size(self) -> Optional[int]:
        """The samples one shard draws per draw (batch_size / shards)."""
        return None if self.batch_size is None else self.batch_size // self.shards

    def sample(self, data: PyTree, key: jax.Array, draw, rows: bool = False) -> Tuple[PyTree, jax.Array]:
        """The batch of draw number `draw` (a traced int) from the level's root `key`: the local
        batch inside `shard_map` (`axis_name`), else the D shards' batches one after the other.
        `rows=True`: a block sampler's contiguous batch (one shard, or the local one) as a `Rows`,
        not cut yet (for `over_samples`); other batches are cut as usual."""
        local = self.axis_name is not None or self.shards == 1 or data is None
        if rows and self.blocks and local and data is not None:
            shard = None if self.axis_name is None else jax.lax.axis_index(self.axis_name)
            batch_id = self.block_id(data, key, draw, shard)
            return Rows(data, batch_id * self.local_batch_size, self.local_batch_size), batch_id
        if self.axis_name is not None:
            return self.draw(data, key, draw, jax.lax.axis_index(self.axis_name))
        if self.shards == 1 or data is None:
            return self.draw(data, key, draw, None)
        shard_ids = jnp.arange(self.shards)
        batches, ids = jax.vmap(lambda d, i: self.draw(d, key, draw, i))(split_shards(data, self.shards), shard_ids)
        return merge_shards(batches), ids[0]

    def block(self, data: PyTree, batch_id) -> PyTree:
        """The (global) block `batch_id`: block `batch_id` of every shard (of this device's shard
        inside `shard_map`)."""
        if self.axis_name is not None or self.shards == 1 or data is None:
            return self.local_block(data, batch_id)
        return merge_shards(jax.vmap(lambda d: self.local_block(d, batch_id))(split_shards(data, self.shards)))

    def local_block(self, data: PyTree, batch_id) -> PyTree:
        """Block `batch_id` of one shard (the whole data for samplers without blocks)."""
        return data

    def shard_size(self, data: PyTree) -> Optional[int]:
        """The samples of one shard (of `data` as this sampler sees it: local inside `shard_map`)."""
        n = num_samples(data)
        if n is None or self.axis_name is not None:
            return n
        return n // self.shards

    def num_blocks(self, data: PyTree) -> int:
        """How many distinct batch ids the sampler draws: (n / D) // (b / D) for the block samplers,
        1 for full and i.i.d. batches."""
        n = self.shard_size(data)
        if not self.blocks or n is None:
            return 1
        return n // self.local_batch_size

    @abc.abstractmethod
    def draw(self, data: PyTree, key: jax.Array, draw, shard) -> Tuple[PyTree, jax.Array]:
        """`local_batch_size` samples of one shard `data` (the shard index `shard`, None when
        unsharded) for draw number `draw` from the level's root `key`, and the batch id."""


def split_shards(data: PyTree, shards: int) -> PyTree:
    """Every leaf [n, ...] as [shards, n / shards, ...] (n divisible by shards: `check_fits`)."""
    return jax.tree_util.tree_map(lambda x: x.reshape((shards, x.shape[0] // shards) + x.shape[1:]), data)


def merge_shards(data: PyTree) -> PyTree:
    """The inverse of `split_shards`: [shards, m, ...] -> [shards * m, ...]."""
    return jax.tree_util.tree_map(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), data)


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
    return sampler.num_blocks(data)


def check_fits(sampler: Sampler, data: PyTree, name: str) -> None:
    """A clear error when `sampler` cannot draw from `data` (a batch larger than the data, n not
    divisible by the shards); a warning when a block sampler leaves out the tail of a shard that
    does not fill a block (n / shards not a multiple of batch_size / shards)."""
    n = num_samples(data, name)
    if n is None:
        if sampler.batch_size is not None:
            raise ValueError(f"batch_size={sampler.batch_size} was given but {name} is None.")
        return
    shards = sampler.shards
    total = n * shards if sampler.axis_name is not None else n
    if sampler.axis_name is None and n % shards:
        raise ValueError(f"{name} has {n} samples, not divisible by shards={shards}: every shard must hold the "
                         "same number of samples (drop or pad the last samples).")
    if sampler.batch_size is not None and sampler.batch_size > total:
        raise ValueError(f"batch_size={sampler.batch_size} is larger than {name}'s {total} samples.")
    local_n, b = sampler.shard_size(data), sampler.local_batch_size
    if sampler.blocks and local_n % b:
        left = local_n % b
        where = f"each of the {shards} shards of {local_n} samples" if shards > 1 else f"{name}'s {n} samples"
        warnings.warn(f"{sampler.kind}(batch_size={sampler.batch_size}) on {where}: {local_n} is not a "
                      f"multiple of {b}, the last {left} samples ({local_n - left}..{local_n - 1}"
                      f"{' of every shard' if shards > 1 else ''}) are never drawn; use a batch size that divides "
                      "n, or the iid sampler.", stacklevel=2)


def _take(data, idx):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)


@jax.tree_util.register_pytree_node_class
class Rows:
    """A batch not cut yet: rows `start .. start + size - 1` of every leaf of `source`.

    The block samplers return one (`Sampler.sample(..., rows=True)`) for the problems whose oracles
    run over sub-batches (`BilevelProblem(sample_chunk=)`): `bj.oracles.over_samples` cuts each
    sub-batch from the data set itself, so XLA reads it in place inside the scan, where a batch
    cut before the scan is first copied out of the data set (a read and a write of the whole
    batch). Everything else reads the batch with `read` first: objectives never see a `Rows`.
    """

    def __init__(self, source: PyTree, start, size: int):
        self.source, self.start, self.size = source, start, size

    def tree_flatten(self):
        return (self.source, self.start), self.size

    @classmethod
    def tree_unflatten(cls, size, children):
        return cls(*children, size)

    def cut(self, offset, size: int) -> PyTree:
        """Rows `start + offset .. start + offset + size - 1`, read in place."""
        return jax.tree_util.tree_map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, self.start + offset, size, axis=0), self.source)

    def read(self) -> PyTree:
        """The batch."""
        return self.cut(0, self.size)


def read(batch: PyTree) -> PyTree:
    """`batch`, read if it is a `Rows` (the batch an objective may be called on)."""
    return batch.read() if isinstance(batch, Rows) else batch


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

    def sample(self, data, key, draw, rows: bool = False):
        return data, jnp.zeros((), jnp.int32)

    def draw(self, data, key, draw, shard):
        return data, jnp.zeros((), jnp.int32)


class IID(Sampler):
    """b indices drawn uniformly with replacement: the sampling of the convergence theorems.
    Each draw generates b random indices and gathers (copies) the b samples: on CPU the slowest
    sampler (see the module docstring); `shuffled` and `partition` read blocks in place."""

    kind: ClassVar[str] = "iid"

    def draw(self, data, key, draw, shard):
        key = jax.random.fold_in(key, draw)
        if shard is not None:
            key = jax.random.fold_in(key, shard)
        idx = jax.random.randint(key, (self.local_batch_size,), 0, num_samples(data))
        return _take(data, idx), jnp.zeros((), jnp.int32)


class BlockSampler(Sampler):
    """A sampler of contiguous blocks of b = batch_size / shards samples, read in place
    (`lax.dynamic_slice`, no gather); `block_id` says which block a draw reads (the batch id of
    SAGA-type memories)."""

    blocks: ClassVar[bool] = True

    def block_id(self, data, key, draw, shard) -> jax.Array:
        raise NotImplementedError

    def draw(self, data, key, draw, shard):
        batch_id = self.block_id(data, key, draw, shard)
        return self.local_block(data, batch_id), batch_id

    def local_block(self, data, batch_id):
        """Block `batch_id` (samples batch_id * b ... batch_id * b + b - 1 of the shard), read in place."""
        return Rows(data, batch_id * self.local_batch_size, self.local_batch_size).read()


class Shuffled(BlockSampler):
    """Random reshuffling of contiguous blocks: the data cut into m = n // b blocks of b samples;
    epoch e = draw // m visits every block once, in the order `block_order(key, e, .)`, a fresh
    pseudo-random permutation per epoch (as benchmark_bilevel's sampler, which permutes its batch
    order at every epoch); each block is read in place (`lax.dynamic_slice`, no gather). The batch
    id is the block index, so SAGA-type memories (SABA, SRBA) work with it."""

    kind: ClassVar[str] = "shuffled"

    def block_id(self, data, key, draw, shard):
        """The block of draw number `draw`: position draw mod m of epoch draw // m's order."""
        m = num_samples(data) // self.local_batch_size
        epoch, position = jnp.divmod(jnp.asarray(draw, jnp.int32), m)
        return block_order(key, epoch, position, m)


class Partition(BlockSampler):
    """The data cut into n // b fixed contiguous blocks, one drawn uniformly (with replacement) at
    every draw and read in place (`lax.dynamic_slice`, no gather); the block index is the batch id
    of SAGA-type memories."""

    kind: ClassVar[str] = "partition"

    def block_id(self, data, key, draw, shard):
        """A block drawn uniformly."""
        m = num_samples(data) // self.local_batch_size
        return jax.random.randint(jax.random.fold_in(key, draw), (), 0, m).astype(jnp.int32)


def full(shards: int = 1) -> Sampler:
    return Full(shards=shards)


def iid(batch_size: int, shards: int = 1) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return IID(batch_size, shards)


def shuffled(batch_size: int, shards: int = 1) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return Shuffled(batch_size, shards)


def partition(batch_size: int, shards: int = 1) -> Sampler:
    check_positive_int("batch_size", batch_size)
    return Partition(batch_size, shards)


SAMPLERS = {"iid": iid, "shuffled": shuffled, "partition": partition}
BLOCK_SAMPLERS = ("shuffled", "partition")   # batch ids for SAGA-type memories


def make_sampler(batch_size: Optional[int], kind: str = "iid", shards: int = 1) -> Sampler:
    """`batch_size=None` means full batch; otherwise a sampler of the given kind, drawing
    batch_size / shards samples from each of `shards` contiguous shards."""
    if batch_size is None:
        return full(shards)
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; valid: {sorted(SAMPLERS)}.")
    return SAMPLERS[kind](batch_size, shards)

"""What a compiled program moves between devices: its collectives, read from the optimised HLO.

    ops = bj.collectives.of(jax.jit(step).lower(state, data).compile())
    sum(op.bytes for op in ops)      # bytes one call all-reduces / gathers / permutes

Used to check that a data-parallel step moves only parameter-sized operands (no sample crosses a
device) and to report the bytes per step in the benchmarks.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Tuple

import numpy as np

KINDS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter", "collective-broadcast")
_OP = re.compile(r"=\s*([^\n]*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


class Collective(NamedTuple):
    """One collective of a compiled program: its kind, result shapes ((dtype, dims), ...) and bytes."""

    kind: str
    shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
    bytes: int

    @property
    def largest(self) -> int:
        """The element count of its largest operand."""
        return max((int(np.prod(dims)) for _, dims in self.shapes), default=0)


def parse(hlo_text: str):
    """The collectives of an HLO module's text (an async pair counted once, at its start)."""
    ops = []
    for result, kind, _ in _OP.findall(hlo_text):
        shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _SHAPE.findall(result))
        ops.append(Collective(kind, shapes, sum(_BYTES[dt] * int(np.prod(dims)) for dt, dims in shapes)))
    return ops


def of(compiled) -> list:
    """The collectives of a compiled program (`jax.jit(f).lower(...).compile()`, or
    `eqx.filter_jit(f).lower(...).compile()`)."""
    compiled = getattr(compiled, "compiled", compiled)   # equinox's wrapper
    return parse(compiled.as_text())


__all__ = ["Collective", "KINDS", "of", "parse"]

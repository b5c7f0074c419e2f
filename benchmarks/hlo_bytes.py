"""Bytes a compiled XLA program reads and writes per call, loops counted as many times as they run.

`compiled.cost_analysis()["bytes accessed"]` counts the body of a `while` loop once, whatever its
trip count, so it undercounts a step with an LL phase or a solver loop. `bytes_accessed` walks the
compiled HLO text instead, with the same convention as XLA's cost analysis for the instructions of
a sequential computation (the operands an instruction reads plus the result it writes):

- a `while` body counts `known_trip_count` times (XLA's annotation; a loop without one counts once,
  with a warning); of a `conditional`, the branch that moves the most bytes counts (an upper bound:
  the samplers' rare reshuffle branch);
- a fusion reads its operands, except one that it only slices (`dynamic-slice`, `slice`: the slices
  are read) or updates in place (`dynamic-update-slice`: the update is written);
- parameters, constants, tuples, bitcasts are free.

`matrix_passes` counts the reads and the writes of arrays of at least `threshold` bytes (one
minibatch matrix): the passes over the batch data that the compiled program makes.
On a program without loops, `bytes_accessed` equals XLA's cost analysis (`tests/test_benchmarks.py`).
"""
from __future__ import annotations

import collections
import re
import warnings
from typing import Dict, List, Tuple

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f16": 2, "bf16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "iota", "partition-id",
         "replica-id"}


def _nbytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE[dtype]
    return total


def _parse(text: str) -> Tuple[Dict[str, List[dict]], str]:
    """{computation: [instruction]} and the entry computation's name."""
    comps, current, entry = {}, None, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)", line)
            current = m.group(2)
            comps[current] = []
            entry = current if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            root, name, shape, op, rest = m.groups()
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            args = rest[:i - 1]
            comps[current].append({"name": name, "shape": shape, "op": op, "root": bool(root), "attrs": rest[i:],
                                   "operands": re.findall(r"%([\w.\-]+)", args),
                                   "index": int(args) if op == "parameter" else None})
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _called(attrs: str, key: str) -> str:
    return re.search(key + r"=%?([\w.\-]+)", attrs).group(1)


def analyze(text: str, threshold: int) -> dict:
    """{"bytes": total, "by_op": {opcode: bytes}, "matrix_reads": n, "matrix_writes": n} of one call
    of the compiled program whose HLO text is `text` (`compiled.as_text()`)."""
    comps, entry = _parse(text)
    shapes = {c: {i["name"]: i["shape"] for i in insts} for c, insts in comps.items()}
    by_op: Dict[str, float] = collections.Counter()
    passes = collections.Counter()

    def fused_read(fused: str, k: int, full: int) -> int:
        insts = comps[fused]
        param = next(i["name"] for i in insts if i["op"] == "parameter" and i["index"] == k)
        users = [i for i in insts if param in i["operands"]]
        if users and all(u["op"] in ("dynamic-slice", "slice") and u["operands"][0] == param for u in users):
            return sum(_nbytes(u["shape"]) for u in users)
        if users and all(u["op"] == "dynamic-update-slice" and u["operands"][0] == param for u in users):
            return 0
        return full

    def cost(comp: str) -> Tuple[collections.Counter, collections.Counter]:
        ops, mats = collections.Counter(), collections.Counter()
        for ins in comps[comp]:
            op, attrs = ins["op"], ins["attrs"]
            if op in _FREE:
                continue
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
                if trips is None:
                    warnings.warn("hlo_bytes: a while loop without a known trip count is counted once")
                sub_ops, sub_mats = cost(_called(attrs, "body"))
                n = int(trips.group(1)) if trips else 1
                ops.update({k: v * n for k, v in sub_ops.items()})
                mats.update({k: v * n for k, v in sub_mats.items()})
                continue
            if op in ("conditional", "call"):
                if op == "call":
                    branches = [_called(attrs, "to_apply")]
                elif "branch_computations" in attrs:
                    branches = re.findall(r"%?([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", attrs).group(1))
                else:
                    branches = [_called(attrs, "true_computation"), _called(attrs, "false_computation")]
                sub_ops, sub_mats = max((cost(b) for b in branches), key=lambda c: sum(c[0].values()))
                ops.update(sub_ops)
                mats.update(sub_mats)
                continue
            out = _nbytes(ins["shape"])
            if op == "fusion":
                fused = _called(attrs, "calls")
                reads = [fused_read(fused, k, _nbytes(shapes[comp].get(o, ""))) for k, o in enumerate(ins["operands"])]
                root = next(i for i in comps[fused] if i["root"])
                if root["op"] == "dynamic-update-slice":
                    out = _nbytes(shapes[fused][root["operands"][1]])
            elif op in ("dynamic-slice", "slice"):
                reads = [out]
            elif op == "dynamic-update-slice":
                out = _nbytes(shapes[comp].get(ins["operands"][1], ""))
                reads = [out]
            else:
                reads = [_nbytes(shapes[comp].get(o, "")) for o in ins["operands"]]
            ops[op] += sum(reads) + out
            mats["reads"] += sum(r >= threshold for r in reads)
            mats["writes"] += int(out >= threshold)
        return ops, mats

    ops, mats = cost(entry)
    by_op.update(ops)
    return {"bytes": float(sum(ops.values())), "by_op": dict(by_op), "matrix_reads": int(mats["reads"]),
            "matrix_writes": int(mats["writes"])}


def bytes_accessed(compiled, threshold: int) -> dict:
    """`analyze` of a compiled executable (`jax.jit(f).lower(...).compile()`)."""
    return analyze(compiled.as_text(), threshold)

"""`rebuild`: a tree of components (an algorithm, its direction rule, samplers, the problem) with
some of its parts replaced, static fields included.

`jax.tree_util` and `eqx.tree_at` reach only a Module's array fields; an algorithm's problem and
samplers are static fields (hashable configuration), so transformations that change them (a
precision policy on the objectives, the data-parallel view of the samplers and objectives) walk
the Modules' dataclass fields instead and rebuild only what changed (`dataclasses.replace`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import equinox as eqx


def rebuild(tree: Any, replace: Callable[[Any], Any]) -> Any:
    """`tree` with every part `x` for which `replace(x) is not x` replaced by `replace(x)`, in
    nested equinox Modules (every dataclass field, static or not), tuples, NamedTuples and
    lists; a replaced part is not walked into. Unchanged subtrees are returned as they are."""
    new = replace(tree)
    if new is not tree:
        return new
    if isinstance(tree, eqx.Module):
        changes = {}
        for field in dataclasses.fields(tree):
            old = getattr(tree, field.name, None)
            value = rebuild(old, replace)
            if value is not old:
                changes[field.name] = value
        return dataclasses.replace(tree, **changes) if changes else tree
    if isinstance(tree, (tuple, list)):
        items = [rebuild(x, replace) for x in tree]
        if any(a is not b for a, b in zip(items, tree)):
            return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree


__all__ = ["rebuild"]

"""The one problem bundle: what a run needs (the problem, its data, a start) and what it is measured
against (a reference solution, when one is known).

    inst = bj.problems.quadratic_bilevel(key, dim_upper=5, dim_lower=10)
    alg.init(inst.theta0, inst.phi0, key, inst.data)
    inst.reference.theta, inst.reference.value          # theta* and F(theta*) (None: not known)

Every builder of `bj.problems` returns an `Instance`; a problem with closed forms or extra arrays
(quadratic means, a held-out test set, a corruption mask) returns a subclass that adds them as
fields and methods (`QuadraticBilevel.grad`, `HyperCleaning.test_accuracy`). The experiments
(`experiments.problems`), the benchmarks (`benchmarks.setups`) and the tests use the same type.

An `Instance` is a frozen dataclass registered as a pytree (the fields marked `static` are part of
its structure), so a whole instance can cross `jit`/`vmap` (one per seed, stacked); its methods
are plain bound methods, so `jax.jit(inst.grad)` works as it does for a function. `_replace`
returns a copy with some fields changed, as a NamedTuple's does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax


class Reference(NamedTuple):
    """A known solution of the bilevel problem: theta* and F(theta*) = f_upper(theta*, phi*(theta*))."""

    theta: Any
    value: Any


def static(default=dataclasses.MISSING, **kwargs):
    """A field of an `Instance` that is configuration (a count, a name), not data: part of the
    pytree's structure, never traced."""
    return dataclasses.field(default=default, metadata={"static": True}, **kwargs)


def instance_type(cls):
    """Class decorator of an `Instance` subclass: a frozen dataclass registered as a pytree
    (fields made with `static()` are metadata, the others children)."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(cls, data_fields=[f.name for f in fields if not f.metadata.get("static")],
                                     meta_fields=[f.name for f in fields if f.metadata.get("static")])
    return cls


@instance_type
class Instance:
    """A bilevel problem instance.

    problem: the `bj.BilevelProblem` (or `bj.MultiObjectiveProblem`).
    data: `(upper_data, lower_data)`, as every algorithm takes it.
    theta0, phi0: the starting point (pytrees; an equinox model is fine).
    reference: a `Reference(theta, value)` when theta* is known (closed form), else None.
    name: a short identifier ("quadratic"); description: one line for titles and logs.
    """

    problem: Any
    data: Any
    theta0: Any
    phi0: Any
    reference: Optional[Reference] = dataclasses.field(default=None, kw_only=True)
    name: str = static("", kw_only=True)
    description: str = static("", kw_only=True)

    def _replace(self, **changes) -> "Instance":
        """A copy with `changes` applied (as `NamedTuple._replace`)."""
        return dataclasses.replace(self, **changes)


__all__ = ["Instance", "Reference", "instance_type", "static"]

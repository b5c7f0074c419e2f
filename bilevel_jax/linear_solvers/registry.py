"""The registry of the linear solvers: `REGISTRY[name]` is an `Entry(build, example, tags)`.

    entry = bj.linear_solvers.REGISTRY["cg"]
    entry.build(maxiter=10)          # the factory, `bj.linear_solvers.cg` (a config table's keywords)
    entry.example()                  # a small instance that the tests hold to its tags
    entry.tags                       # frozenset of TAGS

The one list of the solvers: configs look names up here (`experiments.sweep`), the README's solver
table and the tests are checked against it (`tests/test_registries.py`: every entry, on SPD,
indefinite, singular and NaN-containing operators, returns x NaN in every leaf exactly when its
status is not OK, and solves what its tags claim to 1e-8 against a dense solve in float64).

`example()` solves, alone or over repeated solves (`stateful`), a system of dimension 4..8 whose
eigenvalues lie in [0.5, 1.5] in absolute value to that accuracy: its step sizes (eta = 1) and
lengths are set for that spectrum, not for general use.
"""
from __future__ import annotations

from typing import Callable, FrozenSet, NamedTuple

from bilevel_jax.linear_solvers.base import LinearSolver
from bilevel_jax.linear_solvers.cg import cg
from bilevel_jax.linear_solvers.damped import damped
from bilevel_jax.linear_solvers.dense import dense
from bilevel_jax.linear_solvers.gd import gd, neumann
from bilevel_jax.linear_solvers.lanczos import lanczos
from bilevel_jax.linear_solvers.minres import minres
from bilevel_jax.linear_solvers.normal import normal
from bilevel_jax.linear_solvers.sampled_neumann import sampled_neumann
from bilevel_jax.linear_solvers.stochastic_neumann import stochastic_neumann
from bilevel_jax.linear_solvers.subspace import subspace

TAGS = {
    "spd_only": "solves A x = b for a symmetric positive definite A (on another A it may fail loudly, x NaN, "
                "or return an x that does not solve it, with status OK, as the Neumann series do)",
    "indefinite": "also solves a symmetric indefinite, nonsingular A",
    "stochastic": "`matvec(x, key)` applies an independent estimate of A per key, `solve` needs a key, and x "
                  "is an unbiased estimate (of the truncated Neumann series)",
    "stateful": "a solve continues the previous ones (the state is the method's memory, not only a warm "
                "start): repeated solves of one system converge, one solve alone does not",
    "wrapper": "wraps another solver (`solver=`); its other tags are those of `example()`, whose inner "
               "solver is given",
}


class Entry(NamedTuple):
    """A registered solver: `build` its factory, `example` a zero-argument builder of the small
    test instance (module docstring), `tags` a subset of `TAGS`."""

    build: Callable[..., LinearSolver]
    example: Callable[[], LinearSolver]
    tags: FrozenSet[str]


def _entry(build, example, *tags: str) -> Entry:
    unknown = set(tags) - set(TAGS)
    if unknown:
        raise ValueError(f"unknown solver tags {sorted(unknown)}; valid: {sorted(TAGS)}.")
    return Entry(build, example, frozenset(tags))


REGISTRY = {
    "cg": _entry(cg, lambda: cg(maxiter=20), "spd_only"),
    "minres": _entry(minres, lambda: minres(maxiter=20), "indefinite"),
    "gd": _entry(gd, lambda: gd(steps=60, eta=1.0), "spd_only"),
    "neumann": _entry(neumann, lambda: neumann(steps=60, eta=1.0), "spd_only"),
    "stochastic_neumann": _entry(stochastic_neumann, lambda: stochastic_neumann(steps=40, eta=1.0),
                                 "spd_only", "stochastic"),
    "sampled_neumann": _entry(sampled_neumann, lambda: sampled_neumann(steps=40, eta=1.0), "spd_only", "stochastic"),
    "dense": _entry(dense, dense, "spd_only"),
    "damped": _entry(damped, lambda: damped(cg(maxiter=20), damping=0.0), "spd_only", "wrapper"),
    "normal": _entry(normal, lambda: normal(cg(maxiter=20)), "indefinite", "wrapper"),
    "subspace": _entry(subspace, lambda: subspace(eta=1.0), "spd_only", "stateful"),
    "lanczos": _entry(lanczos, lambda: lanczos(4, m_start=4), "spd_only", "stateful"),
}


__all__ = ["Entry", "REGISTRY", "TAGS"]

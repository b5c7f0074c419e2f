"""The bilevel problem.

    min_{theta in Theta}  F(theta) = f_upper(theta, phi*(theta), upper_batch)
    s.t.  phi*(theta) = argmin_phi f_lower(theta, phi, lower_batch)

`theta` (upper level, UL) and `phi` (lower level, LL) are arbitrary pytrees, equinox Modules
included: only their inexact-array leaves are differentiated and updated. A `batch` is a pytree
whose leaves share a leading sample axis, or None for deterministic problems.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax.cache import StaticFields

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)   # equality and hash: StaticFields
class BilevelProblem(StaticFields):
    """A bilevel problem given by its two objectives.

    Args:
      f_upper: `f_upper(theta, phi, batch) -> scalar`, the UL objective.
      f_lower: `f_lower(theta, phi, batch) -> scalar`, the LL objective, strongly convex in `phi`
        for the implicit-gradient methods.
      project_upper: optional Euclidean projection `theta -> P_Theta(theta)` applied after every
        UL step (e.g. `lambda t: jnp.clip(t, 0, 1)`); None means Theta is the whole space.
      lower_inequality: optional `P(theta, phi) -> pytree`, the LL constraints P <= 0 (elementwise).
      lower_equality: optional `Q(theta, phi) -> pytree`, the LL constraints Q = 0. With either,
        the LL is min_{phi in Phi(theta)} f_lower, Phi(theta) = {phi : P <= 0, Q = 0}, and
        `bj.hypergradient` uses the KKT implicit gradient (`bj.hypergrad.kkt`).
      pessimistic: False (default) for the optimistic reading min_theta min_{phi in S(theta)} f_upper
        when the LL has many solutions S(theta); True for the pessimistic problem
        min_theta max_{phi in S(theta)} f_upper (`bj.algorithms.pessimistic_penalty` solves it).
        The two coincide when S(theta) is a singleton.
      sample_chunk: None (default), or a number of samples c: every oracle pass over a minibatch
        (a gradient, a value, the Hessian- and cross-products of one linearization) runs as a
        `lax.scan` over the batch's consecutive sub-batches of c samples and averages them
        (`bj.oracles.over_samples`). All the contractions one pass makes of a sub-batch then read
        it from cache, where a pass over the whole batch reads each per-sample array from memory
        once per contraction (an objective with dense per-sample matrices: 2.1x faster SOBA steps
        with c = 1 on benchmark_bilevel's quadratic, `make bench ARGS="--only bilevel"`). Valid
        when f(theta, phi, batch) is the mean over the batch's samples of per-sample terms plus
        terms that do not depend on the batch (the results then equal the unchunked ones up to
        rounding); the batch size (per device, with a mesh) must be a multiple of c.
    """

    f_upper: Callable[[PyTree, PyTree, PyTree], jax.Array]
    f_lower: Callable[[PyTree, PyTree, PyTree], jax.Array]
    project_upper: Optional[Callable[[PyTree], PyTree]] = None
    lower_inequality: Optional[Callable[[PyTree, PyTree], PyTree]] = None
    lower_equality: Optional[Callable[[PyTree, PyTree], PyTree]] = None
    pessimistic: bool = False
    sample_chunk: Optional[int] = None

    @property
    def constrained(self) -> bool:
        """Whether the LL has constraints (`lower_inequality` or `lower_equality`)."""
        return self.lower_inequality is not None or self.lower_equality is not None

    def __post_init__(self):
        for name in ("f_upper", "f_lower"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"BilevelProblem: `{name}` must be a callable "
                    f"`{name}(theta, phi, batch) -> scalar`, got {type(getattr(self, name)).__name__}."
                )
        if self.project_upper is not None and not callable(self.project_upper):
            raise TypeError(
                "BilevelProblem: `project_upper` must be None or a callable theta -> theta, "
                f"got {type(self.project_upper).__name__}."
            )
        if not isinstance(self.pessimistic, bool):
            raise TypeError(f"BilevelProblem: `pessimistic` must be a bool, got {self.pessimistic!r}.")
        chunk = self.sample_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"BilevelProblem: `sample_chunk` must be None or a positive int, got {chunk!r}.")
        for name in ("lower_inequality", "lower_equality"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"BilevelProblem: `{name}` must be None or a callable "
                                f"`{name}(theta, phi) -> pytree`, got {type(fn).__name__}.")

    def project(self, theta: PyTree) -> PyTree:
        """P_Theta(theta), the identity when the problem has no UL constraint."""
        return theta if self.project_upper is None else self.project_upper(theta)

    def validate(self, theta: PyTree, phi: PyTree, data: Any) -> None:
        """Check, before tracing, that `theta`, `phi` and `data` fit the objectives.

        Raises a ValueError/TypeError naming the mismatch: non-float leaves, mixed float dtypes,
        a `data` that is not an `(upper, lower)` pair, objectives that fail or do not return a
        real scalar on these structures.
        """
        check_data_pair(data)
        _check_float_leaves("theta", theta)
        _check_float_leaves("phi", phi)
        dtypes = {jnp.result_type(x) for x in _inexact_leaves((theta, phi))}
        if len(dtypes) > 1:
            raise TypeError(
                "theta and phi mix floating dtypes "
                f"{sorted(str(d) for d in dtypes)}; cast them to one dtype "
                "(mixed precision would silently change the hypergradient)."
            )
        upper, lower = data
        for name, fn, batch in (("f_upper", self.f_upper, upper), ("f_lower", self.f_lower, lower)):
            try:
                out = eqx.filter_eval_shape(fn, theta, phi, batch)
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    f"{name}(theta, phi, batch) fails on the given structures "
                    f"(theta: {_describe(theta)}; phi: {_describe(phi)}; batch: {_describe(batch)}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
                    and jnp.issubdtype(out.dtype, jnp.floating)):
                raise ValueError(f"{name} must return a real scalar, got {_describe(out)}.")
        for name in ("lower_inequality", "lower_equality"):
            fn = getattr(self, name)
            if fn is None:
                continue
            try:
                out = eqx.filter_eval_shape(fn, theta, phi)
            except Exception as e:  # noqa: BLE001 - re-raised with context
                raise ValueError(f"{name}(theta, phi) fails on the given structures (theta: {_describe(theta)}; "
                                 f"phi: {_describe(phi)}): {type(e).__name__}: {e}") from e
            leaves = jax.tree_util.tree_leaves(out)
            if not leaves or not all(isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating)
                                     for x in leaves):
                raise ValueError(f"{name} must return a pytree of real floating arrays, got {_describe(out)}.")


def check_problem(problem: Any, where: str = "") -> BilevelProblem:
    """`problem` if it is a `BilevelProblem`, else a TypeError (prefixed with `where`)."""
    if not isinstance(problem, BilevelProblem):
        prefix = f"{where}: " if where else ""
        raise TypeError(f"{prefix}problem must be a bj.BilevelProblem, got {type(problem).__name__}.")
    return problem


def check_optimistic(problem: BilevelProblem, where: str) -> BilevelProblem:
    """`problem`, unless it states the pessimistic problem (`pessimistic=True`), which `where` does
    not solve (it computes the optimistic hypergradient or LL solution): a ValueError naming the
    presets that solve it (tagged "pessimistic" in `bj.algorithms.CAPABILITIES`: `pessimistic_penalty`)."""
    if getattr(problem, "pessimistic", False):
        from bilevel_jax.algorithms.capabilities import presets_with   # the presets import this module
        solvers = " or ".join(f"bj.algorithms.{name}" for name in presets_with("pessimistic"))
        raise ValueError(f"{where}: the problem is pessimistic (BilevelProblem(..., pessimistic=True): "
                         "min_theta max_(phi in S(theta)) f_upper) and this solves the optimistic problem instead. "
                         f"Use {solvers}, or build the problem with pessimistic=False for the optimistic reading.")
    return problem


def check_data_pair(data: Any) -> None:
    """`data` must be `(upper_data, lower_data)`; each a pytree or None."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(
            "data must be a pair (upper_data, lower_data) (each a pytree or None), "
            f"got {type(data).__name__}."
        )


def check_same_structure(name: str, reference: PyTree, candidate: PyTree) -> None:
    """Raise a clear error when `candidate` does not have `reference`'s structure and shapes."""
    ref_leaves, ref_def = jax.tree_util.tree_flatten(reference)
    cand_leaves, cand_def = jax.tree_util.tree_flatten(candidate)
    if ref_def != cand_def:
        raise ValueError(f"{name} has structure {cand_def}, expected {ref_def}.")
    for i, (a, b) in enumerate(zip(ref_leaves, cand_leaves)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"{name}: leaf {i} has shape {jnp.shape(b)}, expected {jnp.shape(a)}.")


def _inexact_leaves(tree: PyTree):
    return [x for x in jax.tree_util.tree_leaves(tree) if eqx.is_inexact_array(x)]


def _check_float_leaves(name: str, tree: PyTree) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = [(p, x) for p, x in leaves if eqx.is_array_like(x) and not isinstance(x, (bool,))]
    if not any(eqx.is_inexact_array(x) for _, x in arrays):
        raise TypeError(f"{name} has no floating-point array leaf to optimise: {_describe(tree)}.")
    for path, x in arrays:
        if eqx.is_array(x) and not eqx.is_inexact_array(x):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {x.dtype}; the variables of a "
                "bilevel problem must be floating point (integer leaves cannot be differentiated)."
            )


def _describe(tree: PyTree) -> str:
    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return f"{x.dtype}{list(x.shape)}"
        return type(x).__name__

    return str(jax.tree_util.tree_map(leaf, tree))

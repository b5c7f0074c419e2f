"""The robust multi-objective bilevel problem: n objective pairs sharing the upper-level variable.

    min_{theta in Theta} max_{lambda in Delta_n}  sum_i lambda_i f_u,i(theta, phi_i*(theta))
    s.t.  phi_i*(theta) = argmin_{phi_i} f_l,i(theta, phi_i),   i = 1..n

(Gu, Lu, Ram, Weng, "Min-Max Multi-objective Bilevel Optimization with Applications in Robust
Machine Learning", ICLR 2023, arXiv:2203.01924, eq. (1)). Max over the simplex Delta_n is the
worst objective: max_lambda sum_i lambda_i F_i(theta) = max_i F_i(theta), F_i(theta) =
f_u,i(theta, phi_i*(theta)). Each pair has its own LL variable phi_i; theta is shared.

Two ways to give the n pairs:
  - one pair `(f_upper, f_lower)` and data with a leading task axis (the usual case: the same
    model on n tasks). The tasks are then a `jax.vmap` inside the algorithms.
  - lists `[f_u,1, ..., f_u,n]`, `[f_l,1, ..., f_l,n]` (different objectives per task); the tasks
    are then unrolled (one trace per task).
Either way `phi` is the per-task LL variables stacked on a leading axis of size n (every leaf of
shape (n, ...)), and `data = (upper, lower)` has a leading task axis on every leaf: task i's
batch is `upper[i]` (then the sample axis, as in `bj.BilevelProblem`). With lists, the phi_i
must share shapes (stack them; pad where the domains differ).

`pair(i)` is task i's `bj.BilevelProblem`, so every single-problem tool (oracles, linear solvers,
`bj.hypergrad.implicit_direction`) applies per task; `map_tasks` runs a per-task function over
all tasks (vmap, or the unrolled loop for lists) and stacks its outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import equinox as eqx
import jax
import jax.numpy as jnp

from bilevel_jax import oracles
from bilevel_jax.problem import BilevelProblem, check_data_pair

PyTree = Any
Fn = Callable[[PyTree, PyTree, PyTree], jax.Array]


@dataclasses.dataclass(frozen=True)
class MultiObjectiveProblem:
    """n bilevel objective pairs with a shared UL variable theta (see the module docstring).

    Args:
      f_upper: `f(theta, phi_i, batch_i) -> scalar` shared by all tasks, or a sequence of n such.
      f_lower: the same for the LL objectives (strongly convex in phi_i).
      num_tasks: n (required with shared functions; the lists' length otherwise).
      project_upper: optional Euclidean projection P_Theta applied after every UL step.
    """

    f_upper: Union[Fn, Tuple[Fn, ...]]
    f_lower: Union[Fn, Tuple[Fn, ...]]
    num_tasks: Optional[int] = None
    project_upper: Optional[Callable[[PyTree], PyTree]] = None

    def __post_init__(self):
        f_upper, f_lower, n = check_pairs("MultiObjectiveProblem", self.f_upper, self.f_lower, self.num_tasks,
                                          "num_tasks", "f(theta, phi_i, batch_i)")
        object.__setattr__(self, "f_upper", f_upper)
        object.__setattr__(self, "f_lower", f_lower)
        object.__setattr__(self, "num_tasks", n)
        check_projection("MultiObjectiveProblem", "project_upper", self.project_upper, "theta -> theta")

    @property
    def shared(self) -> bool:
        """One pair of functions for all tasks (tasks vmapped) rather than lists (tasks unrolled)."""
        return not isinstance(self.f_upper, tuple)

    def pair(self, i: int = 0) -> BilevelProblem:
        """Task i's bilevel problem (without the UL projection: the algorithms project theta once)."""
        if self.shared:
            return BilevelProblem(self.f_upper, self.f_lower)
        return BilevelProblem(self.f_upper[i], self.f_lower[i])

    def project(self, theta: PyTree) -> PyTree:
        """P_Theta(theta) (the identity without a UL constraint)."""
        return theta if self.project_upper is None else self.project_upper(theta)

    def map_tasks(self, fn: Callable, *task_args) -> PyTree:
        """`fn(pair_problem, *args_i)` for every task i, outputs stacked on a leading task axis.

        `task_args` are pytrees with a leading task axis on every array leaf (None leaves pass as
        None). Shared functions: one `jax.vmap` (fn is traced once); lists: a loop over the n pairs.
        The oracle calls of fn (`bj.oracles`) are counted per task (a solver's matvec count may
        differ between tasks) and recorded, summed over the tasks, in the open `counting` block.
        """
        def counted(problem, *args):
            with oracles.counting(times=0) as tally:
                out = fn(problem, *args)
            return out, tally.counts

        if self.shared:
            problem = self.pair()
            outs, counts = jax.vmap(lambda *args: counted(problem, *args))(*task_args)
        else:
            per_task = [counted(self.pair(i), *task_slice(task_args, i)) for i in range(self.num_tasks)]
            outs, counts = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_task)
        oracles.record(oracles.OracleCounts(*(jnp.sum(c) for c in counts)))
        return outs

    def values(self, theta, phi, data, level: str = "upper") -> jax.Array:
        """The n objective values f_u,i(theta, phi_i, data_i) (or f_l,i with level="lower"), shape (n,)."""
        index = {"upper": 0, "lower": 1}[level]

        def one(p, phi_i, batch_i):
            return (p.f_upper if index == 0 else p.f_lower)(theta, phi_i, batch_i)

        return self.map_tasks(one, phi, data[index])

    def validate(self, theta, phi, data) -> None:
        """Check, before tracing, that phi and data carry the task axis and fit every pair."""
        check_data_pair(data)
        check_task_axis(self.num_tasks, phi=phi, **{"upper data": data[0], "lower data": data[1]})
        for i in range(1 if self.shared else self.num_tasks):
            phi_i, upper_i, lower_i = task_slice((phi, data[0], data[1]), i)
            self.pair(i).validate(theta, phi_i, (upper_i, lower_i))


@dataclasses.dataclass(frozen=True)
class MinMaxBilevelProblem:
    """The multi-block min-max bilevel problem (Hu, Zhong, Yang, "Multi-block Min-max Bilevel
    Optimization with Applications in Multi-task Deep AUC Maximization", NeurIPS 2022,
    arXiv:2206.00260):

        min_{theta in Theta} max_{y in Y^m}  (1/m) sum_i f_i(theta, y_i, phi_i*(theta)),
        phi_i*(theta) = argmin_phi g_i(theta, phi),   i = 1..m,

    m blocks, each with its own dual (max) variable y_i in Y and its own LL variable phi_i; theta is
    shared. f_i is strongly concave in y_i and g_i strongly convex in phi (the paper's setting).
    `bj.algorithms.mmb` solves it.

    The blocks are given as `MultiObjectiveProblem`'s tasks are (one shared pair with data on a
    leading block axis, vmapped; or lists of m functions, unrolled), and y, phi and both data
    levels carry the leading block axis of size m.

    Args:
      f_upper: `f(theta, y_i, phi_i, batch_i) -> scalar`, or a sequence of m such.
      f_lower: `g(theta, phi_i, batch_i) -> scalar`, or a sequence of m such.
      num_blocks: m (required with shared functions; the lists' length otherwise).
      project_upper: optional Euclidean projection P_Theta, applied after every UL step.
      project_dual: optional Euclidean projection P_Y of one block's y_i (no block axis), applied
        after every dual step (None: Y is the whole space).
    """

    f_upper: Union[Callable, Tuple[Callable, ...]]
    f_lower: Union[Fn, Tuple[Fn, ...]]
    num_blocks: Optional[int] = None
    project_upper: Optional[Callable[[PyTree], PyTree]] = None
    project_dual: Optional[Callable[[PyTree], PyTree]] = None

    def __post_init__(self):
        kind = "MinMaxBilevelProblem"
        f_upper, f_lower, n = check_pairs(kind, self.f_upper, self.f_lower, self.num_blocks, "num_blocks",
                                          "f_upper(theta, y_i, phi_i, batch_i), f_lower(theta, phi_i, batch_i)")
        object.__setattr__(self, "f_upper", f_upper)
        object.__setattr__(self, "f_lower", f_lower)
        object.__setattr__(self, "num_blocks", n)
        check_projection(kind, "project_upper", self.project_upper, "theta -> theta")
        check_projection(kind, "project_dual", self.project_dual, "y_i -> y_i")

    @property
    def shared(self) -> bool:
        return not isinstance(self.f_upper, tuple)

    @property
    def blocks(self) -> MultiObjectiveProblem:
        """The m blocks as bilevel pairs in the joint variable x_i = (theta, y_i):
        f_u,i((theta, y_i), phi, b) = f_i(theta, y_i, phi, b), f_l,i((theta, y_i), phi, b) = g_i(theta, phi, b).
        So one implicit direction of pair i at (theta, y_i) is (grad_theta F_i - J_i v_i, grad_y f_i):
        g_i does not depend on y_i, hence the y part has no implicit term."""
        if self.shared:
            return MultiObjectiveProblem(JointUpper(self.f_upper), JointLower(self.f_lower), self.num_blocks)
        return MultiObjectiveProblem(tuple(map(JointUpper, self.f_upper)), tuple(map(JointLower, self.f_lower)))

    def project(self, theta: PyTree) -> PyTree:
        """P_Theta(theta) (the identity without a UL constraint)."""
        return theta if self.project_upper is None else self.project_upper(theta)

    def project_y(self, y_i: PyTree) -> PyTree:
        """P_Y(y_i) of one block (the identity when Y is the whole space)."""
        return y_i if self.project_dual is None else self.project_dual(y_i)

    def validate(self, theta, y, phi, data) -> None:
        """Check, before tracing, that y, phi and data carry the block axis and fit every block."""
        check_data_pair(data)
        check_task_axis(self.num_blocks, y=y, phi=phi, **{"upper data": data[0], "lower data": data[1]})
        blocks = self.blocks
        for i in range(1 if self.shared else self.num_blocks):
            y_i, phi_i, upper_i, lower_i = task_slice((y, phi, data[0], data[1]), i)
            blocks.pair(i).validate((theta, y_i), phi_i, (upper_i, lower_i))


@dataclasses.dataclass(frozen=True)
class JointUpper:
    """f((theta, y), phi, batch) = f_upper(theta, y, phi, batch): a block's UL objective in the joint
    variable (equal for equal f_upper, so algorithms holding it compile once)."""

    f_upper: Callable

    def __call__(self, x, phi, batch):
        return self.f_upper(x[0], x[1], phi, batch)


@dataclasses.dataclass(frozen=True)
class JointLower:
    """g((theta, y), phi, batch) = f_lower(theta, phi, batch) (independent of y)."""

    f_lower: Fn

    def __call__(self, x, phi, batch):
        return self.f_lower(x[0], phi, batch)


def check_pairs(kind: str, f_upper, f_lower, n, n_name: str, signature: str):
    """The objectives of n pairs, one shared pair or two lists (see `MultiObjectiveProblem`):
    returns `(f_upper, f_lower, n)`, lists as tuples; clear errors prefixed with `kind`."""
    listed = [isinstance(f, (list, tuple)) for f in (f_upper, f_lower)]
    if listed[0] != listed[1]:
        raise TypeError(f"{kind}: give f_upper and f_lower both as one function or both as lists of n functions.")
    if listed[0]:
        f_upper, f_lower = tuple(f_upper), tuple(f_lower)
        if len(f_lower) != len(f_upper) or not f_upper:
            raise ValueError(f"{kind}: f_upper has {len(f_upper)} functions and f_lower {len(f_lower)}; give one "
                             "pair per task.")
        if n is not None and n != len(f_upper):
            raise ValueError(f"{kind}: {n_name}={n} but {len(f_upper)} function pairs.")
        n, fns = len(f_upper), f_upper + f_lower
    else:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{kind}: with one shared (f_upper, f_lower) pair, {n_name} must be a positive int (the "
                             f"size of the leading axis of phi and data), got {n!r}.")
        fns = (f_upper, f_lower)
    for f in fns:
        if not callable(f):
            raise TypeError(f"{kind}: objectives must be callables {signature}, got {type(f).__name__}.")
    return f_upper, f_lower, n


def check_projection(kind: str, name: str, fn, signature: str) -> None:
    """`fn` is None or callable (a projection argument of a problem type)."""
    if fn is not None and not callable(fn):
        raise TypeError(f"{kind}: {name} must be None or a callable {signature}.")


def check_task_axis(n: int, **trees) -> None:
    """Every array leaf of every named tree has a leading axis of size n (the task/block axis)."""
    for name, tree in trees.items():
        for x in jax.tree_util.tree_leaves(tree):
            if eqx.is_array(x) and (jnp.ndim(x) == 0 or jnp.shape(x)[0] != n):
                raise ValueError(f"{name}: every array leaf needs a leading task axis of size {n}, got a leaf of "
                                 f"shape {jnp.shape(x)}.")


def task_slice(tree: PyTree, i: int) -> PyTree:
    """Task i of a pytree with a leading task axis on its array leaves (other leaves as they are)."""
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def stack_tasks(trees: Sequence[PyTree]) -> PyTree:
    """Per-task pytrees (e.g. n equinox models) stacked on a leading task axis (array leaves only)."""
    arrays = [eqx.filter(t, eqx.is_array) for t in trees]
    static = eqx.partition(trees[0], eqx.is_array)[1]
    return eqx.combine(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *arrays), static)


__all__ = ["MinMaxBilevelProblem", "MultiObjectiveProblem", "stack_tasks", "task_slice"]

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
        listed = [isinstance(f, (list, tuple)) for f in (self.f_upper, self.f_lower)]
        if listed[0] != listed[1]:
            raise TypeError("MultiObjectiveProblem: give f_upper and f_lower both as one function or both "
                            "as lists of n functions.")
        if listed[0]:
            object.__setattr__(self, "f_upper", tuple(self.f_upper))
            object.__setattr__(self, "f_lower", tuple(self.f_lower))
            n = len(self.f_upper)
            if len(self.f_lower) != n or n < 1:
                raise ValueError(f"MultiObjectiveProblem: f_upper has {len(self.f_upper)} functions and f_lower "
                                 f"{len(self.f_lower)}; give one pair per task.")
            if self.num_tasks is not None and self.num_tasks != n:
                raise ValueError(f"MultiObjectiveProblem: num_tasks={self.num_tasks} but {n} function pairs.")
            object.__setattr__(self, "num_tasks", n)
            fns = self.f_upper + self.f_lower
        else:
            if not isinstance(self.num_tasks, int) or isinstance(self.num_tasks, bool) or self.num_tasks < 1:
                raise ValueError("MultiObjectiveProblem: with one shared (f_upper, f_lower) pair, num_tasks must be "
                                 f"a positive int (the size of the task axis of phi and data), got {self.num_tasks!r}.")
            fns = (self.f_upper, self.f_lower)
        for f in fns:
            if not callable(f):
                raise TypeError(f"MultiObjectiveProblem: objectives must be callables f(theta, phi_i, batch_i), "
                                f"got {type(f).__name__}.")
        if self.project_upper is not None and not callable(self.project_upper):
            raise TypeError("MultiObjectiveProblem: project_upper must be None or a callable theta -> theta.")

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
        """
        if self.shared:
            problem = self.pair()
            return jax.vmap(lambda *args: fn(problem, *args))(*task_args)
        outs = [fn(self.pair(i), *task_slice(task_args, i)) for i in range(self.num_tasks)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    def values(self, theta, phi, data, level: str = "upper") -> jax.Array:
        """The n objective values f_u,i(theta, phi_i, data_i) (or f_l,i with level="lower"), shape (n,)."""
        index = {"upper": 0, "lower": 1}[level]

        def one(p, phi_i, batch_i):
            return (p.f_upper if index == 0 else p.f_lower)(theta, phi_i, batch_i)

        return self.map_tasks(one, phi, data[index])

    def validate(self, theta, phi, data) -> None:
        """Check, before tracing, that phi and data carry the task axis and fit every pair."""
        check_data_pair(data)
        n = self.num_tasks
        for name, tree in (("phi", phi), ("upper data", data[0]), ("lower data", data[1])):
            for x in jax.tree_util.tree_leaves(tree):
                if eqx.is_array(x) and (jnp.ndim(x) == 0 or jnp.shape(x)[0] != n):
                    raise ValueError(f"{name}: every array leaf needs a leading task axis of size num_tasks={n}, "
                                     f"got a leaf of shape {jnp.shape(x)}.")
        for i in range(1 if self.shared else n):
            phi_i, upper_i, lower_i = task_slice((phi, data[0], data[1]), i)
            self.pair(i).validate(theta, phi_i, (upper_i, lower_i))


def task_slice(tree: PyTree, i: int) -> PyTree:
    """Task i of a pytree with a leading task axis on its array leaves (other leaves as they are)."""
    return jax.tree_util.tree_map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def stack_tasks(trees: Sequence[PyTree]) -> PyTree:
    """Per-task pytrees (e.g. n equinox models) stacked on a leading task axis (array leaves only)."""
    arrays = [eqx.filter(t, eqx.is_array) for t in trees]
    static = eqx.partition(trees[0], eqx.is_array)[1]
    return eqx.combine(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *arrays), static)


__all__ = ["MultiObjectiveProblem", "stack_tasks", "task_slice"]

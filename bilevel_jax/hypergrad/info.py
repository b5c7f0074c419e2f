"""What every hypergradient reports: one info type for the implicit, the KKT (constrained LL) and
the custom-root paths of `bj.hypergradient`."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax

from bilevel_jax.linear_solvers import SolverInfo

PyTree = Any


class HypergradInfo(NamedTuple):
    """A hypergradient's report.

    v: the linear-system solution, v ~ A^{-1} grad_phi f_upper (for a constrained LL: the phi part
      a of the KKT adjoint); NaN if the solve failed.
    residual_norm: ||b - A v|| of the solve (NaN for stochastic solvers and failed solves).
    status: a `bj.status` code: the solver's, | NONFINITE if g is non-finite (| DEGENERATE for a
      constrained LL whose active set is degenerate).
    solver: the solver's `SolverInfo`.

    Constrained LLs only (None otherwise; Gould, Fernando, Cherian, Anderson, Santa Cruz, Guo, "On
    Differentiating Parameterized Argmin and Argmax Problems with Application to Bi-level
    Optimization", 2016, arXiv:1607.05447):
    adjoint: the multiplier parts (b_P, b_Q) of the KKT adjoint.
    multipliers: the lambda used (given, or by least squares at phi).
    active: the inequality mask (1.0 active).
    stationarity: ||grad_phi L(phi, lambda)|| (0 at a KKT point).
    """

    v: PyTree
    residual_norm: jax.Array
    status: jax.Array
    solver: SolverInfo
    adjoint: Optional[Any] = None
    multipliers: Optional[Any] = None
    active: Optional[PyTree] = None
    stationarity: Optional[jax.Array] = None


__all__ = ["HypergradInfo"]

"""Matrix-free linear solvers for A x = b, one per file (see `base` for the interface)."""
from bilevel_jax.linear_solvers.base import (
    LinearSolver,
    LinearSolverState,
    SolverInfo,
    StatefulLinearSolver,
    residual_norm,
    stateful,
)
from bilevel_jax.linear_solvers.cg import cg
from bilevel_jax.linear_solvers.dense import dense
from bilevel_jax.linear_solvers.gd import gd, neumann
from bilevel_jax.linear_solvers.stochastic_neumann import stochastic_neumann

__all__ = [
    "LinearSolver", "LinearSolverState", "SolverInfo", "StatefulLinearSolver", "residual_norm",
    "stateful", "cg", "dense", "gd", "neumann", "stochastic_neumann",
]

"""Matrix-free linear solvers for A x = b, one per file (see `base` for the protocol):

    state = solver.init(b_like, x0=None)
    x, state, info = solver.solve(matvec, b, state, key=None)

`REGISTRY` names every solver with its tags (spd_only, indefinite, stochastic, stateful, wrapper)
and a small test instance (`registry`).
"""
from bilevel_jax.linear_solvers.base import KrylovSolver, LinearSolver, SolverInfo, WarmStart, fail_where, residual_norm
from bilevel_jax.linear_solvers.cg import CG, cg
from bilevel_jax.linear_solvers.damped import Damped, damped
from bilevel_jax.linear_solvers.dense import Dense, dense
from bilevel_jax.linear_solvers.gd import GD, Neumann, gd, neumann
from bilevel_jax.linear_solvers.lanczos import Lanczos, LanczosState, lanczos
from bilevel_jax.linear_solvers.minres import MINRES, minres
from bilevel_jax.linear_solvers.normal import Normal, normal
from bilevel_jax.linear_solvers.registry import REGISTRY, TAGS, Entry
from bilevel_jax.linear_solvers.sampled_neumann import SampledNeumann, sampled_neumann
from bilevel_jax.linear_solvers.stochastic_neumann import StochasticNeumann, stochastic_neumann
from bilevel_jax.linear_solvers.subspace import Subspace, subspace

__all__ = [
    "REGISTRY", "TAGS", "Entry", "KrylovSolver", "LinearSolver", "SolverInfo", "WarmStart", "fail_where", "residual_norm",
    "CG", "Damped", "Dense", "GD", "Lanczos", "LanczosState", "Neumann", "StochasticNeumann", "Subspace",
    "MINRES", "minres", "Normal", "normal",
    "cg", "damped", "dense", "gd", "lanczos", "neumann", "stochastic_neumann", "subspace", "sampled_neumann", "SampledNeumann",
]

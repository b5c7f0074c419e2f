"""bilevel_jax: a JAX toolkit for bilevel optimization.

    min_theta F(theta) = f_upper(theta, phi*(theta)),  phi*(theta) = argmin_phi f_lower(theta, phi)

Sign convention everywhere: v ~ A^{-1} grad_phi f_upper with A = grad^2_{phi phi} f_lower, and
grad F = grad_theta f_upper - J v with J = grad^2_{theta phi} f_lower.
"""
from bilevel_jax import algorithms, collectives, constraints, sharding, datasets, linear_solvers, oracles, problems, sampling, schedules, stationarity, status
from bilevel_jax.algorithms import Algorithm
from bilevel_jax.algorithms.parallel import data_parallel
from bilevel_jax.sharding import shard
from bilevel_jax.cache import enable_compilation_cache
from bilevel_jax.checkpoint import run_chunked
from bilevel_jax.hypergrad import argmin, custom_fixed_point, custom_root, hypergradient, unrolled_hypergradient, zero_ig_hypergradient
from bilevel_jax.multi_objective import MinMaxBilevelProblem, MultiObjectiveProblem
from bilevel_jax import precision
from bilevel_jax.precision import Precision
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.run import run

__all__ = [
    "Algorithm", "BilevelProblem", "collectives", "data_parallel", "shard", "sharding", "MinMaxBilevelProblem", "MultiObjectiveProblem", "Precision", "precision", "algorithms", "constraints", "datasets", "enable_compilation_cache", "run", "run_chunked", "schedules", "argmin", "custom_fixed_point", "custom_root", "hypergradient", "linear_solvers", "oracles", "problems", "sampling", "stationarity", "status",
    "unrolled_hypergradient", "zero_ig_hypergradient",
]
__version__ = "0.1.0"

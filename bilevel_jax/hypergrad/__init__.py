"""Hypergradient estimators: implicit (any linear solver), unrolled (reverse/forward),
zero implicit gradient (SignSGD + UL), the differentiable `argmin`, jaxopt-style `custom_root` /
`custom_fixed_point`, and the KKT implicit gradient
of a constrained lower level (`kkt`)."""
from bilevel_jax.hypergrad.argmin import argmin
from bilevel_jax.hypergrad.custom_root import custom_fixed_point, custom_root, root_jvp, root_vjp
from bilevel_jax.hypergrad.info import HypergradInfo
from bilevel_jax.hypergrad.implicit import hypergradient, implicit_direction
from bilevel_jax.hypergrad.kkt import kkt_argmin, kkt_direction, kkt_hypergradient, kkt_hypergradient_dense
from bilevel_jax.lower import lower_step, lower_steps, solve_lower
from bilevel_jax.hypergrad.unrolled import unrolled_hypergradient
from bilevel_jax.hypergrad.zero_ig import zero_ig_hypergradient

__all__ = [
    "argmin", "custom_fixed_point", "custom_root", "root_jvp", "root_vjp", "HypergradInfo", "hypergradient", "implicit_direction", "lower_step", "lower_steps",
    "solve_lower", "kkt_argmin", "kkt_direction", "kkt_hypergradient", "kkt_hypergradient_dense", "unrolled_hypergradient", "zero_ig_hypergradient",
]

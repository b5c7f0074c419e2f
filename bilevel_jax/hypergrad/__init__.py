"""Hypergradient estimators: implicit (any linear solver), unrolled (reverse/forward),
zero implicit gradient (SignSGD + UL), and the differentiable `argmin`."""
from bilevel_jax.hypergrad.argmin import argmin
from bilevel_jax.hypergrad.implicit import HypergradInfo, hypergradient, implicit_direction
from bilevel_jax.hypergrad.inner import lower_step, lower_steps, solve_lower
from bilevel_jax.hypergrad.unrolled import unrolled_hypergradient
from bilevel_jax.hypergrad.zero_ig import zero_ig_hypergradient

__all__ = [
    "argmin", "HypergradInfo", "hypergradient", "implicit_direction", "lower_step", "lower_steps",
    "solve_lower", "unrolled_hypergradient", "zero_ig_hypergradient",
]

"""Hypergradients by differentiating T lower-level steps (Franceschi, Donini, Frasconi, Pontil,
"Forward and Reverse Gradient-Based Hyperparameter Optimization", 2017, arXiv:1703.01785).

With phi_t = Phi_t(phi_{t-1}, theta) (one optimizer step), A_t = d phi_t / d phi_{t-1} and
B_t = d phi_t / d theta, the hypergradient of F_T(theta) = f_upper(theta, phi_T(theta)) is

    grad F_T = grad_theta f_upper + Z_T^T grad_phi f_upper,   Z_t = A_t Z_{t-1} + B_t,  Z_0 = 0.

- reverse mode: `jax.grad` through the `lax.scan` of the T steps (the backward recursion
  alpha_{t-1} = A_t^T alpha_t, g += B_t^T alpha_t); memory O(T d), or O(sqrt-ish) with
  `checkpoint=True` (`jax.checkpoint` of each step, recomputed in the backward pass);
  `truncate=K` keeps only the last K steps in the graph (phi_{T-K} is a constant).
- forward mode: Z_T by `jax.jacfwd` through the same scan (one JVP per theta coordinate, the
  forward recursion Z_t = A_t Z_{t-1} + B_t), then contracted with grad_phi f_upper.
Both differentiate the same T-step map, so they agree to rounding for the same T.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int
from bilevel_jax.hypergrad.inner import lower_steps
from bilevel_jax.problem import BilevelProblem

MODES = ("reverse", "forward")


def unrolled_hypergradient(problem: BilevelProblem, theta, phi0, data, *,
                           optimizer: optax.GradientTransformation, steps: int,
                           mode: str = "reverse", truncate: Optional[int] = None,
                           checkpoint: bool = False):
    """grad_theta of f_upper(theta, phi_T(theta), upper) with phi_T = `steps` steps of `optimizer`
    on f_lower(theta, ., lower) from `phi0` (phi0 does not depend on theta).

    Returns `(g, phi_T)`.
    """
    check_positive_int("steps", steps)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if truncate is not None:
        check_positive_int("truncate", truncate)
        if truncate > steps:
            raise ValueError(f"truncate={truncate} exceeds steps={steps}.")
        if mode == "forward":
            raise ValueError("truncate is a reverse-mode option (forward mode carries Z_t from t=0).")
    problem.validate(theta, phi0, data)
    upper, lower = data
    keep = steps if truncate is None else truncate
    # The first steps - keep steps run outside the graph; the optimizer state (momentum, Adam
    # moments) is carried into the last `keep` steps, so phi_T is the same as without truncation.
    state0 = optimizer.init(oracles.differentiable(phi0))
    start = (lower_steps(problem, optimizer, theta, phi0, state0, steps - keep, lambda t: lower)
             if keep < steps else (phi0, state0))
    phi_start, state_start = jax.lax.stop_gradient(start)

    def phi_T(th):
        return lower_steps(problem, optimizer, th, phi_start, state_start, keep, lambda t: lower, checkpoint)[0]

    if mode == "reverse":
        def objective(th):
            phi = phi_T(th)
            return problem.f_upper(th, phi, upper), phi

        g, phi = jax.grad(objective, has_aux=True)(theta)
        return g, phi

    theta_flat, unravel = ravel_pytree(theta)
    phi = phi_T(theta)
    z = jax.jacfwd(lambda t: oracles.differentiable(phi_T(unravel(t))))(theta_flat)  # Z_T, phi x d_theta
    g_theta, g_phi = oracles.upper_grads(problem, theta, phi, upper)
    contraction = sum(
        jnp.tensordot(gp.reshape(-1), zl.reshape(gp.size, -1), axes=1)
        for gp, zl in zip(jax.tree_util.tree_leaves(g_phi), jax.tree_util.tree_leaves(z))
    )
    g = jax.tree_util.tree_map(jnp.add, g_theta, unravel(contraction))
    return g, phi

"""The zero-implicit-gradient estimator of SignSGD + UL (Fan, Ram, Liu, "Sign-MAML: Efficient Model-Agnostic Meta-Learning by SignSGD", 2021, arXiv:2109.07497).

With LL steps  phi_{t+1} = phi_t - beta sign(grad_phi f_lower(theta, phi_t)),  d sign(x)/dx = 0
almost surely, so A_t = I, B_t = 0 in Z_t = A_t Z_{t-1} + B_t and Z_T = 0:
the unrolled hypergradient is exactly the partial gradient

    grad F_T(theta) = grad_theta f_upper(theta, phi_T).
"""
from __future__ import annotations

import jax
import optax

from bilevel_jax import oracles
from bilevel_jax._checks import check_positive_int, check_step_size
from bilevel_jax.lower import solve_lower
from bilevel_jax.problem import BilevelProblem, check_optimistic


def zero_ig_hypergradient(problem: BilevelProblem, theta, phi0, data, *, lower_lr, steps: int):
    """(grad_theta f_upper(theta, phi_T), phi_T), phi_T = `steps` SignSGD steps (`optax.sign_sgd`,
    Bernstein et al. 2018, arXiv:1802.04434) from phi0."""
    check_optimistic(problem, "zero_ig_hypergradient")
    check_positive_int("steps", steps)
    check_step_size("lower_lr", lower_lr)
    problem.validate(theta, phi0, data)
    phi = jax.lax.stop_gradient(solve_lower(problem, optax.sign_sgd(lower_lr), theta, phi0, data[1], steps))
    return oracles.upper_grad_theta(problem, theta, phi, data[0]), phi

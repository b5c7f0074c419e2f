"""PZOBO: a zeroth-order (evolution-strategies) Jacobian of the unrolled lower level (Sow, Ji,
Liang, "On the Convergence Theory for Hessian-Free Bilevel Algorithms", NeurIPS 2022,
arXiv:2110.07004). No second derivative anywhere:

    y_N(x)   = N gradient steps on f_lower(x, .) from y_k (warm start: y_k is the last y_N)
    delta_j  = (y_N(x_k + mu u_j) - y_N(x_k)) / mu,   u_j ~ N(0, I), j = 1..Q   (vmapped over j,
               the perturbed runs on the same LL batches as the unperturbed one)
    x_{k+1}  = P_X(x_k - beta (grad_x f_upper(x_k, y_N) + (1/Q) sum_j u_j <delta_j, grad_y f_upper(x_k, y_N)>))

(1/Q) sum_j u_j delta_j' estimates dy_N/dx^T: E[u u'] = I makes it unbiased up to O(mu)
(exactly for an affine y_N). `directions="orthogonal"` draws Q = dim(x) directions as the rows of
a random orthogonal matrix times sqrt(dim x) (still E[u u'] = I, and (1/Q) sum u_j u_j' = I for
every draw: no sampling noise for affine maps). Defaults of the public benchmark: mu = 0.1, Q = 10,
N = 10. Oracles per step: N (Q + 1) LL gradients, 1 UL gradient.
"""
from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_positive_int, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State, step_key
from bilevel_jax.algorithms.constrained import lower_projection, project_rule
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import SOLVER_STREAM, Composed, apply_step
from bilevel_jax.lower import lower_steps as run_lower_steps
from bilevel_jax.problem import BilevelProblem, check_problem

PyTree = Any


class PzoboState(State):
    header: Header


def draw_directions(key, like: PyTree, num: int, kind: str) -> PyTree:
    """`num` directions shaped like `like` (a leading axis): Gaussian, or the rows of a random
    orthogonal matrix scaled by sqrt(dim) (`num` must then be dim)."""
    flat, unravel = ravel_pytree(like)
    d = flat.shape[0]
    if kind == "gaussian":
        u = jax.random.normal(key, (num, d), flat.dtype)
    else:
        q, r = jnp.linalg.qr(jax.random.normal(key, (d, d), flat.dtype))
        u = jnp.sqrt(d) * (q * jnp.sign(jnp.diag(r))).T
    return jax.vmap(unravel)(u)


class PZOBO(Composed):
    mu: jax.Array
    lower_steps: int = eqx.field(static=True, default=10)
    num_directions: int = eqx.field(static=True, default=10)
    directions: str = eqx.field(static=True, default="gaussian")
    name: str = eqx.field(static=True, default="pzobo", kw_only=True)
    handles_constraints: ClassVar[bool] = True   # by projected LL steps (`pzobo` builds them)

    def init(self, theta0, phi0, key, data=None) -> PzoboState:
        head = self.start(theta0, phi0, key, data)
        if self.directions == "orthogonal":
            dim = ravel_pytree(oracles.differentiable(head.theta))[0].shape[0]
            if dim != self.num_directions:
                raise ValueError(f"pzobo: directions='orthogonal' needs num_directions = dim(theta) = {dim}, "
                                 f"got {self.num_directions}.")
        return PzoboState(head)

    def update(self, state: PzoboState, data):
        p, k = self.problem, state.count
        batches = self.batches(state, data, self.lower_steps)
        theta_d, theta_s = eqx.partition(state.theta, eqx.is_inexact_array)
        phi_s = eqx.filter(state.phi, eqx.is_inexact_array, inverse=True)

        def unrolled(t):
            """y_N as a function of theta's array part (the same start and batches every call)."""
            theta = eqx.combine(t, theta_s)
            phi, opt_state = run_lower_steps(p, self.lower.build(theta), theta, state.phi, state.lower_opt_state,
                                             self.lower_steps, batches.lower_at)
            return oracles.differentiable(phi), opt_state

        u = draw_directions(step_key(state.key, k, SOLVER_STREAM), theta_d, self.num_directions, self.directions)
        with oracles.counting() as tally:
            y_n, lower_state = unrolled(theta_d)
            phi = eqx.combine(y_n, phi_s)
            g_theta, g_phi = oracles.upper_grads(p, state.theta, phi, batches.upper)
            jac_t_w, _ = oracles.gaussian_jacobian_transpose(lambda t: unrolled(t)[0], theta_d, g_phi, u, self.mu, y_n)
        d = jax.tree_util.tree_map(jnp.add, g_theta, jac_t_w)
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state, d, k, p.project)
        (theta, phi), info = self.finish((theta, phi), tally.counts, jnp.nan, (up_status, self.lower.status(k)))
        return PzoboState(state.header.next(theta, phi, upper_state, lower_state)), info


def pzobo(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=0.1, upper_opt=None, lower_opt=None,
          lower_steps: int = 10, num_directions: int = 10, perturbation=0.1, directions: str = "gaussian",
          upper_decay=0.0, lower_set=None, batch_size: BatchSize = None, sampler: str = "iid",
          check: bool = False) -> PZOBO:
    """PZOBO (module docstring): step beta = `upper_lr` (decayed as (k+1)^-`upper_decay`), N =
    `lower_steps` LL steps of `lower_lr` per outer step, Q = `num_directions` perturbations of size
    mu = `perturbation`; defaults mu = 0.1, Q = 10, N = 10 (the public benchmark's, full batch). Sampling: full
    batch by default; the paper's stochastic variant draws i.i.d. minibatches (`batch_size=b`).
    `lower_set`: a constrained LL's feasible set (a `bj.constraints` set or a projection; default the
    set a constrained problem was built from): y_N(x) is then N projected gradient steps, and the
    Gaussian estimate differentiates that map (no derivative of the projection is needed)."""
    with named("pzobo"):
        check_problem(problem)
        check_positive_int("lower_steps", lower_steps)
        check_positive_int("num_directions", num_directions)
        check_step_size("perturbation", perturbation)
        if directions not in ("gaussian", "orthogonal"):
            raise ValueError(f"directions must be 'gaussian' or 'orthogonal', got {directions!r}.")
        lower = rule("lower_lr", lower_lr, lower_opt)
        if lower_set is not None or problem.constrained:
            lower = project_rule(lower, lower_projection(problem, lower_set))
        return PZOBO(problem, rule("upper_lr", upper_lr, upper_opt, upper_decay), lower,
                     make_samplers(batch_size, sampler), as_array(perturbation), lower_steps, num_directions, directions,
                     check=check)


__all__ = ["PZOBO", "PzoboState", "draw_directions", "pzobo"]

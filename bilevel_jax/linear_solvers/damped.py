"""Damping (Tikhonov / Levenberg-Marquardt): any solver applied to A + lambda I.

    x = solver((A + lambda I)^{-1} b),     lambda >= 0

For a lower level whose Hessian A is indefinite or singular at the current point (a randomly
initialised neural network, a flat direction), the undamped solve breaks down (CG and the dense
factorisation report BREAKDOWN and return NaN); with lambda above -lambda_min(A) the damped
system is positive definite and the solve returns the regularised implicit gradient
grad_theta f_upper - J (A + lambda I)^{-1} grad_phi f_upper, the hypergradient of the proximal
lower level f_lower + (lambda / 2) ||phi - phi_k||^2 at phi_k (Rajeswaran, Finn, Kakade, Levine,
"Meta-Learning with Implicit Gradients", NeurIPS 2019, arXiv:1909.04630, use the same damped
system). It is biased for the original problem by O(lambda / lambda_min(A)) where A is positive
definite: choose lambda small against the curvature, or anneal it.

The wrapped solver keeps its state, warm starts, stochastic matvecs (`matvec(x, key)`) and status;
`info.residual_norm` is the residual of the damped system and `num_matvecs` counts applications
of A (the damping term costs no oracle call). A damping that is negative or not finite (a traced
sweep value; a concrete one raises at construction) makes x NaN with the status INVALID_STEP.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import equinox as eqx
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_in_range
from bilevel_jax.linear_solvers.base import LinearSolver, fail_where


class Damped(LinearSolver):
    """`solver` on (A + damping I) x = b (module docstring)."""

    solver: LinearSolver = eqx.field(kw_only=True)
    damping: Any = eqx.field(kw_only=True)

    def __check_init__(self):
        if not isinstance(self.solver, LinearSolver):
            raise TypeError(f"damped: solver must be a bj.linear_solvers solver, got {type(self.solver).__name__}.")
        if isinstance(self.solver, Damped):
            raise TypeError("damped: the solver is already damped (add the two dampings instead).")

    @property
    def stochastic(self) -> bool:   # type: ignore[override]
        return self.solver.stochastic

    @property
    def needs_symmetric(self) -> bool:   # type: ignore[override]
        return self.solver.needs_symmetric

    def init(self, b_like, x0: Optional[Any] = None):
        return self.solver.init(b_like, x0)

    def solve(self, matvec, b, state, key=None):
        def damped(x, *key_arg):
            return otu.tree_add_scale(matvec(x, *key_arg), self.damping, x)

        x, state, info = self.solver.solve(damped, b, state, key)
        invalid = ~jnp.all(jnp.isfinite(self.damping) & (self.damping >= 0))
        info = info._replace(status=st.merge(info.status, st.flag(invalid, st.INVALID_STEP)))
        return fail_where(invalid, x), state, info


def damped(solver: LinearSolver, damping=1e-2) -> Damped:
    """`solver` applied to A + damping I (damping >= 0; a float, an array to sweep, traced under
    jit). E.g. `bj.algorithms.aid_bio(problem, linear_solver=damped(cg(20), 1e-2))` for a network
    phi whose LL Hessian is indefinite at its random initialisation."""
    if callable(damping):
        raise TypeError("damped: damping must be a float or an array (anneal it by rebuilding the solver).")
    check_in_range("damping", damping, 0.0, math.inf, closed_high=False)
    return Damped(solver=solver, damping=as_array(damping))


__all__ = ["Damped", "damped"]

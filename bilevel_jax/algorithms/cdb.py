"""CDB: the constraint dissolving approach to bilevel problems (Hu, Xiao, Liu, Toh, "An improved
unconstrained approach for bilevel optimization", SIAM J. Optimization 33(4), 2023,
arXiv:2208.00732), for an upper level f that may be non-smooth (and non-convex) and a lower level
g strongly convex in phi.

The bilevel problem is the constrained problem min f(x, y) s.t. c(x, y) = grad_y g(x, y) = 0
(its feasible set is a manifold: grad_y c = A = grad^2_yy g is nonsingular). The constraint
dissolving function replaces it by an unconstrained one,

    h(x, y) = f(x, Y(x, y)) + (beta / 2) ||c(x, y)||^2,      Y(x, y) = y - A(x, y)^{-1} c(x, y)

(Y: one Newton step of the LL; Y = y on the feasible set), whose stationary points (beta above a
threshold) are those of the bilevel problem, so unconstrained (sub)gradient methods apply. With
J = grad^2_{xy} g and the derivatives of A^{-1} dropped (they multiply c, which is 0 on the
feasible set), the (sub)gradient of h is

    d = grad f(x, y_hat) + (J w, A w),   w = beta c - v,   v = A^{-1} grad_y f(x, y_hat),   y_hat = Y(x, y):

the x-part is grad_x f - J A^{-1} grad_y f (the implicit hypergradient at y_hat) plus beta J c,
the y-part grad_y f - A v + beta A c -> beta A c (v solves A v = grad_y f). At d = 0: c = 0 and the
hypergradient vanishes, the bilevel problem's stationarity. One outer step: 2 linear solves with A
(`linear_solver`, warm-started), 1 linearisation of c at (x, y) (one pullback for (J w, A w)), 1 UL
(sub)gradient at (x, y_hat) (autodiff of a non-smooth f gives an element of its subdifferential
almost everywhere, e.g. sign(x) of |x|), then (x, y) <- (x, y) - (alpha_k d_x, alpha'_k d_y).
The UL is evaluated at the Newton point y_hat (exactly the LL solution for a quadratic LL), while
y itself contracts only at the rate 1 - alpha' beta lambda_min(A)^2 of the penalty's gradient:
`state.phi` is y, which may lag behind y_hat (a larger beta speeds it, within alpha' beta L_g^2 < 2).
"""
from __future__ import annotations

from typing import Any, Optional

import equinox as eqx
import jax
import optax.tree_utils as otu

from bilevel_jax import oracles
from bilevel_jax._checks import as_array, check_step_size
from bilevel_jax.algorithms._common import named, rule
from bilevel_jax.algorithms.base import Header, State
from bilevel_jax.algorithms.loop import BatchSize, make_samplers
from bilevel_jax.algorithms.steps import Composed, apply_step
from bilevel_jax.linear_solvers import LinearSolver, cg
from bilevel_jax.problem import BilevelProblem, check_problem



class CDBState(State):
    header: Header
    newton_state: Any    # the solver's state of A s = c (y_hat = y - s)
    adjoint_state: Any   # the solver's state of A v = grad_y f(x, y_hat)


class CDB(Composed):
    """See the module docstring; build with `cdb`."""

    beta: jax.Array
    solver: LinearSolver
    mode: str = eqx.field(static=True, default="rev")
    name: str = eqx.field(static=True, default="cdb", kw_only=True)

    def init(self, theta0, phi0, key, data=None) -> CDBState:
        like = oracles.differentiable(phi0)
        return CDBState(self.start(theta0, phi0, key, data), self.solver.init(like), self.solver.init(like))

    def update(self, state: CDBState, data):
        p, k = self.problem, state.count
        batches = self.batches(state, data)
        with oracles.counting() as tally:
            lin = oracles.linearize_lower(p, state.theta, state.phi, batches.lower, self.mode)
            c = lin.gradient()
            s, newton_state, newton = oracles.solve(self.solver, lin.hvp, c, state.newton_state)
            phi_hat = eqx.apply_updates(state.phi, otu.tree_scale(-1.0, s))          # Y(x, y): one Newton step
            g_theta, g_phi = oracles.upper_grads(p, state.theta, phi_hat, batches.upper)
            v, adjoint_state, adjoint = oracles.solve(self.solver, lin.hvp, g_phi, state.adjoint_state)
            a_w, j_w = lin.hvp_and_cross(otu.tree_add_scale(otu.tree_scale(-1.0, v), self.beta, c))
        theta, upper_state, up_status = apply_step(self.upper, state.theta, state.upper_opt_state,
                                                   otu.tree_add(g_theta, j_w), k, p.project)
        phi, lower_state, low_status = apply_step(self.lower, state.phi, state.lower_opt_state,
                                                  otu.tree_add(g_phi, a_w), k)
        statuses = (up_status, low_status, newton.status, adjoint.status)
        (theta, phi), info = self.finish((theta, phi), tally.counts, adjoint.residual_norm, statuses)
        return CDBState(state.header.next(theta, phi, upper_state, lower_state), newton_state, adjoint_state), info


def cdb(problem: BilevelProblem, *, upper_lr=0.1, lower_lr=None, upper_opt=None, lower_opt=None, penalty=1.0,
        linear_solver: Optional[LinearSolver] = None, upper_decay=0.0, batch_size: BatchSize = None,
        sampler: str = "iid", mode: str = "rev", check: bool = False) -> CDB:
    """CDB (module docstring): (sub)gradient steps on the constraint dissolving function

        h(x, y) = f(x, y - A^{-1} grad_y g) + (beta / 2) ||grad_y g||^2,
        x <- P_X(x - alpha_k (grad_x f(x, y_hat) - J v + beta J c)),   y <- y - alpha'_k (grad_y f(x, y_hat) - A v + beta A c)

    with beta = `penalty`, alpha_k = `upper_lr` / (k+1)^`upper_decay` on x and a constant alpha' =
    `lower_lr` (default `upper_lr`) on y (its direction is smooth where f is smooth in y), A^{-1} by `linear_solver` (default `cg(20, warm_start=True)`; two solves per
    step, each warm-started from its last solution). A non-smooth UL (an l1 term) needs the
    subgradient method's diminishing steps, `upper_decay` in (0.5, 1] (constant steps leave an
    O(step) oscillation across the kinks); a smooth UL takes constant steps (the default). The y
    step must resolve beta A^2: alpha' beta L_g^2 < 2. What is not verified against the paper: its
    step-size rules and the threshold on beta (stated there in terms of Lipschitz constants; not
    checked here), and whether its framework keeps the derivative of A^{-1} c that is dropped here
    (an O(||c||) term, 0 on the feasible set; the limit points are the same). Oracles per step: 1 LL
    gradient (one linearisation of grad_y g), 1 UL gradient, the two solves' HVPs + 1 HVP and 1
    cross product (one pullback). Sampling: full batch (the paper's deterministic analysis);
    `batch_size=b` draws i.i.d. minibatches (the same LL batch for c, A and J)."""
    with named("cdb"):
        check_problem(problem)
        check_step_size("penalty", penalty)
        oracles.check_mode(mode)
        solver = cg(20, warm_start=True) if linear_solver is None else linear_solver
        if not isinstance(solver, LinearSolver) or solver.stochastic:
            raise TypeError(f"linear_solver must be a deterministic bj.linear_solvers solver (e.g. cg(20)), "
                            f"got {solver!r}.")
        lower_lr = upper_lr if (lower_lr is None and lower_opt is None) else lower_lr
        return CDB(problem, rule("upper_lr", upper_lr, upper_opt, upper_decay), rule("lower_lr", lower_lr, lower_opt),
                   make_samplers(batch_size, sampler), as_array(penalty), solver, mode, check=check)


__all__ = ["CDB", "CDBState", "cdb"]

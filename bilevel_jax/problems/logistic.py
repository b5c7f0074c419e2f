"""Hyperparameter selection for L2-regularised logistic regression (the IJCNN1 experiment of Dagreou et al. 2022, arXiv:2201.13409).

    f_lower(theta, w; X, y)   = 1/n sum_i log(1 + exp(-y_i x_i'w)) + 1/2 sum_k exp(theta_k) w_k^2
    f_upper(theta, w; Xv, yv) = 1/m sum_j log(1 + exp(-yv_j xv_j'w))          (unregularised)

theta = lambda is one log-regularisation per feature (or a scalar shared by all features), phi = w
the model weights; labels in {-1, +1}. The LL is exp(min theta)-strongly convex. With
s_i = sigmoid(-y_i x_i'w), the LL derivatives are

    grad_w f_lower = -X'(y s)/n + exp(theta) w,     A = X' diag(y^2 s (1 - s)) X / n + diag(exp(theta)),
    J = d/dtheta grad_w f_lower = diag(exp(theta) w)            (a row sum for scalar theta),

so, with v = A^{-1} grad_w f_upper(w*) (the bilevel_jax sign convention),

    grad h(theta) = -exp(theta) * w* * v.

The reference evaluators below form the dense d x d Hessian (d = 22 for IJCNN1): they are ground
truth for tests and for h* in the experiments, not algorithms. All are jitted with the data as an
argument (nothing large is baked into the compiled code).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel_jax._checks import check_positive_int
from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type, static


def _margins(w, batch):
    X, y = batch
    return y * (X @ w)


def _lower(theta, w, batch):
    return jnp.mean(jnp.logaddexp(0.0, -_margins(w, batch))) + 0.5 * jnp.sum(jnp.exp(theta) * w ** 2)


def _upper(theta, w, batch):
    del theta
    return jnp.mean(jnp.logaddexp(0.0, -_margins(w, batch)))


LOGISTIC = BilevelProblem(_upper, _lower)


# --------------------------------------------------------------------------------------------------
# reference evaluators: pure functions of (theta, data)

def lower_grad(theta, w, lower_data):
    """grad_w f_lower in closed form at (theta, w), shape `(d,)`."""
    X, y = lower_data
    s = jax.nn.sigmoid(-_margins(w, lower_data))
    return -X.T @ (y * s) / X.shape[0] + jnp.broadcast_to(jnp.exp(theta), w.shape) * w


def lower_grad_hessian(theta, w, lower_data):
    """`(grad_w f_lower, A)` in closed form at (theta, w): shapes `(d,)` and `(d, d)`."""
    X, y = lower_data
    s = jax.nn.sigmoid(-_margins(w, lower_data))
    H = (X.T * (y ** 2 * s * (1.0 - s))) @ X / X.shape[0] + jnp.diag(jnp.broadcast_to(jnp.exp(theta), w.shape))
    return lower_grad(theta, w, lower_data), H


def _newton_direction(theta, w, lower_data):
    g, H = lower_grad_hessian(theta, w, lower_data)
    return -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(H), g), g


def _per_feature(theta, lower_data):
    """theta as a `(d,)` vector (a scalar theta is shared by all features)."""
    X, _ = lower_data
    return jnp.broadcast_to(jnp.asarray(theta, X.dtype), (X.shape[1],))


def newton_phi_star(theta, lower_data, phi0=None, newton_steps: int = 20, line_search_steps: int = 12):
    """w*(theta) by at most `newton_steps` damped Newton steps on f_lower from `phi0` (default
    zeros), then one full Newton step.

    Damped steps: the full step is kept when it satisfies the Armijo condition, otherwise the best
    of t = 1/2, ..., 2^-(line_search_steps-1) (or none when nothing decreases f_lower). Once
    ||grad_w f_lower|| <= sqrt(machine eps) the remaining damped steps are skipped (`lax.cond`; the
    loop length stays `newton_steps`), and the final full step brings w to machine precision.

    Derivatives: the damped phase runs under `stop_gradient`; only the final step is
    differentiated. At a converged w the derivative of one Newton step is exactly the implicit
    derivative -A^{-1} d_theta grad_w f_lower, so `jax.grad` of anything built on
    `newton_phi_star` is the implicit gradient, at the cost of one step. Jitted; theta may be a
    scalar or `(d,)`.
    """
    return _newton(_per_feature(theta, lower_data), lower_data, phi0, newton_steps, line_search_steps)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _newton(theta, lower_data, phi0, newton_steps, line_search_steps):
    X, _ = lower_data
    dtype = X.dtype
    w0 = jnp.zeros(X.shape[1], dtype) if phi0 is None else jnp.asarray(phi0, dtype)
    theta_c = jax.lax.stop_gradient(theta)
    fallback = 0.5 ** jnp.arange(1, line_search_steps, dtype=dtype)
    tol = float(jnp.finfo(dtype).eps) ** 0.5
    f = lambda w: _lower(theta_c, w, lower_data)

    def damped_step(w):
        d, g = _newton_direction(theta_c, w, lower_data)
        f0 = f(w)

        def backtrack(_):
            values = jax.vmap(lambda t: f(w + t * d))(fallback)
            best = jnp.argmin(values)
            return jnp.where(values[best] < f0, fallback[best], jnp.zeros((), dtype))

        full_ok = f(w + d) <= f0 + 1e-4 * jnp.vdot(g, d)
        t = jax.lax.cond(full_ok, lambda _: jnp.ones((), dtype), backtrack, None)
        converged = jnp.linalg.norm(g) <= tol            # then leave the rest to the final step
        return jnp.where(converged, w, w + t * d), converged

    def step(carry, _):
        w, done = carry
        return jax.lax.cond(done, lambda w: (w, done), damped_step, w), None

    (w, _), _ = jax.lax.scan(step, (jax.lax.stop_gradient(w0), jnp.asarray(False)), None,
                             length=newton_steps)
    w = jax.lax.stop_gradient(w)
    return w + _newton_direction(theta, w, lower_data)[0]


def implicit_grad(theta, w, data):
    """grad h at a `(d,)` theta from the LL solution w = w*(theta), with the dense LL Hessian:
    `-exp(theta) * w * A^{-1} grad_w f_upper(w)` (the reference evaluator of experiments)."""
    upper, lower = data
    Xv, yv = upper
    b = -Xv.T @ (yv * jax.nn.sigmoid(-_margins(w, upper))) / Xv.shape[0]   # grad_w f_upper
    _, H = lower_grad_hessian(theta, w, lower)
    v = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(H), b)
    return -jnp.exp(theta) * w * v


@functools.partial(jax.jit, static_argnums=(2,))
def _evaluate(theta, data, newton_steps):
    """(w*, h, grad h) at a `(d,)` theta: one Newton solve, one dense implicit gradient."""
    w = _newton(theta, data[1], None, newton_steps, 12)
    return w, _upper(theta, w, data[0]), implicit_grad(theta, w, data)


def hyper_value(theta, data, newton_steps: int = 20):
    """h(theta) = f_upper(theta, w*(theta)) on the full validation data (differentiable, jitted)."""
    return _evaluate(_per_feature(theta, data[1]), data, newton_steps)[1]


def hyper_grad(theta, data, newton_steps: int = 20):
    """grad h(theta) by the implicit function theorem with the dense LL Hessian (closed forms):
    `-exp(theta) * w* * A^{-1} grad_w f_upper`, summed over features for a scalar theta."""
    g = _evaluate(_per_feature(theta, data[1]), data, newton_steps)[2]
    return g.sum() if jnp.ndim(theta) == 0 else g


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _value_closed_form_grad(theta, data, newton_steps):
    """h at a `(d,)` theta whose derivative is the closed-form `grad h` (one `_evaluate` per
    value-and-gradient, no autodiff through Newton); not differentiable in `data`."""
    return _evaluate(theta, data, newton_steps)[1]


@_value_closed_form_grad.defjvp
def _value_closed_form_grad_jvp(newton_steps, primals, tangents):
    theta, data = primals
    _, value, grad = _evaluate(theta, data, newton_steps)
    return value, jnp.vdot(grad, tangents[0])


class ValueSolution(NamedTuple):
    theta: jax.Array       # the last iterate, approximately argmin h
    value: jax.Array       # h(theta): the reference h* for h(theta_t) - h* plots
    grad_norm: jax.Array   # ||grad h(theta)||, to judge how well h* is resolved


@functools.partial(jax.jit, static_argnames=("steps", "newton_steps", "memory_size"))
def minimize_value(theta0, data, steps: int = 100, newton_steps: int = 20, memory_size: int = 10):
    """h* = min h by `steps` iterations of L-BFGS (optax, zoom line search) on `hyper_value`.

    Deterministic; value and gradient come from one Newton solve and the closed-form implicit
    gradient (`hyper_grad`), also inside the line search. Some regularisers
    may have their optimum at +-infinity (no or infinite regularisation of a feature): h* is then
    an infimum approached along the iterates, and `grad_norm` still tends to zero.
    """
    value_fn = lambda th: _value_closed_form_grad(_per_feature(th, data[1]), data, newton_steps)
    opt = optax.lbfgs(memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def step(carry, _):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=value_fn)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    value, grad = jax.value_and_grad(value_fn)(theta)
    return ValueSolution(theta, value, jnp.linalg.norm(grad))


# --------------------------------------------------------------------------------------------------
# the bundle

@instance_type
class LogisticHPO(Instance):
    """The problem, its data `((X_val, y_val), (X_train, y_train))`, a starting point and the
    reference evaluators (Newton for w*, dense implicit gradient, L-BFGS for h*; h* is not computed
    at construction, so `reference` is None)."""

    newton_steps: int = static(20)

    def phi_star(self, theta):
        """w*(theta) by damped Newton (differentiable: `jax.grad` gives the implicit gradient)."""
        return newton_phi_star(theta, self.data[1], newton_steps=self.newton_steps)

    def value(self, theta):
        """h(theta) = f_upper(theta, w*(theta)) on the full validation set."""
        return hyper_value(theta, self.data, self.newton_steps)

    def grad(self, theta):
        """grad h(theta) = -exp(theta) w* (A^{-1} grad_w f_upper), dense A."""
        return hyper_grad(theta, self.data, self.newton_steps)

    def solve_value(self, theta0=None, steps: int = 100, memory_size: int = 10) -> ValueSolution:
        """h* = min h (L-BFGS from `theta0`, default zeros): `ValueSolution(theta, value, grad_norm)`."""
        check_positive_int("steps", steps)
        theta0 = jnp.zeros_like(self.theta0) if theta0 is None else jnp.asarray(theta0, self.theta0.dtype)
        return minimize_value(theta0, self.data, steps, self.newton_steps, memory_size)


_THETA_INITS = ("log_uniform", "zeros")
_PHI_INITS = ("normal", "zeros")


def logistic_hpo(data, key=0, *, per_feature: bool = True, theta_init: str = "log_uniform",
                 phi_init: str = "normal", newton_steps: int = 20) -> LogisticHPO:
    """The logistic-regression HPO problem of the SOBA/SABA experiments on `data = ((X_val, y_val), (X_train, y_train))`
    (e.g. `bj.datasets.ijcnn1().data`).

    Args:
      data: validation (upper) and training (lower) sets, X of shape `(n, d)`, y `(n,)` in {-1, +1}.
      key: PRNG key or int seed for the random initialisations.
      per_feature: one log-regulariser per feature (theta of shape `(d,)`) or one shared scalar.
      theta_init: "log_uniform" (lambda0 = log U(0, 1), the benchmark's choice) or "zeros".
      phi_init: "normal" (w0 ~ N(0, I), the benchmark's choice) or "zeros".
      newton_steps: damped Newton steps of the reference `phi_star` (from zeros).
    """
    (Xv, yv), (X, y) = _check_data(data)
    check_positive_int("newton_steps", newton_steps)
    if theta_init not in _THETA_INITS:
        raise ValueError(f"theta_init must be one of {_THETA_INITS}, got {theta_init!r}.")
    if phi_init not in _PHI_INITS:
        raise ValueError(f"phi_init must be one of {_PHI_INITS}, got {phi_init!r}.")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    k_theta, k_phi = jax.random.split(key)
    d, dtype = X.shape[1], X.dtype
    shape = (d,) if per_feature else ()
    theta0 = (jnp.log(jax.random.uniform(k_theta, shape, dtype, minval=jnp.finfo(dtype).tiny))
              if theta_init == "log_uniform" else jnp.zeros(shape, dtype))
    phi0 = jax.random.normal(k_phi, (d,), dtype) if phi_init == "normal" else jnp.zeros(d, dtype)
    return LogisticHPO(LOGISTIC, ((Xv, yv), (X, y)), theta0, phi0, newton_steps, name="logistic_hpo",
                       description=f"logistic HPO: n_train={X.shape[0]}, n_val={Xv.shape[0]}, d={d}")


def _check_data(data):
    try:
        (Xv, yv), (X, y) = data
    except (TypeError, ValueError) as e:
        raise TypeError("data must be ((X_val, y_val), (X_train, y_train)).") from e
    Xv, yv, X, y = (jnp.asarray(a) for a in (Xv, yv, X, y))
    for name, (A, b) in (("validation", (Xv, yv)), ("training", (X, y))):
        if A.ndim != 2 or b.ndim != 1 or A.shape[0] != b.shape[0]:
            raise ValueError(f"{name} data: X must be (n, d) and y (n,), got {A.shape} and {b.shape}.")
        if not jnp.issubdtype(A.dtype, jnp.floating):
            raise TypeError(f"{name} data: X must be floating point, got {A.dtype}.")
    if Xv.shape[1] != X.shape[1]:
        raise ValueError(f"validation and training X have {Xv.shape[1]} and {X.shape[1]} features.")
    dtype = X.dtype
    return (Xv.astype(dtype), yv.astype(dtype)), (X, y.astype(dtype))

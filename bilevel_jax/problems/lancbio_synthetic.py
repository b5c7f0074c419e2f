"""The synthetic bilevel problem of LancBiO (Yang, Gao & Yuan, "LancBiO: Dynamic Lanczos-aided
Bilevel Optimization via Krylov Subspace", ICLR 2025, arXiv:2404.03331, section 4; settings of
the authors' public synthetic-problem code), with x = theta, y = phi in R^n:

    f(x, y) = 0.1 cos(x' D1 y) + 1/2 ||D2 x - y||^2
    g(x, y) = gamma sum_i sin(x_i + y_i) + log sum_i exp(x_i y_i) + 1/2 y'(D3 + G) y

    D1 = diag(c), c_i ~ U(-5, 5);   D2 = diag(d), d_i ~ U(0.1, 1.1);   gamma = 0.5
    D3 = diag(e), e_i ~ U(0, gamma);   G = Q diag(linspace(1, kappa, n)) Q',  Q Haar (QR of a Gaussian)
    x0, y0 ~ N(0, I)

The paper's size is n = 10^4, kappa = 1e5 in float64; the defaults here are small (n = 200,
kappa = 1e3). g is strongly convex in y: grad^2_yy g = D3 + G - gamma diag(sin(x + y)) +
diag(x)(diag(p) - p p')diag(x) >= (1 - gamma) I (p = softmax(x * y); the log-sum-exp term is
convex), and L-smooth with L <= kappa + gamma + max_i x_i^2.

Data is an argument: `data = (upper, lower)` with upper = {"c", "d"} and lower = {"e", "G"},
each with a leading axis of one sample (deterministic problem, full batch). The quadratic term
1/2 y'G y is a `custom_jvp` that uses the symmetry of G, so the gradient and a Hessian-vector
product each cost one product with G (autodiff of y'G y would take two, G y and y'G); every
other term is O(n). Closed forms (all in this module, independent of the library's solvers):
`lower_grad`, `lower_hvp`, `cross` (J v), `upper_grads`, the dense `lower_hessian`, `phi_star`
(Newton with the dense Hessian), `hypergradient` (grad Phi with the dense solve) and
`residual` (||A v - b||, one product with G).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, instance_type

GAMMA = 0.5   # c_2 in the authors' code: the weight of the sin term and the range of D3
COS = 0.1     # the weight of the cosine term of f


def _mean_matvec(mats, y):
    """mean_k M_k y for mats of shape (k, n, n)."""
    return jnp.mean(jnp.einsum("kij,j->ki", mats, y), axis=0)


@jax.custom_jvp
def symmetric_quadratic(mats, y):
    """mean_k 1/2 y'M_k y for symmetric M_k: its derivatives take one product M y each."""
    return 0.5 * jnp.vdot(y, _mean_matvec(mats, y))


def _symmetric_quadratic_jvp(primals, tangents):
    mats, y = primals
    dmats, dy = tangents
    my = _mean_matvec(mats, y)
    out = 0.5 * jnp.vdot(y, my)
    tangent = jnp.zeros_like(out)
    if not isinstance(dy, jax.custom_derivatives.SymbolicZero):
        tangent = tangent + jnp.vdot(my, dy)
    if not isinstance(dmats, jax.custom_derivatives.SymbolicZero):
        tangent = tangent + 0.5 * jnp.vdot(y, _mean_matvec(dmats, y))
    return out, tangent


symmetric_quadratic.defjvp(_symmetric_quadratic_jvp, symbolic_zeros=True)


def f_upper(theta, phi, batch):
    c, d = batch["c"], batch["d"]
    per_sample = (COS * jnp.cos(jnp.einsum("i,ki,i->k", theta, c, phi))
                  + 0.5 * jnp.sum((d * theta - phi) ** 2, axis=-1))
    return jnp.mean(per_sample)


def f_lower(theta, phi, batch):
    e = batch["e"]
    return (GAMMA * jnp.sum(jnp.sin(theta + phi)) + jax.nn.logsumexp(theta * phi)
            + 0.5 * jnp.mean(jnp.sum(e * phi ** 2, axis=-1)) + symmetric_quadratic(batch["G"], phi))


PROBLEM = BilevelProblem(f_upper, f_lower)


def synthetic_data(key, n: int = 200, kappa: float = 1e3, dtype=jnp.float64):
    """`(data, theta0, phi0)` of one seed (jittable, vmappable over keys); one compiled program per
    (n, kappa, dtype), however the dtype is spelled (`jnp.float64`, `np.dtype("float64")`, "float64")."""
    return _synthetic_data(key, n, float(kappa), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _synthetic_data(key, n, kappa, dtype):
    kc, kd, ke, kq, kx, ky = jax.random.split(key, 6)
    c = jax.random.uniform(kc, (n,), dtype, -5.0, 5.0)
    d = jax.random.uniform(kd, (n,), dtype, 0.1, 1.1)
    e = jax.random.uniform(ke, (n,), dtype, 0.0, GAMMA)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (n, n), dtype))
    g = (q * jnp.linspace(1.0, kappa, n, dtype=dtype)) @ q.T
    g = 0.5 * (g + g.T)
    upper = {"c": c[None], "d": d[None]}
    lower = {"e": e[None], "G": g[None]}
    return (upper, lower), jax.random.normal(kx, (n,), dtype), jax.random.normal(ky, (n,), dtype)


@instance_type
class LancBiOSynthetic(Instance):
    """The problem, its data `(upper, lower)`, the starting point and the closed forms."""

    # ---- closed-form oracles (full batch) ----
    def lower_grad(self, theta, phi):
        return lower_grad(self.data, theta, phi)

    def lower_hvp(self, theta, phi, v):
        return lower_hvp(self.data, theta, phi, v)

    def cross(self, theta, phi, v):
        return cross(self.data, theta, phi, v)

    def upper_grads(self, theta, phi):
        return upper_grads(self.data, theta, phi)

    def lower_hessian(self, theta, phi):
        return lower_hessian(self.data, theta, phi)

    def phi_star(self, theta, phi, steps: int = 8):
        return phi_star(self.data, theta, phi, steps)

    def hypergradient(self, theta, phi_star):
        return hypergradient(self.data, theta, phi_star)

    def residual(self, theta, phi, v):
        return residual(self.data, theta, phi, v)


def _parts(data):
    upper, lower = data
    return (jnp.mean(upper["c"], 0), jnp.mean(upper["d"], 0), jnp.mean(lower["e"], 0), lower["G"])


def lower_grad(data, theta, phi):
    """grad_y g = gamma cos(x + y) + x * p + (D3 + G) y,  p = softmax(x * y)."""
    _, _, e, g = _parts(data)
    p = jax.nn.softmax(theta * phi)
    return GAMMA * jnp.cos(theta + phi) + theta * p + e * phi + _mean_matvec(g, phi)


def lower_hvp(data, theta, phi, v):
    """grad^2_yy g v = -gamma sin(x + y) v + x (p (x v) - p (p'(x v))) + e v + G v."""
    _, _, e, g = _parts(data)
    p = jax.nn.softmax(theta * phi)
    xv = theta * v
    return (-GAMMA * jnp.sin(theta + phi) * v + theta * (p * xv - p * jnp.vdot(p, xv)) + e * v
            + _mean_matvec(g, v))


def cross(data, theta, phi, v):
    """J v = grad^2_xy g v (a vector in x-space): (-gamma sin(x + y) + p) v + y (p (x v) - p (p'(x v)))."""
    p = jax.nn.softmax(theta * phi)
    xv = theta * v
    return (-GAMMA * jnp.sin(theta + phi) + p) * v + phi * (p * xv - p * jnp.vdot(p, xv))


def upper_grads(data, theta, phi):
    """(grad_x f, grad_y f): s = x'D1 y, r = D2 x - y;
    grad_x f = -0.1 sin(s) c y + d r,  grad_y f = -0.1 sin(s) c x - r."""
    c, d, _, _ = _parts(data)
    s = jnp.vdot(theta, c * phi)
    r = d * theta - phi
    return -COS * jnp.sin(s) * c * phi + d * r, -COS * jnp.sin(s) * c * theta - r


def lower_hessian(data, theta, phi):
    """The dense grad^2_yy g (n x n)."""
    _, _, e, g = _parts(data)
    p = jax.nn.softmax(theta * phi)
    xp = theta * p
    diag = -GAMMA * jnp.sin(theta + phi) + theta ** 2 * p + e
    h = jnp.mean(g, 0) - jnp.outer(xp, xp)
    return h + jnp.diag(diag)


def _spd_solve(a, b):
    """A^{-1} b by Cholesky (A is SPD here: grad^2_yy g >= (1 - gamma) I; NaN if it were not)."""
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(a), b)


def phi_star(data, theta, phi, steps: int = 8):
    """y*(x) by `steps` Newton steps with the dense Hessian from `phi` (g is strongly convex
    and nearly quadratic: a few steps reach rounding level from a nearby point)."""
    def step(y, _):
        return y - _spd_solve(lower_hessian(data, theta, y), lower_grad(data, theta, y)), None
    return jax.lax.scan(step, phi, None, length=steps)[0]


def hypergradient(data, theta, phi):
    """grad Phi(x) = grad_x f - J A^{-1} grad_y f at (x, phi) (exact at phi = y*(x)), dense
    Cholesky solve."""
    gx, gy = upper_grads(data, theta, phi)
    v = _spd_solve(lower_hessian(data, theta, phi), gy)
    return gx - cross(data, theta, phi, v)


def residual(data, theta, phi, v):
    """||grad^2_yy g v - grad_y f|| at (x, y, v): the linear-system residual."""
    return jnp.linalg.norm(lower_hvp(data, theta, phi, v) - upper_grads(data, theta, phi)[1])


def lancbio_synthetic(key, n: int = 200, kappa: float = 1e3, dtype=jnp.float64) -> LancBiOSynthetic:
    """Draw the synthetic problem of LancBiO (one seed). The paper: n = 10^4, kappa = 1e5, float64
    (G alone is then 800 MB). Needs jax_enable_x64 for float64."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}.")
    if not kappa >= 1.0:
        raise ValueError(f"kappa must be >= 1 (the condition number of G), got {kappa!r}.")
    data, theta0, phi0 = synthetic_data(key, n, float(kappa), dtype)
    return LancBiOSynthetic(PROBLEM, data, theta0, phi0, name="lancbio_synthetic",
                            description=f"LancBiO synthetic problem (n={n}, kappa={float(kappa):g})")


__all__ = ["GAMMA", "LancBiOSynthetic", "PROBLEM", "cross", "f_lower", "f_upper", "hypergradient", "lancbio_synthetic",
           "lower_grad", "lower_hessian", "lower_hvp", "phi_star", "residual", "symmetric_quadratic",
           "synthetic_data", "upper_grads"]

"""A random strongly convex quadratic bilevel problem with a closed-form solution.

Finite sums over per-sample matrices (stored dense, as in the "simulated" problem of the public
benchmark_bilevel project):

    f_lower(theta, phi; i) = 1/2 phi' H_i phi + phi' C_i theta + h_i' phi
    f_upper(theta, phi; j) = 1/2 phi' P_j phi + phi' S_j theta + p_j' phi + reg/2 ||theta||^2

With the full-batch means H, C, h, P, S, p:

    phi*(theta) = M theta + m,   M = -H^{-1} C,   m = -H^{-1} h
    grad F(theta) = M'(P phi* + S theta + p) + S' phi* + reg theta
    hess F = M'PM + M'S + S'M + reg I,            theta* = -hess F^{-1} (M'P m + M'p + S'm).

`n_samples=None` gives the deterministic problem (one "sample" holding the full matrices);
otherwise the LL Hessians are rank-one, H_i = z_i z_i', built so that their mean has exactly the
spectrum `lower_spectrum` (z_i = H^{1/2} u_i, (1/n) sum u_i u_i' = I).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, Reference, instance_type


def _theta_terms(theta, batch):
    """Per-sample 1/2 theta'B_i theta + b_i'theta, from the optional keys "B" and "b" (zero if absent)."""
    out = 0.0
    if "B" in batch:
        out = out + 0.5 * jnp.einsum("i,nij,j->n", theta, batch["B"], theta)
    if "b" in batch:
        out = out + batch["b"] @ theta
    return out


def quadratic_lower(theta, phi, batch):
    """f_lower = mean_i [1/2 phi'H_i phi + phi'C_i theta + h_i'phi (+ 1/2 theta'B_i theta + b_i'theta)]
    over the batch's samples: batch["H"] (n, d_phi, d_phi), ["C"] (n, d_phi, d_theta), ["h"] (n, d_phi),
    optional ["B"] (n, d_theta, d_theta), ["b"] (n, d_theta).

    One batched contraction per term (`einsum` over the sample axis), which XLA reads in the
    data's own layout for the value and every derivative; vmapping a per-sample quadratic over the
    batch instead makes XLA transpose the cross matrices in the reverse pass (~4x slower per step
    on the benchmark_bilevel quadratic, `make bench`)."""
    per_sample = (0.5 * jnp.einsum("i,nij,j->n", phi, batch["H"], phi)
                  + jnp.einsum("i,nij,j->n", phi, batch["C"], theta)
                  + batch["h"] @ phi + _theta_terms(theta, batch))
    return jnp.mean(per_sample)


def quadratic_upper(reg: float = 0.0):
    """f_upper = mean_j [1/2 phi'P_j phi + phi'S_j theta + p_j'phi (+ 1/2 theta'B_j theta + b_j'theta)]
    + reg/2 ||theta||^2, with batch keys "P", "S", "p" (and optional "B", "b") laid out as in
    `quadratic_lower`."""
    def f(theta, phi, batch):
        per_sample = (0.5 * jnp.einsum("i,nij,j->n", phi, batch["P"], phi)
                      + jnp.einsum("i,nij,j->n", phi, batch["S"], theta)
                      + batch["p"] @ phi + _theta_terms(theta, batch))
        return jnp.mean(per_sample) + 0.5 * reg * theta @ theta
    return f


def quadratic_problem(reg: float = 0.0) -> BilevelProblem:
    """The finite-sum quadratic bilevel problem (`quadratic_upper(reg)`, `quadratic_lower`) for data
    of your own in that layout, e.g. benchmark_bilevel's "simulated" quadratic (its per-sample
    f_i(z, x) = 1/2 z'A_i z + 1/2 x'B_i x + x'C_i z + a_i'z + b_i'x is H = A, C = C_i', h = a, B, b
    with theta = x, phi = z)."""
    return BilevelProblem(quadratic_upper(reg), quadratic_lower)


@instance_type
class QuadraticBilevel(Instance):
    """The problem, its data `(upper, lower)`, a starting point, the reference theta* and the
    closed forms."""

    means: dict  # full-batch H, C, h, P, S, p and reg

    # the closed forms are compiled functions of the arrays (one program per shape and dtype, not an
    # eager dispatch per operation; under a transformation they inline as any jitted call does)
    def phi_star(self, theta):
        return _phi_star(self.means, theta)

    def value(self, theta):
        """F(theta) = f_upper(theta, phi*(theta)) on the full upper data (the quadratic's f_upper,
        `quadratic_upper(reg)`, with this instance's means and upper data)."""
        return _value(self.means, self.data[0], theta)

    def grad(self, theta):
        """grad F(theta) in closed form."""
        return _grad(self.means, theta)

    def hessian(self):
        return _hessian(self.means)

    def theta_star(self):
        return _theta_star(self.means)


@jax.jit
def _phi_star(m, theta):
    """phi*(theta) = -H^{-1}(C theta + h)."""
    return -jnp.linalg.solve(m["H"], m["C"] @ theta + m["h"])


@jax.jit
def _value(m, upper, theta):
    """F(theta) = quadratic_upper(reg)(theta, phi*(theta), upper)."""
    return quadratic_upper(m["reg"])(theta, _phi_star(m, theta), upper)


@jax.jit
def _grad(m, theta):
    """grad F = M'(P phi* + S theta + p) + S' phi* + reg theta, M = -H^{-1} C."""
    phi = _phi_star(m, theta)
    M = -jnp.linalg.solve(m["H"], m["C"])
    return M.T @ (m["P"] @ phi + m["S"] @ theta + m["p"]) + m["S"].T @ phi + m["reg"] * theta


@jax.jit
def _hessian(m):
    """hess F = M'PM + M'S + S'M + reg I."""
    M = -jnp.linalg.solve(m["H"], m["C"])
    return M.T @ m["P"] @ M + M.T @ m["S"] + m["S"].T @ M + m["reg"] * jnp.eye(M.shape[1])


@jax.jit
def _theta_star(m):
    """theta* = -hess F^{-1} grad F(0)."""
    return jnp.linalg.solve(_hessian(m), -_grad(m, jnp.zeros(m["C"].shape[1], m["C"].dtype)))


def _spd(key, dim, low, high, dtype):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, dim), dtype))
    return (q * jnp.linspace(low, high, dim, dtype=dtype)) @ q.T


def _rank_one_factors(key, h, n, dtype):
    """z_i (rows) with (1/n) sum z_i z_i' = h exactly."""
    d = h.shape[0]
    u, _ = jnp.linalg.qr(jax.random.normal(key, (n, d), dtype))
    w, q = jnp.linalg.eigh(h)
    h_half = (q * jnp.sqrt(jnp.clip(w, 0))) @ q.T
    return jnp.sqrt(n) * u @ h_half


@functools.partial(jax.jit, static_argnums=tuple(range(1, 10)))
def _draw(key, du, dl, n_samples, lower_spectrum, upper_spectrum, cross, lower_cross, noise, dtype):
    """The per-sample data (upper, lower), compiled once per shape and setting."""
    ks = jax.random.split(key, 12)
    H = _spd(ks[0], dl, *lower_spectrum, dtype)
    P = _spd(ks[1], dl, *upper_spectrum, dtype)
    C = lower_cross * jax.random.normal(ks[2], (dl, du), dtype)
    S = cross * jax.random.normal(ks[3], (dl, du), dtype)
    h = jax.random.normal(ks[4], (dl,), dtype)
    p = jax.random.normal(ks[5], (dl,), dtype)
    if n_samples is None:
        lower = {"H": H[None], "C": C[None], "h": h[None]}
        upper = {"P": P[None], "S": S[None], "p": p[None]}
    else:
        n = n_samples

        def centered(k, shape):
            e = jax.random.normal(k, (n,) + shape, dtype)
            return noise * (e - e.mean(0))

        zl = _rank_one_factors(ks[6], H, n, dtype)
        zu = _rank_one_factors(ks[7], P, n, dtype)
        lower = {"H": jnp.einsum("ni,nj->nij", zl, zl), "C": C + lower_cross * centered(ks[8], (dl, du)),
                 "h": h + centered(ks[9], (dl,))}
        upper = {"P": jnp.einsum("ni,nj->nij", zu, zu), "S": S + cross * centered(ks[10], (dl, du)),
                 "p": p + centered(ks[11], (dl,))}
    return upper, lower


def quadratic_bilevel(key, dim_upper: int = 5, dim_lower: int = 10, n_samples: Optional[int] = None,
                      lower_spectrum=(0.1, 1.0), upper_spectrum=(0.1, 1.0), cross: float = 0.1,
                      reg: float = 1.0, noise: float = 1.0, lower_cross: Optional[float] = None,
                      dtype=jnp.float64) -> QuadraticBilevel:
    """Draw a quadratic bilevel problem (deterministic when `n_samples` is None).

    `cross` scales the cross matrices S (UL) and C (LL; `lower_cross` overrides it: 0 makes phi*
    independent of theta, so the implicit gradient vanishes); `noise` scales the per-sample spread
    of the linear terms. Fails loudly if the drawn F is not strongly convex.
    """
    lower_cross = cross if lower_cross is None else lower_cross
    du, dl = dim_upper, dim_lower
    upper, lower = _draw(key, dim_upper, dim_lower, n_samples, tuple(lower_spectrum), tuple(upper_spectrum),
                         float(cross), float(lower_cross), float(noise), jnp.dtype(dtype))
    inst = QuadraticBilevel(quadratic_problem(reg), (upper, lower),
                            jnp.zeros(du, dtype), jnp.zeros(dl, dtype), _means(upper, lower, jnp.asarray(reg, dtype)),
                            name="quadratic", description=f"quadratic bilevel (d_theta={du}, d_phi={dl}, "
                                                          f"{f'{n_samples} samples' if n_samples else 'deterministic'})")
    smallest, theta_star, value_star = _curvature_and_reference(inst.means, upper)
    if not bool(smallest > 0):
        raise ValueError("the drawn F is not strongly convex: increase `reg` or decrease `cross`.")
    return inst._replace(reference=Reference(theta_star, value_star))


@jax.jit
def _means(upper, lower, reg):
    """The full-batch means of every data key, and `reg`."""
    return {**{k: v.mean(0) for k, v in {**lower, **upper}.items()}, "reg": reg}


@jax.jit
def _curvature_and_reference(m, upper):
    """The smallest eigenvalue of hess F, theta* and F(theta*), in one program."""
    theta_star = _theta_star(m)
    return jnp.linalg.eigvalsh(_hessian(m)).min(), theta_star, _value(m, upper, theta_star)

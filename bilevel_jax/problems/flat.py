"""A bilevel problem whose lower level has many minima (a flat direction), with a closed-form
optimistic solution: the test case of the value-function methods.

    phi = (u, w) in R^d x R^d,   theta in R^d
    f_lower(theta, phi; i) = 1/2 ||u + w - theta - e_i||^2                       (mean_i e_i = 0)
    f_upper(theta, phi; j) = 1/2 ||u - a_j||^2 + 1/2 ||w - b_j||^2 + rho/2 ||theta - c||^2

The LL is convex but not strongly convex: S(theta) = {(u, w): u + w = theta} (its Hessian
[[I, I], [I, I]] is singular), so phi*(theta) and the implicit gradient do not exist. The
optimistic problem min_{theta, phi in S(theta)} f_upper has the closed form (a, b the means)

    u = (a + theta - b) / 2,  w = (theta - a + b) / 2,   F(theta) = 1/4 ||theta - a - b||^2 + rho/2 ||theta - c||^2
    theta* = ((a + b) / 2 + rho c) / (1/2 + rho).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.problems.instance import Instance, Reference, instance_type, static


def _split(phi):
    d = phi.shape[0] // 2
    return phi[:d], phi[d:]


def _f_lower(theta, phi, batch):
    u, w = _split(phi)
    r = u + w - theta - batch["e"]
    return 0.5 * jnp.mean(jnp.sum(r ** 2, axis=-1))


def _f_upper(rho, c):
    def f(theta, phi, batch):
        u, w = _split(phi)
        per = 0.5 * jnp.sum((u - batch["a"]) ** 2, -1) + 0.5 * jnp.sum((w - batch["b"]) ** 2, -1)
        return jnp.mean(per) + 0.5 * rho * jnp.sum((theta - c) ** 2)
    return f


@instance_type
class FlatBilevel(Instance):
    """The problem, its data `(upper, lower)`, a start, the optimistic theta* (`reference`) and
    the optimistic closed forms."""

    a: jax.Array
    b: jax.Array
    c: jax.Array
    rho: float = static()

    # the closed forms are compiled functions of the arrays (one program per shape, not an eager
    # dispatch per operation; under a transformation they inline as any jitted call does)
    def theta_star(self):
        return _theta_star(self.a, self.b, self.c, self.rho)

    def phi_star(self, theta):
        """The best LL solution for the UL at theta (the optimistic selection)."""
        return _phi_star(self.a, self.b, theta)

    def value(self, theta):
        """F(theta) = min_{phi in S(theta)} f_upper (the optimistic value)."""
        return _value(self.a, self.b, self.c, self.rho, theta)

    def grad(self, theta):
        return _grad(self.a, self.b, self.c, self.rho, theta)


@jax.jit
def _theta_star(a, b, c, rho):
    """theta* = ((a + b) / 2 + rho c) / (1/2 + rho)."""
    return (0.5 * (a + b) + rho * c) / (0.5 + rho)


@jax.jit
def _phi_star(a, b, theta):
    """(u, w) = ((a + theta - b) / 2, (theta - a + b) / 2)."""
    return jnp.concatenate([(a + theta - b) / 2, (theta - a + b) / 2])


@jax.jit
def _value(a, b, c, rho, theta):
    """F(theta) = 1/4 ||theta - a - b||^2 + rho/2 ||theta - c||^2."""
    return 0.25 * jnp.sum((theta - a - b) ** 2) + 0.5 * rho * jnp.sum((theta - c) ** 2)


@jax.jit
def _grad(a, b, c, rho, theta):
    """grad F(theta) = (theta - a - b) / 2 + rho (theta - c)."""
    return 0.5 * (theta - a - b) + rho * (theta - c)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw(key, dim, n_samples, noise, dtype):
    """The means a, b, c and the per-sample data (upper, lower), compiled once per shape and setting."""
    ks = jax.random.split(key, 5)
    a, b, c = (jax.random.normal(k, (dim,), dtype) for k in ks[:3])
    n = 1 if n_samples is None else n_samples

    def centred(k):
        if n_samples is None:
            return jnp.zeros((1, dim), dtype)
        e = jax.random.normal(k, (n, dim), dtype)
        return noise * (e - e.mean(0))

    e1, e2 = jax.random.split(ks[3])
    return a, b, c, ({"a": a + centred(e1), "b": b + centred(e2)}, {"e": centred(ks[4])})


def flat_bilevel(key, dim: int = 3, n_samples: Optional[int] = None, rho: float = 0.5, noise: float = 1.0,
                 dtype=jnp.float64) -> FlatBilevel:
    """Draw the problem (deterministic when `n_samples` is None; else per-sample noise of size
    `noise`, centred so that the full-batch problem has the closed forms above)."""
    a, b, c, (upper, lower) = _draw(key, dim, n_samples, float(noise), jnp.dtype(dtype))
    inst = FlatBilevel(BilevelProblem(_f_upper(rho, c), _f_lower), (upper, lower), jnp.zeros(dim, dtype),
                       jnp.zeros(2 * dim, dtype), a, b, c, rho, name="flat")
    theta_star = inst.theta_star()
    return inst._replace(reference=Reference(theta_star, inst.value(theta_star)))

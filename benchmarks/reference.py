"""Measure 7, the reference for the limit: a minimal SOBA step written directly in plain JAX (no
bilevel_jax code), timed in the same run (interleaved calls) as `bj.algorithms.soba`.

The reference makes exactly SOBA's computation with the toolkit's sampling scheme, so both runs
produce the same iterates (checked: `max_abs_diff` of the final theta):
  - i.i.d. minibatches, index draw `count` of the level's key fold_in(key, level);
  - one `jax.grad` of f_upper over (theta, phi) on the UL batch;
  - one `jax.vjp` of grad_phi f_lower over (theta, phi) on the LL batch, pulled back along v:
    (J v, H v) from one backward pass, grad_phi f_lower its primal output;
  - plain SGD with the preset's decays rho_k = lr / (k+1)^0.4 (phi, v), gamma_k = lr / (k+1)^0.6 (theta).
The objectives f_upper / f_lower are the problem's own functions (the same user code in both).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from benchmarks import timing
from benchmarks.setups import Setup

UPPER_LR = LOWER_LR = 0.1
UPPER_DECAY, LOWER_DECAY = 0.6, 0.4


def reference_soba_run(f_upper, f_lower, batch_size: int, num_steps: int):
    """`run(theta, phi, key, data) -> (theta, phi, v)` after `num_steps` plain-JAX SOBA steps."""

    def sample(data, key, draw):
        n = jax.tree_util.tree_leaves(data)[0].shape[0]
        idx = jax.random.randint(jax.random.fold_in(key, draw), (batch_size,), 0, n)
        return jax.tree_util.tree_map(lambda x: x[idx], data)

    def run(theta, phi, key, data):
        upper_data, lower_data = data
        key_up, key_low = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

        def step(carry, k):
            theta, phi, v = carry
            ub, lb = sample(upper_data, key_up, k), sample(lower_data, key_low, k)
            g_theta, g_phi = jax.grad(f_upper, argnums=(0, 1))(theta, phi, ub)
            grad_lower, pullback = jax.vjp(lambda t, p: jax.grad(f_lower, argnums=1)(t, p, lb), theta, phi)
            jv, hv = pullback(v)
            kf = (k + 1).astype(theta.dtype)
            rho, gamma = LOWER_LR / kf ** LOWER_DECAY, UPPER_LR / kf ** UPPER_DECAY
            return (theta - gamma * (g_theta - jv), phi - rho * grad_lower, v - rho * (hv - g_phi)), None

        (theta, phi, v), _ = jax.lax.scan(step, (theta, phi, jnp.zeros_like(phi)), jnp.arange(num_steps))
        return theta, phi, v

    return run


def toolkit_soba_run(setup: Setup, num_steps: int):
    alg = bj.algorithms.soba(setup.problem, upper_lr=UPPER_LR, lower_lr=LOWER_LR, upper_decay=UPPER_DECAY,
                             lower_decay=LOWER_DECAY, batch_size=setup.batch_size)

    def run(theta, phi, key, data):
        state = alg.init(theta, phi, key)
        state, _ = bj.run(alg, state, data, num_steps=num_steps)
        return state.theta, state.phi, state.v

    return run


def measure(setup: Setup, num_steps: int, repeats: int) -> dict:
    if setup.batch_size is None:
        raise ValueError("the reference SOBA samples minibatches: give the setup a batch size.")
    key = jax.random.PRNGKey(0)
    fns = {"soba": jax.jit(toolkit_soba_run(setup, num_steps)),
           "reference": jax.jit(reference_soba_run(setup.problem.f_upper, setup.problem.f_lower,
                                                   setup.batch_size, num_steps))}
    args = (setup.theta0, setup.phi0, key, setup.data)
    res = timing.interleaved(fns, {k: args for k in fns}, repeats=repeats, scale=num_steps)
    out_t, out_r = fns["soba"](*args)[0], fns["reference"](*args)[0]
    r = timing.ratio(res["soba"]["samples"], res["reference"]["samples"])
    return {"problem": setup.description, "steps_per_call": num_steps,
            "soba": res["soba"], "reference": res["reference"], "ratio": r,
            "ratio_of_medians": res["soba"]["median"] / res["reference"]["median"],
            "max_abs_diff_theta": float(np.max(np.abs(np.asarray(out_t) - np.asarray(out_r)))),
            "bar": 1.15}

"""End-to-end demo: hypergradient descent on ridge-regression hyperparameter optimisation.

    min_theta F(theta) = 1/(2m) ||X_val w*(theta) - y_val||^2,
    w*(theta) = argmin_w 1/(2n) ||X w - y||^2 + 1/2 sum_k exp(theta_k) w_k^2   (one theta per feature)

Each outer step (one jitted function, scanned over `log_every` steps between prints):
  1. `inner_steps` warm-started gradient steps on f_lower (step 1/L(theta), L the LL smoothness),
  2. the implicit hypergradient `bj.hypergradient` with CG, warm-started at the previous v,
  3. a gradient step on theta (optax.sgd).
F and grad F are also evaluated in closed form (`RidgeHPO.value`/`.grad`) to show the true
progress, and F* comes from L-BFGS on the closed-form F.

Run: `python -m experiments.demo` (or `make demo`); a few seconds on a CPU.
"""
from __future__ import annotations

import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import bilevel_jax as bj  # noqa: E402


def inner_step_size(hpo, theta):
    """1/L for f_lower = 1/(2n)||Xw - y||^2 + 1/2 sum exp(theta) w^2: L = ||X||_2^2/n + max exp(theta)."""
    X, _ = hpo.data[1]
    return 1.0 / (jnp.linalg.norm(X, 2) ** 2 / X.shape[0] + jnp.max(jnp.exp(theta)))


def make_step(hpo, outer_lr: float, inner_steps: int, cg_iters: int):
    """One outer iteration `(theta, phi, v, opt_state) -> (same, metrics)`, pure and jittable."""
    problem, data = hpo.problem, hpo.data
    outer = optax.sgd(outer_lr)
    solver = bj.linear_solvers.cg(maxiter=cg_iters)

    def step(carry, _):
        theta, phi, v, opt_state = carry
        inner = optax.sgd(inner_step_size(hpo, theta))
        phi = bj.hypergrad.solve_lower(problem, inner, theta, phi, data[1], inner_steps)
        g, info = bj.hypergradient(problem, theta, phi, data, solver=solver, x0=v)
        updates, opt_state = outer.update(g, opt_state, theta)
        metrics = {
            "F": hpo.value(theta),                                    # closed form, at theta_t
            "grad_norm": jnp.linalg.norm(hpo.grad(theta)),            # closed form
            "grad_error": jnp.linalg.norm(g - hpo.grad(theta)),       # estimate vs closed form
            "ll_grad": jnp.linalg.norm(bj.oracles.lower_grad_phi(problem, theta, phi, data[1])),
            "cg_residual": info.residual_norm,
        }
        return (optax.apply_updates(theta, updates), phi, info.v, opt_state), metrics

    return step, outer


def reference_optimum(hpo, theta0, steps: int = 300):
    """F* by L-BFGS on the closed-form F (deterministic)."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(hpo.value)

    @jax.jit
    def run(theta):
        def body(carry, _):
            theta, state = carry
            value, grad = value_and_grad(theta, state=state)
            updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=hpo.value)
            return (optax.apply_updates(theta, updates), state), None

        (theta, _), _ = jax.lax.scan(body, (theta, opt.init(theta)), None, length=steps)
        return theta, hpo.value(theta), jnp.linalg.norm(hpo.grad(theta))

    return run(theta0)


def main(num_steps: int = 200, log_every: int = 20, outer_lr: float = 50.0, inner_steps: int = 10,
         cg_iters: int = 10, seed: int = 0) -> dict:
    """Run the demo, print a table, and return the final metrics."""
    hpo = bj.problems.ridge_hpo(jax.random.PRNGKey(seed), n_train=100, n_val=100, dim=10,
                                per_feature=True)
    d = hpo.theta0.shape[0]
    print("bilevel_jax demo: per-feature ridge HPO, hypergradient descent "
          f"(d={d}, n_train={hpo.data[1][0].shape[0]}, n_val={hpo.data[0][0].shape[0]})")
    print(f"  per step: {inner_steps} warm-started LL gradient steps, CG({cg_iters}) for v "
          f"(warm-started), UL step {outer_lr}; jitted, lax.scan over {log_every} steps\n")

    step, outer = make_step(hpo, outer_lr, inner_steps, cg_iters)
    chunk = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=log_every))
    theta = hpo.theta0
    carry = (theta, hpo.phi0, jnp.zeros_like(hpo.phi0), outer.init(theta))

    header = (f"{'step':>6} {'F(theta)':>12} {'||grad F||':>11} {'||g_hat - grad F||':>19} "
              f"{'||grad_phi f_lower||':>21}")
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for t in range(0, num_steps, log_every):
        carry, metrics = chunk(carry)
        m = jax.tree_util.tree_map(lambda x: float(x[0]), metrics)   # metrics at step t
        print(f"{t:>6d} {m['F']:>12.6f} {m['grad_norm']:>11.2e} {m['grad_error']:>19.2e} {m['ll_grad']:>21.2e}")
    theta = jax.block_until_ready(carry[0])
    elapsed = time.perf_counter() - start
    final_value, final_grad = float(hpo.value(theta)), float(jnp.linalg.norm(hpo.grad(theta)))
    print(f"{num_steps:>6d} {final_value:>12.6f} {final_grad:>11.2e}")
    print("(F, grad F: closed forms at theta_t; g_hat: the CG hypergradient used for the step)")

    _, f_star, g_star = reference_optimum(hpo, hpo.theta0)
    f_star, g_star = float(f_star), float(g_star)
    print(f"\nF* (L-BFGS on the closed-form F, ||grad F|| = {g_star:.1e}): {f_star:.6f}")
    print(f"F(theta_0) = {float(hpo.value(hpo.theta0)):.6f}   F(theta_T) = {final_value:.6f}   "
          f"F(theta_T) - F* = {final_value - f_star:.2e}")
    print(f"{num_steps} outer steps in {elapsed:.2f} s (compilation included)")
    return {"F_final": final_value, "F_star": f_star, "F_initial": float(hpo.value(hpo.theta0)),
            "grad_norm_final": final_grad, "seconds": elapsed}


if __name__ == "__main__":
    main()

"""A new bilevel algorithm composed from bilevel_jax's building blocks, in about forty lines.

The method: T lower-level SGD steps, the implicit hypergradient by warm-started conjugate
gradient, a projected step on theta, and an extra variable: the Polyak-Ruppert average of the
theta iterates (Polyak & Juditsky, "Acceleration of Stochastic Approximation by Averaging",
1992), moved by its own optax rule (SGD with step 1/(k+1) towards theta: avg_{k+1} = avg_k -
(avg_k - theta_{k+1}) / (k - k0 + 1) after a burn-in of k0 steps, avg = theta before). With noisy
minibatch hypergradients and a constant step, the average is closer to theta* than the last
iterate.

It is written the way every preset is: a `bj.algorithms.steps.Composed` (problem, step rules,
samplers; `start`, `batches`, `finish`) whose state is a `bj.algorithms.State` (the shared
`Header`, then its own variables), the public step primitives (lower_phase, step_rule,
apply_step, init_rule), `bj.hypergrad.implicit_direction` and `bj.linear_solvers.cg`; its oracle
counts are those the oracle functions record in the step's `bj.oracles.counting` block. It runs
under `bj.run` like any preset (jit, vmap over seeds, status in the history). The problem is the
toolkit's stochastic quadratic with a closed-form theta*.

Run from the repository root:
    .venv/bin/python examples/custom_algorithm.py           # 2000 outer steps
    .venv/bin/python examples/custom_algorithm.py --quick   # 400 outer steps
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import bilevel_jax as bj
from bilevel_jax.algorithms import steps


class AveragedState(bj.algorithms.State):
    header: bj.algorithms.Header   # theta, phi, count, key and the step rules' states (`steps.start`)
    solver: Any          # CG's warm start: v
    average: Any         # the extra variable
    average_opt_state: Any


class AveragedImplicit(steps.Composed):   # problem, upper, lower, samplers; check, name
    averaging: steps.StepRule
    solver: bj.linear_solvers.LinearSolver
    lower_steps: int = eqx.field(static=True, default=5)
    name: str = eqx.field(static=True, default="averaged_implicit", kw_only=True)

    def init(self, theta0, phi0, key, data=None):
        head = self.start(theta0, phi0, key, data)
        return AveragedState(head, self.solver.init(phi0), head.theta, steps.init_rule(self.averaging, head.theta))

    def update(self, state, data):
        k = state.count
        batches = self.batches(state, data, self.lower_steps)
        with bj.oracles.counting() as tally:   # the oracle calls of the step, as the oracle functions count them
            phi, lower_state, ll_status = steps.lower_phase(
                self.problem, self.lower, state.theta, state.phi, state.lower_opt_state, self.lower_steps,
                batches.lower_at, k)
            out = bj.hypergrad.implicit_direction(self.problem, state.theta, phi, batches.upper, batches.lower,
                                                  self.solver, state.solver)
        theta, upper_state, up_status = steps.apply_step(self.upper, state.theta, state.upper_opt_state, out.g, k,
                                                         self.problem.project)
        # the extra variable: a step of its own rule along (average - theta_{k+1})
        average, avg_state, avg_status = steps.apply_step(self.averaging, state.average, state.average_opt_state,
                                                          state.average - theta, k)
        (theta, phi, average), info = self.finish((theta, phi, average), tally.counts, out.info.residual_norm,
                                                  (ll_status, out.info.status, up_status, avg_status))
        return AveragedState(state.header.next(theta, phi, upper_state, lower_state), out.state, average,
                             avg_state), info


def averaged_implicit(problem, *, upper_lr=0.1, lower_lr=0.3, lower_steps=5, batch_size=64, burn_in=100):
    tail_average = lambda k: 1.0 / jnp.maximum(k - burn_in + 1, 1)   # 1 before burn_in: avg = theta
    return AveragedImplicit(
        problem, steps.step_rule("upper_lr", upper_lr), steps.step_rule("lower_lr", lower_lr),
        bj.algorithms.loop.make_samplers(batch_size, "iid"), steps.step_rule("averaging", tail_average),
        bj.linear_solvers.cg(maxiter=5, warm_start=True), lower_steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 outer steps instead of 2000")
    args = parser.parse_args(argv)
    num_steps = 400 if args.quick else 2000
    q = bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), dim_upper=4, dim_lower=6, n_samples=256,
                                      dtype=jnp.float32)
    alg = averaged_implicit(q.problem, burn_in=num_steps // 2)
    theta_star = q.theta_star()
    error = lambda t: jnp.linalg.norm(t - theta_star) / jnp.linalg.norm(theta_star)

    @jax.jit
    def go(keys):
        def one(key):
            state, hist = bj.run(alg, alg.init(q.theta0, q.phi0, key), q.data, num_steps=num_steps)
            return error(state.theta), error(state.average), hist["status"][-1]
        return jax.vmap(one)(keys)

    last, averaged, status = go(jax.random.split(jax.random.PRNGKey(1), 4))
    print(f"relative error to theta* over 4 seeds: last iterate {float(jnp.median(last)):.3e}, "
          f"Polyak average {float(jnp.median(averaged)):.3e}")
    ok = bool(jnp.all(status == bj.status.OK))
    print(f"status {'ok' if ok else [bj.status.describe(s) for s in status]}")
    return {"last": float(jnp.median(last)), "average": float(jnp.median(averaged)), "ok": ok}


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

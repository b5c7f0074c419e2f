"""Pessimistic hyperparameter optimisation: tuning a penalty when the training data cannot tell two
features apart.

A linear model w >= 0 (box [0, B]^3) on three features. In the training data features 1 and 2 are
identical copies (a duplicated sensor), so the training loss only sees s = w_1 + w_2: the lower
level has a segment of minimisers {(t, s - t, w_3)}. In the validation data the second copy has
drifted (x_2 = x_1 + noise), so how the weight is split matters there. The hyperparameter theta is
the log-weight of a ridge penalty on w_3 alone (x_3 is correlated with x_1):

    LL:  S(theta) = argmin_{w in [0, B]^3} (1/2n) ||X w - y||^2 + (e^theta / 2) w_3^2
    optimistic:   min_theta min_{w in S(theta)} validation loss
    pessimistic:  min_theta max_{w in S(theta)} validation loss        (a robust choice of theta)

Penalising w_3 moves weight onto the ambiguous pair (s grows), which the optimistic problem does
not mind (it picks the best split) but the pessimistic one pays for (the worst split puts all of s
on the drifted copy); so the pessimistic theta* is smaller. Both are solved with
`bj.algorithms.pessimistic_penalty` (a value-gap penalty, first order) on a box-constrained problem
(`BilevelProblem(..., pessimistic=True / False)`), and checked against the exact value functions:
for each theta, s and w_3 solve a 2 x 2 ridge system, the validation loss is a quadratic on the
segment (its max at an end, its min at the clipped vertex), minimised over a fine theta grid.

Run from the repository root:
    .venv/bin/python examples/pessimistic_hpo.py            # 3000 outer steps
    .venv/bin/python examples/pessimistic_hpo.py --quick    # 1500 outer steps (a few seconds)
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import bilevel_jax as bj

B, THETA_BOX, N = 3.0, (-4.0, 4.0), 200


def make_data(key, n: int = N):
    """(validation, training) pairs (X, y); training features 1 and 2 identical."""
    k = jax.random.split(key, 6)
    x1 = jax.random.normal(k[0], (n,))
    x3 = 0.6 * x1 + 0.8 * jax.random.normal(k[1], (n,))
    y = x1 + 0.5 * x3 + 0.1 * jax.random.normal(k[2], (n,))
    x1v = jax.random.normal(k[3], (n,))
    x3v = 0.6 * x1v + 0.8 * jax.random.normal(k[4], (n,))
    x2v = x1v + 0.2 * jax.random.normal(k[5], (n,))     # the copy has drifted
    return (jnp.stack([x1v, x2v, x3v], 1), x1v + 0.2 * x3v), (jnp.stack([x1, x1, x3], 1), y)


def f_lower(theta, w, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(theta[0]) * w[2] ** 2


def f_upper(theta, w, batch):
    X, y = batch
    return 0.5 * jnp.mean((X @ w - y) ** 2)


def exact_values(theta, data):
    """(worst, best) validation loss over S(theta), exactly: s, w_3 from the reduced ridge system,
    the segment t in [max(0, s - B), min(B, s)] (w_1 = t, w_2 = s - t), the quadratic's max at an
    end and min at its clipped vertex."""
    (Xv, yv), (X, y) = data
    x1, x3 = X[:, 0], X[:, 2]
    a = jnp.array([[jnp.mean(x1 * x1), jnp.mean(x1 * x3)], [jnp.mean(x1 * x3), jnp.mean(x3 * x3) + jnp.exp(theta)]])
    s, w3 = jnp.linalg.solve(a, jnp.array([jnp.mean(x1 * y), jnp.mean(x3 * y)]))
    lo, hi = jnp.maximum(0.0, s - B), jnp.minimum(B, s)
    q = lambda t: f_upper(None, jnp.stack([t, s - t, w3]), (Xv, yv))
    q_lo, q_mid, q_hi = q(lo), q(0.5 * (lo + hi)), q(hi)
    curv = 4.0 * (q_lo - 2.0 * q_mid + q_hi) / (hi - lo) ** 2          # q''
    slope = (q_hi - q_lo) / (hi - lo) - 0.5 * curv * (hi + lo)          # q'(0) of q(t) = c + slope t + curv t^2 / 2
    vertex = jnp.clip(-slope / curv, lo, hi)
    return jnp.maximum(q_lo, q_hi), jnp.minimum(jnp.minimum(q_lo, q_hi), q(vertex))


def exact_solutions(data):
    """argmin over theta in THETA_BOX of the worst and the best validation loss (grid, then a finer
    grid around each minimiser: resolution 1e-4)."""
    values = jax.jit(jax.vmap(lambda t: exact_values(t, data)))
    coarse = jnp.linspace(*THETA_BOX, 801)
    out = []
    for which in (0, 1):
        t0 = coarse[jnp.argmin(values(coarse)[which])]
        fine = jnp.linspace(jnp.maximum(t0 - 0.02, THETA_BOX[0]), jnp.minimum(t0 + 0.02, THETA_BOX[1]), 401)
        out.append(float(fine[jnp.argmin(values(fine)[which])]))
    return out[0], out[1]


def solve(data, pessimistic: bool, steps: int):
    box = bj.constraints.box(jnp.zeros(3), B * jnp.ones(3))
    problem = box.problem(f_upper, f_lower, project_upper=lambda t: jnp.clip(t, *THETA_BOX), pessimistic=pessimistic)
    alg = bj.algorithms.pessimistic_penalty(problem, upper_lr=0.5, follower_lr=0.5, tracker_lr=0.5, follower_steps=20,
                                            tracker_steps=20, penalty=2.0, penalty_rate=0.5, penalty_max=200.0)
    state = alg.init(jnp.zeros(1), 0.5 * jnp.ones(3), jax.random.PRNGKey(0), data)
    state, history = jax.jit(lambda s: bj.run(alg, state=s, data=data, num_steps=steps))(state)
    return state, history


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1500 outer steps instead of 3000")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)    # the exact references are compared to 1e-2
    steps = 1500 if args.quick else 3000
    data = make_data(jax.random.PRNGKey(0))
    star_pess, star_opt = exact_solutions(data)
    out = {"theta_star_pessimistic": star_pess, "theta_star_optimistic": star_opt}
    for name, pessimistic in (("pessimistic", True), ("optimistic", False)):
        state, history = solve(data, pessimistic, steps)
        theta = float(state.theta[0])
        worst, best = (float(v) for v in exact_values(theta, data))
        out[name] = {"theta": theta, "worst": worst, "best": best, "status": int(history["status"][-1])}
        print(f"{name:11s}: theta = {theta:+.4f} (exact {out['theta_star_' + name]:+.4f}); validation loss over "
              f"S(theta): worst {worst:.4f}, best {best:.4f}; status {bj.status.describe(history['status'][-1])}")
    pess, opt = out["pessimistic"], out["optimistic"]
    print(f"the robust theta lowers the worst case from {opt['worst']:.4f} to {pess['worst']:.4f}, "
          f"at a best case of {pess['best']:.4f} instead of {opt['best']:.4f}")
    out["ok"] = (abs(pess["theta"] - star_pess) < 1e-2 and abs(opt["theta"] - star_opt) < 1e-2
                 and pess["status"] == opt["status"] == bj.status.OK and pess["worst"] < opt["worst"])
    if not out["ok"]:
        print("a solution is off its exact reference, or the robust theta did not lower the worst case",
              file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

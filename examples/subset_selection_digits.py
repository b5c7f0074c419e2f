"""Data subset selection by bilevel optimisation: weights on training samples under a budget.

`bj.problems.subset_selection` (Borsos, Mutny, Krause, "Coresets via Bilevel Optimization for
Continual Learning and Streaming", NeurIPS 2020, arXiv:2006.03875):

    min_{w in [0,1]^n, sum w <= k}  CE_val(W*(w))
    s.t.  W*(w) = argmin_W 1/k sum_i w_i CE(W x_i, y_i) + 0.01 ||W||^2

on scikit-learn's 8x8 digits (bundled): n = 500 training images of which 40% have a wrong label,
500 clean validation images, 797 test images, budget k = 250. Starts at the uniform weights k/n;
AmIGO (10 GD steps on W, 10 on v per outer step, full batch), w projected onto the capped simplex
after every UL step.

    .venv/bin/python examples/subset_selection_digits.py           # 300 outer steps
    .venv/bin/python examples/subset_selection_digits.py --quick   # 60 outer steps

Prints F(w) = f_upper(W*(w)) (W* by L-BFGS) at the start and the end, the share of clean samples
among the k of largest weight, and the test accuracy of a model trained on those k samples next to
k random ones.
"""
from __future__ import annotations

import argparse
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel_jax as bj
from bilevel_jax.problems import subset_selection as ss


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 outer steps instead of 300")
    p.add_argument("--budget", type=int, default=250)
    p.add_argument("--noise", type=float, default=0.4, help="share of wrong training labels (default 0.4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    steps = 60 if args.quick else 300
    start = time.perf_counter()
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(y))
    X, y = (X[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    noisy = y[:500].copy()
    wrong = rng.permutation(500)[: int(args.noise * 500)]
    noisy[wrong] = (noisy[wrong] + rng.integers(1, 10, wrong.size)) % 10
    clean = noisy == y[:500]
    bundle = ss.subset_selection((X[:500], noisy), (X[500:1000], y[500:1000]), args.budget)
    test = (jnp.concatenate([jnp.asarray(X[1000:]), jnp.ones((len(y) - 1000, 1), jnp.float32)], axis=1),
            jnp.asarray(y[1000:]))
    problem = bundle.problem
    solve = eqx.filter_jit(bj.argmin(problem.f_lower, optax.lbfgs(), steps=300))
    value = lambda w: float(problem.f_upper(w, solve(w, bundle.phi0, bundle.data[1]), bundle.data[0]))  # noqa: E731

    phi0 = solve(bundle.theta0, bundle.phi0, bundle.data[1])
    alg = bj.algorithms.amigo(problem, upper_lr=2.0, lower_lr=0.5, batch_size=None)
    state = alg.init(bundle.theta0, phi0, jax.random.PRNGKey(1), bundle.data)
    state, hist = bj.run(alg, state, bundle.data, num_steps=steps, eval_every=steps // 3)   # one compiled program
    status = int(hist["status"][-1])

    def trained_on(indices):
        w = jnp.zeros(500, jnp.float32).at[indices].set(1.0)
        return float(bundle.accuracy(solve(w, bundle.phi0, bundle.data[1]), test))

    chosen = np.asarray(ss.select(state.theta, args.budget))
    random = rng.permutation(500)[: args.budget]
    out = {"value_initial": value(bundle.theta0), "value_final": value(state.theta),
           "budget_used": float(jnp.sum(state.theta)), "clean_share_selected": float(clean[chosen].mean()),
           "clean_share_all": float(clean.mean()), "acc_selected": trained_on(chosen),
           "acc_random": trained_on(random), "status": bj.status.describe(status),
           "finite": bool(np.all(hist["finite"])), "seconds": time.perf_counter() - start}
    print(f"digits, {int(args.noise * 100)}% wrong training labels, budget {args.budget} of 500, AmIGO {steps} outer steps")
    print(f"  F(w) = validation loss of W*(w): {out['value_initial']:.4f} -> {out['value_final']:.4f} "
          f"(sum w = {out['budget_used']:.1f} <= {args.budget})")
    print(f"  clean samples among the {args.budget} of largest weight: {out['clean_share_selected']:.1%} "
          f"(all training samples: {out['clean_share_all']:.1%})")
    print(f"  test accuracy trained on the selected subset {out['acc_selected']:.3f}; on a random subset "
          f"{out['acc_random']:.3f}")
    print(f"status {out['status']}; {out['seconds']:.1f} s")
    return out


if __name__ == "__main__":
    main()

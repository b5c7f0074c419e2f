"""Model pruning by bilevel optimisation: a relaxed mask on the weights of an equinox model.

Bi-level pruning (Zhang et al., "Advancing Model Pruning via Bi-level Optimization",
NeurIPS 2022, arXiv:2210.04092), `bj.problems.pruning`:

    min_{theta in [0,1]^{10x64}}  CE_val(theta (.) phi*(theta)) + sparsity * mean(theta)
    s.t.  phi*(theta) = argmin_phi CE_train(theta (.) phi) + rho ||phi||^2

phi is an `eqx.nn.Linear(64, 10)` on scikit-learn's 8x8 digits (bundled: 500 train / 500
validation / 797 test images), theta one mask entry per weight (the bias is not masked), kept in
[0, 1] by projection. The run starts at theta0 = 1/2 everywhere and phi0 = phi*(theta0) (L-BFGS)
and uses AmIGO (10 GD steps on phi, 10 on v per outer step, full batch).

    .venv/bin/python examples/pruning_digits.py           # 300 outer steps
    .venv/bin/python examples/pruning_digits.py --quick   # 60 outer steps (a few seconds)

Prints the UL objective F(theta) = f_upper(theta, phi*(theta)) (phi* re-solved by L-BFGS) at the
start and the end, the mean mask, and the test accuracy of the model pruned to the `keep` share
of largest mask entries and retrained, next to a random mask of the same size.
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
from bilevel_jax.problems import pruning as pr


def digits(seed: int = 0):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order] / 16.0, y[order].astype(np.int32)
    cuts = [0, 500, 1000, len(y)]
    return tuple((jnp.asarray(X[a:b], jnp.float32), jnp.asarray(y[a:b])) for a, b in zip(cuts, cuts[1:]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 outer steps instead of 300")
    p.add_argument("--sparsity", type=float, default=0.05, help="weight of mean(theta) in the UL (default 0.05)")
    p.add_argument("--keep", type=float, default=0.25, help="share of weights kept by the hard mask (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    steps = 60 if args.quick else 300
    start = time.perf_counter()
    train, val, test = digits(args.seed)
    model = eqx.nn.Linear(64, 10, key=jax.random.PRNGKey(args.seed))
    bundle = pr.pruning(model, train, val, rho=1e-3, sparsity=args.sparsity, mask_init=0.5)
    problem = bundle.problem
    solve = eqx.filter_jit(bj.argmin(problem.f_lower, optax.lbfgs(), steps=300))
    value = lambda theta: float(problem.f_upper(theta, solve(theta, model, train), val))   # noqa: E731

    phi0 = solve(bundle.theta0, model, train)
    alg = bj.algorithms.amigo(problem, upper_lr=20.0, lower_lr=0.5, batch_size=None)
    state = alg.init(bundle.theta0, phi0, jax.random.PRNGKey(1), bundle.data)
    state, hist = bj.run(alg, state, bundle.data, num_steps=steps, eval_every=steps // 3)   # one compiled program
    status = int(hist["status"][-1])

    def pruned_accuracy(mask):
        phi = solve(mask, model, train)
        return float(bundle.accuracy(mask, phi, test))

    hard = pr.hard_mask(state.theta, args.keep)
    rand = tuple(jax.random.permutation(jax.random.PRNGKey(7), h.ravel()).reshape(h.shape) for h in hard)
    out = {"value_initial": value(bundle.theta0), "value_final": value(state.theta),
           "mean_mask_initial": 0.5, "mean_mask_final": float(np.mean(np.asarray(state.theta[0]))),
           "acc_pruned": pruned_accuracy(hard), "acc_random_mask": pruned_accuracy(rand),
           "acc_dense": pruned_accuracy(pr.mask_like(model, 1.0)), "status": bj.status.describe(status),
           "finite": bool(np.all(hist["finite"])), "seconds": time.perf_counter() - start}
    print(f"digits, eqx.nn.Linear(64, 10), AmIGO {steps} outer steps, sparsity {args.sparsity}")
    print(f"  F(theta) = f_upper(theta, phi*(theta)): {out['value_initial']:.4f} -> {out['value_final']:.4f}")
    print(f"  mean mask: 0.5 -> {out['mean_mask_final']:.3f}")
    print(f"  test accuracy, retrained: dense {out['acc_dense']:.3f}; keep {args.keep:.0%} by the learned mask "
          f"{out['acc_pruned']:.3f}; a random mask of the same size {out['acc_random_mask']:.3f}")
    print(f"status {out['status']}; {out['seconds']:.1f} s")
    return out


if __name__ == "__main__":
    main()

"""Per-layer weight decay of a small neural network, tuned by bilevel optimisation.

theta holds one log weight decay per layer; phi is an MLP classifier 64 -> hidden -> 10 with
tanh (an `eqx.nn.MLP`); W_l is the weight and bias of layer l:

    min_theta  F(theta) = CE_val(phi*(theta))
    s.t.       phi*(theta) = argmin_phi  CE_train(phi) + sum_l exp(theta_l)/2 ||W_l||^2

The data is scikit-learn's 8x8 digits (1797 images, bundled, no download): 500 for training
(the lower level), 500 for validation (the upper level) and 797 for testing (reported only).
The hypergradient is grad F = grad_theta f_upper - J v with A v = grad_phi f_upper, where
A = grad^2_phi f_lower and J = grad^2_{theta phi} f_lower. It needs the lower level to be
locally strongly convex: near its minimisers, not at a random network. So the run starts at
phi0 = phi*(theta0), trained by `bj.argmin` with L-BFGS, from a deliberately strong decay (0.05
on both layers) that underfits.

Algorithm: SOBA (`bj.algorithms.soba`) on minibatches of 64. Each outer step takes one SGD step
on phi, one on v and one Adam step on theta, all from a single fused vjp. Why SOBA: weight decay
pushes hidden units towards zero, where a tanh network's curvature is nearly flat, and the
Hessians at SGD iterates are often slightly indefinite. Double-loop methods solve A v = b at
every step and correctly report such a system as a breakdown (NaN, status `breakdown`). Here
AID-BiO's CG does so at the first step, and AmIGO's 10 warm-started GD steps within ~100 steps.
SOBA takes one step on v per outer step, so v only drifts slowly along such directions until phi
moves on. Each step is also cheap, so many small steps fit in the time budget. Settings:
- The LL step is a constant 0.5. Under SOBA's default k^-2/5 decay it falls to 0.02 by step
  5000 and phi lags phi*(theta); the full run then overshoots to too small a decay
  (retrained validation loss 0.169 instead of 0.156).
- theta uses Adam, which is insensitive to the hypergradient's scale (that scale shrinks with the
  decay), on a cosine schedule that damps the minibatch noise at the end.

Run from the repository root:
    .venv/bin/python examples/mlp_hpo_digits.py            # 5000 outer steps (~15 s on 2 CPU cores)
    .venv/bin/python examples/mlp_hpo_digits.py --quick    # 1000 outer steps (~10 s)
    .venv/bin/python examples/mlp_hpo_digits.py --help     # sizes, step sizes, seed

Output:
- At each evaluation point (every steps/10 outer steps), the validation loss and test accuracy
  of the current (theta, phi), and the weight decays exp(theta).
- A summary: the validation loss and test accuracy of the network retrained (500 full-batch
  L-BFGS steps from the same initialisation) with the initial and with the tuned decays.
- If a step reported a failure, a message naming the status, and exit status 1.
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
import optax.tree_utils as otu

import bilevel_jax as bj


def load_digits_splits(n_train: int = 500, n_val: int = 500, seed: int = 0):
    """(train, val, test), each (X float32 in [0, 1] of shape (n, 64), y int32), shuffled once."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = (X[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    cuts = [0, n_train, n_train + n_val, len(y)]
    return tuple((jnp.asarray(X[a:b]), jnp.asarray(y[a:b])) for a, b in zip(cuts, cuts[1:]))


def make_mlp(hidden: int, key) -> eqx.nn.MLP:
    return eqx.nn.MLP(64, 10, hidden, depth=1, activation=jnp.tanh, dtype=jnp.float32, key=key)


def cross_entropy(model, batch):
    X, y = batch
    return optax.losses.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(X), y).mean()


def accuracy(model, batch):
    X, y = batch
    return jnp.mean(jnp.argmax(jax.vmap(model)(X), axis=-1) == y)


def f_lower(theta, model, batch):
    """Training cross-entropy + sum_l exp(theta_l)/2 ||W_l||^2 (weight and bias of layer l)."""
    decay = sum(jnp.exp(theta[l]) / 2 * otu.tree_norm(eqx.filter(layer, eqx.is_inexact_array), squared=True)
                for l, layer in enumerate(model.layers))
    return cross_entropy(model, batch) + decay


def f_upper(theta, model, batch):
    """Validation cross-entropy (theta acts through phi*(theta) only)."""
    return cross_entropy(model, batch)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1000 outer steps instead of 5000")
    p.add_argument("--steps", type=int, help="outer steps (default 5000, --quick 1000)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    p.add_argument("--decay0", type=float, default=0.05, help="initial weight decay of each layer (default 0.05)")
    p.add_argument("--upper-lr", type=float, default=0.02, help="Adam step on theta, cosine-decayed (default 0.02)")
    p.add_argument("--lower-lr", type=float, default=0.5, help="SGD step on phi and on v (default 0.5)")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch size of both levels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="data split, network init and minibatches (default 0)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1000 if args.quick else 5000)
    args.eval_every = args.steps // 10 if args.steps % 10 == 0 else args.steps
    return args


def _fmt(values) -> str:
    return "[" + " ".join(f"{v:.2e}" for v in np.asarray(values).ravel()) + "]"


def main(argv=None) -> dict:
    """Run the example; returns the summary numbers (see the end of this function)."""
    args = parse(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    train, val, test = load_digits_splits(seed=args.seed)
    data = (val, train)                                     # (upper_data, lower_data)
    key_model, key_run = jax.random.split(jax.random.PRNGKey(args.seed))
    init = make_mlp(args.hidden, key_model)
    theta0 = jnp.full((len(init.layers),), np.log(args.decay0), jnp.float32)

    # phi*(theta) by full-batch L-BFGS: the start of the run, and the final comparison.
    retrain = eqx.filter_jit(bj.argmin(f_lower, optax.lbfgs(), steps=500))
    phi0 = retrain(theta0, init, train)

    problem = bj.BilevelProblem(f_upper, f_lower)
    alg = bj.algorithms.soba(problem, upper_opt=optax.adam(optax.cosine_decay_schedule(args.upper_lr, args.steps)),
                             lower_lr=args.lower_lr, lower_decay=0.0, batch_size=args.batch_size)

    @eqx.filter_jit
    def run(alg, theta0, phi0, key, data, test):
        def evaluate(state, data):
            return {"val_loss": f_upper(state.theta, state.phi, data[0]), "test_acc": accuracy(state.phi, test),
                    "theta": state.theta}

        state = alg.init(theta0, phi0, key, data)
        return bj.run(alg, state, data, num_steps=args.steps, eval_every=args.eval_every, eval_fn=evaluate)

    print(f"digits: {len(train[1])} train / {len(val[1])} validation / {len(test[1])} test; MLP 64-{args.hidden}-10; "
          f"{alg.name}, {args.steps} outer steps, minibatches of {args.batch_size}")
    state, history = run(alg, theta0, phi0, key_run, data, test)
    history = jax.tree_util.tree_map(np.asarray, history)
    for i, step in enumerate(history["step"]):
        print(f"  step {int(step):5d}  val loss {history['val_loss'][i]:.4f}  test acc {history['test_acc'][i]:.3f}"
              f"  decay {_fmt(np.exp(history['theta'][i]))}")
    status = int(history["status"][-1])                     # OR of every step's status
    if status != bj.status.OK:
        raise SystemExit(f"mlp_hpo_digits: the run failed with status '{bj.status.describe(status)}': "
                         f"{bj.status.explain(status)}.")
    run_seconds = time.perf_counter() - start

    phi = retrain(state.theta, init, train)
    out = {"val_loss_initial": float(f_upper(theta0, phi0, val)), "val_loss_final": float(f_upper(state.theta, phi, val)),
           "test_acc_initial": float(accuracy(phi0, test)), "test_acc_final": float(accuracy(phi, test)),
           "decay_initial": np.exp(np.asarray(theta0)).tolist(), "decay_final": np.exp(np.asarray(state.theta)).tolist(),
           "status": bj.status.describe(status), "finite": bool(history["finite"].all()),
           "run_seconds": run_seconds, "seconds": time.perf_counter() - start}
    print("\nretrained with each weight decay (500 full-batch L-BFGS steps from the same initialisation):")
    for name in ("initial", "final"):
        print(f"  {name:7s} decay {_fmt(out[f'decay_{name}'])}: val loss {out[f'val_loss_{name}']:.4f}, "
              f"test acc {out[f'test_acc_{name}']:.3f}")
    print(f"status {out['status']}; data, phi0 and bilevel run {run_seconds:.1f} s (compilation included), "
          f"total {out['seconds']:.1f} s")
    return out


if __name__ == "__main__":
    main()

"""The benchmark problems, at full size or `quick` (tiny) size.

- "quadratic": the stochastic quadratic "simulated" problem of benchmark_bilevel: n = 1024 samples
  per level, dim_upper = dim_lower = 100, per-sample rank-one PSD LL Hessians stored dense
  (`bj.problems.quadratic_bilevel`), inner spectrum [0.1, 1], cross 0.1, float32, batch 64.
- "logistic": hyperparameter selection of L2-regularised logistic regression on IJCNN1-shaped
  data (`bj.datasets.ijcnn1`: the real files when $BILEVEL_JAX_IJCNN1 points to them, else the
  deterministic generator `ijcnn1_like`, 49,990 x 22 train / 91,701 x 22 validation), one
  log-regulariser per feature, float32; batch 64 ("logistic") and full batch ("logistic_full").
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

import bilevel_jax as bj
from bilevel_jax import datasets
from bilevel_jax.problems.instance import Instance, instance_type, static


@instance_type
class Benchmark(Instance):
    """A `bj.problems.Instance` (its `name` keys the report) with the benchmark's run settings."""

    batch_size: Optional[int] = static()        # None: full batch
    preset_kwargs: dict = dataclasses.field(default_factory=dict)   # overrides of the presets' defaults here


# The UL regulariser: with cross 0.1 at dims 100/100, reg = 1 (the generator's default) leaves F
# non-convex (the generator refuses); 5 is the smallest round value for which it is strongly convex.
REG = 5.0


def quadratic(quick: bool = False) -> Benchmark:
    du, dl, n, b = (10, 10, 128, 16) if quick else (100, 100, 1024, 64)
    q = bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), du, dl, n_samples=n, lower_spectrum=(0.1, 1.0),
                                      cross=0.1, reg=REG, dtype=jnp.float32)
    desc = f"quadratic, n={n} per level, dims {du}/{dl}, rank-one dense per-sample Hessians, cross 0.1, reg {REG}, batch {b}, float32"
    # F's curvature reaches ~70 at reg 5: the presets' default upper_lr = 0.1 diverges for the
    # full-hypergradient methods, so every preset runs with upper_lr = 0.01 here (timing only).
    return Benchmark(q.problem, q.data, q.theta0, q.phi0, b, {"upper_lr": 0.01}, name="quadratic",
                     description=desc + ", upper_lr 0.01")


def logistic_data(quick: bool = False):
    if quick:
        data = datasets.ijcnn1_like(0, n_train=512, n_val=512, dtype=jnp.float32)
        return data, "ijcnn1_like(n_train=512, n_val=512)"
    loaded = datasets.ijcnn1(dtype=jnp.float32)
    return loaded.data, loaded.source


def logistic(quick: bool = False, full_batch: bool = False, loaded=None) -> Benchmark:
    data, source = logistic_data(quick) if loaded is None else loaded
    hpo = bj.problems.logistic_hpo(data, key=0)
    b = None if full_batch else (16 if quick else 64)
    n_val, n_train = data[0][0].shape[0], data[1][0].shape[0]
    desc = (f"logistic HPO, {source}, {n_train} train / {n_val} val x {data[1][0].shape[1]}, "
            f"{'full batch' if b is None else f'batch {b}'}, float32")
    return Benchmark(hpo.problem, hpo.data, hpo.theta0, hpo.phi0, b, name="logistic_full" if full_batch else "logistic",
                     description=desc)


def all_setups(quick: bool = False):
    loaded = logistic_data(quick)
    return [quadratic(quick), logistic(quick, False, loaded), logistic(quick, True, loaded)]


def make_algorithm(name: str, setup: Benchmark, **overrides):
    """The preset `name` with its defaults, at the setup's batch size."""
    kw = {"batch_size": setup.batch_size, **setup.preset_kwargs, **overrides}
    return bj.algorithms.ALGORITHMS[name](setup.problem, **kw)

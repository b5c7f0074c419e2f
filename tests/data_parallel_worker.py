"""Run by tests/test_data_parallel.py in a subprocess with 4 forced host devices (XLA_FLAGS must
be set before JAX starts): for each (preset, sampler), the iterates of `mesh=` on 4 devices and of
`shards=4` on one device after a few steps, and the collectives of the compiled sharded step.
Prints one JSON line per case."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                           " --xla_backend_optimization_level=0").strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bilevel_jax as bj  # noqa: E402

CASES = [("soba", "iid"), ("soba", "shuffled"), ("amigo", "iid"), ("amigo", "shuffled"), ("stocbio", "iid"),
         ("stocbio", "shuffled"), ("saba", "partition")]


def collectives(preset, sampler, mesh, n, batch):
    """The collectives of one compiled sharded step, as (kind, shapes) pairs."""
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=3, dim_lower=5, n_samples=n)
    placed = bj.shard(inst.data, mesh)
    alg = preset(inst.problem, batch_size=batch, sampler=sampler, mesh=mesh)
    state = alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(3), placed)
    ops = bj.collectives.of(eqx.filter_jit(alg.update).lower(state, placed).compile())
    return sorted((op.kind, op.shapes) for op in ops)


def main(steps: int = 6, n: int = 64, batch: int = 16):
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=3, dim_lower=5, n_samples=n)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    placed = bj.shard(inst.data, mesh)
    key = jax.random.PRNGKey(3)
    for name, sampler in CASES:
        preset = bj.algorithms.get(name)
        one = preset(inst.problem, batch_size=batch, sampler=sampler, shards=4)
        many = preset(inst.problem, batch_size=batch, sampler=sampler, mesh=mesh)
        s1 = one.init(inst.theta0, inst.phi0, key, inst.data)
        s4 = many.init(inst.theta0, inst.phi0, key, placed)
        s1, h1 = eqx.filter_jit(bj.run)(one, s1, inst.data, steps)
        s4, h4 = eqx.filter_jit(bj.run)(many, s4, placed, steps)
        ops = collectives(preset, sampler, mesh, n, batch)
        # 4x the samples and the batch: a collective that moved samples would grow with them
        ops_more = collectives(preset, sampler, mesh, 4 * n, 4 * batch)
        print(json.dumps({
            "preset": name, "sampler": sampler,
            "theta_diff": float(jnp.max(jnp.abs(s1.theta - s4.theta))),
            "phi_diff": float(jnp.max(jnp.abs(s1.phi - s4.phi))),
            "moved": float(jnp.max(jnp.abs(s1.theta - inst.theta0))),
            "status": [int(h1["status"][-1]), int(h4["status"][-1])],
            "collectives": len(ops),
            "collectives_grow_with_samples": ops != ops_more,
            "largest_collective": max((int(np.prod(dims)) for _, shapes in ops for _, dims in shapes), default=0),
            "devices": len(jax.devices()),
        }), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

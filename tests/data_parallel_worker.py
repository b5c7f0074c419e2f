"""Run by tests/test_data_parallel.py in a subprocess with 4 forced host devices (XLA_FLAGS must
be set before JAX starts): for each (preset, sampler), the iterates of `mesh=` on 4 devices and of
`shards=4` on one device after a few steps, and the collectives of the compiled sharded run (its steps)
(section "presets"); FSDP (section "fsdp"); the entry points with `mesh=` ("entry_points"); the
experiment runner's batch of seeds x grid points split over the 4 devices ("sweep <config as JSON>").
Prints one JSON line per case: `python tests/data_parallel_worker.py <section>` (section
`all <config as JSON>`: the four in turn, what tests/test_data_parallel.py runs)."""
import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
                           " --xla_backend_optimization_level=0").strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bilevel_jax as bj  # noqa: E402

# (preset, sampler, step sizes given): the sampler is the loop's (one per preset suffices: the presets
# share it), soba's step sizes are estimated at init (from each device's data), and amigo runs again
# with BilevelProblem(sample_chunk=2): each shard's block read in place
CASES = [("soba", "iid", False), ("amigo", "shuffled", True), ("stocbio", "shuffled", True), ("saba", "partition", True)]
CHUNKED = [("amigo", "shuffled", True)]
STEPS = dict(upper_lr=0.05, lower_lr=0.2)   # given: the presets' step-size estimation at init is tested elsewhere
GROWTH = [("stocbio", "shuffled")]


def collectives(compiled):
    """The collectives of a compiled program, as (kind, shapes) pairs."""
    return sorted((op.kind, op.shapes) for op in bj.collectives.of(compiled))


def compiled_run(alg, state, data, steps):
    """`bj.run` compiled (the program the collectives are read from) and its result: one compilation."""
    compiled = eqx.filter_jit(bj.run).lower(alg, state, data, steps).compile()
    return compiled, compiled(alg, state, data, steps)


def growth_run(preset, sampler, mesh, n, batch, steps, given):
    """The compiled sharded run on a problem with n samples and minibatches of `batch`."""
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=3, dim_lower=5, n_samples=n)
    placed = bj.shard(inst.data, mesh)
    alg = preset(inst.problem, batch_size=batch, sampler=sampler, mesh=mesh, **given)
    state = alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(3), placed)
    return compiled_run(alg, state, placed, steps)[0]


def main(steps: int = 6, n: int = 64, batch: int = 16):
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=3, dim_lower=5, n_samples=n)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    placed = bj.shard(inst.data, mesh)
    key = jax.random.PRNGKey(3)
    chunked = dataclasses.replace(inst.problem, sample_chunk=2)
    for name, sampler, steps_given, problem in ([case + (inst.problem,) for case in CASES]
                                                + [case + (chunked,) for case in CHUNKED]):
        preset, given = bj.algorithms.get(name), STEPS if steps_given else {}
        one = preset(inst.problem, batch_size=batch, sampler=sampler, shards=4, **given)
        many = preset(problem, batch_size=batch, sampler=sampler, mesh=mesh, **given)
        s1 = one.init(inst.theta0, inst.phi0, key, inst.data)
        s4 = many.init(inst.theta0, inst.phi0, key, placed)
        s1, h1 = eqx.filter_jit(bj.run)(one, s1, inst.data, steps)
        compiled, (s4, h4) = compiled_run(many, s4, placed, steps)
        # the collectives of the compiled sharded run (its steps' and nothing else: the run adds none); with
        # 4x the samples and the batch, a collective that moved samples would grow with them (one case: every
        # case's collectives are also bounded by the parameters' sizes in the test)
        ops = collectives(compiled)
        ops_more = collectives(growth_run(preset, sampler, mesh, 4 * n, 4 * batch, steps, given)) \
            if (name, sampler) in GROWTH and problem is inst.problem else ops
        print(json.dumps({
            "preset": name, "sampler": sampler, "defaults": not steps_given, "sample_chunk": problem.sample_chunk,
            "theta_diff": float(jnp.max(jnp.abs(s1.theta - s4.theta))),
            "phi_diff": float(jnp.max(jnp.abs(s1.phi - s4.phi))),
            "moved": float(jnp.max(jnp.abs(s1.theta - inst.theta0))),
            "status": [int(h1["status"][-1]), int(h4["status"][-1])],
            "collectives": len(ops),
            "collectives_grow_with_samples": ops != ops_more,
            "largest_collective": max((int(np.prod(dims)) for _, shapes in ops for _, dims in shapes), default=0),
            "devices": len(jax.devices()),
        }), flush=True)


def fsdp(steps: int = 3):
    """An MLP phi on a 2 x 2 mesh (data x model): iterates of `model_axis=` equal to `shards=2` on one
    device, and the compiled step's argument bytes (the state) against the replicated layout."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
    y = jnp.sin(x[:, 0])
    net = eqx.nn.MLP(16, 1, 128, 2, key=jax.random.PRNGKey(1))

    def fit(theta, phi, batch):
        return jnp.mean((jax.vmap(phi)(batch[0])[:, 0] - batch[1]) ** 2)

    def f_lower(theta, phi, batch):
        weights = jax.tree_util.tree_leaves(eqx.filter(phi, eqx.is_inexact_array))
        return fit(theta, phi, batch) + 0.5 * jnp.exp(theta[0]) * sum(jnp.sum(w ** 2) for w in weights)

    problem, data = bj.BilevelProblem(fit, f_lower), ((x, y), (x, y))
    placed = bj.shard(data, mesh)
    soba = bj.algorithms.soba(problem, batch_size=8, upper_lr=0.01, lower_lr=0.05)
    out = {}
    for name, alg, d in [("one", bj.data_parallel(soba, shards=2), data),
                         ("replicated", bj.data_parallel(soba, mesh=mesh), placed),
                         ("fsdp", bj.data_parallel(soba, mesh=mesh, model_axis="model"), placed)]:
        state = alg.init(jnp.zeros(1), net, jax.random.PRNGKey(2), d)
        if name == "fsdp":
            state = bj.algorithms.parallel.shard_model(state, mesh)
        update = eqx.filter_jit(alg.update).lower(state, d).compile()   # one compilation: steps and memory
        memory = update.compiled.memory_analysis()
        for _ in range(steps):
            state, info = update(state, d)
        out[name] = (state, memory.argument_size_in_bytes, int(info.status))

    def diff(a, b):
        return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(
            jax.tree_util.tree_leaves(eqx.filter(a.phi, eqx.is_array)),
            jax.tree_util.tree_leaves(eqx.filter(b.phi, eqx.is_array))))

    print(json.dumps({"fsdp": True, "replicated_diff": diff(out["one"][0], out["replicated"][0]),
                      "fsdp_diff": diff(out["one"][0], out["fsdp"][0]),
                      "bytes": [out["replicated"][1], out["fsdp"][1]],
                      "status": [out[k][2] for k in out]}), flush=True)


def entry_points():
    """`bj.hypergradient`, a gradient through `bj.argmin` and `bj.run` with `mesh=` against one device."""
    inst = bj.problems.quadratic_bilevel(jax.random.PRNGKey(1), dim_upper=3, dim_lower=5, n_samples=64)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    placed = bj.shard(inst.data, mesh)
    theta = inst.theta0 + 0.3
    phi = inst.phi_star(theta)
    g1, _ = bj.hypergradient(inst.problem, theta, phi, inst.data)
    g4, info = bj.hypergradient(inst.problem, theta, phi, placed, mesh=mesh)

    @eqx.filter_jit   # one program (eagerly, every operation of the sharded solve would compile on its own)
    def grad_through(solve, data):
        return jax.grad(lambda t: inst.problem.f_upper(t, solve(t, inst.phi0, data[1]), data[0]))(theta)

    a = grad_through(bj.argmin(inst.problem.f_lower, optax.sgd(0.3), 100), inst.data)
    b = grad_through(bj.argmin(inst.problem.f_lower, optax.sgd(0.3), 100, mesh=mesh), placed)
    alg = bj.algorithms.soba(inst.problem, batch_size=16, shards=4, **STEPS)
    s1, _ = bj.run(alg, alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(0), inst.data), inst.data, 10)
    s4, _ = bj.run(alg, alg.init(inst.theta0, inst.phi0, jax.random.PRNGKey(0), placed), placed, 10, mesh=mesh)
    print(json.dumps({"entry_points": True, "hypergradient": float(jnp.max(jnp.abs(g1 - g4))),
                      "exact": float(jnp.max(jnp.abs(g4 - inst.grad(theta)))), "status": int(info.status),
                      "argmin": float(jnp.max(jnp.abs(a - b))), "run": float(jnp.max(jnp.abs(s1.theta - s4.theta)))}),
          flush=True)


def experiment_sweep(raw_config: str):
    """The cells of an experiment config (JSON, results_dir included) computed by the experiment runner
    on the 4 devices (the test computes them on one device and compares)."""
    from experiments import config, runner, sweep
    from experiments.results import ResultStore
    cfg = config.from_dict(json.loads(raw_config))
    store = ResultStore(config.experiment_dir(cfg))
    workload, reference = runner.prepare(cfg, store)
    runner.run_cells(cfg, workload, reference, store, sweep.expand(cfg), log=lambda *a: None)
    print(json.dumps({"sweep": True, "devices": len(jax.devices())}), flush=True)


def run_all(raw_config: str):
    """Every section in this one process (the test's: one interpreter and JAX start instead of four)."""
    main()
    fsdp()
    entry_points()
    experiment_sweep(raw_config)


if __name__ == "__main__":
    {"all": run_all, "presets": main, "fsdp": fsdp, "entry_points": entry_points,
     "sweep": experiment_sweep}[sys.argv[1]](*sys.argv[2:])

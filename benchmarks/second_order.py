"""Measure: `mode="rev"` against `mode="fwd"` for the second-order products of the implicit rules
(`bj.oracles.linearize_lower`), on hyper-cleaning of an MLP (`bj.problems.hyper_cleaning(...,
model="mlp")`, two hidden layers) at several widths, on synthetic 8 x 8 "images" (n training and n
validation samples, full batch, theta one weight per training sample).

Two computations per width and mode, each one compiled program:
  products   one linearization of grad_phi f_lower and one (A v, J v)
  implicit   `bj.hypergradient` with `damped(cg(maxiter=k), 0.1)` (the LL of a random network is
             indefinite): one linearization, k products, one J v
Peak temporary memory is XLA's buffer assignment (`memory_analysis().temp_size_in_bytes`), time
the median of interleaved calls (rev, fwd, rev, fwd, ...), with the fwd / rev ratio of wall and of
process CPU time (the steadier one on a shared machine).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from benchmarks import timing

MODES = ("rev", "fwd")
DAMPING = 0.1


def mlp_hyper_cleaning(width: int, n: int, key: int = 0, depth: int = 2, dtype=jnp.float32):
    """Hyper-cleaning of an `eqx.nn.MLP` (65 inputs, `depth` hidden layers of `width`, 10 classes)
    on random 8 x 8 uint8 images with random labels (30% of the training labels corrupted)."""
    rng = np.random.default_rng(key)

    def split(m):
        return rng.integers(0, 256, (m, 8, 8), dtype=np.uint8), rng.integers(0, 10, m)

    return bj.problems.hyper_cleaning(split(n), split(n), split(8), 0.3, key, model="mlp", hidden=width,
                                      depth=depth, dtype=dtype, source=f"synthetic 8x8 images (n = {n})")


def n_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))))


def _programs(inst, mode: str, cg_iterations: int):
    """{name: (jitted fn, args)} of the two computations in `mode` (phi's static part closed over)."""
    phi_d, phi_s = eqx.partition(inst.phi0, eqx.is_inexact_array)
    problem, solver = inst.problem, bj.linear_solvers.damped(bj.linear_solvers.cg(maxiter=cg_iterations), DAMPING)

    def products(theta, p, v, lower):
        return bj.oracles.linearize_lower(problem, theta, eqx.combine(p, phi_s), lower, mode).hvp_and_cross(v)

    def implicit(theta, p, data):
        return bj.hypergradient(problem, theta, eqx.combine(p, phi_s), data, solver, mode=mode)[0]

    v = jax.tree_util.tree_map(jnp.ones_like, phi_d)
    return {"products": (jax.jit(products), (inst.theta0, phi_d, v, inst.data[1])),
            "implicit": (jax.jit(implicit), (inst.theta0, phi_d, inst.data))}


def measure(widths, n: int, cg_iterations: int, repeats: int) -> dict:
    rows = {}
    for width in widths:
        inst = mlp_hyper_cleaning(width, n)
        programs = {mode: _programs(inst, mode, cg_iterations) for mode in MODES}
        for name in ("products", "implicit"):
            compiled, args, mem, out = {}, {}, {}, {}
            for mode in MODES:
                fn, args[mode] = programs[mode][name]
                compiled[mode] = fn.lower(*args[mode]).compile()
                mem[mode] = int(compiled[mode].memory_analysis().temp_size_in_bytes)
                out[mode] = jax.tree_util.tree_leaves(compiled[mode](*args[mode]))
            t = timing.interleaved(compiled, args, repeats=repeats)
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out["rev"], out["fwd"]))
            scale = max(float(jnp.max(jnp.abs(a))) for a in out["rev"])
            rows[f"{name}/width={width}"] = {
                "computation": name, "width": width, "params": n_params(inst.phi0),
                "temp_bytes": mem, "time": {m: {k: v for k, v in t[m].items() if not k.endswith("samples")}
                                            for m in MODES},
                "fwd_over_rev": timing.ratios(t, "fwd", "rev"), "temp_fwd_over_rev": mem["fwd"] / mem["rev"],
                "max_abs_diff": diff, "max_abs": scale,
            }
    return {"problem": f"{inst.description.split(':')[0]}: MLP 65 -> width -> width -> 10, n = {n} "
                       f"training and validation samples (full batch), float32; implicit = damped(cg({cg_iterations}), {DAMPING})",
            "rows": rows}

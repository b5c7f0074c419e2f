"""Measure 7, the reference for the limit: SOBA, SABA, AmIGO, StocBiO and MRBO written directly in
plain JAX (no bilevel_jax code), timed in the same run (interleaved calls) as the presets.

Each reference makes exactly its preset's computation with the toolkit's sampling scheme, so both
produce the same iterates (checked: `max_abs_diff_theta` after the run):
  - draws numbered per level from fold_in(key, level) (0: upper, 1: lower): draw `count` of the
    UL, draws count * (T + 1) + t of the LL (T LL-phase steps, then the directions' batch);
    "iid": b indices `randint(fold_in(level_key, draw))` and a gather (`jnp.take`); "partition":
    one block `randint(fold_in(level_key, draw), (), 0, n // b)` read with `lax.dynamic_slice`;
  - one `jax.grad` of f_upper over (theta, phi) on the UL batch; one `jax.vjp` of grad_phi f_lower
    over (theta, phi) on the LL batch, pulled back along v: (J v, A v) from one backward pass,
    grad_phi f_lower its primal output; a linear solver's matvecs reuse that pullback;
  - plain SGD with the presets' step sizes (SOBA: rho_k = lr / (k+1)^0.4 for phi and v,
    gamma_k = lr / (k+1)^0.6 for theta; MRBO: lr / (k+1)^(1/3); the others constant);
  - SABA: SAGA tables per block id, filled at the initial point (not timed), d = new - mem[i] +
    mean; AmIGO: 10 SGD steps on phi, 10 warm-started GD steps on v on the LL batch; StocBiO: 10 SGD
    steps, the 10-term Neumann series with a fresh LL minibatch per factor (keys
    fold_in(fold_in(fold_in(key, 2), count), q)); MRBO: STORM on (StocBiO's hypergradient,
    grad_phi f_lower) with a_k = 1 - 0.5 / (k+1)^(2/3), both points on the same batches.
The objectives f_upper / f_lower are the problem's own functions (the same user code in both).
The references make no status, finiteness or residual computations: bilevel_jax's runs are timed
twice, bare (the history discarded, so XLA removes what it does not return) and recording its
default history (status, oracle counts, residual) at the end of the call.
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from benchmarks import bandwidth, timing
from benchmarks.setups import Benchmark

UPPER_LR = LOWER_LR = 0.1
UPPER_DECAY, LOWER_DECAY = 0.6, 0.4
T_LOWER = 10      # AmIGO / StocBiO LL steps
M_SOLVER = 10     # GD steps (AmIGO), Neumann terms (StocBiO, MRBO)
ETA0 = 0.5        # MRBO's momentum constant
METHODS = ("soba", "saba", "amigo", "stocbio", "mrbo")
DEFAULT_SAMPLER = {"soba": "iid", "saba": "partition", "amigo": "iid", "stocbio": "iid", "mrbo": "iid"}
BAR = 1.10
# LL minibatches a step draws (and one UL batch): T LL-phase steps, the directions' batch, and one
# per Neumann factor after the first (StocBiO, MRBO: shared by MRBO's two points)
LL_DRAWS = {"soba": 1, "saba": 1, "amigo": T_LOWER + 1, "stocbio": T_LOWER + M_SOLVER, "mrbo": M_SOLVER}


# ------------------------------------------------------------------------------------ sampling

def _size(data) -> int:
    return jax.tree_util.tree_leaves(data)[0].shape[0]


def make_sample(kind: str, batch_size: int) -> Callable:
    """`sample(data, key, draw) -> batch` in plain JAX, as the toolkit's sampler of that kind."""
    b = batch_size

    def iid(data, key, draw):
        idx = jax.random.randint(jax.random.fold_in(key, draw), (b,), 0, _size(data))
        return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)

    def partition(data, key, draw):
        i = jax.random.randint(jax.random.fold_in(key, draw), (), 0, _size(data) // b)
        return block(data, i, b)

    return {"iid": iid, "partition": partition}[kind]


def block(data, i, b):
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * b, b, axis=0), data)


def _scanned(step, num_steps: int):
    """`run(carry, key, data) -> carry`: `num_steps` plain-JAX steps `carry = step(carry, k, data,
    keys)`, keys = the run key's UL, LL and solver streams (fold_in 0, 1, 2)."""
    def run(carry, key, data):
        keys = tuple(jax.random.fold_in(key, i) for i in range(3))
        return jax.lax.scan(lambda c, k: (step(c, k, data, keys), None), carry, jnp.arange(num_steps))[0]

    return run


def _linearize(f_lower, theta, phi, batch):
    """grad_phi f_lower and its pullback v -> (J v, A v) (one vjp over (theta, phi))."""
    return jax.vjp(lambda t, p: jax.grad(f_lower, argnums=1)(t, p, batch), theta, phi)


# ----------------------------------------------------------------------------------- references

def reference_soba(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "iid",
                   upper_lr: float = UPPER_LR):
    """`(init, run)`: `init(theta, phi, key, data) -> carry`, `run(carry, key, data) -> carry` after
    `num_steps` plain-JAX SOBA steps; carry = (theta, phi, v)."""
    sample = make_sample(sampler, batch_size)

    def step(carry, k, data, keys):
        (theta, phi, v), (upper_data, lower_data), (key_up, key_low, _) = carry, data, keys
        ub, lb = sample(upper_data, key_up, k), sample(lower_data, key_low, k)
        g_theta, g_phi = jax.grad(f_upper, argnums=(0, 1))(theta, phi, ub)
        grad_lower, pullback = _linearize(f_lower, theta, phi, lb)
        jv, hv = pullback(v)
        kf = (k + 1).astype(theta.dtype)
        rho, gamma = LOWER_LR / kf ** LOWER_DECAY, upper_lr / kf ** UPPER_DECAY
        return theta - gamma * (g_theta - jv), phi - rho * grad_lower, v - rho * (hv - g_phi)

    return _zero_v, _scanned(step, num_steps)


def _zero_v(theta, phi, key, data):
    return theta, phi, jnp.zeros_like(phi)


def reference_soba_run(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "iid",
                       upper_lr: float = UPPER_LR):
    """`run(theta, phi, key, data) -> (theta, phi, v)` after `num_steps` plain-JAX SOBA steps."""
    init, run = reference_soba(f_upper, f_lower, batch_size, num_steps, sampler, upper_lr)
    return lambda theta, phi, key, data: run(init(theta, phi, key, data), key, data)


def reference_saba(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "partition",
                       upper_lr: float = UPPER_LR):
    """SABA: SAGA memories of (grad_theta f_u, grad_phi f_u) per UL block and (grad_phi f_l, A v,
    J v) per LL block, filled at the initial point; constant steps."""
    if sampler != "partition":
        raise ValueError("SABA's memories are indexed by block: sampler='partition'.")
    b = batch_size

    def upper_oracles(theta, phi, batch):
        return jax.grad(f_upper, argnums=(0, 1))(theta, phi, batch)

    def lower_oracles(theta, phi, v, batch):
        grad_lower, pullback = _linearize(f_lower, theta, phi, batch)
        jv, hv = pullback(v)
        return grad_lower, hv, jv

    def init(theta, phi, key, data):
        """The carry before the first step: the tables filled at the initial point (v = 0)."""
        upper_data, lower_data = data
        v = jnp.zeros_like(phi)
        table_up = jax.lax.map(lambda i: upper_oracles(theta, phi, block(upper_data, i, b)),
                               jnp.arange(_size(upper_data) // b))
        table_low = jax.lax.map(lambda i: lower_oracles(theta, phi, v, block(lower_data, i, b)),
                                jnp.arange(_size(lower_data) // b))
        mean = lambda t: jax.tree_util.tree_map(lambda x: x.mean(0), t)
        return theta, phi, v, table_up, mean(table_up), table_low, mean(table_low)

    def saga(table, avg, new, i, n):
        old = jax.tree_util.tree_map(lambda m: m[i], table)
        out = jax.tree_util.tree_map(lambda a, o, mu: a - o + mu, new, old, avg)
        avg = jax.tree_util.tree_map(lambda mu, a, o: mu + (a - o) / n, avg, new, old)
        table = jax.tree_util.tree_map(lambda m, a: m.at[i].set(a), table, new)
        return out, table, avg

    def step(carry, k, data, keys):
        (theta, phi, v, table_up, avg_up, table_low, avg_low), (upper_data, lower_data), (key_up, key_low, _) = (
            carry, data, keys)
        n_up, n_low = _size(upper_data) // b, _size(lower_data) // b
        j = jax.random.randint(jax.random.fold_in(key_up, k), (), 0, n_up)
        i = jax.random.randint(jax.random.fold_in(key_low, k), (), 0, n_low)
        up, table_up, avg_up = saga(table_up, avg_up, upper_oracles(theta, phi, block(upper_data, j, b)), j, n_up)
        low, table_low, avg_low = saga(table_low, avg_low, lower_oracles(theta, phi, v, block(lower_data, i, b)),
                                       i, n_low)
        (g_theta, g_phi), (grad_lower, hv, jv) = up, low
        theta, phi, v = theta - upper_lr * (g_theta - jv), phi - LOWER_LR * grad_lower, v - LOWER_LR * (hv - g_phi)
        return theta, phi, v, table_up, avg_up, table_low, avg_low

    return init, _scanned(step, num_steps)


def _lower_phase(f_lower, sample, lower_data, key_low, theta, phi, first):
    def one(phi, t):
        lb = sample(lower_data, key_low, first + t)
        return phi - LOWER_LR * jax.grad(f_lower, argnums=1)(theta, phi, lb), None

    return jax.lax.scan(one, phi, jnp.arange(T_LOWER))[0]


def reference_amigo(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "iid",
                        upper_lr: float = UPPER_LR):
    """AmIGO: 10 SGD steps on phi; v by 10 GD steps on 0.5 v'Av - b'v from the previous v (one
    linearization on the step's LL batch); theta <- theta - lr (grad_theta f_u - J v)."""
    sample = make_sample(sampler, batch_size)

    def step(carry, k, data, keys):
        (theta, phi, v), (upper_data, lower_data), (key_up, key_low, _) = carry, data, keys
        first = k * (T_LOWER + 1)
        phi = _lower_phase(f_lower, sample, lower_data, key_low, theta, phi, first)
        ub, lb = sample(upper_data, key_up, k), sample(lower_data, key_low, first + T_LOWER)
        g_theta, b = jax.grad(f_upper, argnums=(0, 1))(theta, phi, ub)
        _, pullback = _linearize(f_lower, theta, phi, lb)
        matvec = lambda x: pullback(x)[1]

        def gd(c, _):
            x, r = c
            return (x + LOWER_LR * r, r - LOWER_LR * matvec(r)), None

        (v, _), _ = jax.lax.scan(gd, (v, b - matvec(v)), None, length=M_SOLVER)
        return theta - upper_lr * (g_theta - pullback(v)[0]), phi, v

    return _zero_v, _scanned(step, num_steps)


def reference_stocbio(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "iid",
                          upper_lr: float = UPPER_LR):
    """StocBiO: 10 SGD steps on phi; v = eta sum_{q<10} prod_{j<=q} (I - eta A_{xi_j}) b with a
    fresh LL minibatch per factor; theta <- theta - lr (grad_theta f_u - J v)."""
    sample = make_sample(sampler, batch_size)

    def step(carry, k, data, keys):
        (theta, phi), (upper_data, lower_data), (key_up, key_low, key_solver) = carry, data, keys
        first = k * (T_LOWER + 1)
        phi = _lower_phase(f_lower, sample, lower_data, key_low, theta, phi, first)
        ub, lb = sample(upper_data, key_up, k), sample(lower_data, key_low, first + T_LOWER)
        g_theta, b = jax.grad(f_upper, argnums=(0, 1))(theta, phi, ub)
        v = _sampled_neumann(f_lower, sample, lower_data, theta, phi, b, jax.random.fold_in(key_solver, k))
        jv = _linearize(f_lower, theta, phi, lb)[1](v)[0]
        return theta - upper_lr * (g_theta - jv), phi

    return (lambda theta, phi, key, data: (theta, phi)), _scanned(step, num_steps)


def _sampled_neumann(f_lower, sample, lower_data, theta, phi, b, key):
    """eta * sum_{q<10} prod_{j<=q} (I - eta A_{xi_j}) b, a fresh LL minibatch xi_j per factor
    (drawn with fold_in(key, j)), each A_{xi_j} r from its own linearization."""
    def factor(c, q):
        x, r = c
        fresh = sample(lower_data, jax.random.fold_in(key, q), 0)
        r = r - LOWER_LR * _linearize(f_lower, theta, phi, fresh)[1](r)[1]
        return (x + r, r), None

    (x, _), _ = jax.lax.scan(factor, (b, b), jnp.arange(1, M_SOLVER))
    return LOWER_LR * x


def reference_mrbo(f_upper, f_lower, batch_size: int, num_steps: int, sampler: str = "iid",
                   upper_lr: float = UPPER_LR):
    """MRBO: STORM recursions d = o(z_k) + a_k (d - o(z_{k-1})) of o = (StocBiO's hypergradient,
    grad_phi f_l), both points on the same batches (the Neumann factors' too);
    a_k = 1 - 0.5 / (k+1)^(2/3), steps lr / (k+1)^(1/3) on both levels."""
    sample = make_sample(sampler, batch_size)

    def oracles(theta, phi, ub, lb, lower_data, key):
        g_theta, b = jax.grad(f_upper, argnums=(0, 1))(theta, phi, ub)
        grad_lower, pullback = _linearize(f_lower, theta, phi, lb)
        v = _sampled_neumann(f_lower, sample, lower_data, theta, phi, b, key)
        return g_theta - pullback(v)[0], grad_lower

    def init(theta, phi, key, data):
        return theta, phi, jnp.zeros_like(theta), jnp.zeros_like(phi), theta, phi

    def step(carry, k, data, keys):
        (theta, phi, d_theta, d_phi, prev_theta, prev_phi), (upper_data, lower_data), (key_up, key_low, key_solver) = (
            carry, data, keys)
        ub, lb = sample(upper_data, key_up, k), sample(lower_data, key_low, k)
        key_k = jax.random.fold_in(key_solver, k)
        g, grad_lower = oracles(theta, phi, ub, lb, lower_data, key_k)
        g_old, grad_lower_old = oracles(prev_theta, prev_phi, ub, lb, lower_data, key_k)
        kf = (k + 1).astype(theta.dtype)
        a = jnp.where(k > 0, 1.0 - ETA0 / kf ** (2.0 / 3.0), 0.0)
        d_theta, d_phi = g + a * (d_theta - g_old), grad_lower + a * (d_phi - grad_lower_old)
        step_size = kf ** (1.0 / 3.0)
        new = (theta - upper_lr / step_size * d_theta, phi - LOWER_LR / step_size * d_phi)
        return *new, d_theta, d_phi, theta, phi

    return init, _scanned(step, num_steps)


REFERENCES = {"soba": reference_soba, "saba": reference_saba, "amigo": reference_amigo,
              "stocbio": reference_stocbio, "mrbo": reference_mrbo}   # name -> (init, run) factory


# ------------------------------------------------------------------------------------ the presets

def toolkit_algorithm(setup: Benchmark, name: str, sampler: str, upper_lr: float = UPPER_LR):
    """The preset with the reference's settings (its defaults: lr 0.1, T = 10 LL steps, 10 solver
    steps)."""
    kw = dict(upper_lr=upper_lr, lower_lr=LOWER_LR, batch_size=setup.batch_size, sampler=sampler)
    if name == "soba":
        kw.update(upper_decay=UPPER_DECAY, lower_decay=LOWER_DECAY)
    elif name in ("amigo", "stocbio"):
        kw.update(lower_steps=T_LOWER)
    if name in ("stocbio", "mrbo"):
        kw.update(neumann_steps=M_SOLVER)
    if name == "mrbo":
        kw.update(momentum=1.0 - ETA0)
    return bj.algorithms.get(name)(setup.problem, **kw)


def toolkit_run(setup: Benchmark, name: str, num_steps: int, sampler: str, upper_lr: float = UPPER_LR,
                history: bool = False):
    """`(init, run)` as the references': `init(theta, phi, key, data) -> state` (the preset's
    init), `run(state, key, data)`: `bj.run` of `num_steps` steps; with `history`, the run returns
    its history (status, oracle counts, residual, finite) too, so it is computed."""
    alg = toolkit_algorithm(setup, name, sampler, upper_lr)

    def init(theta, phi, key, data):
        return alg.init(theta, phi, key, data)

    def run(state, key, data):
        state, hist = bj.run(alg, state, data, num_steps=num_steps)
        return (state, hist) if history else state

    return init, run


def toolkit_soba_run(setup: Benchmark, num_steps: int, sampler: str = "iid"):
    """`run(theta, phi, key, data) -> (theta, phi)`: bj.algorithms.soba with the reference's settings."""
    init, run = toolkit_run(setup, "soba", num_steps, sampler, setup.preset_kwargs.get("upper_lr", UPPER_LR))

    def both(theta, phi, key, data):
        state = run(init(theta, phi, key, data), key, data)
        return state.theta, state.phi

    return both


def _theta(out):
    """theta from a run's output (a state, a (state, history) pair or a reference carry)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[0]
    return np.asarray(out.theta if hasattr(out, "theta") else out[0])


def measure_one(setup: Benchmark, name: str, sampler: str, num_steps: int, repeats: int, history: bool = True) -> dict:
    """One method on one setup: bare bj, bj with its history (if `history`) and the reference,
    interleaved; the states are built before the timed calls (SABA's tables included)."""
    if setup.batch_size is None:
        raise ValueError("the references sample minibatches: give the setup a batch size.")
    upper_lr = setup.preset_kwargs.get("upper_lr", UPPER_LR)
    key = jax.random.PRNGKey(0)
    pairs = {"bilevel_jax": toolkit_run(setup, name, num_steps, sampler, upper_lr),
             "reference": REFERENCES[name](setup.problem.f_upper, setup.problem.f_lower, setup.batch_size,
                                           num_steps, sampler, upper_lr)}
    if history:
        pairs["bilevel_jax_history"] = toolkit_run(setup, name, num_steps, sampler, upper_lr, history=True)
    fns, args = {}, {}
    for k, (init, run) in pairs.items():
        fns[k] = jax.jit(run)
        args[k] = (jax.jit(init)(setup.theta0, setup.phi0, key, setup.data), key, setup.data)
    res = timing.interleaved(fns, args, repeats=repeats, scale=num_steps)
    theta = {k: _theta(f(*args[k])) for k, f in fns.items()}
    upper_data, lower_data = setup.data
    bytes_per_step = (bandwidth.batch_bytes(upper_data, setup.batch_size)
                      + LL_DRAWS[name] * bandwidth.batch_bytes(lower_data, setup.batch_size))
    out = {"method": name, "sampler": sampler, "steps_per_call": num_steps, "bytes_per_step": bytes_per_step,
           "ll_batches_per_step": LL_DRAWS[name],
           "max_abs_diff_theta": float(np.max(np.abs(theta["bilevel_jax"] - theta["reference"]))),
           "max_abs_theta": float(np.max(np.abs(theta["reference"]))),
           "finite": bool(np.all(np.isfinite(theta["reference"]))), "bar": BAR}
    for k in fns:
        out[k] = res[k]
    out["ratio"] = timing.ratios(res, "bilevel_jax", "reference")
    if history:
        out["ratio_history"] = timing.ratios(res, "bilevel_jax_history", "reference")
    return out


def measure(setup: Benchmark, num_steps: Dict[str, int], repeats: int, methods=METHODS, log=print,
            history_for=METHODS) -> dict:
    """Every method on `setup` with its preset's default sampler, and SOBA also with 'partition'
    (blocks read in place): {row name: measure_one(...)}; bj with its history for `history_for`."""
    rows = [(m, DEFAULT_SAMPLER[m]) for m in methods]
    if "soba" in methods:
        rows.insert(1, ("soba", "partition"))
    out = {"problem": setup.description, "rows": {}}
    for name, sampler in rows:
        label = f"{name} ({sampler})"
        try:
            r = measure_one(setup, name, sampler, num_steps[name], repeats, name in history_for)
            hist = (f"; with history {r['ratio_history']['median']:.3f}, cpu {r['ratio_history']['cpu']['median']:.3f}"
                    if "ratio_history" in r else "")
            log(f"  {setup.name:10s} {label:20s} bj {r['bilevel_jax']['median'] * 1e3:.4g} ms, "
                f"ref {r['reference']['median'] * 1e3:.4g} ms, ratio {r['ratio']['median']:.3f} "
                f"(cpu {r['ratio']['cpu']['median']:.3f}{hist}), |dtheta| {r['max_abs_diff_theta']:.2g}")
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the bench
            r = timing.error_row(e)
            log(f"  {setup.name:10s} {label:20s} ERROR {r['error']}")
        out["rows"][label] = r
    return out

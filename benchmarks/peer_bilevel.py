"""Measure 8: bilevel_jax against benchmark_bilevel (Dagréou, Ablin, Vaiter, Moreau's benchopt
benchmark of stochastic bilevel solvers) on the peer's own problem and sampling scheme.

benchmark_bilevel is a benchopt benchmark repository, not a package (nothing to install from
PyPI), so its JAX solvers are re-implemented here in plain JAX from the structure of its published
code, and labelled "benchmark_bilevel (re-implementation)". What is reproduced (facts, not code):

- the problem: its quadratic data set ("simulated" quadratics): per level n = 1024 samples of
  f_i(z, x) = 1/2 z'A_i z + 1/2 x'B_i x + x'C_i z + a_i'z + b_i'x, z the inner (dim 100) and x the
  outer (dim 100) variable, dense rank-one A_i = u_i u_i' (u_i ~ N(0, S), S with a log-spaced
  spectrum in [mu, L]), B_i likewise with one zero eigenvalue, C_i = (U D g_i)(g_i' V') with U, V
  the singular vectors of a Gaussian matrix and D log-spaced in [mu, L_cross], a_i, b_i ~ N(0, I);
  mu = 0.1, L = 1, L_cross = 0.1 on both levels; the data redrawn until the value function's
  Hessian is positive definite; float32; batch 64;
- its objective code: the per-sample quadratic vmapped over the batch, then averaged, on the batch
  cut from the data with `lax.dynamic_slice` at `start`, the data closed over (compile-time
  constants);
- its sampler: the order of the n / b blocks, re-permuted after each epoch, carried in a state
  (order, position, key) with a `lax.cond`; each draw is a contiguous block;
- its solvers' iterations (step size 0.1, outer ratio 1): SOBA (one vjp of grad_z f_inner over
  (z, x), one grad of f_outer, steps 0.1 / sqrt(k+1)); SABA (the same five oracles through SAGA
  memories with n_batches + 2 rows, zero-initialised, constant steps); AmIGO (grad of f_outer, 10
  SGD steps on v each on a fresh inner batch with its own vjp, the cross product on another batch,
  10 SGD steps on z); StocBiO (the same with the 11-term Neumann sum of its `shia` routine).

bilevel_jax runs the same data with `sampler="shuffled"` (random reshuffling of the same blocks,
read in place) and the peer's settings (AmIGO's 10 v steps run as `gd(10)` on the step's one LL
batch: that is bilevel_jax's AmIGO, 11 LL batches per iteration against the peer's 21; StocBiO
with `neumann_steps=11`: 21 LL batches as the peer), through `bj.run` with its default history.

Each side runs the problem with its own code: bilevel_jax its finite-sum quadratic
(`bj.problems.quadratic_problem`, one batched `einsum` per term; the peer's data converted to its
layout once, before timing), the peer its per-sample quadratic vmapped over the batch. Two more
columns separate what the toolkit does from what the objective code does: bilevel_jax running the
peer's objective code, and the peer running the einsum formulation. On the peer's objective code
bilevel_jax runs with `mode="fwd"` (forward-over-reverse products read the per-sample matrices in
their stored layout, where the reverse pass transposes them) and `BilevelProblem(sample_chunk=1)`:
each oracle pass is a `lax.scan` over the batch's samples, every sample's matrices cut in place
from the data set (`sampling.Rows`) and contracted as often as the derivatives need while they sit
in cache. `bilevel_jax:peer:whole` is the same without chunking (whole-batch passes, as the peer),
`bilevel_jax:peer:rev` also in the default mode.

The bandwidth account (`bandwidth_account`; issue item 4(b): bilevel_jax at <= 0.5 x the peer's
time per iteration on the peer's objective code, or why the same code cannot get there). Every
number of bytes is read from compiled programs (`benchmarks.hlo_bytes`: loops counted by their
trip counts), so it does not depend on the machine's load. It explains why whole-batch passes
cannot reach the bar and chunked passes can:

- the passes over a minibatch one iteration needs (`PASSES`) and the bytes they must read at the
  least, every batch matrix once a pass: 12.9 MB for SOBA, 87.3 MB for AmIGO and StocBiO, 0.18 and
  0.23 x what the peer's compiled step moves;
- whole-batch passes on the peer's objective code (`oracle_bytes`, each pass compiled alone by its
  cheaper differentiation) must move far more: its derivatives contract each per-sample matrix
  several times in different patterns (A z and A'z for a gradient, A v and A'v for an HVP, x'C per
  sample on a transposed copy and C z), which XLA emits as separate dots, one read of the batch
  matrix from memory each, after a copy of the dynamically sliced block. So a UL gradient moves 14
  batch matrices for its 3, an LL gradient 7 for 2, an HVP 4 for 1, SOBA's fused (grad, A v, J v) 12
  for 2: 67.7 MB for SOBA, 285 MB for AmIGO, 331 MB for StocBiO, 0.93, 0.74 and 0.87 x the peer's
  compiled step. With equal rates per byte no whole-batch step can go below these ratios; measured,
  whole-batch bilevel_jax takes 0.73-0.88 x the peer's time;
- chunked passes read each batch matrix from memory once a pass (the strict bytes above) and serve
  the other contractions of a sample from cache; the floor in time (`copy_rates`: the fresh bytes at
  the memory copy rate, the rest at the cache copy rate) is 0.33-0.45 x the peer's time, and
  `sample_chunk=1` measures 0.39-0.41 x for SOBA, 0.33-0.34 x for AmIGO and 0.38-0.39 x for StocBiO
  (2-core CPU, process time, interleaved calls);
- wall time on an idle multi-core CPU is another matter: the peer's whole-batch dots run on several
  threads (on an idle 2-core machine its CPU time is 1.9x its wall time), while a scan over samples
  runs its small per-sample products on one. Measured there, in one run: SOBA 0.77 x by wall time
  (0.40 x by CPU time), AmIGO 0.49 x (0.28 x), StocBiO 0.51 x (0.30 x); larger chunks (8, 32 samples)
  are slower in both (0.88-0.95 x for SOBA), and splitting the batch over two forced host devices
  (`mesh=`, one per core) is 3.6 x slower than one device (the collectives between host devices
  cost more than the second core gives). Splitting the scan's sum into 8 independent accumulators
  (a prototype, not in the library) lets XLA:CPU run sub-batches of SOBA's passes concurrently: 0.47 x
  by wall time at 20% more CPU time; AmIGO's and StocBiO's passes (inside their inner loops) stay
  serial (0.51-0.54 x). On a loaded machine, where the peer gets one core too, wall and CPU time
  agree.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj
from benchmarks import bandwidth, hlo_bytes, timing

PEER = ("benchmark_bilevel (re-implementation in plain JAX of its JAX solvers, sampler and quadratic; "
        "the benchmark is a benchopt repository, not an installable package)")
METHODS = ("soba", "saba", "amigo", "stocbio")
STEP, OUTER_RATIO, INNER_STEPS, SHIA_STEPS = 0.1, 1.0, 10, 10
BAR = 0.5
# LL ("inner") batches drawn per outer iteration (and 1 UL batch each)
PEER_LL_DRAWS = {"soba": 1, "saba": 1, "amigo": 2 * INNER_STEPS + 1, "stocbio": 2 * INNER_STEPS + 1}
BJ_LL_DRAWS = {"soba": 1, "saba": 1, "amigo": INNER_STEPS + 1, "stocbio": 2 * INNER_STEPS + 1}
# bilevel_jax's second-order products: forward-over-reverse, which reads the peer's per-sample
# matrices in their stored layout (the reverse pass transposes them: a copy of each batch matrix)
BJ_MODE = "fwd"
# and its oracle passes over sub-batches of one sample (`BilevelProblem(sample_chunk=1)`): every
# contraction of a sample's matrices then reads them from cache
BJ_SAMPLE_CHUNK = 1


class PeerProblem(NamedTuple):
    inner: dict     # the LL finite sum: A (n, dz, dz), B (n, dx, dx), C (n, dx, dz), a (n, dz), b (n, dx)
    outer: dict     # the UL finite sum, same layout
    batch_size: int
    description: str


# ---------------------------------------------------------------------------------- the problem

def _orthogonal(key, d):
    return jnp.linalg.qr(jax.random.normal(key, (d, d)))[0]


def _rank_one_hessians(key, n, d, mu, high, zero_first):
    """u_i u_i' with u_i = g_i S^{1/2}, S = Q diag(spectrum) Q' log-spaced in [mu, high]."""
    k_q, k_g = jax.random.split(key)
    spectrum = np.logspace(np.log10(mu), np.log10(high), d - int(zero_first))
    if zero_first:
        spectrum = np.concatenate([[0.0], spectrum])
    q = _orthogonal(k_q, d)
    u = jax.random.normal(k_g, (n, d)) @ ((q * jnp.sqrt(jnp.asarray(spectrum, jnp.float32))) @ q.T)
    return jnp.einsum("ni,nj->nij", u, u)


def _level(key, n, dz, dx, high_z, high_x, high_cross, mu):
    ks = jax.random.split(key, 6)
    m = min(dz, dx)
    u = _orthogonal(ks[2], dx)[:, :m]
    vt = _orthogonal(ks[3], dz)
    d = jnp.asarray(np.logspace(np.log10(mu), np.log10(high_cross), m), jnp.float32)
    g = jax.random.normal(ks[4], (n, dz))
    left = (g[:, :m] * d) @ u.T          # (n, dx): U D g_i
    right = g @ vt.T                     # (n, dz): g_i' V'
    k_a, k_b = jax.random.split(ks[5])
    return {"A": _rank_one_hessians(ks[0], n, dz, mu, high_z, False),
            "B": _rank_one_hessians(ks[1], n, dx, mu, high_x, True),
            "C": jnp.einsum("ni,nj->nij", left, right),
            "a": jax.random.normal(k_a, (n, dz)), "b": jax.random.normal(k_b, (n, dx))}


def _value_hessian_min_eig(inner, outer) -> float:
    """The smallest eigenvalue of the Hessian of x -> f_outer(z*(x), x), z*(x) = argmin f_inner."""
    m_in = {k: np.asarray(jnp.mean(v, axis=0), np.float64) for k, v in inner.items()}
    m_out = {k: np.asarray(jnp.mean(v, axis=0), np.float64) for k, v in outer.items()}
    jac = -np.linalg.solve(m_in["A"], m_in["C"].T)            # dz* / dx, (dz, dx)
    cross = m_out["C"] @ jac                                  # (dx, dx)
    hess = jac.T @ m_out["A"] @ jac + m_out["B"] + cross + cross.T
    return float(np.linalg.eigvalsh(0.5 * (hess + hess.T)).min())


@functools.lru_cache(maxsize=2)
def peer_quadratic(quick: bool = False) -> PeerProblem:
    n, d, b = (128, 10, 16) if quick else (1024, 100, 64)
    key = jax.random.PRNGKey(2442)
    make = jax.jit(functools.partial(_level, n=n, dz=d, dx=d, mu=0.1), static_argnames=("high_z", "high_x", "high_cross"))
    for attempt in range(20):
        k_in, k_out, key = jax.random.split(key, 3)
        inner = make(k_in, high_z=1.0, high_x=1.0, high_cross=0.1)
        outer = make(k_out, high_z=1.0, high_x=1.0, high_cross=0.1)
        if _value_hessian_min_eig(inner, outer) >= 1e-12:
            break
    else:
        raise RuntimeError("could not draw a peer quadratic with a positive definite value Hessian")
    desc = (f"benchmark_bilevel's quadratic ('simulated'), n = {n} per level, dims {d}/{d}, dense rank-one "
            f"per-sample A_i, B_i, C_i, batch {b}, float32")
    return PeerProblem(inner, outer, b, desc)


def _quadratic(z, x, A, B, C, a, b):
    return 0.5 * z @ (A @ z) + 0.5 * x @ (B @ x) + x @ C @ z + a @ z + b @ x


def peer_objective(z, x, batch):
    """The peer's formulation: the per-sample quadratic vmapped over the batch, averaged."""
    per_sample = jax.vmap(_quadratic, in_axes=(None, None, 0, 0, 0, 0, 0))
    return jnp.mean(per_sample(z, x, batch["A"], batch["B"], batch["C"], batch["a"], batch["b"]))


def einsum_objective(z, x, batch):
    """The same function with one einsum per term (as `bj.problems.quadratic_bilevel`)."""
    per_sample = (0.5 * jnp.einsum("i,nij,j->n", z, batch["A"], z) + 0.5 * jnp.einsum("i,nij,j->n", x, batch["B"], x)
                  + jnp.einsum("i,nij,j->n", x, batch["C"], z) + batch["a"] @ z + batch["b"] @ x)
    return jnp.mean(per_sample)


OBJECTIVES = {"peer": peer_objective, "einsum": einsum_objective}


# ------------------------------------------------------------------ the peer, re-implemented

def _slice_fn(data, objective, batch_size):
    """f(z, x, start): the objective on the block at `start`, the data closed over (as the peer)."""
    def f(z, x, start):
        batch = {k: jax.lax.dynamic_slice_in_dim(v, start, batch_size, axis=0) for k, v in data.items()}
        return objective(z, x, batch)
    return f


def _sampler(n, batch_size, seed=1):
    """The peer's block sampler: (draw(state) -> (start, block, state), state0)."""
    n_batches = n // batch_size

    def draw(state):
        block = state["order"][state["position"]]
        last = state["position"] == n_batches - 1

        def reshuffle(s):
            key, sub = jax.random.split(s["key"])
            return {"order": jax.random.permutation(sub, s["order"]), "position": jnp.zeros((), jnp.int32), "key": key}

        def advance(s):
            return {**s, "position": s["position"] + 1}

        return batch_size * block, block, jax.lax.cond(last, reshuffle, advance, state)

    state0 = {"order": jnp.arange(n_batches, dtype=jnp.int32), "position": jnp.zeros((), jnp.int32),
              "key": jax.random.PRNGKey(seed)}
    return draw, state0


def _lr(state):
    """The peer's scheduler: constants / (i + 1)^exponents, i the iteration."""
    lr = state["constants"] / (state["i"] + 1.0) ** state["exponents"]
    return lr, {**state, "i": state["i"] + 1}


def peer_runner(name: str, problem: PeerProblem, objective: Callable, num_steps: int):
    """`(run, carry0)`: `run(carry)` makes `num_steps` iterations of the peer's solver `name`."""
    b = problem.batch_size
    n_in, n_out = problem.inner["a"].shape[0], problem.outer["a"].shape[0]
    dz, dx = problem.inner["a"].shape[1], problem.inner["b"].shape[1]
    f_inner = _slice_fn(problem.inner, objective, b)
    f_outer = _slice_fn(problem.outer, objective, b)
    grad_inner = jax.grad(f_inner, argnums=0)
    grad_outer = jax.grad(f_outer, argnums=(0, 1))
    draw_in, s_in = _sampler(n_in, b)
    draw_out, s_out = _sampler(n_out, b)
    constants, exponents = {"soba": ([STEP, STEP / OUTER_RATIO], [0.5, 0.5]),
                            "saba": ([STEP, STEP / OUTER_RATIO], [0.0, 0.0])}.get(
        name, ([STEP, STEP, STEP / OUTER_RATIO], [0.0, 0.0, 0.0]))
    carry0 = {"z": jnp.zeros(dz), "x": jnp.zeros(dx), "v": jnp.zeros(dz), "s_in": s_in, "s_out": s_out,
              "lr": {"constants": jnp.asarray(constants), "exponents": jnp.asarray(exponents), "i": jnp.zeros(())}}

    def sgd_inner(z, x, s_in, lr):
        def one(_, c):
            s, z = c
            start, _, s = draw_in(s)
            return s, z - lr * grad_inner(z, x, start)
        s_in, z = jax.lax.fori_loop(0, INNER_STEPS, one, (s_in, z))
        return z, s_in

    def hvp(z, x, v, start):
        return jax.vjp(lambda zz: grad_inner(zz, x, start), z)[1](v)[0]

    def soba(c, _):
        (lr_in, lr_out), c["lr"] = _lr(c["lr"])
        start, _, c["s_in"] = draw_in(c["s_in"])
        g_z, pullback = jax.vjp(lambda z, x: grad_inner(z, x, start), c["z"], c["x"])
        h_v, cross_v = pullback(c["v"])
        start, _, c["s_out"] = draw_out(c["s_out"])
        g_in_out, g_out_out = grad_outer(c["z"], c["x"], start)
        c["z"] = c["z"] - lr_in * g_z
        c["v"] = c["v"] - lr_in * (h_v + g_in_out)
        c["x"] = c["x"] - lr_out * (cross_v + g_out_out)
        return c, None

    def saba(c, _):
        (lr_in, lr_out), c["lr"] = _lr(c["lr"])
        start, i, c["s_in"] = draw_in(c["s_in"])
        g_z, pullback = jax.vjp(lambda z, x: grad_inner(z, x, start), c["z"], c["x"])
        h_v, cross_v = pullback(c["v"])
        start, j, c["s_out"] = draw_out(c["s_out"])
        g_in_out, g_out_out = grad_outer(c["z"], c["x"], start)

        def reduce(mem, g, idx, weight):   # rows: one per block, then the running mean, then the direction
            diff = g - mem[idx]
            return mem.at[-1].set(diff + mem[-2]).at[-2].add(weight * diff).at[idx].set(g)

        mem = c["memory"]
        new = {"g_z": (g_z, i, b / n_in), "h_v": (h_v, i, b / n_in), "cross_v": (cross_v, i, b / n_in),
               "g_in_out": (g_in_out, j, b / n_out), "g_out_out": (g_out_out, j, b / n_out)}
        mem = {k: reduce(mem[k], *new[k]) for k in mem}
        c["memory"] = mem
        c["z"] = c["z"] - lr_in * mem["g_z"][-1]
        c["v"] = c["v"] - lr_in * (mem["h_v"][-1] + mem["g_in_out"][-1])
        c["x"] = c["x"] - lr_out * (mem["cross_v"][-1] + mem["g_out_out"][-1])
        return c, None

    def double_loop(solve):
        def step(c, _):
            (lr_in, lr_v, lr_out), c["lr"] = _lr(c["lr"])
            start, _, c["s_out"] = draw_out(c["s_out"])
            g_in_out, g_out_out = grad_outer(c["z"], c["x"], start)
            c["v"], c["s_in"] = solve(c["z"], c["x"], c["v"], g_in_out, c["s_in"], lr_v)
            start, _, c["s_in"] = draw_in(c["s_in"])
            implicit = jax.vjp(lambda x: grad_inner(c["z"], x, start), c["x"])[1](c["v"])[0]
            c["x"] = c["x"] - lr_out * (g_out_out - implicit)
            c["z"], c["s_in"] = sgd_inner(c["z"], c["x"], c["s_in"], lr_in)
            return c, None
        return step

    def sgd_v(z, x, v, g, s_in, lr):          # AmIGO: SGD on 1/2 v'Av - g'v, a fresh batch per step
        def one(_, c):
            s, v = c
            start, _, s = draw_in(s)
            return s, v - lr * (hvp(z, x, v, start) - g)
        s_in, v = jax.lax.fori_loop(0, INNER_STEPS, one, (s_in, v))
        return v, s_in

    def shia(z, x, v, g, s_in, lr):           # StocBiO: lr * sum of the 11 Neumann terms, fresh batches
        def one(_, c):
            s, r, total = c
            start, _, s = draw_in(s)
            r = r - lr * hvp(z, x, r, start)
            return s, r, total + r
        s_in, _, total = jax.lax.fori_loop(0, SHIA_STEPS, one, (s_in, g, g))
        return lr * total, s_in

    body = {"soba": soba, "saba": saba, "amigo": double_loop(sgd_v), "stocbio": double_loop(shia)}[name]
    if name == "saba":
        rows_in, rows_out = n_in // b + 2, n_out // b + 2
        carry0["memory"] = {"g_z": jnp.zeros((rows_in, dz)), "h_v": jnp.zeros((rows_in, dz)),
                            "cross_v": jnp.zeros((rows_in, dx)), "g_in_out": jnp.zeros((rows_out, dz)),
                            "g_out_out": jnp.zeros((rows_out, dx))}

    def run(carry):
        return jax.lax.scan(body, carry, None, length=num_steps)[0]

    return jax.jit(run), carry0


# ------------------------------------------------------------------------------ bilevel_jax

def bj_problem(objective: Callable, sample_chunk: Optional[int] = None) -> bj.BilevelProblem:
    """The peer's objective code as a bilevel_jax problem: theta = its outer variable x, phi = its
    inner variable z; `sample_chunk`: the problem's oracle passes over sub-batches of that many samples."""
    def f(theta, phi, batch):
        return objective(phi, theta, batch)
    return bj.BilevelProblem(f, f, sample_chunk=sample_chunk)


def library_data(level: dict, upper: bool) -> dict:
    """The peer's per-sample arrays in `bj.problems.quadratic_problem`'s layout (x'C_i z = z'C_i'x)."""
    cross = jnp.swapaxes(level["C"], 1, 2)
    keys = ("P", "S", "p") if upper else ("H", "C", "h")
    return {keys[0]: level["A"], keys[1]: cross, keys[2]: level["a"], "B": level["B"], "b": level["b"]}


def bj_algorithm(name: str, problem: bj.BilevelProblem, batch_size: int, mode: str = BJ_MODE):
    kw = dict(upper_lr=STEP / OUTER_RATIO, lower_lr=STEP, batch_size=batch_size, sampler="shuffled", mode=mode)
    if name == "soba":
        kw.update(upper_decay=0.5, lower_decay=0.5)
    elif name == "saba":
        kw.update(saga_init="zero")
    elif name == "amigo":
        kw.update(lower_steps=INNER_STEPS)
    elif name == "stocbio":
        kw.update(lower_steps=INNER_STEPS, neumann_steps=SHIA_STEPS + 1)
    return bj.algorithms.get(name)(problem, **kw)


def bj_runner(name: str, problem: PeerProblem, objective: Optional[Callable], num_steps: int, mode: str = BJ_MODE,
              sample_chunk: Optional[int] = None):
    """`(run, args)`: `run(state, data)` = `bj.run` of `num_steps` steps with its history, on the
    library's quadratic (`objective=None`) or on the given objective code in the peer's layout
    (oracle passes over sub-batches of `sample_chunk` samples), second-order products by `mode`."""
    if objective is None:
        bj_prob = bj.problems.quadratic_problem()
        data = (library_data(problem.outer, True), library_data(problem.inner, False))
    else:
        bj_prob, data = bj_problem(objective, sample_chunk), (problem.outer, problem.inner)
    alg = bj_algorithm(name, bj_prob, problem.batch_size, mode)
    dz, dx = problem.inner["a"].shape[1], problem.inner["b"].shape[1]
    state = alg.init(jnp.zeros(dx), jnp.zeros(dz), jax.random.PRNGKey(1), data)

    def run(state, data):
        return bj.run(alg, state, data, num_steps=num_steps)

    return jax.jit(run), (state, data)


def batch_bytes(problem: PeerProblem) -> Dict[str, int]:
    """Bytes of one batch that a step must read: every UL leaf; of the LL, A, C and a (the
    gradient in z and its derivatives do not involve B and b)."""
    b = problem.batch_size
    per_sample = lambda d, keys: sum(int(np.prod(d[k].shape[1:])) * d[k].dtype.itemsize for k in keys)
    return {"upper": b * per_sample(problem.outer, "ABCab"), "lower": b * per_sample(problem.inner, "ACa")}


# ------------------------------------------------------------------------ the bandwidth account

# The oracle passes over a minibatch that one outer iteration of bilevel_jax makes (its schemes
# above; AmIGO's 10 GD steps on v run on the step's one LL batch: the first HVP cuts it, the nine
# others reuse it), and the leaves of the batch each pass needs.
PASSES = {"soba": {"upper": 1, "triple": 1},
          "amigo": {"upper": 1, "lower_grad": INNER_STEPS, "hvp": 1, "hvp_same_batch": INNER_STEPS - 1, "cross": 1},
          "stocbio": {"upper": 1, "lower_grad": INNER_STEPS, "hvp": SHIA_STEPS, "cross": 1}}
PASS_LEAVES = {"upper": "ABCab", "lower_grad": "ACa", "triple": "ACa", "hvp": "A", "hvp_same_batch": "A", "cross": "C"}


def matrix_bytes(problem: PeerProblem) -> int:
    """Bytes of one batch of one per-sample matrix (A, B or C)."""
    a = problem.inner["A"]
    return problem.batch_size * int(np.prod(a.shape[1:])) * a.dtype.itemsize


def oracle_functions(objective: Callable, batch_size: int) -> Dict[str, Dict[str, Callable]]:
    """Every pass of `PASSES` in plain JAX on `objective(z, x, batch)`, by each differentiation
    that gives it: `{pass: {mode: fn(z, x, v, data, start)}}`, the batch cut at `start` as both
    sides cut it (`hvp_same_batch`: `data` is a batch already cut). "rev": a vjp of the gradient,
    "fwd": a jvp of it (forward-over-reverse); `triple` is SOBA's (grad_z, A v, J v)."""
    def cut(data, start):
        return {k: jax.lax.dynamic_slice_in_dim(a, start, batch_size, axis=0) for k, a in data.items()}

    grad_z, grad_x, grad_zx = (jax.grad(objective, argnums) for argnums in (0, 1, (0, 1)))

    def hvp(batch):
        return {"rev": lambda z, x, v, d, s: jax.vjp(lambda z_: grad_z(z_, x, batch(d, s)), z)[1](v)[0],
                "fwd": lambda z, x, v, d, s: jax.jvp(lambda z_: grad_z(z_, x, batch(d, s)), (z,), (v,))[1]}

    def triple_rev(z, x, v, d, s):
        g, pullback = jax.vjp(lambda z_, x_: grad_z(z_, x_, cut(d, s)), z, x)
        return g, pullback(v)

    def triple_fwd(z, x, v, d, s):   # the tangent of (grad_z, grad_x) along z -> v is (A v, J v)
        (g, _), products = jax.jvp(lambda z_: grad_zx(z_, x, cut(d, s)), (z,), (v,))
        return g, products

    return {"upper": {"rev": lambda z, x, v, d, s: grad_zx(z, x, cut(d, s))},
            "lower_grad": {"rev": lambda z, x, v, d, s: grad_z(z, x, cut(d, s))},
            "triple": {"rev": triple_rev, "fwd": triple_fwd},
            "hvp": hvp(cut), "hvp_same_batch": hvp(lambda batch, _: batch),
            "cross": {"rev": lambda z, x, v, d, s: jax.vjp(lambda x_: grad_z(z, x_, cut(d, s)), x)[1](v)[0],
                      "fwd": lambda z, x, v, d, s: jax.jvp(lambda z_: grad_x(z_, x, cut(d, s)), (z,), (v,))[1]}}


def oracle_bytes(problem: PeerProblem, objective: Callable) -> Dict[str, dict]:
    """The bytes each pass of `PASSES` reads and writes, each compiled alone on the objective code
    (`hlo_bytes`), by each differentiation, and the least of them (`bytes`, `mode`)."""
    b, threshold = problem.batch_size, matrix_bytes(problem)
    dz, dx = problem.inner["a"].shape[1], problem.inner["b"].shape[1]
    z, x, v, start = jnp.ones(dz), jnp.ones(dx), jnp.ones(dz), jnp.zeros((), jnp.int32)
    out = {}
    for name, modes in oracle_functions(objective, b).items():
        data = problem.outer if name == "upper" else problem.inner
        if name == "hvp_same_batch":
            data = {k: a[:b] for k, a in data.items()}
        by_mode = {m: hlo_bytes.bytes_accessed(jax.jit(fn).lower(z, x, v, data, start).compile(), threshold)
                   for m, fn in modes.items()}
        best = min(by_mode, key=lambda m: by_mode[m]["bytes"])
        out[name] = {"bytes": by_mode[best]["bytes"], "mode": best,
                     "by_mode": {m: {k: r[k] for k in ("bytes", "matrix_reads", "matrix_writes")} for m, r in by_mode.items()}}
    return out


def compiled_per_step(compiled, problem: PeerProblem, num_steps: int) -> dict:
    """Bytes and batch-matrix reads / writes of a compiled `num_steps`-step call, per step."""
    r = hlo_bytes.bytes_accessed(compiled, matrix_bytes(problem))
    return {k: r[k] / num_steps for k in ("bytes", "matrix_reads", "matrix_writes")}


def copy_rates(problem: PeerProblem, memory_mib: int, repeats: int) -> dict:
    """The copy rates a step's bytes move at: `memory`, one pass over `memory_mib` MiB (beyond the
    caches: the rate of a fresh minibatch's first read from its data set), and `cache`, 50 passes
    over one batch matrix (the rate of the re-reads and writes of a cut batch)."""
    return {"memory": bandwidth.copy_rate(memory_mib * 2 ** 20, 1, repeats),
            "cache": bandwidth.copy_rate(matrix_bytes(problem), 50, repeats)}


def bandwidth_account(problem: PeerProblem, rows: dict, rates: dict, log=print) -> dict:
    """Per method of `PASSES` with a timed row in `rows` (a `measure` section's methods): the passes
    over a batch one iteration needs; the bytes they must read at the least (every batch matrix
    once a pass: `strict_bytes`, of which `fresh_bytes` on batches not read before in the step)
    and with the peer's objective code (every pass compiled alone, by its cheaper differentiation:
    `code_bytes`, reads and writes); the bytes the two compiled steps move; the floor = fresh bytes /
    the memory copy rate + the other bytes / the cache copy rate (`copy_rates`), by wall time and
    by process CPU time, against the measured times of the peer and of bilevel_jax on the peer's
    objective code."""
    b = problem.batch_size
    per_sample = lambda d, keys: sum(int(np.prod(d[k].shape[1:])) * d[k].dtype.itemsize for k in keys)
    leaves = {p: b * per_sample(problem.outer if p == "upper" else problem.inner, keys) for p, keys in PASS_LEAVES.items()}
    oracles = oracle_bytes(problem, peer_objective)
    out = {"rates": rates, "matrix_bytes": matrix_bytes(problem), "oracles": oracles, "methods": {}}
    for name, passes in PASSES.items():
        row = rows.get(name)
        if row is None or "error" in row:
            continue
        strict = sum(n * leaves[p] for p, n in passes.items())
        fresh = sum(n * leaves[p] for p, n in passes.items() if p != "hvp_same_batch")
        code = sum(n * oracles[p]["bytes"] for p, n in passes.items())
        compiled = {"peer": row["compiled_per_step"]["peer:peer"], "bilevel_jax": row["compiled_per_step"]["bilevel_jax:peer"]}
        m = {"passes": passes, "strict_bytes": strict, "fresh_bytes": fresh, "code_bytes": code, "compiled": compiled,
             "code_over_peer_bytes": code / compiled["peer"]["bytes"], "strict_over_peer_bytes": strict / compiled["peer"]["bytes"],
             "bilevel_jax_over_peer_bytes": compiled["bilevel_jax"]["bytes"] / compiled["peer"]["bytes"]}
        for clock, key, get in (("wall", "copy_read_GBps", lambda s: s["median"]),
                                ("cpu", "copy_read_GBps_cpu", lambda s: s["cpu"]["median"])):
            memory, cache = rates["memory"][key] * 1e9, rates["cache"][key] * 1e9
            floor, strict_floor = fresh / memory + (code - fresh) / cache, fresh / memory + (strict - fresh) / cache
            peer_s, bj_s = get(row["peer:peer"]), get(row["bilevel_jax:peer"])
            m[clock] = {"floor_s": floor, "strict_floor_s": strict_floor, "peer_s": peer_s, "bilevel_jax_s": bj_s,
                        "floor_over_peer": floor / peer_s, "strict_floor_over_peer": strict_floor / peer_s,
                        "bilevel_jax_over_peer": bj_s / peer_s}
        out["methods"][name] = m
        c = m["cpu"]
        log(f"  account {name:8s} must read {strict / 1e6:.1f} MB (each matrix once a pass), {code / 1e6:.1f} MB with the "
            f"peer's code; compiled peer {compiled['peer']['bytes'] / 1e6:.1f} MB, bj {compiled['bilevel_jax']['bytes'] / 1e6:.1f}"
            f" MB (floor {m['code_over_peer_bytes']:.2f} x the peer's bytes); CPU time: floor {c['floor_s'] * 1e3:.3g} ms = "
            f"{c['floor_over_peer']:.2f} x the peer's {c['peer_s'] * 1e3:.3g} ms")
    return out


@contextlib.contextmanager
def _no_persistent_cache():
    """JAX's persistent compilation cache off: the peer's executables embed its data (hundreds of
    MiB of constants), which the cache would hash and write to disk at every compilation."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def measure(quick: bool, num_steps: Dict[str, int], repeats: int, methods=METHODS, log=print,
            memory_mib: int = 256) -> dict:
    with _no_persistent_cache():
        out = _measure(quick, num_steps, repeats, methods, log)
        problem = peer_quadratic(quick)
        try:
            rates = copy_rates(problem, memory_mib, max(repeats, 7))
            out["account"] = bandwidth_account(problem, out["methods"], rates, log)
        except Exception as e:  # noqa: BLE001 - the timings above stand without the account
            out["account"] = timing.error_row(e)
            log(f"  account ERROR {out['account']['error']}")
    return out


def _measure(quick, num_steps, repeats, methods, log) -> dict:
    t0 = time.perf_counter()
    problem = peer_quadratic(quick)
    out = {"problem": problem.description, "peer": PEER, "bar": BAR, "setup_s": time.perf_counter() - t0,
           "settings": {"step_size": STEP, "outer_ratio": OUTER_RATIO, "inner_steps": INNER_STEPS,
                        "shia_steps": SHIA_STEPS, "bilevel_jax_sampler": "shuffled", "peer_sampler":
                        "its epoch-permuted block order (state, lax.cond)"},
           "batch_bytes": batch_bytes(problem), "methods": {}}
    for name in methods:
        k = num_steps[name]
        fns, args, compile_s, compiled = {}, {}, {}, {}
        try:
            runs = {"peer:peer": (peer_runner, peer_objective), "peer:einsum": (peer_runner, einsum_objective),
                    "bilevel_jax": (bj_runner, None),
                    "bilevel_jax:peer": (functools.partial(bj_runner, sample_chunk=BJ_SAMPLE_CHUNK), peer_objective),
                    "bilevel_jax:peer:whole": (bj_runner, peer_objective),
                    "bilevel_jax:peer:rev": (functools.partial(bj_runner, mode="rev"), peer_objective)}
            for label, (runner, objective) in runs.items():
                fn, a = runner(name, problem, objective, k)
                a = a if isinstance(a, tuple) else (a,)
                t = time.perf_counter()
                fns[label] = fn.lower(*a).compile()
                compile_s[label] = time.perf_counter() - t
                compiled[label] = compiled_per_step(fns[label], problem, k)
                args[label] = a
            res = timing.interleaved(fns, args, repeats=repeats, scale=k)
            finite = {}
            for label, fn in fns.items():
                final = fn(*args[label])
                x = final["x"] if label.startswith("peer") else final[0].theta   # the outer variable
                finite[label] = bool(np.all(np.isfinite(np.asarray(x))))
            ratio = lambda a, b: timing.ratios(res, a, b)
            sizes = batch_bytes(problem)
            row = {"steps_per_call": k, "compile_s": compile_s, "finite": finite, "compiled_per_step": compiled,
                   "ll_batches_per_step": {"peer": PEER_LL_DRAWS[name], "bilevel_jax": BJ_LL_DRAWS[name]},
                   "bytes_per_step": {who: sizes["upper"] + draws * sizes["lower"]
                                      for who, draws in (("peer", PEER_LL_DRAWS[name]), ("bilevel_jax", BJ_LL_DRAWS[name]))},
                   **{label: res[label] for label in fns},
                   "ratio": ratio("bilevel_jax", "peer:peer"),
                   "ratio_same_objective": ratio("bilevel_jax:peer", "peer:peer"),
                   "ratio_same_objective_whole": ratio("bilevel_jax:peer:whole", "peer:peer"),
                   "ratio_same_objective_rev": ratio("bilevel_jax:peer:rev", "peer:peer"),
                   "ratio_einsum_both": ratio("bilevel_jax", "peer:einsum")}
            log(f"  peer {name:8s} peer {res['peer:peer']['median'] * 1e3:.4g} ms, bj {res['bilevel_jax']['median'] * 1e3:.4g} ms "
                f"(ratio {row['ratio']['median']:.3f}, cpu {row['ratio']['cpu']['median']:.3f}; same objective code "
                f"{row['ratio_same_objective']['median']:.3f}, cpu {row['ratio_same_objective']['cpu']['median']:.3f}; "
                f"both einsum {row['ratio_einsum_both']['median']:.3f}, cpu {row['ratio_einsum_both']['cpu']['median']:.3f})")
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the bench
            row = timing.error_row(e)
            log(f"  peer {name:8s} ERROR {row['error']}")
        out["methods"][name] = row
    return out

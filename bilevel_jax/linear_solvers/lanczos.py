"""LancBiO's dynamic Lanczos process: a Krylov subspace for A v = b that is built across solves
(one Lanczos vector per call), restarted every m calls, with a residual correction.

Yang, Gao & Yuan, "LancBiO: Dynamic Lanczos-aided Bilevel Optimization via Krylov Subspace",
ICLR 2025, arXiv:2404.03331 (Algorithm LancBiO; the synthetic-problem solver of the authors'
public code for the ordering of the steps). The operator A_k and the right-hand side b_k may
change from one call to the next (in a bilevel loop: A_k = grad^2_phiphi f_lower and
b_k = grad_phi f_upper at the current (theta_k, phi_k)); the solver only sees `matvec` and `b`.

One call (`steps = 1`, LancBiO's setting) at outer step k, with j vectors in the current basis:

  0. schedule   every `every` calls, m <- min(ceil(m * inc), m_max, n)   (m starts at min(m_start, n),
                n = the system's dimension: a basis never has more than n vectors)
  1. restart    when the epoch has made m steps (and at the first call):
                    v_bar = v_{k-1},   w = A_k v_bar                       (1 matvec, then frozen)
                    q_1 = (b_k - w) / ||b_k - w||,  j = 0, beta_0 = 0
  2. residual   r_k = b_k - w                        (w frozen since the restart)
  3. Lanczos    u = A_k q_{j+1} - beta_j q_j,   alpha_{j+1} = q_{j+1}' u      (1 matvec)
                T_{j+1} = tridiag(beta, alpha, beta) grows by one row and column
  4. solve      correction="galerkin" (default):
                    T_{j+1} s = Q_{j+1}' r_k       (a tridiagonal system: `lax.linalg.tridiagonal_solve`)
                correction="min_residual":
                    s = argmin ||Q_{j+2}' r_k - T~_{j+1} s||, T~ = [T_{j+1}; beta_{j+1} e_{j+1}']
                dv = Q_{j+1} s,   v_k = v_bar + dv
                Q'r_k is formed as ||r_h|| e_1 + Q'(b_k - b_h), with r_h = b_h - w the residual at the
                restart (q_1 = r_h / ||r_h||). The same in exact arithmetic; in floating point the
                loss of orthogonality of Q (no re-orthogonalisation) then only touches the drift of
                b (conjugate gradient's recurrences use ||r_0|| e_1 implicitly too). Projecting r_k
                itself stalls near a 1e-10 residual where this form reaches 1e-15 (frozen system).
  5. next       omega = u - alpha_{j+1} q_{j+1},  beta_{j+1} = ||omega||,  q_{j+2} = omega / beta_{j+1}
                (no re-orthogonalisation, as in the paper)

Step 4, "galerkin", is the Galerkin condition on the correction: dv minimises 1/2 dv'A dv - r_k'dv
over the subspace span(Q_j) when A is fixed (then T_j = Q_j'A Q_j), i.e. dv is the best
approximation of A^{-1} r_k in the A-norm there; it is the authors' public code (T_j s = Q_j'r). For
a fixed A and b, the iterates between two restarts are those of conjugate gradient started at
v_bar, and with m = n the process solves A v = b (in exact arithmetic, in at most n calls).
"min_residual" is the subproblem of the paper's presentation, min over dv in span(Q_j) of
||(b_k - A v_bar) - A dv||: with the Lanczos relation A Q_j = Q_{j+1} T~_j (exact for a fixed A;
up to the drift of A_k otherwise, the paper's Proposition) it is the (j+1) x j least-squares
problem above, MINRES's iterates for a fixed system (the residual norm is minimal, and falls, in
the subspace). It needs no positive definite T (a symmetric indefinite or drifting operator gives
no pivot breakdown: only non-finite values are flagged); the small problem is solved densely
(`jnp.linalg.lstsq` on an (m_max + 1) x m_max matrix, O(m_max^3) flops per call, no matvec).
The default stays "galerkin": the authors' experiments, CG's A-norm optimality (the error that
enters the hypergradient through J v is measured in the A-norm by the implicit function theorem's
bound |J(v - v*)| <= ||J A^{-1/2}|| ||v - v*||_A), and its pivot check, which reports an LL Hessian
that is not positive definite instead of solving the wrong problem. The cost is 1 matvec per call plus 1 per restart: on average
1 + 1/m matvecs per call, the paper's (1 + 1/m) Hessian-vector products per outer iteration.

Fixed-size buffers: the basis (m_max vectors, a leading axis of size m_max on every leaf of b),
the diagonal, off-diagonal and LDL' pivots of T (m_max each). Entries past the current size j are
masked (a masked row of T is the identity, its right-hand side zero), so the basis is never
re-allocated and everything runs inside `lax.scan` and under `vmap`. The current m is a traced
int32 in the state; `m_start` and `inc` are array fields (a sweep may vmap over them), `m_max`,
`every`, `steps` and `correction` are static.

Breakdowns are loud or a documented restart:
- (galerkin) non-positive (or non-finite) pivot of T: the pivots d_1 = alpha_1, d_i = alpha_i -
  beta_{i-1}^2 / d_{i-1} of T = L D L' are updated once per new row (O(1)); T must be positive
  definite (A symmetric positive definite and a slowly drifting A_k). When the new pivot is
  <= c eps max_i ||A q_i||, x is NaN (every leaf) and the status BREAKDOWN (| NONFINITE when a
  value is non-finite); the state keeps the NaN.
- beta ~ 0 (an invariant subspace: the "lucky" breakdown): beta_{j+1} <= c eps ||A q_{j+1}||.
  The basis stops growing for the rest of the epoch (no q_{j+2} is formed); the calls until the
  next scheduled restart re-solve the Galerkin system on the same basis with the new r_k. Not a
  failure.
- ||r|| at a restart at rounding level (v_bar already solves the system): no basis is built in
  this epoch, v = v_bar until the next restart. Not a failure.
Non-finite b, matvec or state: x NaN, status BREAKDOWN | NONFINITE.
With sampled operators (minibatch Hessians, a new sample per call) T mixes entries of different
samples and is often indefinite for m >= 2 at small batches (a loud breakdown); m = 1 (a restart
at every call: the exact line search along the residual, 2 matvecs) or large batches work.

`info.residual_norm` is, by default, the Lanczos estimate ||r_k - Q_j T_j s - beta_j s_j q_{j+1}||
of ||b - A x|| (no matvec; exact for a fixed A in exact arithmetic, where A Q_j = Q_j T_j +
beta_j q_{j+1} e_j'; with a drifting A_k and the frozen w it is an estimate). With
`exact_residual=True` it is ||b - A x|| from one more matvec per call (a diagnostic, not counted
in `info.num_matvecs`). NaN when the solve failed.

Under `vmap` (over seeds, say) the restart's matvec is computed at every call (`lax.cond` becomes
a select), so the wall time is that of 2 matvecs per call; `info.num_matvecs` still counts the
method's 1 + [restart].
"""
from __future__ import annotations

from typing import Any, NamedTuple

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array, check_bool, check_in_range, check_positive_int
from bilevel_jax.linear_solvers.base import LinearSolver, fail_where, make_info, residual_norm, rounding_eps

PyTree = Any

_PIVOT = 4.0     # a pivot <= _PIVOT eps max ||A q|| is non-positive (T not positive definite)
_LUCKY = 16.0    # beta <= _LUCKY eps ||A q||: the subspace is invariant
_FLOOR = 4.0     # a restart residual <= _FLOOR eps (||b|| + ||w||) is zero
_CEIL_RTOL = 1e-6  # ceil(m inc) up to this relative tolerance (10 * 1.1 gives 11, not 12)


class LanczosState(NamedTuple):
    """The state of `lanczos`, kept across solves (in a bilevel loop: across outer steps).

    x: the current solution v_k.   x_bar, w: the restart point and A v_bar (frozen).
    b_ref, r_ref: b and ||b - w|| at the restart.
    basis: q_1..q_j as a leading axis of size m_max on every leaf (rows >= size masked).
    q_next: q_{j+1}.   alpha, beta, pivots: diagonal, off-diagonal (beta[i] between rows i and
    i+1) and LDL' pivots of T (m_max each).   scale: max ||A q_i|| of the epoch.
    size: j (vectors in the basis).   epoch_step: calls since the restart.   m: the current
    subspace dimension.   count: calls so far (the schedule's clock).   active: the epoch has a
    basis (its restart residual was not zero).   exhausted: beta ~ 0 met (the basis is invariant).
    """

    x: PyTree
    x_bar: PyTree
    w: PyTree
    b_ref: PyTree
    r_ref: jax.Array
    basis: PyTree
    q_next: PyTree
    alpha: jax.Array
    beta: jax.Array
    pivots: jax.Array
    scale: jax.Array
    size: jax.Array
    epoch_step: jax.Array
    m: jax.Array
    count: jax.Array
    active: jax.Array
    exhausted: jax.Array


def _dtype(tree) -> Any:
    dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(tree)]
    dtypes = [d for d in dtypes if jnp.issubdtype(d, jnp.inexact)]
    return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)


def _project(basis, r) -> jax.Array:
    """Q' r: (m_max,), summed over the leaves."""
    parts = [jnp.tensordot(q, x, axes=x.ndim) for q, x in
             zip(jax.tree_util.tree_leaves(basis), jax.tree_util.tree_leaves(r))]
    return sum(parts[1:], parts[0])


def _combine(basis, s) -> PyTree:
    """Q s: a tree shaped like one basis vector."""
    return jax.tree_util.tree_map(lambda q: jnp.tensordot(s.astype(q.dtype), q, axes=1), basis)


def _combine2(basis, s, c):
    """(Q s, Q c) with one contraction of the basis."""
    sc = jnp.stack([s, c])
    both = jax.tree_util.tree_map(lambda q: jnp.tensordot(sc.astype(q.dtype), q, axes=1), basis)
    return (jax.tree_util.tree_map(lambda t: t[0], both), jax.tree_util.tree_map(lambda t: t[1], both))


def _row(basis, i) -> PyTree:
    return jax.tree_util.tree_map(lambda q: jax.lax.dynamic_index_in_dim(q, i, 0, keepdims=False), basis)


def _set_row(basis, i, v) -> PyTree:
    return jax.tree_util.tree_map(lambda q, x: jax.lax.dynamic_update_index_in_dim(q, x.astype(q.dtype), i, 0),
                                  basis, v)


def _safe_div(tree, norm, ok):
    return jax.tree_util.tree_map(lambda x: jnp.where(ok, x / jnp.where(ok, norm, 1.0), 0.0).astype(x.dtype), tree)


def tridiagonal_spd_solve(diag, off, rhs, size) -> jax.Array:
    """s with T s = rhs for the leading `size` rows of the symmetric tridiagonal T =
    tridiag(off, diag, off) (off[i] couples rows i and i+1); rows >= size are masked (s = 0)."""
    n = diag.shape[0]
    idx = jnp.arange(n)
    mask = idx < size
    d = jnp.where(mask, diag, 1.0)
    du = jnp.where(idx < size - 1, off, 0.0)
    dl = jnp.concatenate([jnp.zeros((1,), du.dtype), du[:-1]])
    b = jnp.where(mask, rhs, 0.0)
    s = jax.lax.linalg.tridiagonal_solve(dl, d, du, b[:, None])[:, 0]
    return jnp.where(mask, s, 0.0)


def _size(tree) -> int:
    """The dimension n of a vector tree (static)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def _least_squares_correction(alpha, beta, c, extra, tail, size, m_max):
    """s = argmin ||[c; extra] - T~ s|| over the leading `size` entries (rows >= size masked, s = 0
    there): T~ is the (size + 1) x size tridiagonal T with the row `tail` e_size' appended (tail =
    beta_size); `extra` is the right-hand side's component along q_{size+1}. Dense, in an (m_max + 1) x m_max
    matrix whose masked columns are unit columns below the active block (so they decouple)."""
    idx = jnp.arange(m_max)
    active = idx < size
    t = (jnp.diag(jnp.where(active, alpha, 0.0))
         + jnp.diag(jnp.where(idx[:-1] < size - 1, beta[:-1], 0.0), 1)
         + jnp.diag(jnp.where(idx[:-1] < size - 1, beta[:-1], 0.0), -1))
    rows = jnp.arange(m_max + 1)[:, None]
    below = jnp.where((rows == idx[None, :] + 1) & ~active[None, :], 1.0, 0.0)      # masked columns
    last = jnp.where((rows == size) & (idx[None, :] == size - 1), tail, 0.0)
    mat = jnp.concatenate([t, jnp.zeros((1, m_max), t.dtype)]) + below.astype(t.dtype) + last.astype(t.dtype)
    rhs = jnp.concatenate([jnp.where(active, c, 0.0), jnp.zeros((1,), c.dtype)])
    rhs = rhs.at[size].set(jnp.where(size > 0, extra, 0.0))
    s = jnp.linalg.lstsq(mat, rhs)[0]
    return jnp.where(active, s, 0.0)


def _tridiagonal_matvec(alpha, beta, s, size):
    """T s for the leading `size` rows (zero below)."""
    idx = jnp.arange(alpha.shape[0])
    off = jnp.where(idx < size - 1, beta, 0.0)
    ts = alpha * s + off * jnp.roll(s, -1) + jnp.roll(off * s, 1)
    return jnp.where(idx < size, ts, 0.0)


def _next_m(m, inc, m_max):
    grown = jnp.ceil(m * inc * (1.0 - _CEIL_RTOL)).astype(jnp.int32)
    return jnp.clip(jnp.maximum(grown, m), 1, m_max).astype(jnp.int32)


CORRECTIONS = ("galerkin", "min_residual")


class Lanczos(LinearSolver):
    """LancBiO's dynamic Lanczos solver (see the module docstring). `m_start`, `inc` are array
    fields; `m_max` (the buffer size), `every`, `steps` (Lanczos steps per solve) and `correction`
    are static."""

    m_max: int = eqx.field(default=80, static=True)
    m_start: Any = 1
    inc: Any = 1.1
    every: int = eqx.field(default=20, static=True)
    steps: int = eqx.field(default=1, static=True)
    exact_residual: bool = eqx.field(default=False, static=True)
    warm_start: bool = eqx.field(default=True, static=True)
    correction: str = eqx.field(default="galerkin", static=True)

    def __check_init__(self):
        check_positive_int("m_max", self.m_max)
        check_positive_int("every", self.every)
        check_positive_int("steps", self.steps)
        check_bool("warm_start", self.warm_start)
        check_bool("exact_residual", self.exact_residual)
        check_in_range("m_start", self.m_start, 1, self.m_max)
        check_in_range("inc", self.inc, 1.0, float("inf"))
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}.")
        m_start = self.m_start
        if not isinstance(m_start, jax.core.Tracer):
            arr = np.asarray(m_start)
            if not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr)):
                raise ValueError(f"m_start must be an integer (a subspace dimension), got {m_start!r}.")

    def init(self, b_like, x0=None) -> LanczosState:
        """The state before the first solve: x = x0 (default 0), an empty basis; the first solve
        restarts (v_bar = x0). The dimension m starts at min(m_start, n), n the system's dimension
        (a warning when m_start > n: no basis of R^n has more than n vectors; with a drifting
        operator a larger one stops being a basis and the correction diverges)."""
        n = _size(b_like)
        m_start = self.m_start
        if not isinstance(m_start, jax.core.Tracer) and np.any(np.asarray(m_start) > n):
            warnings.warn(f"lanczos: m_start={np.asarray(m_start).tolist()} exceeds the dimension n={n} of the "
                          f"system; the subspace dimension is capped at {n}.", stacklevel=2)
        x = otu.tree_zeros_like(b_like) if x0 is None else x0
        dtype = _dtype(b_like)
        vec = lambda: otu.tree_zeros_like(b_like)
        zeros = jnp.zeros((self.m_max,), dtype)
        i0 = jnp.zeros((), jnp.int32)
        return LanczosState(
            x=x, x_bar=vec(), w=vec(), b_ref=vec(), r_ref=jnp.zeros((), dtype),
            basis=jax.tree_util.tree_map(lambda l: jnp.zeros((self.m_max,) + jnp.shape(l), jnp.result_type(l)),
                                         b_like),
            q_next=vec(), alpha=zeros, beta=zeros, pivots=zeros, scale=jnp.zeros((), dtype), size=i0,
            epoch_step=i0, m=jnp.minimum(jnp.asarray(m_start, jnp.int32), n), count=i0, active=jnp.zeros((), bool),
            exhausted=jnp.zeros((), bool))

    def _step(self, matvec, b, state: LanczosState, eps):
        """One dynamic Lanczos step: `(state, matvecs, failed, nonfinite, estimate)`."""
        dtype = state.alpha.dtype
        m = jnp.where((state.count > 0) & (state.count % self.every == 0),
                      _next_m(state.m, self.inc, min(self.m_max, _size(b))), state.m)
        restart = (state.epoch_step == 0) | (state.epoch_step >= m)

        # 1. restart: w = A v_bar, frozen until the next restart (a matvec only when restarting)
        x_bar = otu.tree_where(restart, state.x, state.x_bar)
        w = jax.lax.cond(restart, lambda: matvec(state.x), lambda: state.w)
        r = otu.tree_sub(b, w)
        r_norm = otu.tree_norm(r)
        floor = _FLOOR * eps * (otu.tree_norm(b) + otu.tree_norm(w))
        start_active = r_norm > floor
        q = otu.tree_where(restart, _safe_div(r, r_norm, start_active), state.q_next)
        b_ref = otu.tree_where(restart, b, state.b_ref)
        r_ref = jnp.where(restart, jnp.where(start_active, r_norm, 0.0), state.r_ref).astype(dtype)
        size = jnp.where(restart, 0, state.size)
        epoch_step = jnp.where(restart, 0, state.epoch_step)
        active = jnp.where(restart, start_active, state.active)
        exhausted = jnp.where(restart, False, state.exhausted)
        scale = jnp.where(restart, jnp.zeros((), dtype), state.scale)
        grow = active & ~exhausted

        # 3. one Lanczos step with the current operator
        j = size
        has_prev = j > 0
        jp = jnp.maximum(j - 1, 0)
        beta_prev = jnp.where(has_prev, state.beta[jp], 0.0)
        aq = matvec(q)
        u = otu.tree_add_scale(aq, -beta_prev, _row(state.basis, jp))
        a = otu.tree_vdot(q, u).astype(dtype)
        gain = otu.tree_norm(aq).astype(dtype)
        scale = jnp.where(grow, jnp.maximum(scale, gain), scale)
        d_prev = jnp.where(has_prev, state.pivots[jp], 1.0)
        d = jnp.where(has_prev, a - beta_prev ** 2 / jnp.where(d_prev != 0, d_prev, 1.0), a)
        omega = otu.tree_add_scale(u, -a, q)
        beta_new = otu.tree_norm(omega).astype(dtype)
        invariant = beta_new <= _LUCKY * eps * gain
        finite = jnp.isfinite(a) & jnp.isfinite(d) & jnp.isfinite(beta_new) & jnp.isfinite(gain)
        pivot_ok = finite & ((d > _PIVOT * eps * scale) | (self.correction == "min_residual"))
        failed = grow & ~pivot_ok
        nonfinite = ~jnp.isfinite(r_norm) | (grow & ~finite)

        # rows past `size` are masked, so slot j may be written whether or not the basis grows
        basis = _set_row(state.basis, j, q)
        alpha = state.alpha.at[j].set(a)
        beta = state.beta.at[j].set(beta_new)
        pivots = state.pivots.at[j].set(d)
        q_next = otu.tree_where(grow, _safe_div(omega, beta_new, ~invariant), state.q_next)
        size = size + grow.astype(jnp.int32)
        exhausted = exhausted | (grow & invariant)

        # 4. the correction on the current basis (Galerkin, or minimal residual)
        mask = jnp.arange(self.m_max) < size
        # Q'r_k = ||r_h|| e_1 + Q'(b_k - b_h), r_h = b_h - w the restart residual (q_1 = r_h / ||r_h||):
        # equal in exact arithmetic; this form keeps the loss of orthogonality of Q out of the
        # fixed part (as conjugate gradient's recurrences do) and projects only the drift of b
        e1 = (jnp.arange(self.m_max) == 0) * r_ref
        drift = otu.tree_sub(b, b_ref)
        c = jnp.where(mask, e1 + _project(basis, drift).astype(dtype), 0.0)
        last = jnp.maximum(size - 1, 0)
        if self.correction == "galerkin":
            s = tridiagonal_spd_solve(alpha, beta, c, size)
            ts = c
        else:   # q_{j+1}'r_k = q_{j+1}'(b_k - b_h) (q_{j+1} is orthogonal to r_h); 0 when the basis is invariant
            extra = jnp.where(exhausted, 0.0, otu.tree_vdot(q_next, drift)).astype(dtype)
            tail = jnp.where(exhausted, 0.0, beta[last])
            s = _least_squares_correction(alpha, beta, c, extra, tail, size, self.m_max)
            ts = _tridiagonal_matvec(alpha, beta, s, size)
        dv, qts = _combine2(basis, s, ts)   # Q s and Q T s in one pass over the basis
        x = otu.tree_add(x_bar, dv)
        # Lanczos estimate of ||b - A x||: r - Q T s - beta_j s_j q_{j+1}
        tail = jnp.where((size > 0) & ~exhausted, beta[last] * s[last], 0.0)
        estimate = otu.tree_norm(otu.tree_add_scale(otu.tree_sub(r, qts), -tail, q_next))

        new = LanczosState(x, x_bar, w, b_ref, r_ref, basis, q_next, alpha, beta, pivots, scale, size, epoch_step + 1, m,
                           state.count + 1, active, exhausted)
        return new, 1 + restart.astype(jnp.int32), failed, nonfinite, estimate

    def solve(self, matvec, b, state, key=None):
        del key
        if not isinstance(state, LanczosState):
            raise TypeError(f"lanczos: the state must come from lanczos(...).init(b), got {type(state).__name__}.")
        if jax.tree_util.tree_structure(state.x) != jax.tree_util.tree_structure(b):
            raise ValueError("the solver state's x does not have the structure of b: "
                             f"{jax.tree_util.tree_structure(state.x)} vs {jax.tree_util.tree_structure(b)}.")
        if not self.warm_start:
            state = self.init(b)
        eps = rounding_eps(b)

        def body(carry, _):
            state, matvecs, failed, nonfinite, _ = carry
            state, mv, f, nf, est = self._step(matvec, b, state, eps)
            return (state, matvecs + mv, failed | f, nonfinite | nf, est), None

        zero = jnp.zeros((), jnp.int32)
        no = jnp.zeros((), bool)
        carry = (state, zero, no, no, jnp.zeros((), state.alpha.dtype))
        if self.steps == 1:
            carry, _ = body(carry, None)
        else:
            carry, _ = jax.lax.scan(body, carry, None, length=self.steps)
        state, matvecs, failed, nonfinite, estimate = carry
        nonfinite = nonfinite | (st.nonfinite(state.x) != st.OK)
        status = st.merge(st.flag(failed | nonfinite, st.BREAKDOWN), st.flag(nonfinite, st.NONFINITE))
        bad = status != st.OK
        state = state._replace(x=fail_where(bad, state.x), x_bar=fail_where(bad, state.x_bar),
                               w=fail_where(bad, state.w), b_ref=fail_where(bad, state.b_ref))
        x = state.x
        if self.exact_residual:
            res = residual_norm(matvec, b, x)
        else:
            res = estimate
        res = jnp.where(bad, jnp.nan, res)
        return x, state, make_info(res, matvecs, status)


def lanczos(m_max: int = 80, *, m_start=1, inc=1.1, every: int = 20, steps: int = 1, warm_start: bool = True,
            exact_residual: bool = False, correction: str = "galerkin") -> Lanczos:
    """LancBiO's dynamic Lanczos solver (Yang, Gao & Yuan, ICLR 2025, arXiv:2404.03331).

    One Lanczos vector per solve (`steps` per solve), the basis kept in the state across solves,
    restarted every m solves at v_bar = the last solution with the frozen w = A v_bar and the
    residual correction v = v_bar + Q_j s, s from `correction`: "galerkin" (default, T_j s =
    Q_j'(b - w), the authors' code) or "min_residual" (the least-squares s of minimal ||(b - w) -
    A Q_j s|| through the Lanczos relation); the module docstring states why Galerkin is the
    default. The dimension m starts at `m_start` and is multiplied by `inc` (rounded up) every
    `every` solves, capped at `m_max` (the buffer size) and at the system's dimension n. A fixed
    dimension m: `lanczos(m, m_start=m)`. The paper's synthetic-problem setting is the default:
    m_start = 1, inc = 1.1, every = 20, m_max = 80. Cost: 1 matvec per solve + 1 per restart
    (1 + 1/m on average). `warm_start=False` starts every solve from a fresh state (x0 = 0, no
    basis). See the module docstring for breakdowns and `info.residual_norm`.
    (`m_start` was called `m0` before 0.2; LancBiO's theorem uses m0 for another count, see
    `bj.algorithms.lancbio`.)
    """
    return Lanczos(m_max=m_max, m_start=as_array(m_start), inc=as_array(inc), every=every, steps=steps,
                   warm_start=warm_start, exact_residual=exact_residual, correction=correction)


__all__ = ["CORRECTIONS", "Lanczos", "LanczosState", "lanczos", "tridiagonal_spd_solve"]

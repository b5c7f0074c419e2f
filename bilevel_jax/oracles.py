"""All derivative plumbing of the toolkit: gradients, Hessian- and cross-products.

Notation:
    A = grad^2_{phi phi} f_lower   (the LL Hessian, symmetric)
    J = grad^2_{theta phi} f_lower (d_theta x d_phi), so  J v = grad_theta <grad_phi f_lower, v>
    b = grad_phi f_upper
    v ~ A^{-1} b   (the one sign convention of bilevel_jax)
    grad F = grad_theta f_upper - J v                                  (implicit gradient)

Ordering matters: `A v` and `J v` are gradients of the scalar
`<grad_phi f_lower, v>`; they are computed with one `jax.vjp` of `grad_phi f_lower` over
(theta, phi), or one forward-over-reverse `jax.jvp`, never by forming a Hessian.

Only the inexact-array leaves of `theta` and `phi` are differentiated (`eqx.partition`), so a
neural network (an equinox Module) can be `phi`; gradients and `v` are pytrees shaped like
`eqx.filter(phi, eqx.is_inexact_array)` (None at the static leaves).

Oracle counts. Every function here that evaluates f_upper or f_lower adds the oracle calls it
makes (`OracleCounts`) to the innermost open `counting()` block, at trace time:

    with oracles.counting() as tally:
        ... one outer step ...
    tally.counts          # OracleCounts: LL / UL gradients, HVPs A v, cross products J v, values

A gradient pass counts once whichever partials it returns; a linearization of grad_phi f_lower
counts its products as they are applied (`hvp` one HVP, `cross` one cross product,
`hvp_and_cross` one of each) and its gradient only when taken (`LowerLinearization.gradient`). A
block runs once per trace: code that repeats oracle calls in a loop or a `vmap` scales them
(`counting(times=n)`: `lower.lower_steps` by its steps, `gaussian_jacobian_transpose` by its
directions), and a linear solve counts its solver's own matvec count (`solve`). The Lagrangian of
a constrained LL counts its f_lower part only (`OracleCounts`, `LagrangianLinearization`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, Iterator, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from bilevel_jax.problem import BilevelProblem
from bilevel_jax.sampling import Rows, read

PyTree = Any


# ------------------------------------------------------------------ oracle counts

class OracleCounts(NamedTuple):
    """Oracle calls: gradients of f_lower / f_upper (one pass may give both partials), Hessian-
    vector products A v, cross products J v (or J^T d), and function values of f_lower / f_upper
    used on their own (the values of the value-function methods' gap; an LL step's value, passed
    to its optax rule, is part of its gradient pass).

    Only f_lower and f_upper are oracles. On a constrained LL (L = f_lower + <lambda_P, P> +
    <lambda_Q, Q>) a product with the Lagrangian counts as the same product of f_lower:
    grad^2_{phi phi} L a = A a + sum_i lambda_i grad^2 C_i a is one HVP, grad^2_{theta phi} L a
    one cross product, grad_phi L one LL gradient; the constraint functions C = (P, Q) and their
    derivatives (values, jvps, vjps, the multiplier-weighted curvature) are not counted. So a KKT
    matvec K z (`bj.hypergrad.kkt`) is one HVP, the KKT hypergradient's correction one cross
    product, and least-squares multipliers cost nothing beyond grad_phi f_lower."""

    lower_grads: jax.Array
    upper_grads: jax.Array
    hvps: jax.Array
    cross: jax.Array
    values: jax.Array = jnp.zeros((), jnp.int32)

    @staticmethod
    def of(lower_grads=0, upper_grads=0, hvps=0, cross=0, values=0) -> "OracleCounts":
        return OracleCounts(*(jnp.asarray(c, jnp.int32) for c in (lower_grads, upper_grads, hvps, cross, values)))

    def __add__(self, other):  # type: ignore[override]
        return OracleCounts(*(a + b for a, b in zip(self, other)))

    def scaled(self, upper=1, lower=1) -> "OracleCounts":
        """The UL gradients times `upper`, the LL oracles (gradients, HVPs, cross products, values)
        times `lower` (e.g. minibatch oracles per full pass over each level's data)."""
        return OracleCounts(self.lower_grads * lower, self.upper_grads * upper, self.hvps * lower,
                            self.cross * lower, self.values * lower)


def _calls(lower_grads=0, upper_grads=0, hvps=0, cross=0, values=0) -> OracleCounts:
    """Static counts (Python ints): what one oracle function adds to a `Tally`."""
    return OracleCounts(lower_grads, upper_grads, hvps, cross, values)


class Tally:
    """The oracle calls traced in a `counting` block (Python ints, or int32 arrays where a count
    depends on the data, e.g. a solver's matvecs)."""

    def __init__(self):
        self._counts = _calls()

    def add(self, counts: OracleCounts) -> None:
        self._counts = self._counts + counts

    @property
    def counts(self) -> OracleCounts:
        """The block's counts as int32 arrays."""
        return OracleCounts.of(*self._counts)


_TALLY: contextvars.ContextVar = contextvars.ContextVar("bilevel_jax_oracle_tally", default=None)


@contextlib.contextmanager
def counting(times=1) -> Iterator[Tally]:
    """Count the oracle calls traced inside the block (see the module docstring); on leaving it,
    add them times `times` to the enclosing block (0: not at all, the caller records them itself,
    e.g. selected by a `lax.cond`)."""
    tally = Tally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)
    if times:
        record(tally._counts if times == 1 else tally._counts.scaled(times, times))


def uncounted():
    """A `counting` block whose calls are not passed on (a linear solve counted by its solver)."""
    return counting(times=0)


def record(counts: OracleCounts) -> None:
    """Add `counts` to the innermost open `counting` block (nothing when none is open)."""
    tally = _TALLY.get()
    if tally is not None:
        tally.add(counts)


def solve(solver, matvec: Callable, b: PyTree, state, key=None):
    """`solver.solve(matvec, b, state, key)` counted as the solver's `info.num_matvecs` HVPs (the
    length of its loop, not the matvec calls traced once inside it; its residual diagnostic is not
    counted): `(x, state, info)`."""
    with uncounted():
        x, state, info = solver.solve(matvec, b, state, key)
    record(_calls(hvps=info.num_matvecs))
    return x, state, info


@dataclasses.dataclass(frozen=True, eq=False)
class PenalisedLower(BilevelProblem):
    """A problem whose LL objective also evaluates f_upper (a penalised objective such as
    f_upper(theta, phi, upper_batch) + lambda f_lower(theta, phi, batch): F2SA's inner loop, the
    pessimistic follower): each gradient of its LL objective counts one gradient of each level."""


def _lower_gradient(problem: BilevelProblem, n: int = 1) -> OracleCounts:
    """`n` gradients of `problem`'s LL objective (of both levels for a `PenalisedLower`)."""
    return _calls(lower_grads=n, upper_grads=n if isinstance(problem, PenalisedLower) else 0)


def differentiable(tree: PyTree) -> PyTree:
    """The inexact-array part of `tree` (None at the other leaves): what oracles differentiate."""
    return eqx.filter(tree, eqx.is_inexact_array)


def _on_diff(fn: Callable, theta: PyTree, phi: PyTree, batch: PyTree):
    """`fn` as a function of the differentiable parts of (theta, phi), and those parts (the batch
    read if it is a `sampling.Rows`)."""
    batch = read(batch)
    theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)

    def f(t, p):
        return fn(eqx.combine(t, theta_s), eqx.combine(p, phi_s), batch)

    return f, theta_d, phi_d


def over_samples(problem: Any, fn: Callable[[PyTree], PyTree], batch: PyTree) -> PyTree:
    """`fn(batch)`, or, when the problem sets `sample_chunk = c`, the mean of `fn` over the
    batch's consecutive sub-batches of c samples, one `lax.scan` step each:

        fn(batch) = (c / n) sum_j fn(batch[j c : (j + 1) c])

    which holds for every oracle `fn` (a gradient, a value, products of one linearization: all
    linear in the objective) when the objective is a mean over its batch's samples plus terms that
    do not depend on the batch. A sub-batch small enough to stay in cache is read from memory once
    for all the contractions its pass makes of it (the point of chunking: `BilevelProblem`'s
    `sample_chunk`). Leaves without a sample axis (scalars) go to every sub-batch whole; the sums
    accumulate in at least float32 (a bfloat16 oracle is summed in float32 and cast back).
    """
    size = getattr(problem, "sample_chunk", None)
    if size is None:
        return fn(read(batch))
    if isinstance(batch, Rows):   # a block not cut yet: each sub-batch read in place from the data
        n, cut = batch.size, lambda j: batch.cut(j * size, size)
    else:
        leaves = [x for x in jax.tree_util.tree_leaves(batch) if jnp.ndim(x)]
        if not leaves:
            return fn(batch)
        n = leaves[0].shape[0]
        if any(x.shape[0] != n for x in leaves):
            raise ValueError(f"sample_chunk: the batch's leaves have different leading (sample) axes "
                             f"{sorted({x.shape[0] for x in leaves})}; chunking needs one sample axis.")

        def cut(j):
            return jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, j * size, size, 0) if jnp.ndim(x) else x, batch)
    if n % size:
        raise ValueError(f"sample_chunk = {size} does not divide the batch of {n} samples (per device with a "
                         "mesh); choose a batch size that is a multiple of it.")
    if n == size:
        return fn(cut(0))

    shapes = jax.eval_shape(lambda: fn(cut(0)))
    wide = lambda dtype: jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.inexact) else dtype
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, wide(s.dtype)), shapes)

    def body(total, j):
        return jax.tree_util.tree_map(lambda t, y: t + y.astype(t.dtype), total, fn(cut(j))), None

    total, _ = jax.lax.scan(body, zeros, jnp.arange(n // size))
    return jax.tree_util.tree_map(lambda t, s: (t / (n // size)).astype(s.dtype), total, shapes)


def _grads(fn: Callable, theta, phi, batch, argnums):
    """grad of `fn` in `argnums` over the differentiable parts of (theta, phi)."""
    f, t, p = _on_diff(fn, theta, phi, batch)
    return jax.grad(f, argnums=argnums)(t, p)


def _value_and_grads(fn: Callable, theta, phi, batch, argnums):
    f, t, p = _on_diff(fn, theta, phi, batch)
    return jax.value_and_grad(f, argnums=argnums)(t, p)


def upper_value(problem: BilevelProblem, theta, phi, batch):
    """f_upper(theta, phi, batch) on its own (one value: MORBiT's objective values for its weights' ascent)."""
    record(_calls(values=1))
    return over_samples(problem, lambda b: problem.f_upper(theta, phi, b), batch)


def upper_grads(problem: BilevelProblem, theta, phi, batch):
    """(grad_theta f_upper, grad_phi f_upper) from one reverse pass."""
    record(_calls(upper_grads=1))
    return over_samples(problem, lambda b: _grads(problem.f_upper, theta, phi, b, (0, 1)), batch)


def upper_grad_theta(problem: BilevelProblem, theta, phi, batch):
    """The partial gradient grad_theta f_upper (the IG-free UL direction)."""
    record(_calls(upper_grads=1))
    return over_samples(problem, lambda b: _grads(problem.f_upper, theta, phi, b, 0), batch)


def lower_grad_phi(problem: BilevelProblem, theta, phi, batch):
    """grad_phi f_lower."""
    record(_lower_gradient(problem))
    return over_samples(problem, lambda b: _grads(problem.f_lower, theta, phi, b, 1), batch)


def lower_value_and_grad_phi(problem: BilevelProblem, theta, phi, batch):
    """(f_lower, grad_phi f_lower) from one reverse pass: an LL step's oracle, counted as one LL
    gradient (the value rides along for the optax rules that read it; a line search's further
    values of f_lower are not counted)."""
    record(_lower_gradient(problem))
    return over_samples(problem, lambda b: _value_and_grads(problem.f_lower, theta, phi, b, 1), batch)


class LowerLinearization(NamedTuple):
    """grad_phi f_lower at (theta, phi) and the linear maps of its derivative.

    Built once per point and applied to many vectors (a linear solver's iterations); each
    application counts its products (module docstring), the gradient counts when taken with
    `gradient()` (the field `grad_phi` is the same array, uncounted).
    """

    grad_phi: PyTree                      # grad_phi f_lower
    hvp: Callable[[PyTree], PyTree]       # v -> A v
    cross: Callable[[PyTree], PyTree]     # v -> J v
    hvp_and_cross: Callable[[PyTree], tuple]  # v -> (A v, J v), one pass
    cross_transpose: Callable[[PyTree], PyTree]  # d (theta-shaped) -> J^T d (phi-shaped)

    def gradient(self) -> PyTree:
        """grad_phi f_lower at the linearization point, counted as one LL gradient."""
        record(_calls(lower_grads=1))
        return self.grad_phi


def _counted(fn: Callable, counts: OracleCounts) -> Callable:
    def counted_fn(*args):
        record(counts)
        return fn(*args)
    return counted_fn


MODES = ("rev", "fwd")


def check_mode(mode: str) -> str:
    """The derivative mode of `linearize_lower`, checked up front (before any tracing)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'rev' or 'fwd', got {mode!r}.")
    return mode


def _linearization(problem: BilevelProblem, theta, phi, batch, mode: str):
    """(grad_phi f_lower, v -> (A v, J v), d -> J^T d) on one batch, uncounted (`linearize_lower`)."""
    f, t, p = _on_diff(problem.f_lower, theta, phi, batch)
    grad_phi_fn = jax.grad(f, argnums=1)

    def cross_transpose(d):
        return jax.jvp(lambda t_: grad_phi_fn(t_, p), (t,), (d,))[1]

    if mode == "rev":
        g_phi, pullback = jax.vjp(grad_phi_fn, t, p)

        def hvp_and_cross(v):
            jv, av = pullback(v)
            return av, jv

    else:  # "fwd" (checked by the callers, before tracing: `check_mode`)
        (_, g_phi), push = jax.linearize(lambda p_: jax.grad(f, argnums=(0, 1))(t, p_), p)

        def hvp_and_cross(v):
            jv, av = push(v)
            return av, jv

    return g_phi, hvp_and_cross, cross_transpose


def linearize_lower(problem: BilevelProblem, theta, phi, batch, mode: str = "rev") -> LowerLinearization:
    """Linearize grad_phi f_lower at (theta, phi).

    mode="rev": one `jax.vjp` of grad_phi f_lower over (theta, phi); its pullback maps v to
      (J v, A^T v) = (J v, A v) in one backward pass.
    mode="fwd": one `jax.linearize` (forward-over-reverse) of phi -> grad_{(theta, phi)} f_lower;
      its pushforward along v is (J v, A v).

    With the problem's `sample_chunk` set, the gradient and every application run over the
    batch's sub-batches (`over_samples`), each linearizing its sub-batch again.

    Which to use (measured with `python -m benchmarks --only second_order`: hyper-cleaning of a
    two-hidden-layer MLP, widths 64 / 256 / 1024, float32, 2-core CPU, process CPU time): with one
    product per linearization (single-loop steps: soba's fused triple, `unrolled_hypergradient(
    mode="mixed")`) "fwd" holds 10-20% less temporary memory and takes 0.86-0.92x the time of
    "rev"; with many products per linearization (cg(10) in `bj.hypergradient`) the two hold the
    same memory and time within noise (0.87-1.05x). The results agree to rounding. "rev" stays the
    default; prefer "fwd" for single-loop methods on networks, and time both on your own
    objective (the ratio depends on how XLA compiles its two passes).
    """
    if getattr(problem, "sample_chunk", None) is None:
        g_phi, hvp_and_cross, cross_transpose = _linearization(problem, theta, phi, batch, mode)
    else:
        def on_samples(k):
            return lambda *args: over_samples(
                problem, lambda b: _linearization(problem, theta, phi, b, mode)[k](*args), batch)
        g_phi = over_samples(problem, lambda b: _linearization(problem, theta, phi, b, mode)[0], batch)
        hvp_and_cross, cross_transpose = on_samples(1), on_samples(2)
    return LowerLinearization(
        grad_phi=g_phi,
        hvp=_counted(lambda v: hvp_and_cross(v)[0], _calls(hvps=1)),
        cross=_counted(lambda v: hvp_and_cross(v)[1], _calls(cross=1)),
        hvp_and_cross=_counted(hvp_and_cross, _calls(hvps=1, cross=1)),
        cross_transpose=_counted(cross_transpose, _calls(cross=1)),
    )


def hvp(problem: BilevelProblem, theta, phi, v, batch, mode: str = "rev"):
    """A v = grad^2_{phi phi} f_lower v."""
    return linearize_lower(problem, theta, phi, batch, mode).hvp(v)


def cross(problem: BilevelProblem, theta, phi, v, batch, mode: str = "rev"):
    """J v = grad^2_{theta phi} f_lower v = grad_theta <grad_phi f_lower, v>."""
    return linearize_lower(problem, theta, phi, batch, mode).cross(v)


def grad_hvp_cross(problem: BilevelProblem, theta, phi, v, batch, mode: str = "rev"):
    """(grad_phi f_lower, A v, J v) from one vjp (or one jvp) of grad_phi f_lower: the fused
    triple of a single-loop step (SOBA's D_phi, and the second-order parts of D_v and D_theta),
    on each sub-batch in one pass with the problem's `sample_chunk`."""
    def triple(b):
        g_phi, hvp_and_cross, _ = _linearization(problem, theta, phi, b, mode)
        return (g_phi, *hvp_and_cross(v))

    record(_calls(lower_grads=1, hvps=1, cross=1))
    return over_samples(problem, triple, batch)


class StepTranspose(NamedTuple):
    """One adjoint step of a differentiated LL step (see `lower_step_transpose`)."""

    cross: PyTree   # J w: this step's contribution to the theta-gradient
    phi: PyTree     # the adjoint of phi before the step
    state: PyTree   # the adjoint of the optimizer state's inexact leaves before the step


def lower_step_transpose(problem: BilevelProblem, rule: Callable, theta, phi, opt_state, batch, a_phi, a_state
                         ) -> StepTranspose:
    """The transpose of one LL step's Jacobian applied to an adjoint, in mixed mode (Kemaev,
    Calian, Zintgraf, Farquhar, van Hasselt, "Scalable Meta-Learning via Mixed-Mode
    Differentiation", ICML 2025, arXiv:2505.00793).

    The step is (phi', s') = rule(G, s, phi) with G = grad_phi f_lower(theta, phi, batch) and
    `rule(G, s, phi_d) -> (phi_d', s')` an optimizer's update with the gradient as an input (no
    derivative of f_lower inside). With (a_phi, a_state) the adjoint of (phi', s'):

        (w, a_state_prev, a_rule) = (d rule / d(G, s, phi))^T (a_phi, a_state)
        a_phi_prev = a_rule + A w,       cross = J w

    The rule is transposed by reverse mode (parameter-sized, elementwise for optax rules); A w and
    J w come from one forward-over-reverse product of grad f_lower (`linearize_lower(mode="fwd")`,
    using A = A^T), so no intermediate of f_lower's reverse pass outlives the step. For plain SGD
    (rule G -> phi - lr G) it is a_phi_prev = a_phi - lr A a_phi, cross = -lr J a_phi. `a_state`
    and the returned state adjoint are shaped like the inexact leaves of `opt_state` (integer
    leaves such as step counts carry no adjoint)."""
    s_d, s_rest = eqx.partition(opt_state, eqx.is_inexact_array)
    lin = linearize_lower(problem, theta, phi, batch, mode="fwd")

    def rule_d(g, s, p):
        p_new, s_new = rule(g, eqx.combine(s, s_rest), p)
        return p_new, differentiable(s_new)

    _, pull = jax.vjp(rule_d, lin.grad_phi, s_d, differentiable(phi))
    w, a_state_prev, a_rule = pull((a_phi, a_state))
    aw, jw = lin.hvp_and_cross(w)
    return StepTranspose(cross=jw, phi=otu.tree_add(a_rule, aw), state=a_state_prev)


# ------------------------------------------------------------------ first-order / Hessian-free oracles

def lower_grads(problem: BilevelProblem, theta, phi, batch):
    """(grad_theta f_lower, grad_phi f_lower) from one reverse pass."""
    record(_lower_gradient(problem))
    return over_samples(problem, lambda b: _grads(problem.f_lower, theta, phi, b, (0, 1)), batch)


def lower_value_and_grads(problem: BilevelProblem, theta, phi, batch):
    """(f_lower, (grad_theta f_lower, grad_phi f_lower)) from one reverse pass: the value-function
    oracle of the value-function methods (g(x, y) and its gradient, Danskin's grad_theta g(x, z))."""
    record(_lower_gradient(problem) + _calls(values=1))
    return over_samples(problem, lambda b: _value_and_grads(problem.f_lower, theta, phi, b, (0, 1)), batch)


def finite_difference_products(problem: BilevelProblem, theta, phi, v, batch, delta):
    """(A v, J v) by central differences of the LL gradient along v, no second-order autodiff:

        A v ~ (grad_phi f_lower(theta, phi + delta v) - grad_phi f_lower(theta, phi - delta v)) / (2 delta)
        J v ~ (grad_theta f_lower(theta, phi + delta v) - grad_theta f_lower(theta, phi - delta v)) / (2 delta)

    Two gradient passes. The error is O(delta^2 ||v||^3) times the third derivative of f_lower in
    phi (zero for a quadratic), plus the round-off eps ||grad f_lower|| / delta of the difference:
    in float64 delta ~ 1e-5 balances the two, in float32 delta ~ 1e-2 (relative to ||v||) does.
    """
    f, t, p = _on_diff(problem.f_lower, theta, phi, batch)
    grad = jax.grad(f, argnums=(0, 1))
    record(_lower_gradient(problem, 2))
    (gt_plus, gp_plus) = grad(t, otu.tree_add_scale(p, delta, v))
    (gt_minus, gp_minus) = grad(t, otu.tree_add_scale(p, -delta, v))
    scale = 0.5 / delta
    return (otu.tree_scale(scale, otu.tree_sub(gp_plus, gp_minus)),
            otu.tree_scale(scale, otu.tree_sub(gt_plus, gt_minus)))


def gaussian_jacobian_transpose(fn: Callable[[PyTree], PyTree], x, w, directions, mu, base=None):
    """A zeroth-order estimate of (d fn / d x)^T w from perturbations of x, no derivative of fn:

        (1/Q) sum_j u_j <(fn(x + mu u_j) - fn(x)) / mu, w>,     directions = [u_1, ..., u_Q]

    (the Q runs of fn vmapped). With E[u u^T] = I it is unbiased up to O(mu) (exactly unbiased
    when fn is affine); `directions` has a leading axis Q over x's structure. `base` is fn(x) when
    the caller has it (else fn is called once more). Returns (estimate, fn(x)); fn is called Q
    (+ 1) times, and so are the oracles it calls counted (`counting`).
    """
    y0 = fn(x) if base is None else base

    def one(u):
        y = fn(otu.tree_add_scale(x, mu, u))
        return otu.tree_vdot(otu.tree_sub(y, y0), w) / mu

    with counting(times=jax.tree_util.tree_leaves(directions)[0].shape[0]):
        coeffs = jax.vmap(one)(directions)
    estimate = jax.tree_util.tree_map(lambda u: jax.numpy.tensordot(coeffs, u, axes=1) / coeffs.shape[0],
                                      directions)
    return estimate, y0


def lower_hessian_blocks(problem: BilevelProblem, theta, phi, batch):
    """The dense blocks (A, J) of grad_phi f_lower's derivative at (theta, phi) as matrices over the
    flattened differentiable leaves: A = grad^2_{phi phi} f_lower (n_phi x n_phi), J =
    grad^2_{theta phi} f_lower (n_theta x n_phi). One forward-mode Jacobian (n_theta + n_phi
    JVPs of grad_phi f_lower, counted as n_phi HVPs and n_theta cross products): for small problems
    and methods that track dense estimates (STABLE's Hessian tracking); everything else stays
    matrix-free."""
    f, t, p = _on_diff(problem.f_lower, theta, phi, batch)
    t_flat, unravel_t = ravel_pytree(t)
    p_flat, unravel_p = ravel_pytree(p)

    def grad_phi_flat(t_, p_):
        return ravel_pytree(jax.grad(f, argnums=1)(unravel_t(t_), unravel_p(p_)))[0]

    record(_calls(hvps=p_flat.size, cross=t_flat.size))
    hessian = jax.jacfwd(lambda p_: grad_phi_flat(t_flat, p_))(p_flat)      # (n_phi, n_phi)
    cross = jax.jacfwd(lambda t_: grad_phi_flat(t_, p_flat))(t_flat)        # (n_phi, n_theta)
    return hessian, cross.T


# ------------------------------------------------------------------ constrained lower level (KKT)

class Multipliers(NamedTuple):
    """Lagrange multipliers of a constrained LL: `inequality` (lambda_P >= 0, shaped like
    P(theta, phi)) and `equality` (lambda_Q, shaped like Q(theta, phi)); None where absent."""

    inequality: PyTree = None
    equality: PyTree = None


def _constraint_fn(problem: BilevelProblem, theta, phi):
    """(t, p) -> (P, Q) on the differentiable parts of (theta, phi) (None where absent)."""
    theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)

    def cons(t, p):
        th, ph = eqx.combine(t, theta_s), eqx.combine(p, phi_s)
        ineq = None if problem.lower_inequality is None else problem.lower_inequality(th, ph)
        eq = None if problem.lower_equality is None else problem.lower_equality(th, ph)
        return ineq, eq

    return cons, theta_d, phi_d


def constraint_values(problem: BilevelProblem, theta, phi) -> Multipliers:
    """(P(theta, phi), Q(theta, phi)) as a `Multipliers`-shaped pair (None where absent)."""
    cons, t, p = _constraint_fn(problem, theta, phi)
    return Multipliers(*cons(t, p))


def kkt_map(problem: BilevelProblem, theta, phi, multipliers: Multipliers, batch):
    """G(theta, phi, lambda_P, lambda_Q) = (grad_phi L, lambda_P * P, Q), L = f_lower + <lambda_P, P> +
    <lambda_Q, Q>: zero at a KKT point. One LL gradient (the constraint terms are not oracle calls)."""
    cons, t, p = _constraint_fn(problem, theta, phi)
    values, pull = jax.vjp(cons, t, p)
    grad_l = otu.tree_add(lower_grad_phi(problem, theta, phi, batch), pull(tuple(multipliers))[1])
    comp = None if values[0] is None else otu.tree_mul(multipliers.inequality, values[0])
    return grad_l, comp, values[1]


class ConstraintLinearization(NamedTuple):
    """P, Q at (theta, phi) and the linear maps of their derivatives (no Jacobian is formed)."""

    values: Multipliers                       # (P, Q)
    jvp_phi: Callable[[PyTree], Multipliers]  # a -> (grad_phi P a, grad_phi Q a)
    vjp: Callable[[Multipliers], tuple]       # (mu_P, mu_Q) -> (grad_theta P'mu_P + grad_theta Q'mu_Q, grad_phi ...)


def linearize_constraints(problem: BilevelProblem, theta, phi) -> ConstraintLinearization:
    """One `jax.linearize` of (P, Q) in phi and one `jax.vjp` in (theta, phi)."""
    cons, t, p = _constraint_fn(problem, theta, phi)
    values, pull = jax.vjp(cons, t, p)
    _, push = jax.linearize(lambda p_: cons(t, p_), p)
    return ConstraintLinearization(Multipliers(*values), lambda a: Multipliers(*push(a)),
                                   lambda mu: pull(tuple(mu)))


class LagrangianLinearization(NamedTuple):
    """The derivative of (grad_phi L, P, Q) over (theta, phi) at fixed multipliers lambda, as its
    transpose (the (theta, phi) columns of the KKT Jacobian): with A_L = grad^2_{phi phi} L =
    A + sum_i lambda_i grad^2_{phi phi} C_i and J_L = grad^2_{theta phi} L = J + sum_i lambda_i
    grad^2_{theta phi} C_i (C = (P, Q)),

        pullback(a, mu) = (J_L a + grad_theta C' mu,  A_L a + grad_phi C' mu)      (theta, phi parts)

    `pullback_phi` and `pullback_theta` are its two parts alone. Counts (`OracleCounts`): the f_lower
    part comes from `lower` (A a one HVP, J a one cross product); the constraint part (`constraint`:
    the multiplier-weighted curvature of C and C's vjp) is no oracle call of f and is not counted. So
    `pullback` counts one HVP and one cross product, `pullback_phi` one HVP, `pullback_theta` one
    cross product. grad_phi f_lower counts when taken (`lower.gradient()`)."""

    lower: LowerLinearization
    constraints: ConstraintLinearization
    constraint: Callable[[PyTree, Multipliers], tuple]   # (a, mu) -> the constraint part of `pullback`

    def pullback(self, a, mu: Multipliers) -> tuple:
        av, jv = self.lower.hvp_and_cross(a)
        ct, cp = self.constraint(a, mu)
        return otu.tree_add(jv, ct), otu.tree_add(av, cp)

    def pullback_phi(self, a, mu: Multipliers) -> PyTree:
        return otu.tree_add(self.lower.hvp(a), self.constraint(a, mu)[1])

    def pullback_theta(self, a, mu: Multipliers) -> PyTree:
        return otu.tree_add(self.lower.cross(a), self.constraint(a, mu)[0])


def linearize_lagrangian(problem: BilevelProblem, theta, phi, multipliers: Multipliers, batch,
                         lower: Optional[LowerLinearization] = None,
                         cons: Optional[ConstraintLinearization] = None) -> LagrangianLinearization:
    """Linearize (grad_phi L, P, Q) at (theta, phi) with the multipliers held fixed: f_lower's part
    is `lower` (`linearize_lower`, built here when not given), the constraints' part one `jax.vjp` of
    (grad_phi <lambda, C>, C) over (theta, phi)."""
    lower = linearize_lower(problem, theta, phi, batch) if lower is None else lower
    cons = linearize_constraints(problem, theta, phi) if cons is None else cons
    cfn, t, p = _constraint_fn(problem, theta, phi)

    def weighted(t_, p_):   # <lambda, C(t_, p_)>
        return sum(otu.tree_vdot(m, c) for m, c in zip(multipliers, cfn(t_, p_)) if c is not None)

    def rows(t_, p_):       # (grad_phi <lambda, C>, C)
        return jax.grad(weighted, argnums=1)(t_, p_), cfn(t_, p_)

    _, pull = jax.vjp(rows, t, p)
    return LagrangianLinearization(lower, cons, lambda a, mu: pull((a, tuple(mu))))


def kkt_jacobians_dense(problem: BilevelProblem, theta, phi, multipliers: Multipliers, batch):
    """The dense reference: the Jacobians of G = kkt_map in z = (phi, lambda_P, lambda_Q) and in
    theta, materialised with `jax.jacfwd` on flat vectors (the only place a KKT Jacobian is
    formed; small problems and tests only). Returns `(G_z, G_theta, unravel_z, unravel_theta)`.
    Counted as `lower_hessian_blocks` is: n_phi HVPs and n_theta cross products (the multiplier
    columns are the constraints' alone)."""
    theta_d, theta_s = eqx.partition(theta, eqx.is_inexact_array)
    phi_d, phi_s = eqx.partition(phi, eqx.is_inexact_array)
    z, unravel_z = ravel_pytree((phi_d, tuple(multipliers)))
    t, unravel_t = ravel_pytree(theta_d)

    def g(t_flat, z_flat):
        p, mu = unravel_z(z_flat)
        out = kkt_map(problem, eqx.combine(unravel_t(t_flat), theta_s), eqx.combine(p, phi_s), Multipliers(*mu), batch)
        return ravel_pytree(out)[0]

    record(_calls(hvps=ravel_pytree(phi_d)[0].size, cross=t.size))
    with uncounted():
        return jax.jacfwd(g, argnums=1)(t, z), jax.jacfwd(g, argnums=0)(t, z), unravel_z, unravel_t

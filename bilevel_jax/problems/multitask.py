"""Multi-task problems for the robust multi-objective algorithm `bj.algorithms.morbit` and the
multi-block min-max bilevel algorithm `bj.algorithms.mmb`.

1. `multitask_quadratic`: n quadratic bilevel pairs sharing theta, with closed-form LL solutions
   and task objectives, and a dense min-max reference for the robust solution (the ground truth
   of the tests):

       f_l,i(theta, phi) = 0.5 phi' A_i phi - phi' B_i theta           phi_i*(theta) = A_i^{-1} B_i theta
       f_u,i(theta, phi) = 0.5 ||phi - c_i||^2 + 0.5 rho ||theta||^2
       F_i(theta) = 0.5 theta' Q_i theta - q_i' theta + 0.5 ||c_i||^2,
       Q_i = M_i'M_i + rho I,  q_i = M_i' c_i,  M_i = A_i^{-1} B_i.

   The task matrices travel as data (a leading task axis), so one pair of functions serves all
   tasks. The robust solution solves the dual max_{lambda in Delta_n} D(lambda) - (mu/2)||lambda - 1/n||^2,
   D(lambda) = min_theta sum_i lambda_i F_i(theta) (a convex-concave saddle: strong duality), by
   projected gradient ascent with grad D(lambda)_i = F_i(theta(lambda)) (Danskin), theta(lambda) =
   (sum lambda_i Q_i)^{-1} sum lambda_i q_i; `RobustReference.gap` is its duality gap.

2. `min_max_quadratic`: m quadratic blocks of the multi-block min-max bilevel class
   (`bj.MinMaxBilevelProblem`), each with its own dual block y_i and LL phi_i, and the saddle point
   of the reduced function from one dense float64 solve of its stationarity conditions.

3. `sinusoid_tasks`: the sinusoid regression tasks of MORBiT's robust meta-regression (Gu, Lu,
   Ram, Weng, ICLR 2023, arXiv:2203.01924): y = a sin(b x + c), amplitude a ~ U(0.1, 5), frequency
   b ~ U(1, 3), phase c ~ U(0, pi), inputs x ~ U(-5, 5); a shared embedding h_theta (an equinox
   MLP) as theta and a linear head w_i per task as phi_i:

       f_l,i(theta, w_i) = mean_support (h_theta(x)' w_i - y)^2 + (reg/2) ||w_i||^2
       f_u,i(theta, w_i) = mean_query (h_theta(x)' w_i - y)^2

   (The authors' code regularises with the unsquared norm 0.01 ||w||_2, which is neither smooth at
   0 nor strongly convex; the implicit hypergradient needs a strongly convex LL, hence the squared
   ridge here.) `head_solution` is the closed-form ridge head, used for the evaluation metrics.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import check_positive_int
from bilevel_jax.multi_objective import MinMaxBilevelProblem, MultiObjectiveProblem

PyTree = Any


# ------------------------------------------------------------------------------------ quadratic
def _quad_lower(theta, phi, batch):
    A, B = batch
    return 0.5 * phi @ A @ phi - phi @ (B @ theta)


def _quad_upper(theta, phi, batch, rho):
    (c,) = batch
    return 0.5 * jnp.sum((phi - c) ** 2) + 0.5 * rho * theta @ theta


class _QuadUpper(eqx.Module):
    rho: float = eqx.field(static=True)

    def __call__(self, theta, phi, batch):
        return _quad_upper(theta, phi, batch, self.rho)


class RobustReference(NamedTuple):
    """The dense min-max reference: theta*, lambda*, the task values F_i(theta*) and the duality
    gap max_lambda [sum lambda_i F_i(theta*) - reg] - [D(lambda*) - reg] (0 at the saddle point)."""

    theta: np.ndarray
    lam: np.ndarray
    values: np.ndarray
    gap: float


class MultitaskQuadratic(NamedTuple):
    problem: MultiObjectiveProblem
    data: tuple              # ((c,), (A, B)) with a leading task axis
    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    rho: float

    @property
    def num_tasks(self) -> int:
        return self.A.shape[0]

    def _M(self):
        return np.linalg.solve(self.A, self.B)

    def _Qq(self):
        M = self._M()
        Q = np.einsum("nij,nik->njk", M, M) + self.rho * np.eye(self.B.shape[2])
        q = np.einsum("nij,ni->nj", M, self.c)
        return Q, q

    def phi_star(self, theta) -> np.ndarray:
        """phi_i*(theta) = A_i^{-1} B_i theta, stacked (n, d_phi)."""
        return self._M() @ np.asarray(theta)

    def values(self, theta) -> np.ndarray:
        """F_i(theta) = f_u,i(theta, phi_i*(theta)), shape (n,)."""
        Q, q = self._Qq()
        theta = np.asarray(theta)
        return 0.5 * np.einsum("j,njk,k->n", theta, Q, theta) - q @ theta + 0.5 * np.sum(self.c ** 2, axis=1)

    def weighted_solution(self, lam) -> np.ndarray:
        """argmin_theta sum_i lam_i F_i(theta) = (sum lam_i Q_i)^{-1} sum lam_i q_i."""
        Q, q = self._Qq()
        lam = np.asarray(lam, np.float64)
        return np.linalg.solve(np.einsum("n,njk->jk", lam, Q), lam @ q)

    def average_solution(self) -> np.ndarray:
        """The multi-task (uniform weights) solution argmin_theta (1/n) sum_i F_i(theta)."""
        return self.weighted_solution(np.full(self.num_tasks, 1.0 / self.num_tasks))

    def robust_solution(self, mu: float = 0.0, iters: int = 20000) -> RobustReference:
        """The robust solution of min_theta max_{lambda in Delta_n} sum lambda_i F_i(theta) -
        (mu/2)||lambda - 1/n||^2, by projected (sorting-based simplex projection) gradient ascent on
        the dual, in float64 NumPy, for `iters` steps or until lambda is a fixed point of the ascent map
        (about 220 steps on the 3-task problems)."""
        n = self.num_tasks
        lam = np.full(n, 1.0 / n)
        Q, _ = self._Qq()
        step = 1.0 / (max(np.abs(self.values(self.average_solution())).max(), 1.0) * 10 + mu)
        for _ in range(iters):
            grad = self.values(self.weighted_solution(lam)) - mu * (lam - 1.0 / n)
            new = _simplex_np(lam + step * grad)
            if np.array_equal(new, lam):   # a fixed point of the ascent map: every further iterate is lam
                break
            lam = new
        theta = self.weighted_solution(lam)
        vals = self.values(theta)
        reg = lambda l: 0.5 * mu * np.sum((l - 1.0 / n) ** 2)
        # the primal value: max over the simplex of the regularised inner objective at theta
        best = _simplex_np(1.0 / n + vals / mu) if mu > 0 else np.eye(n)[np.argmax(vals)]
        primal = best @ vals - reg(best)
        dual = lam @ vals - reg(lam)
        return RobustReference(theta, lam, vals, float(primal - dual))


def _simplex_np(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort and threshold), NumPy."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(x) + 1) > 0)[0][-1]
    return np.maximum(x - css[rho] / (rho + 1.0), 0.0)


def multitask_quadratic(seed: int = 0, num_tasks: int = 3, dim_upper: int = 2, dim_lower: int = 3, rho: float = 0.5,
                        spread: float = 2.0) -> MultitaskQuadratic:
    """n quadratic bilevel pairs (see the module docstring): A_i SPD with eigenvalues in [1, 3],
    B_i Gaussian, targets c_i = spread * Gaussian (NumPy `seed`), float64 NumPy arrays, data as JAX arrays."""
    check_positive_int("num_tasks", num_tasks)
    rs = np.random.RandomState(seed)
    A, B, c = [], [], []
    for _ in range(num_tasks):
        U, _ = np.linalg.qr(rs.randn(dim_lower, dim_lower))
        A.append(U @ np.diag(rs.uniform(1.0, 3.0, dim_lower)) @ U.T)
        B.append(rs.randn(dim_lower, dim_upper))
        c.append(spread * rs.randn(dim_lower))
    A, B, c = np.stack(A), np.stack(B), np.stack(c)
    problem = MultiObjectiveProblem(_QuadUpper(rho), _quad_lower, num_tasks=num_tasks)
    data = ((jnp.asarray(c),), (jnp.asarray(A), jnp.asarray(B)))
    return MultitaskQuadratic(problem, data, A, B, c, rho)


# ----------------------------------------------------------------------------- min-max quadratic
class _MinMaxUpper(eqx.Module):
    """f_i(theta, y, phi) = 0.5||phi - c_i||^2 + 0.5 rho||theta||^2 + y'(C_i phi + D_i theta - e_i) - 0.5 sigma||y||^2."""

    rho: float = eqx.field(static=True)
    sigma: float = eqx.field(static=True)

    def __call__(self, theta, y, phi, batch):
        c, C, D, e = (x[0] for x in batch)   # the block's one sample
        return (0.5 * jnp.sum((phi - c) ** 2) + 0.5 * self.rho * theta @ theta + y @ (C @ phi + D @ theta - e)
                - 0.5 * self.sigma * y @ y)


class MinMaxReference(NamedTuple):
    """The saddle point of the reduced min-max function: theta*, y* (m, p), phi_i*(theta*) (m, q)."""

    theta: np.ndarray
    y: np.ndarray
    phi: np.ndarray


class MinMaxQuadratic(NamedTuple):
    problem: MinMaxBilevelProblem
    data: tuple              # ((c, C, D, e), (A, B)) with a leading block axis (then one sample for f_i)
    A: np.ndarray
    B: np.ndarray
    c: np.ndarray
    C: np.ndarray
    D: np.ndarray
    e: np.ndarray
    rho: float
    sigma: float

    @property
    def num_blocks(self) -> int:
        return self.A.shape[0]

    def phi_star(self, theta) -> np.ndarray:
        """phi_i*(theta) = A_i^{-1} B_i theta, stacked (m, d_phi)."""
        return np.linalg.solve(self.A, self.B) @ np.asarray(theta)

    def saddle_point(self) -> MinMaxReference:
        """The saddle point of Phi(theta, y) = (1/m) sum_i f_i(theta, y_i, M_i theta), M_i = A_i^{-1} B_i,
        from its stationarity conditions (one dense float64 solve), with K_i = C_i M_i + D_i:

            sum_i (M_i'M_i + rho I) theta + sum_i K_i' y_i = sum_i M_i' c_i,   K_i theta - sigma y_i = e_i.

        Phi is strongly convex in theta (rho > 0) and strongly concave in y (sigma > 0): the saddle is unique."""
        m, d, p = self.num_blocks, self.B.shape[2], self.C.shape[1]
        M = np.linalg.solve(self.A, self.B)
        K = self.C @ M + self.D
        H = np.zeros((d + m * p, d + m * p))
        rhs = np.zeros(d + m * p)
        H[:d, :d] = np.einsum("nij,nik->jk", M, M) + m * self.rho * np.eye(d)
        rhs[:d] = np.einsum("nij,ni->j", M, self.c)
        for i in range(m):
            rows = slice(d + i * p, d + (i + 1) * p)
            H[:d, rows] = K[i].T
            H[rows, :d] = K[i]
            H[rows, rows] = -self.sigma * np.eye(p)
            rhs[rows] = self.e[i]
        z = np.linalg.solve(H, rhs)
        theta, y = z[:d], z[d:].reshape(m, p)
        return MinMaxReference(theta, y, M @ theta)


def min_max_quadratic(seed: int = 0, num_blocks: int = 3, dim_upper: int = 2, dim_dual: int = 2, dim_lower: int = 3,
                      rho: float = 0.5, sigma: float = 1.0, coupling: float = 0.5) -> MinMaxQuadratic:
    """m quadratic blocks of the multi-block min-max bilevel class (`bj.MinMaxBilevelProblem`):

        g_i(theta, phi) = 0.5 phi'A_i phi - phi'B_i theta,        phi_i*(theta) = A_i^{-1} B_i theta
        f_i(theta, y, phi) = 0.5||phi - c_i||^2 + 0.5 rho||theta||^2 + y'(C_i phi + D_i theta - e_i) - 0.5 sigma||y||^2

    (f_i couples y with both phi and theta, so the LL's linear system depends on y_i), A_i SPD with
    eigenvalues in [1, 3], B_i, c_i, e_i Gaussian, C_i, D_i `coupling` x Gaussian (NumPy `seed`);
    `saddle_point()` is the dense reference."""
    check_positive_int("num_blocks", num_blocks)
    rs = np.random.RandomState(seed)
    A = []
    for _ in range(num_blocks):
        U, _ = np.linalg.qr(rs.randn(dim_lower, dim_lower))
        A.append(U @ np.diag(rs.uniform(1.0, 3.0, dim_lower)) @ U.T)
    A = np.stack(A)
    B = rs.randn(num_blocks, dim_lower, dim_upper)
    c = rs.randn(num_blocks, dim_lower)
    C = coupling * rs.randn(num_blocks, dim_dual, dim_lower)
    D = coupling * rs.randn(num_blocks, dim_dual, dim_upper)
    e = rs.randn(num_blocks, dim_dual)
    problem = MinMaxBilevelProblem(_MinMaxUpper(rho, sigma), _quad_lower, num_blocks=num_blocks)
    upper = tuple(jnp.asarray(x[:, None]) for x in (c, C, D, e))   # UL data: one sample per block
    data = (upper, (jnp.asarray(A), jnp.asarray(B)))
    return MinMaxQuadratic(problem, data, A, B, c, C, D, e, rho, sigma)


# ------------------------------------------------------------------------------------- sinusoids
def embed(theta, x):
    """h_theta(x) for a batch of scalar inputs x (m,) -> (m, embed_dim)."""
    return jax.vmap(lambda xi: theta(xi[None]))(x)


def _mse(theta, w, batch):
    x, y = batch
    return jnp.mean((embed(theta, x) @ w - y) ** 2)


class SinusoidLower(eqx.Module):
    """f_l,i(theta, w_i) = mean (h_theta(x)'w_i - y)^2 + (reg/2)||w_i||^2."""

    reg: float = eqx.field(static=True, default=0.01)

    def __call__(self, theta, w, batch):
        return _mse(theta, w, batch) + 0.5 * self.reg * w @ w


def sinusoid_upper(theta, w, batch):
    """f_u,i(theta, w_i) = mean (h_theta(x)'w_i - y)^2 on the task's query samples."""
    return _mse(theta, w, batch)


class SinusoidTasks(NamedTuple):
    problem: MultiObjectiveProblem
    data: tuple              # ((x_query, y_query), (x_support, y_support)), each (n, m)
    amplitude: jax.Array
    frequency: jax.Array
    phase: jax.Array
    reg: float


def sample_sinusoids(key, num_tasks: int, num_samples: int):
    """Task parameters and inputs: a ~ U(0.1, 5), b ~ U(1, 3), c ~ U(0, pi), x ~ U(-5, 5)."""
    ka, kb, kc, kx = jax.random.split(key, 4)
    a = jax.random.uniform(ka, (num_tasks,), minval=0.1, maxval=5.0)
    b = jax.random.uniform(kb, (num_tasks,), minval=1.0, maxval=3.0)
    c = jax.random.uniform(kc, (num_tasks,), minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(kx, (num_tasks, num_samples), minval=-5.0, maxval=5.0)
    return a, b, c, x


def sinusoid_values(a, b, c, x):
    """y = a sin(b x + c), per task (broadcast over the sample axis)."""
    return a[:, None] * jnp.sin(b[:, None] * x + c[:, None])


def sinusoid_tasks(key, num_tasks: int = 20, support: int = 100, query: int = 100, reg: float = 0.01,
                   dtype=None) -> SinusoidTasks:
    """`num_tasks` sinusoid tasks with `support` LL samples and `query` UL samples each (an
    algorithm draws its shots from these pools with `batch_size`)."""
    check_positive_int("num_tasks", num_tasks)
    dtype = dtype or jnp.result_type(float)
    k_task, k_s, k_q = jax.random.split(key, 3)
    a, b, c, _ = sample_sinusoids(k_task, num_tasks, 1)
    xs = jax.random.uniform(k_s, (num_tasks, support), minval=-5.0, maxval=5.0).astype(dtype)
    xq = jax.random.uniform(k_q, (num_tasks, query), minval=-5.0, maxval=5.0).astype(dtype)
    data = ((xq, sinusoid_values(a, b, c, xq).astype(dtype)), (xs, sinusoid_values(a, b, c, xs).astype(dtype)))
    problem = MultiObjectiveProblem(sinusoid_upper, SinusoidLower(reg), num_tasks=num_tasks)
    return SinusoidTasks(problem, data, a, b, c, reg)


def embedding_mlp(key, embed_dim: int = 10, width: int = 80, depth: int = 2, dtype=None) -> eqx.nn.MLP:
    """The shared embedding of the sinusoid experiment: 1 -> 80 -> 80 -> 10, ReLU."""
    mlp = eqx.nn.MLP(1, embed_dim, width, depth, activation=jax.nn.relu, key=key)
    dtype = dtype or jnp.result_type(float)
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, mlp)


def head_solution(theta, batch, reg: float) -> jax.Array:
    """The ridge head argmin_w mean (h_theta(x)'w - y)^2 + (reg/2)||w||^2 in closed form:
    w = (2 H'H/m + reg I)^{-1} (2 H'y/m)."""
    x, y = batch
    H = embed(theta, x)
    m = x.shape[0]
    return jnp.linalg.solve(2.0 * H.T @ H / m + reg * jnp.eye(H.shape[1], dtype=H.dtype), 2.0 * H.T @ y / m)


def task_losses(theta, tasks_data, reg: float, shots: Optional[int] = None) -> jax.Array:
    """F_i at the closed-form heads: fit w_i on the support set (its first `shots` samples), report
    the mean squared error on the query set; shape (n,)."""
    query, support = tasks_data
    if shots is not None:
        support = jax.tree_util.tree_map(lambda a: a[:, :shots], support)

    def one(q, s):
        return _mse(theta, head_solution(theta, s, reg), q)

    return jax.vmap(one)(query, support)


__all__ = ["MinMaxQuadratic", "MinMaxReference", "MultitaskQuadratic", "RobustReference", "SinusoidLower", "SinusoidTasks", "embed", "embedding_mlp",
           "head_solution", "min_max_quadratic", "multitask_quadratic", "sample_sinusoids", "sinusoid_tasks", "sinusoid_upper",
           "sinusoid_values", "task_losses"]

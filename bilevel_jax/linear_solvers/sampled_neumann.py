"""The truncated Neumann series with an independent stochastic Hessian per factor: StocBiO's
estimator (Ji, Yang & Liang, "Bilevel Optimization: Convergence Analysis and Enhanced Design",
2021, arXiv:2010.07962, eq. 5):

    x = eta * sum_{q=0}^{N-1} prod_{j=1}^{q} (I - eta A_{xi_j}) b,
    r_0 = b,  r_q = (I - eta A_{xi_q}) r_{q-1},  x = eta * sum_q r_q,

with a fresh minibatch xi_j per factor, so E[x] = eta * sum_{q<N} (I - eta A)^q b, the truncated
series of `neumann(N, eta)` (the products of a *shared* minibatch are biased: E[(I - eta A_xi)^q]
differs from (I - eta E[A_xi])^q). N = `steps` is the number of terms (the paper's Q is N - 1; its
sum runs over q = -1 .. Q-1; benchmark_bilevel's `n_shia_steps = 10` sums 11 terms, i.e. N = 11).
Cost: N - 1 matvecs, each on its own minibatch.

`matvec(x, key)` must apply an independent stochastic estimate of A for each key. No initial point:
`warm_start` and the state's x are ignored. `info.residual_norm` is NaN (A is random); the status
is NONFINITE, with x NaN, when x is non-finite.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from bilevel_jax import status as st
from bilevel_jax._checks import as_array
from bilevel_jax.linear_solvers.base import WarmStart, fail_where, make_info
from bilevel_jax.linear_solvers.stochastic_neumann import StochasticNeumann


class SampledNeumann(StochasticNeumann):
    """N = `steps` terms of the Neumann series, a fresh minibatch per factor; `eta` an array field.
    The same fields and checks as the HIA (`StochasticNeumann`), another estimator of the same
    truncated series: every term instead of one randomly truncated product."""

    def solve(self, matvec, b, state, key=None):
        del state
        if key is None:
            raise ValueError("sampled_neumann needs a PRNG key to draw a minibatch per factor.")
        eta = self.eta

        def step(carry, q):
            x, r = carry
            r = otu.tree_add_scale(r, -eta, matvec(r, jax.random.fold_in(key, q)))
            return (otu.tree_add(x, r), r), None

        (x, _), _ = jax.lax.scan(step, (b, b), jnp.arange(1, self.steps))
        x = otu.tree_scale(eta, x)
        status = st.nonfinite(x)
        x = fail_where(status != st.OK, x)
        return x, WarmStart(x), make_info(jnp.nan, self.steps - 1, status)


def sampled_neumann(steps: int = 10, eta: float = 0.1) -> SampledNeumann:
    """The Neumann series with N = `steps` terms and an independent minibatch per factor
    (StocBiO's unbiased estimator of the truncated series); N - 1 matvecs; needs a key."""
    return SampledNeumann(steps=steps, eta=as_array(eta))

"""No silent wrong result in a run: a diverging run is flagged DIVERGING (bj.run's growth test,
`bj.status.GROWTH_LIMIT`) long before it overflows; converging runs never are."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import status as st


@pytest.fixture(scope="module")
def stiff():
    """A quadratic with LL curvature in [0.25, 25] (UL [0.1, 10]): step sizes of 0.1 for phi and v
    exceed 2 / L_g, so SABA's iterates grow ~1.4-fold per step (1e15 after 100 steps, inf after
    ~1800) while each step's own status stays OK."""
    return bj.problems.quadratic_bilevel(jax.random.PRNGKey(0), 3, 5, lower_spectrum=(0.25, 25.0),
                                         upper_spectrum=(0.1, 10.0))


def test_a_diverging_run_is_flagged_long_before_it_overflows(stiff):
    q = stiff
    alg = bj.algorithms.saba(q.problem, upper_lr=0.1, lower_lr=0.1, v_lr=0.1, batch_size=None)
    size = lambda s, d: {"size": jnp.linalg.norm(jnp.concatenate([s.theta, s.phi]))}
    state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    _, hist = jax.jit(lambda s: bj.run(alg, s, q.data, num_steps=1000, eval_every=100, eval_fn=size))(state)
    status, size = np.asarray(hist["status"]), np.asarray(hist["size"])
    assert np.all(status[1:] & st.DIVERGING) and np.all(np.isfinite(size[:6]))   # flagged at row 1 (step 100) ...
    assert size[1] > 1e10 and size[-1] > 1e80                                       # ... while finite; it does diverge
    assert "diverging" in st.describe(status[1]) and "step size" in st.explain(status[1])
    with pytest.raises(st.BilevelError, match=r"outer step (\d+) of 200 .*'diverging'") as raised:
        bj.run(alg, state, q.data, num_steps=200, check=True)
    step = int(raised.value.args[0].split("outer step ")[1].split()[0])
    # a power of two (where the test is made), early: at ~1.4-fold per step it grows 1000-fold in under 32 steps
    assert (step + 1) & step == 0 and step + 1 <= 64


def test_converging_runs_are_never_flagged(stiff):
    """The same problem with step sizes below 2 / L_g, from zero (the iterates grow from 0 to the
    solution), with SGD and Adam UL steps and a Hessian-free preset (theta* to 1e-8); and a run resumed from a
    converged state (its growth reference is the state it starts from)."""
    q = stiff
    algs = [bj.algorithms.saba(q.problem, upper_lr=0.05, lower_lr=0.06, v_lr=0.06, batch_size=None),
            bj.algorithms.saba(q.problem, upper_opt=optax.adam(0.01), lower_lr=0.06, v_lr=0.06, batch_size=None),
            bj.algorithms.hjfbio(q.problem, upper_lr=0.05, lower_lr=0.06, v_lr=0.06, batch_size=None)]
    theta_star = q.theta_star()
    for alg in algs:
        state = alg.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
        state, hist = bj.run(alg, state, q.data, num_steps=2048, eval_every=256)
        assert np.all(np.asarray(hist["status"]) == st.OK), alg
        np.testing.assert_allclose(state.theta, theta_star, rtol=1e-8)
    _, hist = bj.run(alg, state, q.data, num_steps=2048, eval_every=256)   # resumed: steps 2048..4096
    assert np.all(np.asarray(hist["status"]) == st.OK)

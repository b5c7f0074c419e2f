"""The component contracts of core v2: algorithms are equinox Modules (equal configurations compile
once; a sweep vmaps over their array fields), presets take optax rules (L-BFGS as the LL rule
included), and failures are loud (status codes in step_info and bj.run's history, NaN instead of
a finite-looking hypergradient, `check=True` errors that name the step and the cause).
"""
import chex
import equinox as eqx
import jax
import numpy as np
import optax
import pytest

import bilevel_jax as bj

S = bj.status


def _concave(quad):
    """The quadratic problem with the LL objective's sign flipped: A = -H is negative definite."""
    problem = bj.BilevelProblem(quad.problem.f_upper, lambda t, p, b: -quad.problem.f_lower(t, p, b))
    return problem


# ------------------------------------------------------------------------- modules across jit

@pytest.mark.parametrize("name, kw", [
    ("soba", {"upper_lr": 0.01}), ("amigo", {"upper_lr": 0.01}), ("fsla", {"upper_lr": 0.01}),
    ("mrbo", {"upper_lr": 0.01}), ("stable", {"upper_lr": 0.01}),   # given steps: the presets as they are
    ("ttsa", {"upper_lr": bj.schedules.inverse_power(0.1, 0.6)}),
])
def test_equal_configurations_compile_once(quad_stoch, name, kw):
    """Two separately built equal configurations, and a third with other float hyperparameters,
    share one compilation of `jax.jit(lambda alg, state, data: alg.update(state, data))`; another
    batch size is traced anew (`.trace`: jit's cache decides, without compiling that program)."""
    q = quad_stoch
    traces = []

    @jax.jit
    def step(alg, state, data):
        traces.append(1)
        return alg.update(state, data)

    make = bj.algorithms.get(name)
    a1, a2 = make(q.problem, batch_size=16, **kw), make(q.problem, batch_size=16, **kw)
    a3 = make(q.problem, batch_size=16, **{**kw, "lower_lr": 0.05})
    state = a1.init(q.theta0, q.phi0, jax.random.PRNGKey(0), q.data)
    out1, out2 = step(a1, state, q.data), step(a2, state, q.data)
    step(a3, state, q.data)
    assert len(traces) == 1
    np.testing.assert_array_equal(out1[0].theta, out2[0].theta)
    step.trace(make(q.problem, batch_size=8, **kw), state, q.data)   # another batch size: a new program
    assert len(traces) == 2


def test_a_sweep_vmaps_over_the_array_fields(quad):
    """Stack the array fields of soba at two step sizes: the vmapped run equals the two runs."""
    lrs = (0.3, 0.6)
    algs = [bj.algorithms.soba(quad.problem, upper_lr=lr, lower_lr=0.5, batch_size=None) for lr in lrs]
    dyns, statics = zip(*(eqx.partition(a, eqx.is_array) for a in algs))
    assert statics[0] == statics[1]          # the configuration is the same ...
    stacked = jax.tree_util.tree_map(lambda *x: np.stack(x), *dyns)   # ... the step sizes are leaves

    def run(dyn):
        alg = eqx.combine(dyn, statics[0])
        state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0))
        return bj.run(alg, state, quad.data, num_steps=20)[0].theta

    swept = np.asarray(jax.jit(jax.vmap(run))(stacked))
    for i, alg in enumerate(algs):
        single = bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0)), quad.data, num_steps=20)[0]
        chex.assert_trees_all_close(swept[i], np.asarray(single.theta), rtol=1e-12)
    assert np.abs(swept[0] - swept[1]).max() > 1e-3


# ------------------------------------------------------------------------- optax rules

def test_presets_take_optax_rules_lbfgs_as_the_lower_rule(quad):
    """AID-BiO with heavy-ball SGD on theta and L-BFGS (a transform with extra arguments: value,
    grad, value_fn) on phi reaches theta*; the step rules are the user's own."""
    alg = bj.algorithms.aid_bio(quad.problem, upper_opt=optax.sgd(0.5, momentum=0.5), lower_opt=optax.lbfgs(),
                                lower_steps=5)
    state, hist = jax.jit(lambda d: bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), d), d,
                                           num_steps=150))(quad.data)
    theta, phi, status = jax.device_get((state.theta, state.phi, hist["status"]))
    theta_star, m = np.asarray(quad.reference.theta), {k: np.asarray(v) for k, v in quad.means.items()}
    assert int(status[-1]) == S.OK
    assert np.linalg.norm(theta - theta_star) / np.linalg.norm(theta_star) < 1e-3
    np.testing.assert_allclose(phi, -np.linalg.solve(m["H"], m["C"] @ theta + m["h"]),   # phi*(theta)
                               rtol=1e-6, atol=1e-8)


def test_soba_with_adam_on_every_variable(quad):
    alg = bj.algorithms.soba(quad.problem, upper_opt=optax.adam(0.05), lower_opt=optax.adam(0.1),
                             v_opt=optax.adam(0.1), batch_size=None)
    state, hist = jax.jit(lambda d: bj.run(alg, alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), d), d,
                                           num_steps=300))(quad.data)
    g0, g = (np.linalg.norm(quad.grad(theta)) for theta in (quad.theta0, state.theta))
    assert int(np.asarray(hist["status"])[-1]) == S.OK
    assert g < 1e-2 * g0


def test_a_solver_step_never_silently_comes_from_an_unused_lower_lr(quad):
    """With lower_opt, lower_lr is not phi's step: presets whose solver step defaults to lower_lr
    ask for it explicitly instead of using the unused default."""
    for name in ("amigo", "stocbio", "ttsa", "mrbo"):
        with pytest.raises(ValueError, match=f"{name}: lower_opt replaces lower_lr"):
            bj.algorithms.get(name)(quad.problem, lower_opt=optax.adam(0.1))
    bj.algorithms.stocbio(quad.problem, lower_opt=optax.adam(0.1), neumann_eta=0.5)   # explicit: fine


def test_presets_refuse_options_that_would_change_the_method(quad):
    with pytest.raises(TypeError, match=r"soba: unexpected keyword argument\(s\) \['lower_steps'\]"):
        bj.algorithms.soba(quad.problem, lower_steps=3)
    with pytest.raises(TypeError, match=r"mrbo: unexpected keyword argument\(s\) \['lower_steps'\]"):
        bj.algorithms.mrbo(quad.problem, lower_steps=2)


# ------------------------------------------------------------------------- loud failures

def test_a_negative_traced_step_size_is_flagged(quad):
    """A vmapped grid of step sizes (traced: no check before tracing) with one negative value:
    that run's status says INVALID_STEP, the others are OK."""
    def run(lr):
        alg = bj.algorithms.soba(quad.problem, upper_lr=lr, lower_lr=0.5, batch_size=None)
        state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0))
        return bj.run(alg, state, quad.data, num_steps=5)[1]["status"][-1]

    status = np.asarray(jax.jit(jax.vmap(run))(np.array([0.1, -0.1, 0.2])))
    assert [S.describe(s) for s in status] == ["ok", "invalid step size", "ok"]


def test_a_concave_lower_level_is_a_breakdown_and_nan_never_a_finite_step(quad):
    """AID-BiO's CG meets negative curvature at the first step: the step's status is BREAKDOWN
    and theta becomes NaN (not the partial-gradient step a frozen v = 0 would give)."""
    alg = bj.algorithms.aid_bio(_concave(quad), upper_lr=0.1, lower_lr=0.01, lower_steps=1)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    new, info = jax.device_get(eqx.filter_jit(alg.update)(state, quad.data))
    assert int(info.status) & S.BREAKDOWN
    assert not bool(info.finite)
    assert np.all(np.isnan(new.theta))


def test_nan_data_is_flagged_in_the_history(quad):
    upper, lower = quad.data
    H = np.array(lower["H"])
    H[0, 0] = np.nan
    bad = (upper, {**lower, "H": H})
    alg = bj.algorithms.soba(quad.problem, upper_lr=0.1, lower_lr=0.1, batch_size=None)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0))
    _, hist = jax.device_get(bj.run(alg, state, bad, num_steps=4, eval_every=2))
    assert [S.describe(s) for s in hist["status"]] == ["ok", "non-finite", "non-finite"]
    assert not bool(hist["finite"][-1])


def test_checked_run_names_the_step_and_the_cause(quad):
    alg = bj.algorithms.amigo(_concave(quad), batch_size=None, lower_lr=0.01, lower_steps=1,
                              linear_solver=bj.linear_solvers.cg(5))
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    with pytest.raises(S.BilevelError, match=r"outer step 0 of 6 of amigo failed with status 'breakdown, non-finite': "
                                             r"a linear solve broke down"):
        bj.run(alg, state, quad.data, num_steps=6, eval_every=3, check=True)
    # a healthy run passes the check and returns as usual
    good = bj.algorithms.amigo(quad.problem, batch_size=None, upper_lr=0.1, lower_lr=0.1, lower_steps=2)
    _, hist = bj.run(good, good.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data), quad.data,
                     num_steps=6, check=True)
    assert int(np.asarray(hist["status"])[-1]) == S.OK


def test_checked_step_raises_under_filter_jit(quad):
    alg = bj.algorithms.aid_bio(_concave(quad), lower_lr=0.01, lower_steps=1, check=True)
    state = alg.init(quad.theta0, quad.phi0, jax.random.PRNGKey(0), quad.data)
    with pytest.raises(Exception, match="aid_bio outer step failed: a linear solve broke down"):
        jax.block_until_ready(eqx.filter_jit(alg.update)(state, quad.data))


def test_status_describe_and_explain():
    assert S.describe(S.OK) == "ok"
    assert S.describe(S.BREAKDOWN | S.INVALID_STEP) == "breakdown, invalid step size"
    assert "strongly convex" in S.explain(S.BREAKDOWN)

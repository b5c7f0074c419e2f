"""`bj.unrolled_hypergradient(..., mode="mixed")`: the reverse scan of forward-over-reverse
products (Kemaev, Calian, Zintgraf, Farquhar, van Hasselt, "Scalable Meta-Learning via
Mixed-Mode Differentiation", ICML 2025, arXiv:2505.00793), with sqrt(T) checkpoints (the default)
or all T iterates, against the closed form of unrolled GD on a quadratic, against reverse and
forward mode on an `eqx.nn.MLP` lower level (every mode takes the whole model as phi), its
temporary memory against reverse mode, and its refusals."""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj


def _mlp_problem(width, batch, din=4, key=0, depth=2):
    """LL: regularised least squares of an MLP with `depth` hidden layers, theta = (log weight decay,
    a cubic output term)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(key))
    mlp = eqx.nn.MLP(din, 1, width, depth, key=k1)
    x = np.asarray(jax.random.normal(k2, (batch, din)))      # the data in NumPy: no eager compilation per shape
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1]

    def predict(phi, x):
        return jax.vmap(phi)(x)[:, 0]

    def f_lower(theta, phi, b):
        x, y = b
        out = predict(phi, x)
        sq = sum(jnp.sum(w ** 2) for w in jax.tree_util.tree_leaves(eqx.filter(phi, eqx.is_inexact_array)))
        return jnp.mean((out - y) ** 2) + jnp.exp(theta[0]) * sq + theta[1] * jnp.mean(out ** 3)

    def f_upper(theta, phi, b):
        x, y = b
        return jnp.mean((predict(phi, x) - y) ** 2) + 0.1 * jnp.sum(theta ** 2)

    return bj.BilevelProblem(f_upper, f_lower), mlp, ((x[::2], y[::2]), (x, y))


def _leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))


def _assert_same(out, reference, name):
    (g, phi), (g_ref, phi_ref) = out, reference
    np.testing.assert_allclose(g, g_ref, rtol=1e-11, atol=1e-14, err_msg=name)
    for a, b in zip(_leaves(phi), _leaves(phi_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15, err_msg=name)


def test_mixed_equals_reverse_on_an_mlp():
    """An eqx.nn.MLP as phi (its activation functions are static fields), with heavy-ball steps (a momentum state); truncate=K carries that state into the last K steps.
    Mixed mode's segments: T = 20 is 4 of 5 steps, K = 7 one stored step and 2 segments of 3."""
    problem, mlp, data = _mlp_problem(width=16, batch=32)
    theta = jnp.array([-3.0, 0.3])

    @eqx.filter_jit
    def run(theta):
        kw = dict(optimizer=optax.sgd(0.05, momentum=0.9), steps=20)
        out = {m: bj.unrolled_hypergradient(problem, theta, mlp, data, mode=m, **kw) for m in ("reverse", "mixed")}
        out["mixed/all"] = bj.unrolled_hypergradient(problem, theta, mlp, data, mode="mixed", checkpoint=False, **kw)
        out.update({f"{m}/truncate": bj.unrolled_hypergradient(problem, theta, mlp, data, mode=m, truncate=7, **kw)
                    for m in ("reverse", "mixed")})
        return out

    out = run(theta)
    for name in ("mixed", "mixed/all"):
        _assert_same(out[name], out["reverse"], name)
    _assert_same(out["mixed/truncate"], out["reverse/truncate"], "truncate")
    for name, (_, phi) in out.items():
        assert isinstance(phi, eqx.nn.MLP) and phi.activation is mlp.activation, name
    g, g_truncated = np.asarray(out["mixed"][0]), np.asarray(out["mixed/truncate"][0])
    assert np.linalg.norm(g - g_truncated) > 1e-4                              # truncation does matter
    assert np.all(np.abs(out["reverse"][0]) > 1e-4)                             # both coordinates are coupled


def test_mixed_equals_reverse_with_adamw_and_a_schedule():
    """A rule whose state has integer counts (a schedule's and Adam's) and whose update reads the
    parameters (decoupled weight decay): the rule's own transpose carries both. T = 23: three
    stored steps, then 4 recomputed segments of 5."""
    # one hidden layer: a third less to trace and compile than two (the same bound on the hypergradient:
    # min |rev| = 0.067 with one, 0.059 with two; the LL loss falls from 0.82 to 0.46 over the 23 steps)
    problem, mlp, data = _mlp_problem(width=8, batch=16, key=1, depth=1)
    opt = optax.adamw(optax.linear_schedule(0.01, 0.002, 20), weight_decay=0.1)

    @eqx.filter_jit
    def run(theta):
        return [bj.unrolled_hypergradient(problem, theta, mlp, data, optimizer=opt, steps=23, mode=m, checkpoint=c)
                for m, c in (("reverse", False), ("mixed", True), ("mixed", False))]

    rev, mix, mix_all = run(jnp.array([-3.0, 0.3]))
    _assert_same(mix, rev, "adamw")
    _assert_same(mix_all, rev, "adamw, all iterates")
    assert np.all(np.abs(rev[0]) > 1e-5)


class _Hyper(eqx.Module):
    """theta as an equinox Module with a non-array field (a function)."""
    log_decay: jax.Array
    scale: jax.Array
    transform: object = jnp.exp


def test_every_mode_takes_modules_as_theta_and_phi():
    """theta an equinox Module with a function field, phi an eqx.nn.MLP, in the three modes."""
    # one hidden layer, as in the adamw test (|log_decay| = 0.398 with one, 0.400 with two)
    inner, mlp, data = _mlp_problem(width=4, batch=16, key=2, depth=1)

    def as_array(th):
        return jnp.stack([th.log_decay, th.scale])

    problem = bj.BilevelProblem(lambda th, phi, b: inner.f_upper(as_array(th), phi, b),
                                lambda th, phi, b: inner.f_lower(as_array(th), phi, b) + th.transform(th.scale))
    theta = _Hyper(jnp.array(-2.0), jnp.array(0.4))

    @eqx.filter_jit
    def run(theta):
        return {m: bj.unrolled_hypergradient(problem, theta, mlp, data, optimizer=optax.sgd(0.1), steps=5, mode=m)[0]
                for m in ("reverse", "forward", "mixed")}

    out = run(theta)
    for m, g in out.items():
        assert isinstance(g, _Hyper) and g.transform is None, m   # shaped like theta's inexact arrays
        np.testing.assert_allclose([g.log_decay, g.scale], [out["reverse"].log_decay, out["reverse"].scale],
                                   rtol=1e-11, err_msg=m)
    assert abs(float(out["reverse"].log_decay)) > 1e-6


def test_mixed_sgd_closed_form(quad):
    """T GD steps on the quadratic LL A(phi) = H phi + C theta + h: d phi_T / d theta =
    -beta sum_{j<K} (I - beta H)^j C (the last K steps differentiated), exact in float64."""
    m = {k: np.asarray(v) for k, v in quad.means.items()}
    theta = np.asarray(quad.theta0) + 0.3
    beta, T, K = 0.5 / np.linalg.eigvalsh(m["H"]).max(), 30, 9
    step = np.eye(len(m["h"])) - beta * m["H"]
    phi = np.asarray(quad.phi0)
    for _ in range(T):
        phi = phi - beta * (m["H"] @ phi + m["C"] @ theta + m["h"])
    g_phi = m["P"] @ phi + m["S"] @ theta + m["p"]
    direct = m["S"].T @ phi + m["reg"] * theta

    @jax.jit
    def mixed(theta):
        return [bj.unrolled_hypergradient(quad.problem, theta, quad.phi0, quad.data, optimizer=optax.sgd(beta),
                                          steps=T, mode="mixed", truncate=k) for k in (None, K)]

    for (g, phi_T), k in zip(mixed(jnp.asarray(theta)), (T, K)):
        z = -beta * sum(np.linalg.matrix_power(step, j) for j in range(k)) @ m["C"]
        np.testing.assert_allclose(phi_T, phi, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(g, direct + z.T @ g_phi, rtol=1e-10, atol=1e-12)


def _temp_bytes(problem, mlp, data, theta, mode, steps, checkpoint=None):
    fn = jax.jit(lambda th, d: bj.unrolled_hypergradient(problem, th, mlp, d, optimizer=optax.sgd(0.05),
                                                         steps=steps, mode=mode, checkpoint=checkpoint)[0])
    compiled = fn.lower(theta, data).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled


def test_mixed_memory_at_least_5x_below_reverse():
    """XLA's buffer assignment (deterministic): at T = 100 on an MLP LL, reverse mode keeps every
    step's activations (and iterate); mixed mode keeps 2 sqrt(T) = 20 iterates and one segment's
    products (all T = 100 iterates with checkpoint=False). The MLP is wide for its batch (width 64,
    64 samples: activations per step about the parameters' size), where storing all T iterates
    saves less than 5x and the checkpointed default still saves more."""
    problem, mlp, data = _mlp_problem(width=64, batch=64)
    theta = jnp.array([-4.0, 0.1])
    rev, c_rev = _temp_bytes(problem, mlp, data, theta, "reverse", 100)
    mix, c_mix = _temp_bytes(problem, mlp, data, theta, "mixed", 100)
    mix_all, _ = _temp_bytes(problem, mlp, data, theta, "mixed", 100, checkpoint=False)
    print(f"temp bytes at T = 100: reverse {rev}, mixed {mix} ({rev / mix:.1f}x), all iterates {mix_all} "
          f"({rev / mix_all:.1f}x)")
    n_params = sum(w.size for w in _leaves(mlp))
    assert rev >= 5 * mix, (rev, mix)
    assert mix <= 20 * n_params * 8 * 3, (mix, n_params)          # O(sqrt(T) d): a few copies at most
    assert 100 * n_params * 8 <= mix_all <= 100 * n_params * 8 * 3, (mix_all, n_params)   # O(T d)
    np.testing.assert_allclose(c_mix(theta, data), c_rev(theta, data), rtol=1e-10, atol=1e-14)


def test_mixed_refusals(quad):
    kw = dict(steps=3, mode="mixed")
    with pytest.raises(ValueError, match="mode='reverse'"):   # its update needs value_fn
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.lbfgs(), **kw)
    with pytest.raises(ValueError, match="checkpoint"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1),
                                  steps=3, mode="forward", checkpoint=True)
    with pytest.raises(ValueError, match="mixed"):
        bj.unrolled_hypergradient(quad.problem, quad.theta0, quad.phi0, quad.data, optimizer=optax.sgd(0.1),
                                  steps=3, mode="mixd")

"""Data hyper-cleaning (`bj.problems.hyperclean`) against dense references on tiny problems, and
the figure module `experiments.hyperclean` end to end on tiny IDX files the test writes itself
(no test needs the Fashion-MNIST package)."""
import json
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.problems import hyperclean as hc


def tiny(n=12, n_val=10, d=4, classes=3, p=0.5, seed=0, **kw):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2

    def split(m):
        y = rng.integers(0, classes, m)
        return centers[y] + rng.normal(size=(m, d)), y

    return hc.hyper_cleaning(split(n), split(n_val), split(8), p, seed, num_classes=classes,
                             normalization=(0.0, 1.0), **kw)


def test_corruption_makes_exactly_p_n_labels_wrong():
    y = np.arange(200) % 10
    noisy, mask = hc.corrupt_labels(y, 0.8, jax.random.PRNGKey(3))
    assert mask.sum() == 160
    assert np.all(noisy[mask] != y[mask]) and np.all(noisy[~mask] == y[~mask])
    assert noisy.min() >= 0 and noisy.max() <= 9
    with pytest.raises(ValueError, match="corruption must lie in"):
        hc.corrupt_labels(y, 1.5, jax.random.PRNGKey(0))


def test_features_normalise_and_append_the_bias():
    x = hc.features(np.array([[[0, 255]]], np.uint8))
    np.testing.assert_allclose(x, [[-1.0, 1.0, 1.0]])


def _cross_entropy(z, y):
    """Per-sample softmax cross-entropy of the scores z (NumPy float64: a reference compiles nothing)."""
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1)) - z[np.arange(len(y)), y]


def test_objectives_match_their_formulas_on_full_and_minibatch_data():
    b = tiny()
    (Xv, yv), (X, y, idx) = b.data
    theta = jax.random.normal(jax.random.PRNGKey(1), b.theta0.shape)
    W = b.phi0
    f_lower, f_upper = jax.jit(b.problem.f_lower), jax.jit(b.problem.f_upper)   # one program per shape, not per op
    t, w, X, y, idx = (np.asarray(a) for a in (theta, W, X, y, idx))   # the minibatch below is sliced in NumPy
    ce, weight = _cross_entropy(X @ w.T, y), 1 / (1 + np.exp(-t))
    expected = np.mean(weight * ce) + 0.01 * np.sum(w ** 2)
    np.testing.assert_allclose(f_lower(theta, W, (X, y, idx)), expected, rtol=1e-12)
    rows = np.array([3, 7, 1])                  # a minibatch reads its own lambda_i
    mb = np.mean(weight[rows] * ce[rows]) + 0.01 * np.sum(w ** 2)
    np.testing.assert_allclose(f_lower(theta, W, (X[rows], y[rows], idx[rows])), mb, rtol=1e-12)
    np.testing.assert_allclose(f_upper(theta, W, (Xv, yv)),
                               np.mean(_cross_entropy(np.asarray(Xv) @ w.T, np.asarray(yv))), rtol=1e-12)


def test_implicit_gradient_matches_finite_differences_and_the_library_estimate():
    b = tiny()
    # test-side arithmetic in NumPy (float64), the library's functions compiled: no eager dispatch per operation
    theta = 0.5 * np.asarray(jax.random.normal(jax.random.PRNGKey(2), b.theta0.shape))
    g = jax.jit(b.grad)(theta)
    eps = 1e-5
    value = jax.jit(jax.vmap(b.value))                 # every central difference in one compiled call
    shifts = eps * np.eye(theta.size)
    fd = (np.asarray(value(theta + shifts)) - np.asarray(value(theta - shifts))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-9)

    @jax.jit
    def closed_form(theta, data):
        """-(1/n) sigmoid'(lambda_i) <grad_W CE_i(W*), v> with the dense LL Hessian A (one compiled call)."""
        W = b.phi_star(theta)
        (_, (X, y, _)) = data
        A = jax.hessian(lambda w: b.problem.f_lower(theta, w.reshape(W.shape), data[1]))(W.ravel())
        rhs = jax.grad(lambda w: b.problem.f_upper(theta, w, data[0]))(W).ravel()
        v = jnp.linalg.solve(A, rhs)
        per_sample = jax.vmap(lambda x, t: jax.grad(lambda w: hc.cross_entropy(w, x[None], t[None])[0])(W).ravel())(X, y)
        s = jax.nn.sigmoid(theta)
        return -(s * (1 - s)) * (per_sample @ v) / X.shape[0], W, A, rhs, v

    closed, W, A, rhs, v = closed_form(theta, b.data)
    np.testing.assert_allclose(g, closed, rtol=1e-8, atol=1e-12)
    est, info = bj.hypergradient(b.problem, theta, W, b.data, solver=bj.linear_solvers.cg(maxiter=200, rtol=1e-14))
    assert int(info.status) == bj.status.OK
    np.testing.assert_allclose(est, g, rtol=1e-6, atol=1e-12)
    # the residual metric is ||A v - b|| with the dense A
    residual = jax.jit(b.residual)
    v = np.asarray(v).reshape(W.shape)
    np.testing.assert_allclose(residual(theta, W, v), 0.0, atol=1e-10)
    v2 = v + 0.1
    np.testing.assert_allclose(residual(theta, W, v2), np.linalg.norm(np.asarray(A) @ v2.ravel() - np.asarray(rhs)),
                               rtol=1e-10)


def test_downweighted_counts_corrupted_samples_below_one_half():
    theta = jnp.array([-1.0, 2.0, -0.5, 0.3, -3.0])
    corrupted = jnp.array([True, True, False, False, True])
    bad, good = jax.jit(hc.downweighted)(theta, corrupted)   # one program, not one per operation
    assert float(bad) == pytest.approx(2 / 3) and float(good) == pytest.approx(1 / 2)


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_a_short_run_lowers_the_validation_loss_and_downweights_corrupted_samples(model):
    b = tiny(n=40, n_val=40, p=0.4, model=model, hidden=8)
    alg = bj.algorithms.soba(b.problem, upper_lr=50.0, lower_lr=0.5, batch_size=None, upper_decay=0.0,
                             lower_decay=0.0)
    state = alg.init(b.theta0, b.phi0, jax.random.PRNGKey(0), b.data)
    state, hist = bj.run(alg, state, b.data, num_steps=300, eval_every=300)
    hist = jax.tree_util.tree_map(np.asarray, hist)        # read in NumPy: no eager dispatch per index
    assert bool(hist["finite"].all()) and int(hist["status"][-1]) == 0
    if model == "linear":
        value = jax.jit(b.value)                           # one program for both points, not one per op
        assert float(value(state.theta)) < float(value(b.theta0))
    bad, good = jax.jit(b.downweighted)(state.theta)
    assert float(bad) > 0.5 and float(good) > 0.5


def test_minibatch_form_runs():
    b = tiny(n=40, n_val=40)
    alg = bj.algorithms.soba(b.problem, upper_lr=10.0, lower_lr=0.3, batch_size=8)
    state = alg.init(b.theta0, b.phi0, jax.random.PRNGKey(0), b.data)
    state, hist = bj.run(alg, state, b.data, num_steps=40, eval_every=20)
    assert bool(np.asarray(hist["finite"]).all()) and state.theta.shape == (40,)


# ------------------------------------------------------------------------------------------------
# the figure on tiny IDX files

def _write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def _fake_fashion(folder, n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        # class-dependent bright pixels, so a linear model can learn something
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, c, :] = 250
        _write_idx(folder / f"{split}-images-idx3-ubyte", x, 0x08)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", y, 0x08)


@pytest.mark.slow   # the figure end to end; `make fig-hyperclean` runs it, the problem tests stay fast
def test_figure_runs_on_tiny_idx_files_and_reports_every_method(tmp_path, monkeypatch):
    from experiments import config as C
    from experiments import hyperclean as fig
    _fake_fashion(tmp_path)
    cfg = C.load("configs/hyperclean.toml", [
        f"results_dir={tmp_path / 'out'}", f"problem.path={tmp_path}", "problem.n_train=30", "problem.n_val=20",
        "problem.n_test=20", "steps=4", "eval_every=2", "seeds=2", "only=LancBiO,SOBA,F2SA",
        "algorithms.SOBA.steps=4", "algorithms.F2SA.steps=2", "algorithms.F2SA.lower_steps=2",
        "algorithms.LancBiO.lower_steps=1", "progress=false"])
    out = fig.main(cfg)
    rows = out["summary"]["algorithms"]
    assert set(rows) == {"LancBiO", "SOBA", "F2SA"}
    assert all(r["failed"] == 0 and 0.0 <= r["test_accuracy"] <= 1.0 for r in rows.values())
    assert rows["F2SA"]["residual"] is None and rows["LancBiO"]["residual"] is not None   # F2SA has no v
    text = (tmp_path / "out" / "hyperclean" / "summary.md").read_text()
    assert "0.800-0.815" in text and "corrupted with weight < 1/2" in text
    meta = json.loads((tmp_path / "out" / "hyperclean" / "hyperclean.json").read_text())
    assert [c["label"] for c in meta["curves"]] == ["LancBiO", "SOBA", "F2SA"]
    assert all(c["seeds"] == 2 for c in meta["curves"]) and "only: LancBiO, SOBA, F2SA" in meta["title"]


def test_figure_without_the_data_says_how_to_get_it(tmp_path, monkeypatch):
    from experiments import config as C
    from experiments import hyperclean as fig
    monkeypatch.setattr(bj.datasets, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("BILEVEL_JAX_FASHION_MNIST", raising=False)
    cfg = C.load("configs/hyperclean.toml", [f"results_dir={tmp_path}", f"problem.path={tmp_path / 'none'}",
                                              "only=SOBA", "progress=false"])
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fig.main(cfg)


# ------------------------------------------------------------------------------------------------
# the neural-network workload (configs/hyperclean_mlp.toml) at a tiny size

def test_val_split_test_takes_the_validation_images_from_the_test_split(tmp_path):
    _fake_fashion(tmp_path, n_train=30, n_test=20)
    b = hc.fashion_mnist_hyper_cleaning(0.5, 0, n_train=30, n_val=8, n_test=12, path=str(tmp_path), val_split="test")
    (Xv, yv), (X, y, idx) = b.data
    Xt, yt = b.test
    assert X.shape[0] == 30 and Xv.shape[0] == 8 and Xt.shape[0] == 12
    images, labels = bj.datasets.fashion_mnist(str(tmp_path), "train")
    np.testing.assert_array_equal(b.clean_labels, labels)                      # the whole training split
    test_images, test_labels = bj.datasets.fashion_mnist(str(tmp_path), "test")
    rows = {r.tobytes(): i for i, r in enumerate(hc.features(test_images))}
    held, tested = [rows[r.tobytes()] for r in np.asarray(Xv)], [rows[r.tobytes()] for r in np.asarray(Xt)]
    assert sorted(held + tested) == list(range(20))                           # disjoint, all 20 test images
    np.testing.assert_array_equal(yv, test_labels[held])
    np.testing.assert_array_equal(yt, test_labels[tested])
    with pytest.raises(ValueError, match="exceed"):
        hc.fashion_mnist_hyper_cleaning(0.5, 0, n_train=30, n_val=10, n_test=11, path=str(tmp_path), val_split="test")
    with pytest.raises(ValueError, match="val_split must be one of"):
        hc.fashion_mnist_hyper_cleaning(0.5, 0, n_train=30, path=str(tmp_path), val_split="val")


def _mlp_config(tmp_path, *extra):
    from experiments import config as C
    _fake_fashion(tmp_path, n_train=40, n_test=20)
    return C.load("configs/hyperclean_mlp.toml", [
        f"results_dir={tmp_path / 'out'}", f"problem.path={tmp_path}", "problem.n_train=40", "problem.n_val=8",
        "problem.n_test=12", "problem.hidden=8", "steps=4", "eval_every=2", "seeds=2", "algorithms.SOBA.batch_size=4",
        "options.baseline_batch_size=4", "progress=false", *extra])


@pytest.mark.parametrize("name", ["corrupted", "clean"])
def test_a_baseline_is_gradient_descent_on_its_samples_with_weight_one(tmp_path, name):
    """With one minibatch holding all its samples, a baseline is gradient descent on
    mean CE + reg ||W||^2 over them (all 40 samples with the corrupted labels, or the 8 clean
    ones), from each seed's initial model: equal to a hand-written loop in float64."""
    from experiments import hyperclean as fig
    from experiments import problems
    n = 40 if name == "corrupted" else 8
    cfg = _mlp_config(tmp_path, "x64=true", f"options.baseline_batch_size={n}", "options.baseline_lr=0.5")
    opts = fig.check(cfg)
    workload = problems.build(cfg["problem"])
    history, meta = fig.run_baseline(cfg, workload, name, opts)
    assert meta["samples"] == n and history["test_loss"].shape == (2, 3)
    assert history["status"].max() == 0 and history["finite"].all()
    bundle = workload.instance
    X = np.asarray(bundle.data[1][0])

    # one program for both seeds (their samples are arguments), not one per primitive (the loop
    # ran op by op: 150 compilations) nor one per seed
    @eqx.filter_jit
    def gd_step(p, X, y):
        def objective(p):
            arrays = jax.tree_util.tree_leaves(eqx.filter(p, eqx.is_inexact_array))
            return jnp.mean(hc.cross_entropy(p, X, y)) + 1e-3 * sum(jnp.sum(a ** 2) for a in arrays)

        return eqx.apply_updates(p, jax.tree_util.tree_map(lambda g: -0.5 * g, eqx.filter_grad(objective)(p)))

    test_loss, test_accuracy = eqx.filter_jit(hc.loss), eqx.filter_jit(hc.accuracy)
    for seed, inst in enumerate(workload.instances([0, 1])):
        y, mask = np.asarray(inst.data[1][1]), np.asarray(inst.corrupted)
        rows = np.arange(40) if name == "corrupted" else np.flatnonzero(~mask)
        assert rows.size == n
        phi = inst.phi0
        losses = [test_loss(phi, bundle.test)]
        for step in range(4):
            phi = gd_step(phi, X[rows], y[rows])
            if step % 2 == 1:
                losses.append(test_loss(phi, bundle.test))
        np.testing.assert_allclose(history["test_loss"][seed], losses, rtol=1e-10)
        assert history["test_accuracy"][seed, -1] == pytest.approx(float(test_accuracy(phi, bundle.test)))


def test_mlp_config_runs_in_float32_with_both_baselines_and_reuses_its_cells(tmp_path, monkeypatch):
    from experiments import config as C
    from experiments import hyperclean as fig
    x64 = jax.config.jax_enable_x64
    try:
        out = fig.main(_mlp_config(tmp_path))                     # x64 = false in the config
        from experiments import runner
        monkeypatch.setattr(runner, "BatchedRunner", None)         # a rerun loads every cell, trains nothing
        monkeypatch.setattr(fig, "run_baseline", None)
        again = fig.main(_mlp_config(tmp_path))
    finally:
        jax.config.update("jax_enable_x64", x64)
    summary = out["summary"]
    assert set(summary["algorithms"]) == {"SOBA"} and set(summary["baselines"]) == {"corrupted", "clean"}
    soba = summary["algorithms"]["SOBA"]
    assert soba["failed"] == 0 and 0.0 <= soba["test_accuracy"] <= 1.0 and 0.0 <= soba["downweighted"] <= 1.0
    assert summary["baselines"]["clean"]["samples"] == 8 and summary["baselines"]["corrupted"]["samples"] == 40
    assert all(b["failed"] == 0 and 0.0 <= b["test_accuracy"] <= 1.0 for b in summary["baselines"].values())
    assert set(summary["claim"]["above_corrupted_baseline"]) == {"SOBA"}
    text = (tmp_path / "out" / "hyperclean_mlp" / "summary.md").read_text()
    assert "plain training (corrupted labels)" in text and "clean samples only" in text
    cells = list((tmp_path / "out" / "hyperclean_mlp" / "cells").glob("*.npz"))
    assert len(cells) == 3 and np.load(cells[0])["test_accuracy"].dtype == np.float32
    assert again["summary"]["baselines"] == summary["baselines"] and again["summary"]["algorithms"]["SOBA"] == soba
    with pytest.raises(C.ConfigError, match="baselines must be a list of 'corrupted', 'clean'"):
        fig.check(_mlp_config(tmp_path, 'options.baselines=["noisy"]'))

"""The examples in examples/ run (their --quick variant, imported, not spawned) and do what they say."""
import importlib.util
import math
import pathlib
import sys


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses (equinox Modules) look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_example_is_listed_in_the_readme():
    readme = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLES.glob("*.py"):
        assert f"examples/{path.name}" in readme, path.name


def test_mlp_hpo_digits_quick_improves_the_validation_loss(capsys):
    out = load("mlp_hpo_digits").main(["--quick"])
    assert out["status"] == "ok" and out["finite"]
    assert all(math.isfinite(x) for x in (out["val_loss_initial"], out["val_loss_final"], out["test_acc_final"]))
    assert out["val_loss_final"] < 0.8 * out["val_loss_initial"], out
    assert out["test_acc_final"] > 0.9, out
    assert out["decay_final"] != out["decay_initial"]
    printed = capsys.readouterr().out
    assert "val loss" in printed and "status ok" in printed


def test_meta_learning_argmin_quick_learns_a_useful_prior(capsys):
    out = load("meta_learning_argmin").main(["--quick"])
    assert out["ok"], out
    assert out["query_loss_final"] < 0.5 * out["query_loss_initial"], out
    assert out["argmin_error"] < 1e-6, out          # float64 in tests: the IFT solve is exact
    assert "held-out query loss" in capsys.readouterr().out


def test_custom_algorithm_quick_runs_and_its_average_beats_the_last_iterate():
    out = load("custom_algorithm").main(["--quick"])
    assert out["ok"], out
    assert out["average"] < out["last"], out


def test_pessimistic_hpo_quick_reaches_both_exact_solutions_and_they_differ(capsys):
    import jax
    import jax.numpy as jnp
    ex = load("pessimistic_hpo")
    out = ex.main(["--quick"])
    assert out["ok"], out
    assert out["theta_star_optimistic"] - out["theta_star_pessimistic"] > 0.3, out   # the robust theta differs
    assert out["pessimistic"]["worst"] < out["optimistic"]["worst"], out
    # the exact value functions against a dense scan of the LL solution segment
    data = ex.make_data(jax.random.PRNGKey(0))

    @jax.jit
    def exact_and_scanned(theta, data):
        """(worst, best) of exact_values and of the scan: one program for the three thetas, not one per operation."""
        (Xv, yv), (X, y) = data
        worst, best = ex.exact_values(theta, data)
        x1, x3 = X[:, 0], X[:, 2]
        a = jnp.array([[jnp.mean(x1 * x1), jnp.mean(x1 * x3)], [jnp.mean(x1 * x3), jnp.mean(x3 * x3) + jnp.exp(theta)]])
        s, w3 = jnp.linalg.solve(a, jnp.array([jnp.mean(x1 * y), jnp.mean(x3 * y)]))
        t = jnp.linspace(jnp.maximum(0.0, s - ex.B), jnp.minimum(ex.B, s), 20001)
        losses = jax.vmap(lambda ti: ex.f_upper(None, jnp.stack([ti, s - ti, w3]), (Xv, yv)))(t)
        return worst, best, losses.max(), losses.min()

    for theta in (-2.0, -0.5, 1.0):
        worst, best, scan_worst, scan_best = (float(v) for v in exact_and_scanned(jnp.asarray(theta), data))
        assert abs(scan_worst - worst) < 1e-12 and abs(scan_best - best) < 1e-8
    assert "the robust theta lowers the worst case" in capsys.readouterr().out

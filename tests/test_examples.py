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

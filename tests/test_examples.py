"""The examples in examples/ run (their --quick variant, imported, not spawned) and do what they say."""
import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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

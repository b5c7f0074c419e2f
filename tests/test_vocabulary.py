"""One vocabulary of preset keyword names: every preset (`bj.algorithms.CAPABILITIES`) takes only
names of `bj.algorithms.vocabulary.VOCABULARY`, and only those its signature names (what the
experiments read as its sweepable keys), the README table "Hyperparameter names" lists exactly those
names and the presets that take each, and the names renamed in 0.2.0 convert with a warning or fail
naming the new one."""
import importlib
import inspect
import pathlib
import pkgutil
import re
import warnings

import equinox as eqx
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.vocabulary import RENAMED, RENAMES, VOCABULARY, translate_renamed
from bilevel_jax.problems import multitask

ALG = bj.algorithms
PRESETS = (*ALG.ALGORITHMS, "pessimistic_penalty", "bsg_constrained", *ALG.MULTI_OBJECTIVE, *ALG.MIN_MAX)


def _keywords(name):
    return [n for n, p in inspect.signature(bj.algorithms.get(name)).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _readme_rows():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    table = text.split("### Hyperparameter names", 1)[1].split("\n## ", 1)[0]
    rows = [r.split(" | ") for r in table.splitlines() if r.startswith("| ") and "`" in r]
    return {re.fullmatch(r"`(\w+)`", r[1]).group(1): r[2] for r in rows}


def test_every_preset_keyword_is_in_the_vocabulary():
    unknown = {name: sorted(set(_keywords(name)) - set(VOCABULARY)) for name in PRESETS}
    assert not {k: v for k, v in unknown.items() if v}, unknown


def test_presets_are_every_registered_preset():
    assert sorted(PRESETS) == sorted(ALG.CAPABILITIES)


def _helper_keywords() -> set:
    """Every keyword of every function of `bj.algorithms`' modules: what a preset's `**kw` could
    reach in a helper it calls (a loop builder's estimator, a private helper's decays)."""
    names = set()
    for module in pkgutil.iter_modules(ALG.__path__):
        mod = importlib.import_module(f"{ALG.__name__}.{module.name}")
        for _, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ == mod.__name__:
                names |= {n for n, p in inspect.signature(fn).parameters.items()
                          if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return (names | set(VOCABULARY)) - {"problem"}


class _Unusable:
    """A keyword value no builder accepts: a builder that takes the keyword fails on the value instead."""


def _problem_for(name):
    """A problem the preset accepts (its tags), to build it."""
    zero = lambda theta, phi, batch: 0.0   # noqa: E731
    tags = ALG.CAPABILITIES[name]
    if "multi_objective" in tags:
        return bj.MultiObjectiveProblem(zero, zero, num_tasks=2)
    if "min_max" in tags:
        return multitask.min_max_quadratic(0).problem
    box = bj.constraints.box(0.0, 1.0)
    if "pessimistic" in tags:
        return box.problem(zero, zero, pessimistic=True)
    return box.problem(zero, zero) if name == "bsg_constrained" else bj.BilevelProblem(zero, zero)


@pytest.mark.parametrize("name", sorted(ALG.CAPABILITIES))
def test_a_preset_takes_exactly_the_keywords_its_signature_names(name):
    """The experiments learn a preset's sweepable keys from its signature (`experiments.sweep.keywords`):
    any other keyword (a vocabulary name, a helper's parameter) is refused as unexpected, not passed
    on through `**kw` (only the loop options `LOOP_OPTIONS` are); the names renamed in 0.2.0 translate."""
    signature = set(inspect.signature(ALG.get(name)).parameters) | set(ALG.LOOP_OPTIONS)
    problem = _problem_for(name)
    for key in sorted(_helper_keywords() - signature):
        if (name, key) in RENAMED:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(TypeError, match="unexpected keyword") as refused:
                ALG.get(name)(problem, **{key: _Unusable()})
        assert key in str(refused.value), (name, key, str(refused.value))


def test_readme_table_lists_the_vocabulary_and_its_presets():
    rows = _readme_rows()
    assert list(rows) == list(VOCABULARY)
    for name, cell in rows.items():
        users = [p for p in PRESETS if name in _keywords(p)]
        if cell == "all":
            expected = list(PRESETS)
        elif cell.startswith("all but "):
            expected = [p for p in PRESETS if p not in re.findall(r"`(\w+)`", cell)]
        else:
            expected = re.findall(r"`(\w+)`", cell)
        assert users == expected, (name, users)


@pytest.mark.parametrize("old,new,presets,note,convert", RENAMES)
def test_renamed_keywords_convert_with_a_warning_or_fail_naming_the_new_one(old, new, presets, note, convert):
    for preset in presets:
        assert old not in _keywords(preset)
        if convert is None:
            with pytest.raises(TypeError, match=f"{preset}: renamed .*{old}= is now {new}="):
                translate_renamed(preset, {old: 1})
            continue
        with pytest.warns(FutureWarning, match=f"{preset}: {old}= is deprecated .*use {new}="):
            assert translate_renamed(preset, {old: 1, "upper_lr": 0.1}) == {new: convert(1), "upper_lr": 0.1}
        with pytest.raises(TypeError, match=f"{old}= is now {new}=.*given too"):
            translate_renamed(preset, {old: 1, new: 1})


def test_old_names_still_build_the_same_preset(quad):
    with pytest.warns(FutureWarning, match="momentum_eta= is deprecated"):
        old = bj.algorithms.fsla(quad.problem, upper_lr=0.1, lower_lr=0.1, v_lr=0.1, momentum_eta=0.3)
    new = bj.algorithms.fsla(quad.problem, upper_lr=0.1, lower_lr=0.1, v_lr=0.1, momentum=0.7)
    assert eqx.tree_equal(old, new)
    with pytest.raises(TypeError, match="does not convert automatically"):
        bj.algorithms.fsla(quad.problem, momentum_eta=bj.schedules.inverse_power(0.5, 0.5))


def test_pbgd_variant_string_in_penalty_is_the_variant():
    with pytest.warns(FutureWarning, match="penalty='gradient' \\(the variant\\) is deprecated: use variant='gradient'"):
        assert translate_renamed("pbgd", {"penalty": "gradient"}) == {"variant": "gradient"}

"""One vocabulary of preset keyword names: every preset takes only names of
`bj.algorithms.vocabulary.VOCABULARY`, the README table "Hyperparameter names" lists exactly those
names and the presets that take each, and the names renamed in 0.2.0 convert with a warning or fail naming
the new one."""
import inspect
import pathlib
import re

import equinox as eqx
import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.vocabulary import RENAMES, VOCABULARY, translate_renamed

PRESETS = (*bj.algorithms.ALGORITHMS, "pessimistic_penalty", "bsg_constrained")


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

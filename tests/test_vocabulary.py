"""One vocabulary of preset keyword names: every preset takes only names of
`bj.algorithms.vocabulary.VOCABULARY`, the README table "Hyperparameter names" lists exactly those
names and the presets that take each, and the names renamed in 0.2.0 fail naming the new one."""
import inspect
import pathlib
import re

import pytest

import bilevel_jax as bj
from bilevel_jax.algorithms.vocabulary import RENAMES, VOCABULARY

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


@pytest.mark.parametrize("old,new,presets,note", RENAMES)
def test_renamed_keywords_fail_naming_the_new_one(old, new, presets, note):
    for preset in presets:
        assert old not in _keywords(preset)
        with pytest.raises(TypeError, match=f"{preset}: renamed .*{old}= is now {new}="):
            bj.algorithms.get(preset)(None, **{old: 1.0})


def test_pbgd_variant_string_in_penalty_names_variant():
    with pytest.raises(TypeError, match="penalty='gradient' \\(the variant\\) is now variant='gradient'"):
        bj.algorithms.pbgd(None, penalty="gradient")

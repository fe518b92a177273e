"""Tests of rewards.py: properties (hypothesis) plus hand-written cases that pin the documented behaviour."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rewards
from rewards import (
    TAGS,
    Decomposition,
    RewardBreakdown,
    action_key,
    decomposition_reward,
    format_reward,
    gold_from_lists,
    normalise_item,
    parse_decomposition,
    parse_items,
    render_decomposition,
    set_f1,
)

SETTINGS = settings(max_examples=200, deadline=None)

TAG_STRINGS = [s for tag in TAGS for s in (f"<{tag}>", f"</{tag}>")]
FRAGMENTS = TAG_STRINGS + ["<", ">", "/", "[", "]", '"', "'", ",", ";", "\n", "- ", "1. ", "<|im_end|>", "\\u003c"]
# Text that mixes tag strings, separators and arbitrary unicode, so nested, unbalanced and repeated tags are common.
tagged_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(FRAGMENTS)), max_size=30).map("".join)
# Items with commas, quotes, brackets, newlines, tag strings and unicode: the hard cases for rendering.
item = st.lists(
    st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS + ["é", "ＣＯＡＴ", "“", "ß"])), max_size=5
).map("".join)
item_list = st.lists(item, min_size=1, max_size=5).filter(lambda xs: any(normalise_item(x) for x in xs))
think_text = st.one_of(tagged_text, st.text()).filter(lambda t: t.strip())

GOLD = gold_from_lists(["Recoloring"], ["coat", "hair"], ["scarlet or copper red"])
PERFECT = render_decomposition(
    "The coat and hair turn red.", ["Recoloring"], ["coat", "hair"], ["scarlet or copper red"]
)


def blocks(think="t", action="Recoloring", subjects="coat, hair", goals="scarlet or copper red") -> list[str]:
    return [
        f"<think>{think}</think>",
        f"<action>{action}</action>",
        f"<subjects>{subjects}</subjects>",
        f"<goals>{goals}</goals>",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# No input raises; every reward lies in [0, 1]


@SETTINGS
@given(text=st.one_of(tagged_text, st.text()))
def test_no_public_function_raises_and_rewards_are_in_unit_interval(text):
    assert format_reward(text) in (0.0, 1.0)
    parse_decomposition(text)
    parse_items(text)
    normalise_item(text)
    action_key(text)
    render_decomposition(text, [text], [text], [text])
    assert 0.0 <= set_f1(text, [text, "coat"]) <= 1.0
    r = decomposition_reward(text, GOLD)
    for value in (r.total, r.format, r.action, r.subject, r.goal):
        assert 0.0 <= value <= 1.0


@pytest.mark.parametrize(
    "text",
    [
        "<action>" * 20000,
        "</action>" * 20000,
        "[" * 100_000,
        '["' * 50_000,
        "<think>" + "a," * 50_000,
        PERFECT * 2000,
        "- " * 50_000 + "x",
        " " * 100_000 + "x" + " " * 100_000,
    ],
    ids=["open-tags", "close-tags", "brackets", "json-nesting", "long-think", "repeated-answer", "bullets", "spaces"],
)
def test_long_adversarial_inputs_get_no_credit(text):
    # how long these take is measured by `python speed.py --rewards` (linear: ~10 ms; a backtracking regex: minutes)
    assert format_reward(text) == 0.0
    assert decomposition_reward(text, GOLD).total < 1.0  # a repeated answer may parse, but never earns the format
    parse_items(text)
    action_key(text)


# ---------------------------------------------------------------------------------------------------------------------
# Normalisation, item parsing, action keys


def test_normalise_item_examples():
    assert normalise_item("  “Coat.” ") == "coat"
    assert normalise_item("ＣＯＡＴ") == "coat"  # NFKC folds full-width letters
    assert normalise_item("Straße") == "strasse"  # casefold, not lower
    assert normalise_item("scarlet   or\tcopper\nred!") == "scarlet or copper red"
    assert normalise_item("(x)") == "x"
    assert normalise_item("c++") == "c++"  # symbols are kept, only punctuation is stripped
    assert normalise_item("...") == ""


@SETTINGS
@given(text=st.text())
def test_normalise_item_is_idempotent(text):
    once = normalise_item(text)
    assert normalise_item(once) == once


@pytest.mark.parametrize(
    "body",
    [
        "coat, hair",
        "coat; hair",
        "coat\nhair",
        "- coat\n- hair",
        "* coat\n• hair",
        "1. coat\n2) hair",
        '["coat", "hair"]',
        "[coat, hair]",
        "['coat', 'hair']",
        "'coat', \"hair\"",
        "`coat`, (hair)",
        " Coat ,, HAIR, coat ",
    ],
)
def test_parse_items_accepts_documented_list_forms(body):
    assert parse_items(body) == ["coat", "hair"]


def test_parse_items_json_keeps_separators_inside_items_and_text_splits_them():
    assert parse_items('["warm, golden light", "a; b"]') == ["warm, golden light", "a; b"]
    assert parse_items("warm, golden light") == ["warm", "golden light"]
    assert parse_items("3.5 inch, 10) x") == ["3.5 inch", "10) x"]  # a number prefix needs a following space


def test_parse_items_empty_bodies():
    for body in ["", "  ", "[]", ", ;", "- \n- "]:
        assert parse_items(body) == []


def test_action_key_merges_spelling_and_inflection_variants():
    for variant in ["Recoloring", "recolor", "Recolour", "recolored", "RECOLOURING", "recolors"]:
        assert action_key(variant) == action_key("Recoloring")
    assert action_key("cropping") == action_key("crop")
    assert action_key("stylise") == action_key("Stylized")
    assert action_key("removes") == action_key("remove") == action_key("removing")


def test_action_key_keeps_different_actions_apart():
    assert action_key("remove") != action_key("move")
    assert action_key("add") != action_key("remove")
    assert action_key("recolor") != action_key("color")
    assert action_key("uses") == "use"  # a suffix is not stripped if fewer than 3 letters would remain


# ---------------------------------------------------------------------------------------------------------------------
# set_f1


def test_set_f1_hand_computed():
    assert set_f1(["a", "b", "c"], ["b", "c", "d"]) == pytest.approx(2 / 3)
    assert set_f1(["a"], ["a", "b", "c"]) == pytest.approx(0.5)  # P=1, R=1/3 -> 2PR/(P+R) = 0.5
    assert set_f1(["x"], ["y"]) == 0.0
    assert set_f1([], []) == 1.0
    assert set_f1([], ["a"]) == 0.0
    assert set_f1(["a"], []) == 0.0
    assert set_f1(["", "..."], []) == 1.0  # items that normalise to "" are dropped


def test_set_f1_bare_string_is_a_tag_body_not_characters():
    assert set_f1("coat, hair", ["Hair", "coat"]) == 1.0
    assert set_f1("abc", ["abc"]) == 1.0


def test_set_f1_with_action_key():
    assert set_f1(["recolour"], ["Recoloring"]) == 0.0
    assert set_f1(["recolour"], ["Recoloring"], key=action_key) == 1.0


@SETTINGS
@given(pred=st.lists(st.text(max_size=6), max_size=6), gold=st.lists(st.text(max_size=6), max_size=6))
def test_set_f1_symmetric_and_bounded(pred, gold):
    f1 = set_f1(pred, gold)
    assert 0.0 <= f1 <= 1.0
    assert f1 == set_f1(gold, pred)


@SETTINGS
@given(items=st.lists(st.text(max_size=6), min_size=1, max_size=6), data=st.data())
def test_set_f1_ignores_order_duplicates_case_and_whitespace(items, data):
    if not any(normalise_item(i) for i in items):
        assert set_f1(items, items) == 1.0  # both sets empty after normalisation
        return
    assert set_f1(items, items) == 1.0
    shuffled = data.draw(st.permutations(items))
    noisy = [f"  {i.upper()}\t" for i in shuffled] + shuffled
    assert set_f1(noisy, items) == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and rendering decompositions


@SETTINGS
@given(think=think_text, actions=item_list, subjects=item_list, goals=item_list)
def test_render_round_trips_and_has_perfect_format(think, actions, subjects, goals):
    text = render_decomposition(think, actions, subjects, goals)
    parsed = parse_decomposition(text)
    assert parsed is not None
    normalised = lambda xs: list(dict.fromkeys(n for n in map(normalise_item, xs) if n))  # noqa: E731
    assert parsed.actions == normalised(actions)
    assert parsed.subjects == normalised(subjects)
    assert parsed.goals == normalised(goals)
    if not any(tag in think for tag in TAG_STRINGS):
        assert parsed.think == think.strip()
    assert format_reward(text) == 1.0
    assert decomposition_reward(text, Decomposition("", parsed.actions, parsed.subjects, parsed.goals)).total == 1.0


def test_render_uses_plain_text_when_possible_and_json_otherwise():
    assert "<subjects>coat, hair</subjects>" in render_decomposition("t", ["a"], ["coat", "hair"], ["g"])
    text = render_decomposition("t", ["a"], ["b"], ["warm, golden light", "x</goals>y"])
    body = text.split("<goals>")[1].split("</goals>")[0]
    assert json.loads(body) == ["warm, golden light", "x</goals>y"]
    assert "<" not in body


def test_render_neutralises_tags_in_think():
    text = render_decomposition("I will write <action>Recoloring</action> below", ["a"], ["b"], ["c"])
    assert format_reward(text) == 1.0
    assert parse_decomposition(text).actions == ["a"]


def test_parse_decomposition_missing_tags():
    assert parse_decomposition("".join(blocks()[1:])) == Decomposition(
        "", ["recoloring"], ["coat", "hair"], ["scarlet or copper red"]
    )
    for missing in range(1, 4):
        parts = blocks()
        del parts[missing]
        assert parse_decomposition("".join(parts)) is None
    assert parse_decomposition("<action>a</action><subjects>b</subjects><goals>c") is None  # unclosed


def test_parse_decomposition_is_lenient_about_surroundings_and_takes_the_last_block():
    text = "Sure! <think>maybe <action>move</action>?</think>\n<action>remove</action> <subjects>cat</subjects> x <goals>gone</goals><|im_end|>"
    parsed = parse_decomposition(text)
    assert parsed == Decomposition("maybe <action>move</action>?", ["remove"], ["cat"], ["gone"])
    assert format_reward(text) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Format reward


def test_format_reward_accepts_canonical_and_whitespace():
    assert format_reward(PERFECT) == 1.0
    assert format_reward("".join(blocks())) == 1.0
    assert format_reward("\n  " + "\n\n".join(blocks()) + " \n") == 1.0
    assert format_reward("".join(blocks(subjects='["coat", "hair"]'))) == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "".join(blocks(think="  ")),  # blank reasoning
        "".join(blocks(action="")),  # empty list
        "".join(blocks(goals="[]")),  # a list with no items
        "".join(blocks(subjects=", ;")),
        "".join(blocks()) + "<|im_end|>",  # EOS marker must be stripped by the caller
        "".join(blocks()) + "".join(blocks()),  # repeated
        "".join(blocks(think="a <goals>b</goals>")),  # nested tag
        "".join(blocks()).replace("<think>", "<THINK>").replace("</think>", "</THINK>"),  # tags are lowercase
        "".join(blocks()).replace("</goals>", ""),  # unclosed
    ],
)
def test_format_reward_rejects(text):
    assert format_reward(text) == 0.0


@SETTINGS
@given(think=think_text, actions=item_list, subjects=item_list, goals=item_list, data=st.data())
def test_breaking_the_structure_gives_format_zero(think, actions, subjects, goals, data):
    text = render_decomposition(think, actions, subjects, goals)
    # the four blocks (a think or an item may itself hold newlines, so split on the tags, not on lines)
    parts = [m.group(0) for m in re.finditer(r"<(think|action|subjects|goals)>.*?</\1>", text, re.S)]
    assert len(parts) == 4 and "\n".join(parts) == text  # the renderer writes the blocks one per line
    assert format_reward(text) == 1.0
    i = data.draw(st.integers(0, 3))
    assert format_reward("\n".join(parts[:i] + parts[i + 1 :])) == 0.0  # a tag removed
    j = data.draw(st.integers(0, 3).filter(lambda j: j != i))
    swapped = list(parts)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert format_reward("\n".join(swapped)) == 0.0  # two blocks swapped
    extra = data.draw(st.text(min_size=1).filter(str.strip))
    k = data.draw(st.integers(0, 4))
    assert format_reward("\n".join(parts[:k] + [extra] + parts[k:])) == 0.0  # text outside the blocks


# ---------------------------------------------------------------------------------------------------------------------
# decomposition_reward


def test_perfect_answer_scores_one():
    r = decomposition_reward(PERFECT, GOLD)
    assert r == RewardBreakdown(total=1.0, format=1.0, action=1.0, subject=1.0, goal=1.0)
    # Spelling/inflection variants of the action and shuffled, re-cased subjects are still perfect.
    variant = render_decomposition("t", ["recolour"], ["Hair", "COAT"], ["Scarlet or copper red."])
    assert decomposition_reward(variant, GOLD).total == 1.0


def test_partial_answer_is_the_mean_of_its_components():
    text = render_decomposition("t", ["remove"], ["coat"], ["scarlet or copper red"])
    r = decomposition_reward(text, GOLD)
    assert (r.format, r.action, r.subject, r.goal) == (1.0, 0.0, pytest.approx(2 / 3), 1.0)
    assert r.total == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)


def test_unparseable_answer_gets_only_what_format_gives():
    r = decomposition_reward("Recoloring the coat and hair", GOLD)
    assert r == RewardBreakdown(total=0.0, format=0.0, action=0.0, subject=0.0, goal=0.0)


def test_content_is_rewarded_even_when_format_fails():
    r = decomposition_reward("Answer: " + PERFECT, GOLD)
    assert r.format == 0.0
    assert (r.action, r.subject, r.goal) == (1.0, 1.0, 1.0)
    assert r.total == pytest.approx(3 / 4)


def test_use_goal_false_ignores_a_wrong_goal_but_reports_it():
    text = render_decomposition("t", ["Recoloring"], ["coat", "hair"], ["blue"])
    assert decomposition_reward(text, GOLD).total == pytest.approx(3 / 4)
    r = decomposition_reward(text, GOLD, use_goal=False)
    assert r.total == 1.0
    assert r.goal == 0.0


def test_weights_give_a_weighted_mean():
    text = "Answer: " + render_decomposition("t", ["remove"], ["coat", "hair"], ["scarlet or copper red"])
    # format 0, action 0, subject 1, goal 1
    assert decomposition_reward(text, GOLD).total == pytest.approx(2 / 4)
    r = decomposition_reward(text, GOLD, w_format=3.0, w_action=1.0, w_subject=2.0, w_goal=2.0)
    assert r.total == pytest.approx((3 * 0 + 1 * 0 + 2 * 1 + 2 * 1) / 8)
    assert decomposition_reward(text, GOLD, w_format=0.0, w_action=0.0).total == 1.0
    assert decomposition_reward(text, GOLD, w_format=0.0, w_subject=0.0, w_goal=0.0).total == 0.0
    # Scaling every weight leaves the mean unchanged.
    assert decomposition_reward(text, GOLD, w_format=5, w_action=5, w_subject=5, w_goal=5).total == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"w_format": -1.0},
        {"w_goal": float("nan")},
        {"w_action": float("inf")},
        {"w_format": 0.0, "w_action": 0.0, "w_subject": 0.0, "w_goal": 0.0},
        {"w_format": 0.0, "w_action": 0.0, "w_subject": 0.0, "use_goal": False},
    ],
)
def test_bad_weights_raise(kwargs):
    with pytest.raises(ValueError, match="decomposition_reward"):
        decomposition_reward(PERFECT, GOLD, **kwargs)


@SETTINGS
@given(
    text=tagged_text,
    weights=st.lists(st.floats(0.0, 10.0), min_size=4, max_size=4).filter(lambda w: sum(w) > 0),
    use_goal=st.booleans(),
)
def test_total_is_within_unit_interval_for_any_weights(text, weights, use_goal):
    assume(use_goal or sum(weights[:3]) > 0)  # else no weight is in use: test_bad_weights_raise covers that case
    r = decomposition_reward(
        text, GOLD, w_format=weights[0], w_action=weights[1], w_subject=weights[2], w_goal=weights[3], use_goal=use_goal
    )
    assert 0.0 <= r.total <= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# gold_from_lists


def test_gold_from_lists_normalises_and_dedupes():
    gold = gold_from_lists([" Recoloring "], ["Coat", "coat.", "hair"], ["warm, golden light"], think=" why ")
    assert gold == Decomposition("why", ["recoloring"], ["coat", "hair"], ["warm, golden light"])
    assert gold_from_lists("Recoloring", "coat, hair", "red").subjects == ["coat", "hair"]  # a bare string is a body


@pytest.mark.parametrize("field", ["actions", "subjects", "goals"])
def test_gold_from_lists_names_the_empty_field(field):
    lists = {"actions": ["a"], "subjects": ["b"], "goals": ["c"]}
    lists[field] = ["  ", "..."]
    with pytest.raises(ValueError, match=field):
        gold_from_lists(**lists)


def test_gold_from_lists_rejects_non_strings():
    with pytest.raises(ValueError, match="subjects.*item 1"):
        gold_from_lists(["a"], ["b", 3], ["c"])


def test_module_imports_only_the_standard_library():
    import ast
    import sys

    tree = ast.parse(open(rewards.__file__, encoding="utf-8").read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names

"""The shapes world: pixels, requests, the oracle, the procedural editor's documented limits, the judge, the files."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

import data
import rewards
from judge import Verdict
from miniature import dataset, language, world
from miniature.procedural import ProceduralEditor, ShapesJudge
from miniature.world import CELLS, COLOURS, KINDS, SIZES, Edit, Scene, Shape, read_scene, render

DATASET = dataset.make_dataset(300, seed=11)  # ~0.05 s; shared by the read-only tests below


def _scene(*specs: str) -> Scene:
    """_scene("large red circle at top left", ...) -> Scene."""
    shapes_ = []
    for spec in specs:
        attrs, cell = spec.split(" at ")
        size, colour, kind = attrs.split()
        shapes_.append(Shape(kind, colour, size, cell))
    return Scene(tuple(shapes_))


SCENE = _scene(
    "large red circle at top left",
    "small blue square at middle left",
    "large green triangle at top right",
    "small yellow circle at bottom right",
)


@st.composite
def scenes(draw: st.DrawFn) -> Scene:
    """Any scene the renderer can draw: 0-9 shapes, any kinds, colours and sizes, one per cell."""
    cells = draw(st.lists(st.sampled_from(CELLS), unique=True, max_size=len(CELLS)))
    return Scene(
        tuple(
            Shape(draw(st.sampled_from(KINDS)), draw(st.sampled_from(COLOURS)), draw(st.sampled_from(SIZES)), c)
            for c in cells
        )
    )


# ---------------------------------------------------------------------------------------------------------- pixels


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_render_then_read_is_exact(scene: Scene) -> None:
    image = render(scene)
    assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    assert read_scene(image) == scene


@settings(max_examples=40, deadline=None)
@given(scenes(), st.integers(0, 2**16))
def test_read_survives_the_artefacts_of_many_editor_calls(scene: Scene, seed: int) -> None:
    editor = ProceduralEditor()
    image = render(scene)
    for call in range(1, 9):  # "do nothing" is understood as nothing, so only artefacts accumulate
        image = editor.edit(image, "do nothing", seed=seed)
        assert read_scene(image) == scene, f"misread after {call} calls"
    # Each call corrupts ARTEFACT_FRACTION of the pixels; a few land on earlier ones or match by chance.
    per_call = round(world.ARTEFACT_FRACTION * world.IMAGE_SIZE**2) / world.IMAGE_SIZE**2
    assert 0.8 * 8 * per_call < world.artefact_share(image) <= 8 * per_call


def test_read_survives_mild_blur() -> None:
    for ex in DATASET[:100]:
        assert read_scene(ex.image.filter(ImageFilter.GaussianBlur(0.7))) == ex.scene


def test_read_scene_rejects_other_sizes() -> None:
    with pytest.raises(ValueError, match="84x84"):
        read_scene(render(SCENE).resize((64, 64)))


def test_scene_rejects_two_shapes_in_one_cell() -> None:
    with pytest.raises(ValueError, match="two shapes in one cell"):
        _scene("large red circle at center", "small blue square at center")


# -------------------------------------------------------------------------------------------------------- examples


def test_gold_lists_are_non_empty_normalised_and_in_the_vocabulary() -> None:
    for ex in DATASET:
        assert 1 <= len(ex.edits) <= world.MAX_EDITS
        for items in (ex.actions, ex.subjects, ex.goals):
            assert items and len(set(items)) == len(items)
            assert all(rewards.normalise_item(item) == item for item in items)
        gold = rewards.gold_from_lists(ex.actions, ex.subjects, ex.goals)
        assert (gold.actions, gold.subjects, gold.goals) == (ex.actions, ex.subjects, ex.goals)
        assert set(ex.actions) <= set(world.ACTIONS)
        # Subjects are names of the ORIGINAL shapes, except for added shapes, which are new names.
        original = {s.name for s in ex.scene.shapes}
        for e in ex.edits:
            assert (e.subject not in original) if e.action == "add" else (e.subject in original)


def test_every_action_and_indirect_form_occurs() -> None:
    requests = " ".join(ex.request.lower() for ex in DATASET)
    assert {a for ex in DATASET for a in ex.actions} == set(world.ACTIONS)
    for phrase in ("everything on the", "all the", "the shape in the", "smallest shape", "colour of the", "same size"):
        assert phrase in requests, phrase
    assert any(word in requests for word in ("above the", "below the", "to the left of", "to the right of"))
    share = np.mean([ex.indirect for ex in DATASET])
    assert 0.3 < share < 0.8, share


def test_indirect_clauses_hide_some_of_their_gold_from_the_text() -> None:
    """The gold of an indirect clause cannot be read off its words: a subject or goal needs the image."""
    n_indirect = 0
    for ex in DATASET:
        for text in language.split_clauses(ex.request):
            clause = language.parse_clause(text)
            if not clause.explicit:
                edits = language.clause_edits(clause, ex.scene)
                assert any(item not in text for e in edits for item in (e.subject, e.goal)), text
                n_indirect += 1
    assert n_indirect > 100


def test_the_oracle_reproduces_the_gold_edits_and_the_target() -> None:
    for ex in DATASET:
        assert language.interpret(ex.scene, ex.request) == list(ex.edits), ex.request
        assert language.oracle_apply(ex.scene, ex.request) == ex.target
        assert world.apply_edits(ex.scene, reversed(ex.edits)) == ex.target  # the edits commute


def test_examples_depend_only_on_seed_and_index() -> None:
    assert dataset.make_dataset(20, seed=11) == DATASET[:20]
    assert dataset.make_dataset(20, seed=12) != DATASET[:20]
    assert len({ex.id for ex in DATASET}) == len(DATASET)


def test_oracle_resolves_each_kind_of_reference() -> None:
    cases = {
        "Remove everything on the left.": [
            Edit("remove", "red circle", "removed"),
            Edit("remove", "blue square", "removed"),
        ],
        "Paint the circle the colour of the triangle.": None,  # two circles: the reference is ambiguous
        "Paint the square the colour of the triangle.": [Edit("recolor", "blue square", "green")],
        "Make the shape in the bottom right large.": [Edit("resize", "yellow circle", "large")],
        "Move the smallest shape to the center.": None,  # two small shapes
        "Put a purple square to the right of the red circle.": [Edit("add", "purple square", "top middle")],
        "Add a purple square below the square.": [Edit("add", "purple square", "bottom left")],
        "make all the circles small": [Edit("resize", "red circle", "small"), Edit("resize", "yellow circle", "small")],
        "Recoloring red circle to blue\nremoving the green triangle": [
            Edit("recolor", "red circle", "blue"),
            Edit("remove", "green triangle", "removed"),
        ],
    }
    for request, edits in cases.items():
        if edits is None:
            with pytest.raises(world.UnresolvedReference):
                language.interpret(SCENE, request)
        else:
            assert language.interpret(SCENE, request) == edits, request
    with pytest.raises(world.UnparsedClause):
        language.interpret(SCENE, "make it pop")


# ---------------------------------------------------------------------------------------------------------- editor


def _edited_scene(instruction: str, scene: Scene = SCENE, **kw) -> Scene:
    return read_scene(ProceduralEditor(**kw).edit(render(scene), instruction))


def test_editor_executes_each_explicit_instruction_exactly() -> None:
    n = 0
    for ex in DATASET[:150]:
        for edit in ex.edits:
            expected = world.apply_edit(ex.scene, edit)
            assert _edited_scene(world.explicit_instruction(edit), ex.scene) == expected, edit
            n += 1
    assert n > 250


def test_editor_fully_executes_exactly_the_explicit_requests() -> None:
    """Direct requests (at most MAX_CLAUSES explicit clauses) are done exactly; indirect ones never fully."""
    for ex in DATASET:
        reached = _edited_scene(ex.request, ex.scene) == ex.target
        assert reached == (not ex.indirect), ex.request


def test_editor_ignores_indirect_clauses_but_does_the_explicit_ones() -> None:
    for request in (
        "Remove everything on the left.",
        "Paint the square the colour of the triangle.",
        "Make the biggest shape blue.",  # two large shapes, and no comparison anyway
        "Move the shape in the top left to the center.",
        "Add a purple square below the red circle.",
        "Make all the circles small.",
        "Make it pop.",
    ):
        assert _edited_scene(request) == SCENE, request
    after = _edited_scene("Remove everything on the left and recolor the triangle to purple.")
    assert after == world.apply_edit(SCENE, Edit("recolor", "green triangle", "purple"))


def test_editor_executes_at_most_k_understood_clauses() -> None:
    clauses = [
        "remove the red circle",
        "remove the blue square",
        "remove the green triangle",
        "remove the yellow circle",
    ]
    assert _edited_scene("; ".join(clauses)) == _scene("small yellow circle at bottom right")
    assert _edited_scene("; ".join(clauses), max_clauses=2) == _scene(
        "large green triangle at top right", "small yellow circle at bottom right"
    )
    # Clauses that are not understood do not use up the budget.
    assert _edited_scene("; ".join(["make it pop", "remove everything on the left"] + clauses[2:])) == _scene(
        "large red circle at top left", "small blue square at middle left"
    )


def test_editor_grounds_every_clause_in_the_input_image() -> None:
    """One call cannot chain edits (the blue circle does not exist yet); two calls can."""
    request = "recolor the red circle to blue; move the blue circle to the center"
    once = world.apply_edit(SCENE, Edit("recolor", "red circle", "blue"))
    assert _edited_scene(request) == once
    editor = ProceduralEditor()
    image = render(SCENE)
    for sub in request.split("; "):
        image = editor.edit(image, sub)
    assert read_scene(image) == world.apply_edit(once, Edit("move", "blue circle", "center"))


def test_editor_is_deterministic_and_degrades_every_call() -> None:
    editor = ProceduralEditor()
    image = render(SCENE)
    first = editor.edit(image, "remove the red circle", seed=3)
    assert first.tobytes() == editor.edit(image, "remove the red circle", seed=3).tobytes()
    assert first.tobytes() != editor.edit(image, "remove the red circle", seed=4).tobytes()
    assert first.size == image.size and first.mode == "RGB"
    shares = []
    for _ in range(3):  # the same seed every call: artefacts still accumulate, as in a multi-turn chain
        image = editor.edit(image, "do nothing", seed=0)
        shares.append(world.artefact_share(image))
    assert shares[0] < shares[1] < shares[2]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_editor_never_fails_on_junk_instructions(text: str) -> None:
    edited = ProceduralEditor().edit(render(SCENE), text)
    assert edited.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
    read_scene(edited)


# ----------------------------------------------------------------------------------------------------------- judge

TWO_EDITS = "Remove the blue square and make the red circle purple."


def _speckle(scene: Scene, share: float, seed: int = 0) -> Image.Image:
    """The scene with `share` of its pixels inverted (every palette colour has a channel far from 128: visible)."""
    pixels = np.array(render(scene))  # (H, W, 3)
    rng = np.random.default_rng(seed)
    spots = rng.choice(pixels.shape[0] * pixels.shape[1], size=round(share * pixels.size / 3), replace=False)
    pixels.reshape(-1, 3)[spots] = 255 - pixels.reshape(-1, 3)[spots]
    return Image.fromarray(pixels)


def test_judge_perfect_edit_scores_ten() -> None:
    target = language.oracle_apply(SCENE, TWO_EDITS)
    verdict = ShapesJudge().judge(render(SCENE), render(target), TWO_EDITS)
    assert isinstance(verdict, Verdict)
    assert (verdict.fulfilment, verdict.quality, verdict.preservation, verdict.total) == (4, 3, 3, 10)
    assert "made 2/2" in verdict.reason and "kept 2/2" in verdict.reason


def test_judge_no_op_fulfils_nothing_and_preserves_everything() -> None:
    verdict = ShapesJudge().judge(render(SCENE), render(SCENE), TWO_EDITS)
    assert (verdict.fulfilment, verdict.quality, verdict.preservation) == (0, 3, 3)
    assert "made 0/2" in verdict.reason and "remove the blue square" in verdict.reason


def test_judge_counts_half_an_edit_as_half() -> None:
    half = world.apply_edit(SCENE, Edit("remove", "blue square", "removed"))
    verdict = ShapesJudge().judge(render(SCENE), render(half), TWO_EDITS)
    assert (verdict.fulfilment, verdict.preservation) == (2, 3)


def test_judge_wrong_extra_changes_lower_preservation() -> None:
    target = language.oracle_apply(SCENE, TWO_EDITS)
    recoloured = world.apply_edit(target, Edit("recolor", "green triangle", "purple"))  # 1 of 2 untouched changed
    verdict = ShapesJudge().judge(render(SCENE), render(recoloured), TWO_EDITS)
    assert (verdict.fulfilment, verdict.preservation) == (4, 1.5)
    added = world.apply_edit(target, Edit("add", "purple square", "center"))  # a shape where nothing should be
    verdict = ShapesJudge().judge(render(SCENE), render(added), TWO_EDITS)
    assert verdict.fulfilment == 4 and verdict.preservation == pytest.approx(2.0)
    assert "1 unwanted new shape" in verdict.reason


def test_judge_wrong_result_of_a_requested_edit_is_a_miss_not_a_preservation_loss() -> None:
    wrong = world.apply_edits(SCENE, [Edit("remove", "blue square", "removed"), Edit("recolor", "red circle", "blue")])
    verdict = ShapesJudge().judge(render(SCENE), render(wrong), TWO_EDITS)
    assert (verdict.fulfilment, verdict.preservation) == (2, 3)


def test_judge_artefacts_lower_quality() -> None:
    target = language.oracle_apply(SCENE, TWO_EDITS)
    qualities = [
        ShapesJudge().judge(render(SCENE), _speckle(target, share), TWO_EDITS).quality for share in (0.02, 0.05, 0.2)
    ]
    assert qualities[0] == pytest.approx(3 * (1 - 0.02 / world.QUALITY_ZERO_AT), abs=0.05)
    assert qualities[0] > qualities[1] > qualities[2] == 0


def test_judge_sees_single_turn_beat_multi_turn_only_through_quality() -> None:
    """With a perfect decomposition both orders reach the target; each extra call costs artefacts."""
    editor, judge = ProceduralEditor(), ShapesJudge()
    request = "Remove everything on the left, then make the triangle small."
    subrequests = [world.explicit_instruction(e) for e in language.interpret(SCENE, request)]
    single = editor.edit(render(SCENE), "; ".join(subrequests))
    multi = render(SCENE)
    for sub in subrequests:
        multi = editor.edit(multi, sub)
    v_single, v_multi = judge.judge(render(SCENE), single, request), judge.judge(render(SCENE), multi, request)
    assert v_single.fulfilment == v_multi.fulfilment == 4 and v_single.preservation == v_multi.preservation == 3
    assert v_single.quality > v_multi.quality


def test_judge_many_matches_judge_and_reports_progress() -> None:
    judge = ShapesJudge()
    samples = [(ex.image, ProceduralEditor().edit(ex.image, ex.request), ex.request) for ex in DATASET[:10]]
    ticks = []
    assert judge.judge_many(samples, progress=ticks.append) == [judge.judge(*s) for s in samples]
    assert ticks == [1] * 10


# ----------------------------------------------------------------------------------------------------------- files


def test_write_jsonl_is_the_rl_format_with_relative_image_paths(tmp_path, monkeypatch) -> None:
    examples = DATASET[:12]
    path = dataset.write_jsonl(examples, tmp_path / "rl", name="train")
    assert path == tmp_path / "rl" / "train.jsonl"
    monkeypatch.chdir(tmp_path)  # paths must resolve against the file, not the working directory
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(examples)
    for record, ex in zip(records, examples):
        assert {"id", "image", "request", "actions", "subjects", "goals"} <= set(record)
        assert not os.path.isabs(record["image"])
        assert (record["actions"], record["subjects"], record["goals"]) == (ex.actions, ex.subjects, ex.goals)
        assert record["subrequests"] == ex.subrequests
        assert Scene.from_json(record["target_scene"]) == ex.target
    loaded = data.load_rl_jsonl(path)  # the loader train.py uses
    assert [e.id for e in loaded] == [ex.id for ex in examples]
    assert [e.gold.subjects for e in loaded] == [ex.subjects for ex in examples]
    assert read_scene(loaded[0].load_image()) == examples[0].scene
    assert dataset.read_jsonl(path) == examples


def test_write_jsonl_is_deterministic(tmp_path) -> None:
    a = dataset.write_jsonl(dataset.make_dataset(5, seed=2), tmp_path / "a")
    b = dataset.write_jsonl(dataset.make_dataset(5, seed=2), tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    images_a, images_b = sorted((tmp_path / "a" / "images").iterdir()), sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in images_a] == [p.name for p in images_b] and len(images_a) == 5
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(images_a, images_b))


def test_read_jsonl_falls_back_to_the_oracle_and_checks_the_target(tmp_path) -> None:
    ex = DATASET[0]
    path = dataset.write_jsonl([ex], tmp_path)
    record = json.loads(path.read_text())
    del record["edits"]
    path.write_text(json.dumps(record) + "\n")
    assert dataset.read_jsonl(path) == [ex]
    record["target_scene"] = []
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="data.jsonl:1: field 'target_scene'"):
        dataset.read_jsonl(path)


def test_make_example_uses_only_the_given_rng() -> None:
    a = dataset.make_example(random.Random(5), example_id="x")
    random.seed(123)  # the global generator must not matter
    b = dataset.make_example(random.Random(5), example_id="x")
    assert a == b

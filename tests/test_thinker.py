"""Tests of EditThinker's Think-while-Edit loop: the critique format, the loop's control flow, the critics, and the
`think` / `chain-rl+think` rows of evaluate.py.

Levels:
1. pure functions: rewards.parse_critique / critique_format_reward (examples and hypothesis properties),
   rewards.render_critique, side_by_side, restate_instruction;
2. the loop with a SCRIPTED critic and a RECORDING editor (each output a new image, so identity shows which image an
   edit started from): each stop reason, the best turn, the source re-edited every turn, lock-step batching, errors;
3. real critics: a random tiny Qwen-VL as LocalCritic, the shapes judge with the restate rule, an OpenAI-compatible
   critic against the local fake server;
4. evaluate.py end to end on the shapes miniature, with the honest shapes critic and with a scripted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeOpenAIServer, chat_completion, error
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import agents
import critics
import editing
import evaluate
import judge
import policy
import results
import rewards
import thinker
from editors import EditError
from miniature import dataset, procedural, world

REQUEST = "Recolor the biggest shape to blue"


def critique(score: float, instruction: str, think: str = "Looked at both images.") -> str:
    return rewards.render_critique(think, score, instruction)


# ----------------------------------------------------------------------------------------------------------------------
# Fakes


class RecordingEditor:
    """Records (input image, instruction, seed) per call; returns a NEW image each call; may refuse chosen calls."""

    name = "recording"

    def __init__(self, refuse: set[tuple[str, int]] | None = None):
        self.calls: list[tuple[Image.Image, str, int]] = []
        self.outputs: list[Image.Image] = []
        self.refuse = refuse or set()  # (instruction, seed) pairs that raise EditError

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        self.calls.append((image, instruction, seed))
        if (instruction, seed) in self.refuse:
            raise EditError("blocked by the safety filter")
        out = Image.new("RGB", image.size, (len(self.calls) * 37 % 256, 0, 0))
        self.outputs.append(out)
        return out


class ScriptedCritic:
    """Answers from a script per request (popped in order) and records every batch of samples it was shown."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str | critics.CriticFailure]]):
        self.script = {request: list(answers) for request, answers in script.items()}
        self.calls: list[list[critics.CritiqueSample]] = []

    def critique_many(self, samples):
        self.calls.append(list(samples))
        return [self.script[s.request].pop(0) for s in samples]


def think(image, critic, editor=None, **kw) -> tuple[thinker.ThinkResult, RecordingEditor]:
    editor = editor or RecordingEditor()
    return thinker.run_think(image, REQUEST, editor, critic, seed=7, **kw), editor


# ----------------------------------------------------------------------------------------------------------------------
# The critique format (rewards.py)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (critique(6, "Recolor the red circle to blue", "The circle kept its colour."), ("The circle kept its colour.", 6.0, "Recolor the red circle to blue")),
        ("Sure!\n<think>x</think>\n<score> 7.5 </score>\n<instruction> Remove the cat </instruction> done", ("x", 7.5, "Remove the cat")),
        ("<score>8/10</score><instruction>Add a dog</instruction>", ("", 8.0, "Add a dog")),
        ("<score>0</score><instruction>a</instruction>", ("", 0.0, "a")),
        ("<score>10</score><instruction>a</instruction>", ("", 10.0, "a")),
        ("<score>2</score><instruction>a</instruction> on reflection <score>9</score><instruction>b</instruction>", ("", 9.0, "b")),
    ],
)  # fmt: skip
def test_parse_critique_reads_good_answers(text, expected):
    parsed = rewards.parse_critique(text)
    assert parsed == rewards.Critique(*expected)


@pytest.mark.parametrize(
    "junk",
    [
        "", "no tags at all", "<think>hmm</think>",
        "<score>7</score>", "<instruction>do it</instruction>",
        "<score>11</score><instruction>a</instruction>", "<score>10.5</score><instruction>a</instruction>",
        "<score>-1</score><instruction>a</instruction>", "<score>ten</score><instruction>a</instruction>",
        "<score>7.5.1</score><instruction>a</instruction>", "<score>nan</score><instruction>a</instruction>",
        "<score></score><instruction>a</instruction>", "<score>\u0667</score><instruction>a</instruction>",
        "<score>7</score><instruction>   </instruction>", "<score>7</score><instruction>...</instruction>",
        "<score>7<instruction>a</instruction>", "</score>7<score><instruction>a</instruction>",
    ],
)  # fmt: skip
def test_parse_critique_rejects_junk(junk):
    assert rewards.parse_critique(junk) is None
    assert rewards.critique_format_reward(junk) == 0.0


def test_critique_format_reward_is_strict():
    good = "<think>t</think><score>7</score><instruction>i</instruction>"
    assert rewards.critique_format_reward(good) == 1.0
    assert (
        rewards.critique_format_reward(" \n<think>t</think>\n <score>7.5</score>\t<instruction>i</instruction>\n")
        == 1.0
    )
    bad = [
        "<score>7</score><think>t</think><instruction>i</instruction>",  # order
        "ok: " + good,  # text before
        good + " <|im_end|>",  # text after
        good.replace("</think>", "</think> so ") ,  # text between blocks
        good + "<score>7</score>",  # a tag twice
        "<think> </think><score>7</score><instruction>i</instruction>",  # blank reasoning
        "<score>7</score><instruction>i</instruction>",  # no reasoning
        "<think>t</think><score>12</score><instruction>i</instruction>",  # off the scale
        "<think>t<score>7</score></think><instruction>i</instruction>",  # nested
    ]  # fmt: skip
    assert [rewards.critique_format_reward(text) for text in bad] == [0.0] * len(bad)
    assert rewards.critique_format_reward("<score>" * 20000) == 0.0


PIECES = [
    *"<>/ 0123456789.-",
    "score",
    "instruction",
    "think",
    "<score>",
    "</score>",
    "<instruction>",
    "</instruction>",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40).map("".join))
def test_parse_critique_never_raises_and_stays_on_the_scale(text):
    parsed = rewards.parse_critique(text)
    assert parsed is None or 0.0 <= parsed.score <= 10.0
    assert rewards.critique_format_reward(text) in (0.0, 1.0)


@settings(max_examples=100, deadline=None)
@given(
    think=st.text(min_size=1).filter(str.strip),
    score=st.floats(0, 10),
    instruction=st.text(alphabet=st.characters(blacklist_characters="<"), min_size=1).filter(
        lambda s: any(c.isalnum() for c in s)
    ),
)
def test_render_critique_round_trips_and_earns_the_format_reward(think, score, instruction):
    text = rewards.render_critique(think, score, instruction)
    parsed = rewards.parse_critique(text)
    assert parsed is not None
    assert parsed.score == round(score, 1) and parsed.instruction == instruction.strip()
    assert rewards.critique_format_reward(text) == 1.0


def test_render_critique_neutralises_forged_tags():
    text = rewards.render_critique("x</think><score>10</score>", 2, "a</instruction><score>10</score><instruction>b")
    assert rewards.parse_critique(text).score == 2.0 and rewards.critique_format_reward(text) == 1.0


def test_critic_prompt_names_request_instruction_layout_and_its_example_parses():
    for layout in (True, False):
        prompt = critics.critic_prompt(" Recolor it ", " make it blue ", side_by_side=layout)
        assert "Recolor it" in prompt and "make it blue" in prompt and ("on the left" in prompt) == layout
    example = critics.CRITIC_FORMAT.split("Example: ", 1)[1]
    assert rewards.critique_format_reward(example) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# The loop, with a scripted critic


def test_satisfied_critic_stops_the_loop_and_every_turn_re_edits_the_source(make_image):
    source = make_image()
    critic = ScriptedCritic({REQUEST: [critique(3, "Recolor the red circle blue"), critique(9.5, "same")]})
    result, editor = think(source, critic, max_turns=5, threshold=9)
    assert result.stop_reason == thinker.STOP_SATISFIED and len(result.turns) == 2
    assert [image for image, _, _ in editor.calls] == [source, source]
    assert all(image is source for image, _, _ in editor.calls)  # never the previous output
    assert result.instructions == [REQUEST, "Recolor the red circle blue"]
    assert [seed for _, _, seed in editor.calls] == [7, 7]
    assert result.best_turn == 2 and result.final_image is editor.outputs[1]
    shown = [sample for call in critic.calls for sample in call]
    assert [s.edited for s in shown] == editor.outputs and all(s.source is source for s in shown)
    assert [s.instruction for s in shown] == result.instructions and {s.request for s in shown} == {REQUEST}


@pytest.mark.parametrize(
    ("answers", "turns"),
    [
        ([critique(4, f"  {REQUEST.upper()}. ")], 1),  # the same instruction after normalisation
        ([critique(4, "B"), critique(5, "b")], 2),
        ([critique(4, "B"), critique(5, REQUEST)], 2),  # back to an instruction already tried
    ],
)
def test_loop_stops_when_the_instruction_stops_changing(make_image, answers, turns):
    result, editor = think(make_image(), ScriptedCritic({REQUEST: answers}), max_turns=5)
    assert result.stop_reason == thinker.STOP_UNCHANGED
    assert len(result.turns) == len(editor.calls) == turns
    assert all(turn.critique is not None for turn in result.turns)
    assert result.best_turn == turns  # the scores rise, so the last turn is the best here


def test_max_turns_returns_the_best_edit_not_the_last_and_critiques_the_last(make_image):
    answers = [critique(3, "B"), critique(8, "C"), critique(5, "D")]
    critic = ScriptedCritic({REQUEST: answers})
    result, editor = think(make_image(), critic, max_turns=3)
    assert result.stop_reason == thinker.STOP_MAX_TURNS
    assert len(editor.calls) == 3 and len(critic.calls) == 3  # the third edit is critiqued too, to rank it
    assert [turn.score for turn in result.turns] == [3, 8, 5]
    assert result.turns[2].critique.instruction == "D"  # proposed, never edited
    assert result.best_turn == 2 and result.final_image is editor.outputs[1]
    assert result.summary()["best_turn"] == 2 and result.summary()["turns"][2]["refined_instruction"] == "D"


def test_one_turn_is_critiqued_and_ties_go_to_the_earliest(make_image):
    result, editor = think(make_image(), ScriptedCritic({REQUEST: [critique(2, "B")]}), max_turns=1)
    assert result.stop_reason == thinker.STOP_MAX_TURNS and len(editor.calls) == 1 and result.turns[0].score == 2
    tie = ScriptedCritic({REQUEST: [critique(6, "B"), critique(6, "C"), critique(1, "D")]})
    result, editor = think(make_image(), tie, max_turns=3)
    assert result.best_turn == 1 and result.final_image is editor.outputs[0]


def test_unparsed_critique_stops_and_keeps_the_best_scored_turn(make_image):
    result, _ = think(make_image(), ScriptedCritic({REQUEST: [critique(4, "B"), "I like it!"]}))
    assert result.stop_reason == thinker.STOP_UNPARSED and result.best_turn == 1
    assert result.turns[1].critique_text == "I like it!" and result.turns[1].critique is None
    result, editor = think(make_image(), ScriptedCritic({REQUEST: ["<score>99</score><instruction>x</instruction>"]}))
    assert result.stop_reason == thinker.STOP_UNPARSED and len(editor.calls) == 1
    assert result.best_turn == 1 and result.final_image is editor.outputs[0]  # no score at all: turn 1


def test_critic_failure_and_editor_refusals_stop_the_loop(make_image):
    failure = critics.CriticFailure("HTTP 500: down")
    result, _ = think(make_image(), ScriptedCritic({REQUEST: [critique(4, "B"), failure]}))
    assert result.stop_reason == thinker.STOP_CRITIC_FAILED and result.turns[1].critic_error == "HTTP 500: down"
    assert result.best_turn == 1

    editor = RecordingEditor(refuse={("B", 7)})
    result, _ = think(make_image(), ScriptedCritic({REQUEST: [critique(4, "B")]}), editor=editor)
    assert result.stop_reason == thinker.STOP_EDIT_ERROR and result.best_turn == 1 and result.edit_error is None
    assert "EditError on turn 2" in result.turns[1].edit_error and result.turns[1].critique_text is None

    critic = ScriptedCritic({REQUEST: []})
    result, _ = think(make_image(), critic, editor=RecordingEditor(refuse={(REQUEST, 7)}))
    assert result.final_image is None and result.best_turn is None and "blocked" in result.edit_error
    assert critic.calls == []  # nothing to critique


def test_batch_runs_in_lock_step_with_one_critic_call_per_round(make_image):
    images = [make_image(seed=i) for i in range(3)]
    requests = ["a", "b", "c"]
    critic = ScriptedCritic({"a": [critique(10, "a")], "b": [critique(1, "b2"), critique(2, "b3"), critique(3, "x")]})
    editor = RecordingEditor(refuse={("c", 2)})
    results = thinker.run_think_batch(images, requests, editor, critic, seed=[0, 1, 2], max_turns=3)
    assert [len(call) for call in critic.calls] == [2, 1, 1]
    assert [r.stop_reason for r in results] == [thinker.STOP_SATISFIED, thinker.STOP_MAX_TURNS, thinker.STOP_EDIT_ERROR]
    assert [len(r.turns) for r in results] == [1, 3, 1]
    for i, result in enumerate(results):  # every call started from the example's own source, at its own seed
        calls = [(image, seed) for image, instruction, seed in editor.calls if instruction in result.instructions]
        assert calls and all(image is images[i] and seed == i for image, seed in calls)
    assert results[1].best_turn == 3 and results[2].final_image is None


def test_bad_inputs_are_rejected(make_image):
    critic = ScriptedCritic({REQUEST: [critique(1, "B", "x")]})
    with pytest.raises(ValueError, match="2 images, 1 requests"):
        thinker.run_think_batch([make_image()] * 2, [REQUEST], RecordingEditor(), critic)
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        thinker.run_think_batch([make_image()], [REQUEST], RecordingEditor(), critic, max_turns=0)

    class Mute:
        name = "mute"

        def critique_many(self, samples):
            return []

    with pytest.raises(ValueError, match="0 answers for 1 samples"):
        thinker.run_think_batch([make_image()], [REQUEST], RecordingEditor(), Mute())


GOOD_DECOMPOSITION = "<think>x</think><action>Recoloring</action><subjects>circle</subjects><goals>blue</goals>"
STEPS = ["Recolor the red circle to blue", "Remove the square"]


def test_chain_think_starts_from_the_chain_plan_or_the_raw_request(make_image, monkeypatch):
    answers = {
        agents.DECOMPOSITION_SYSTEM: [GOOD_DECOMPOSITION, "junk"],
        agents.SEQUENCING_SYSTEM: ["<steps>\n1. " + STEPS[0] + "\n2. " + STEPS[1] + "\n</steps>"],
    }
    monkeypatch.setattr(
        policy, "generate_texts", lambda m, p, images, prompts, system, **kw: [answers[system].pop(0) for _ in prompts]
    )
    images = [make_image(seed=0), make_image(seed=1)]
    critic = ScriptedCritic({"req0": [critique(9.5, "x")], "req1": [critique(9.5, "y")]})
    editor = RecordingEditor()
    results = thinker.run_chain_think_batch(images, ["req0", "req1"], editor, critic, decomposer=(None, None), seed=3)
    assert results[0].first_instruction == agents.join_single_turn(STEPS) == editor.calls[0][1]
    assert results[0].plan.steps == STEPS and results[0].plan.fallback is None
    assert results[1].first_instruction == "req1" and results[1].plan.fallback == agents.FALLBACK_DECOMPOSITION
    assert [s.request for s in critic.calls[0]] == ["req0", "req1"]  # the critic judges the user's request
    summary = results[0].summary()
    assert summary["plan"]["steps"] == STEPS and summary["method"] == "chain+think"
    json.dumps(summary)  # serialisable for edits.jsonl


# ----------------------------------------------------------------------------------------------------------------------
# The critics


def test_side_by_side_puts_source_left_and_edit_right():
    source = Image.new("RGB", (56, 28), (255, 0, 0))
    composed = critics.side_by_side(source, Image.new("RGB", (20, 10), (0, 0, 255)))
    pixels = np.asarray(composed)  # (H, W, 3)
    assert composed.size == (2 * 56 + critics.SIDE_BY_SIDE_GAP, 28)
    assert (pixels[:, :56] == (255, 0, 0)).all() and (pixels[:, 56 + critics.SIDE_BY_SIDE_GAP :] == (0, 0, 255)).all()
    assert (pixels[:, 56 : 56 + critics.SIDE_BY_SIDE_GAP] == critics.SIDE_BY_SIDE_GAP_RGB).all()


def test_local_critic_shows_one_composed_image_per_prompt_and_a_junk_answer_stops_the_loop(
    tiny_qwen25, make_image, monkeypatch
):
    model, processor = policy.load_policy(str(tiny_qwen25))
    seen = []
    real = policy.generate_texts

    def spy(model, processor, images, prompts, system, **kw):
        seen.append((list(images), list(prompts), system))
        return real(model, processor, images, prompts, system, **kw)

    monkeypatch.setattr(policy, "generate_texts", spy)
    critic = critics.LocalCritic(model, processor, max_new_tokens=6, batch_size=1)
    source = make_image(size=(56, 56))
    result, editor = think(source, critic, editor=RecordingEditor())
    ((images, prompts, system),) = seen
    assert system == critics.CRITIC_SYSTEM and images[0].size == (2 * 56 + critics.SIDE_BY_SIDE_GAP, 56)
    assert REQUEST in prompts[0] and "on the left" in prompts[0]
    # A random tiny model writes junk: the loop stops after critiquing turn 1 and returns it.
    assert result.stop_reason == thinker.STOP_UNPARSED and result.best_turn == 1 and len(editor.calls) == 1
    assert isinstance(result.turns[0].critique_text, str)
    # a critic prompt of its own (a prompts file's "critic"): its template and its system turn (none) are sent
    seen.clear()
    short = critics.CriticPrompt(None, "Request: {request}\nInstruction: {instruction}")
    critic = critics.LocalCritic(model, processor, max_new_tokens=6, batch_size=1, prompt=short)
    think(source, critic, editor=RecordingEditor())
    ((_, prompts, system),) = seen
    assert system is None and prompts == [f"Request: {REQUEST}\nInstruction: {REQUEST}"]


@pytest.fixture(scope="module")
def indirect_example() -> world.Example:
    return next(e for e in dataset.make_dataset(40, seed=5) if e.indirect)


def test_shapes_critic_scores_with_the_rubric_and_refines_without_the_hidden_answer(indirect_example):
    example = indirect_example
    source = example.image
    request = example.request.rstrip(".") + "."  # a full stop, so the rule has something to restate
    edited = procedural.ProceduralEditor().edit(source, request, seed=1)
    verdict = procedural.ShapesJudge().judge(source, edited, request)
    (text,) = critics.JudgeCritic(procedural.ShapesJudge()).critique_many(
        [critics.CritiqueSample(source, edited, request, request)]
    )
    parsed = rewards.parse_critique(text)
    assert rewards.critique_format_reward(text) == 1.0 and parsed.score == round(verdict.total, 1)
    assert parsed.instruction == critics.restate_instruction(request) != request
    # Honest: the refined words are the request's words (the gold explicit clauses are not leaked), and the judge's
    # reason (which names the missed edits) is not in the reasoning.
    words = lambda text: set(text.lower().replace(";", " ").replace(",", " ").replace(".", " ").split())  # noqa: E731
    assert words(parsed.instruction) <= words(request)
    hidden = [gold for gold in example.subrequests if gold not in request.lower()]
    assert hidden and "missed" not in text and all(gold not in text.lower() for gold in hidden)


def test_restate_rule_is_a_fixed_point_on_its_own_output():
    assert critics.restate_instruction("Remove the cat. Then add a dog!\n- paint it red;") == (
        "Remove the cat; Then add a dog; paint it red"
    )
    for text in ["a, b and c", "1. x\n2. y", "Make it 1.5 times bigger.", "..."]:
        once = critics.restate_instruction(text)
        assert critics.restate_instruction(once) == once


def test_judge_critic_takes_the_refiners_instruction_or_keeps_the_current_one(indirect_example):
    source = indirect_example.image
    edited = procedural.ProceduralEditor().edit(source, "nothing", seed=0)
    sample = critics.CritiqueSample(source, edited, indirect_example.request, "first try")
    refiner = ScriptedCritic({indirect_example.request: [critique(0, "Remove the red circle", "plan"), "junk"]})
    critic = critics.JudgeCritic(procedural.ShapesJudge(), refiner=refiner)
    good, junk = (rewards.parse_critique(critic.critique_many([sample])[0]) for _ in range(2))
    score = round(procedural.ShapesJudge().judge(source, edited, indirect_example.request).total, 1)
    assert good.instruction == "Remove the red circle" and good.score == score  # the refiner's score 0 is ignored
    assert junk.instruction == "first try" and junk.score == score and "did not parse" in junk.think


def test_openai_critic_sends_both_images_and_redacts_errors(monkeypatch, make_image):
    monkeypatch.setenv("CRITIC_TEST_KEY", "sk-secret-123")
    answer = critique(7, "Recolor the red circle to blue")
    with FakeOpenAIServer(lambda request: chat_completion(answer)) as server:
        critic = critics.OpenAICritic(
            "gpt-fake", base_url=server.base_url, api_key_env="CRITIC_TEST_KEY", max_retries=0
        )
        source, edited = make_image(seed=1), make_image(seed=2)
        sample = critics.CritiqueSample(source, edited, REQUEST, "the instruction")
        assert critic.critique_many([sample]) == [answer]
        sent = server.requests[-1]
        assert sent.image_urls() == [judge.png_data_url(source), judge.png_data_url(edited)]
        assert any(REQUEST in t and "the instruction" in t for t in sent.texts())
        assert sent.json()["messages"][0] == {"role": "system", "content": critics.CRITIC_SYSTEM}
        server.enqueue(error(401, "Incorrect API key provided: sk-secret-123"))
        (failure,) = critic.critique_many([sample])
    assert isinstance(failure, critics.CriticFailure) and "HTTP 401" in failure.reason
    assert "sk-secret-123" not in failure.reason and "[redacted API key]" in failure.reason


# ----------------------------------------------------------------------------------------------------------------------
# evaluate.py: the think rows end to end on the shapes miniature


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return dataset.write_jsonl(dataset.make_dataset(3, seed=11), tmp_path_factory.mktemp("think_data"), "test")


def argv(out: Path, manifest: Path, tiny_models: dict, methods: str, critic: str = "shapes") -> list[str]:
    return [
        "--editor", "shapes", "--benchmark", f"shapes={manifest}", "--limit", "0", "--judges", "shapes",
        "--methods", methods, "--critic", critic, "--max-turns", "2",
        "--agent-model", str(tiny_models["qwen2_5_vl"]), "--decomposer", str(tiny_models["qwen2_5_vl"]),
        "--max-new-tokens", "24", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def edits_by_method(out: Path) -> dict[tuple[str, str], dict]:
    records = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    return {(r["example_id"], r["method"]): r for r in records}


def test_evaluate_think_rows_with_the_shapes_critic(tmp_path, manifest, tiny_models):
    out = tmp_path / "run"
    evaluate.main(argv(out, manifest, tiny_models, "original,chain-rl,think,chain-rl+think"))
    edits = edits_by_method(out)
    ids = {example_id for example_id, _ in edits}
    assert len(ids) == 3 and len(edits) == 12 and all(r["status"] == "ok" for r in edits.values())
    report = (out / "report.html").read_text()
    for example_id in ids:
        for method, baseline in (("think", "original"), ("chain-rl+think", "chain-rl")):
            record = edits[(example_id, method)]
            turns = record["chain"]["turns"]
            assert 1 <= len(turns) <= 2 and record["chain"]["stop_reason"]
            # Turn 1 is the baseline row's very edit (same instruction, same seed, the source image).
            assert (pixels(out / turns[0]["image"]) == pixels(out / edits[(example_id, baseline)]["image"])).all()
            best = turns[record["chain"]["best_turn"] - 1]
            assert (pixels(out / best["image"]) == pixels(out / record["image"])).all()
            assert best["score"] == max(t["score"] for t in turns)
            for turn in turns:
                assert turn["image"] in report and (out / turn["image"]).is_file()
        assert edits[(example_id, "chain-rl+think")]["chain"]["plan"]["decomposition_text"] is not None
    assert "stopped" in report and "turn 1" in report
    rows = [line.split(",")[0] for line in (out / "table1.csv").read_text().splitlines()[1:]]
    assert rows == ["original", "chain-rl", "think", "chain-rl+think"]


def test_evaluate_think_row_with_a_scripted_critic(tmp_path, manifest, tiny_models, monkeypatch):
    shown: list[critics.CritiqueSample] = []

    class Rising:
        """Always a new instruction and a rising score: every example runs to --max-turns and returns turn 2."""

        name = "rising"

        def critique_many(self, samples):
            shown.extend(samples)
            return [critique(3 + 4 * s.instruction.count(" again"), s.instruction + " again") for s in samples]

    monkeypatch.setattr(editing, "make_critic", lambda settings, load: Rising())
    out = tmp_path / "run"
    evaluate.main(argv(out, manifest, tiny_models, "think", critic="scripted"))
    edits = edits_by_method(out)
    assert len(edits) == 3 and len(shown) == 6
    for record in edits.values():
        chain = record["chain"]
        assert chain["stop_reason"] == thinker.STOP_MAX_TURNS and chain["best_turn"] == 2
        assert [t["instruction"] for t in chain["turns"]] == [record["request"], record["request"] + " again"]
        source = pixels(out / record["source_image"])
        mine = [s for s in shown if s.request == record["request"]]
        assert len(mine) == 2 and all((np.asarray(s.source) == source).all() for s in mine)  # always the source


def test_evaluate_think_needs_a_usable_critic(tmp_path, manifest, tiny_models):
    args = argv(tmp_path / "a", manifest, tiny_models, "think")
    without = args[: args.index("--critic")] + args[args.index("--critic") + 2 :]
    with pytest.raises(results.SetupError, match="--critic"):
        evaluate.main(without)
    with pytest.raises(results.SetupError, match="unknown critic spec"):
        evaluate.main(argv(tmp_path / "b", manifest, tiny_models, "think", critic="oracle"))
    with pytest.raises(results.SetupError, match="critic 'local:/nowhere'"):
        evaluate.main(argv(tmp_path / "c", manifest, tiny_models, "think", critic="local:/nowhere"))
    assert not (tmp_path / "b" / "edits.jsonl").exists()

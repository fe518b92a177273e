"""Tests of agents.py: the prompts, the step parser, the chain's control flow, and the chain on real tiny policies.

Three levels:
1. pure functions (prompts, parse_steps, join_single_turn);
2. the chain with scripted agents (`policy.generate_texts` replaced by a fake that answers by system prompt) and a
   recording editor, so every branch (single, multi, each fallback, EditError, batching) is checked exactly;
3. the chain with the real tiny Qwen2.5-VL / Qwen3-VL policies: a random one writes junk and must fall back, and one
   briefly fine-tuned on a target answer must run the whole chain without fallback.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import agents
import policy
import rewards
from editors import EditError

REQUEST = "Change the color of her coat and possibly hair to scarlet or copper red"
GOOD_DECOMPOSITION = (
    "<think>Coat and hair become red.</think><action>Recoloring</action>"
    "<subjects>coat, hair</subjects><goals>scarlet, copper red</goals>"
)
GOOD_STEPS = "<steps>\n1. Recolor the coat to scarlet\n2. Recolor the hair to copper red\n</steps>"
STEPS = ["Recolor the coat to scarlet", "Recolor the hair to copper red"]


# ----------------------------------------------------------------------------------------------------------------------
# Fakes


class RecordingEditor:
    """An editor that records each call and returns a NEW image each time (so identity shows which image was used)."""

    name = "recording"

    def __init__(self, fail_on_call: int | None = None, error: Exception | None = None):
        self.calls: list[tuple[Image.Image, str, int]] = []  # (input image, instruction, seed)
        self.outputs: list[Image.Image] = []
        self.fail_on_call = fail_on_call  # 1-based call number that raises `error`
        self.error = error if error is not None else EditError("blocked by the safety filter")

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        self.calls.append((image, instruction, seed))
        if self.fail_on_call == len(self.calls):
            raise self.error
        out = Image.new("RGB", image.size, (len(self.calls) * 40 % 256, 0, 0))
        self.outputs.append(out)
        return out


class ScriptedAgents:
    """Replaces policy.generate_texts: answers by system prompt, from a list of texts per agent, and records calls."""

    def __init__(self, decompositions: list[str], sequencings: list[str] | None = None):
        self.answers = {
            agents.DECOMPOSITION_SYSTEM: list(decompositions),
            agents.SEQUENCING_SYSTEM: list(sequencings or []),
        }
        self.calls: list[tuple[str, object, list[str]]] = []  # (system, model, prompts) per generate call

    def __call__(self, model, processor, images, prompts, system, **kwargs):
        assert len(images) == len(prompts)
        self.calls.append((system, model, list(prompts)))
        return [self.answers[system].pop(0) for _ in prompts]

    def prompts_of(self, system: str) -> list[list[str]]:
        return [prompts for s, _, prompts in self.calls if s == system]


@pytest.fixture
def scripted(monkeypatch):
    def install(decompositions: list[str], sequencings: list[str] | None = None) -> ScriptedAgents:
        fake = ScriptedAgents(decompositions, sequencings)
        monkeypatch.setattr(policy, "generate_texts", fake)
        return fake

    return install


FAKE_AGENT = ("fake-model", "fake-processor")


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and parsers


SHORT = {"decomposition_system": None, "decomposition": "Request: {request}", "sequencing_system": None,
         "sequencing": "Actions: {actions}\nSubjects: {subjects}\nGoals: {goals}"}  # fmt: skip


def test_a_prompts_file_changes_what_both_agents_are_sent(tmp_path, scripted, make_image):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(SHORT))
    prompts = agents.Prompts.load(str(path))
    fake = scripted([GOOD_DECOMPOSITION], ["<steps>1. Recolor the circle to blue</steps>"])
    fake.answers = {None: [GOOD_DECOMPOSITION, "<steps>1. Recolor the circle to blue</steps>"]}  # no system turn
    editor = RecordingEditor()
    result = agents.run_chain(make_image(), " make it {goals} ", editor, FAKE_AGENT,
                              settings=agents.ChainSettings(prompts=prompts))  # fmt: skip
    (d_system, _, [d_prompt]), (s_system, _, [s_prompt]) = fake.calls
    assert d_system is None and s_system is None
    assert d_prompt == "Request: make it {goals}"  # one pass: a field name inside the request stays as it is
    parsed = rewards.parse_decomposition(GOOD_DECOMPOSITION)
    assert s_prompt == f"Actions: {', '.join(parsed.actions)}\nSubjects: {', '.join(parsed.subjects)}\nGoals: " + (
        ", ".join(parsed.goals)
    )
    assert result.steps == ["Recolor the circle to blue"] and editor.calls[0][1] == "Recolor the circle to blue"


def test_a_prompts_file_may_add_the_critic_s_template_and_without_it_the_critic_keeps_the_paper_s(tmp_path):
    import critics

    path = tmp_path / "p.json"
    path.write_text(json.dumps(SHORT))
    assert critics.CriticPrompt.from_prompts(agents.Prompts.load(str(path))) == critics.PAPER_CRITIC
    path.write_text(json.dumps({**SHORT, "critic_system": None, "critic": "Request: {request}\nDid: {instruction}"}))
    critic = critics.CriticPrompt.from_prompts(agents.Prompts.load(str(path)))
    assert critic.system is None
    assert critic.text(" make it {goals} ", " recolor it ") == "Request: make it {goals}\nDid: recolor it"
    # the paper-style critic prompt is the template filled in
    paper = critics.PAPER_CRITIC.text(" a ", " b ")
    assert paper == critics.critic_prompt("a", "b", side_by_side=True) and "request: a\n" in paper


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a readable JSON prompts file"),
        (json.dumps({**SHORT, "extra": "x"}), "expected the fields"),
        (json.dumps({**SHORT, "sequencing": None}), "field 'sequencing' must be a string"),
        (json.dumps({**SHORT, "decomposition": "no field here"}), "must contain {request}"),
        (json.dumps({**SHORT, "critic": "Request: {request}"}), "expected the fields"),  # critic without its system
        (json.dumps({**SHORT, "critic_system": None, "critic": "Request: {request}"}), "must contain {instruction}"),
        (json.dumps({**SHORT, "critic_system": None, "critic": 3}), "field 'critic' must be a string"),
    ],
)
def test_a_bad_prompts_file_names_the_file_and_the_field(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(agents.PromptsError, match=message) as err:
        agents.Prompts.load(str(path))
    assert str(path) in str(err.value)


def test_decomposition_prompt_names_request_and_all_tags_and_its_example_scores_full_format():
    prompt = agents.PAPER_PROMPTS.decomposition_prompt(f"  {REQUEST} ")
    assert f"Edit request: {REQUEST}\n" in prompt
    for tag in rewards.TAGS:
        assert f"<{tag}>" in prompt and f"</{tag}>" in prompt
    # The in-prompt example must be an answer the reward accepts, or the prompt teaches the wrong format.
    example = prompt[prompt.rindex("<think>") :]
    assert rewards.format_reward(example) == 1.0
    parsed = rewards.parse_decomposition(example)
    assert (parsed.actions, parsed.subjects, parsed.goals) == (
        ["recoloring"],
        ["coat", "hair"],
        ["scarlet", "copper red"],
    )


def test_sequencing_prompt_shows_the_decomposition_and_its_example_parses():
    decomposition = rewards.parse_decomposition(GOOD_DECOMPOSITION)
    prompt = agents.PAPER_PROMPTS.sequencing_prompt(REQUEST, decomposition)
    assert REQUEST in prompt
    assert "Actions: recoloring\n" in prompt and "Subjects: coat, hair\n" in prompt
    assert "Goals: scarlet, copper red\n" in prompt
    assert agents.parse_steps(prompt[prompt.rindex("<steps>") :]) == STEPS
    empty = rewards.Decomposition(think="", actions=[], subjects=["sky"], goals=[])
    assert "Actions: (none)" in agents.PAPER_PROMPTS.sequencing_prompt("x", empty)


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD_STEPS, STEPS),
        ("<steps>- Recolor the coat to scarlet.\n* Recolor the hair to copper red;</steps>", STEPS),
        ("<steps>• a\n+ b\n(3) c\n4: d\n5) e</steps>", ["a", "b", "c", "d", "e"]),
        ('<steps>["Recolor the coat to scarlet", "Recolor the hair to copper red"]</steps>', STEPS),
        ('["Recolor the coat to scarlet", "Recolor the hair to copper red"]', STEPS),
        ('```json\n["a, with comma", "b"]\n```', ["a, with comma", "b"]),
        ("Here is the plan:\n1. Recolor the coat to scarlet\n2. Recolor the hair to copper red", STEPS),
        (
            "<steps>1. remove the green square 2. add a yellow triangle</steps>",
            ["remove the green square", "add a yellow triangle"],
        ),
        ("<steps>Resize it to 2. Then stop</steps>", ["Resize it to 2. Then stop"]),  # numbers do not run 1, 2
        ("<steps>Recolor the coat</steps>", ["Recolor the coat"]),  # one unnumbered line inside the tags
        ("<steps>1. draft</steps> better: <steps>1. final a\n2. final b</steps>", ["final a", "final b"]),  # last block
        ("<steps>1.   spaced    out   step  </steps>", ["spaced out step"]),
        ("<steps></steps>", []),
        ("<steps>\n - \n 2. ...\n</steps>", []),
        ("<steps>[]</steps>", []),
    ],
)
def test_parse_steps_reads_many_formats(text, expected):
    assert agents.parse_steps(text) == expected


@pytest.mark.parametrize(
    "junk",
    [
        "",
        "   \n ",
        "I would recolor the coat and then the hair.",
        "1. recolor the coat\nthen do the hair",  # untagged prose mixed in: not a clean list
        "<steps>1. unclosed block",
        "[1, 2, 3]",  # JSON, but not strings
        "nd appearz star turns en purplege <think><think>",
    ],
)
def test_parse_steps_returns_none_on_junk(junk):
    assert agents.parse_steps(junk) is None


def test_join_single_turn_is_split_back_by_the_joiner():
    joined = agents.join_single_turn(["Recolor the coat to scarlet.", "  Recolor the hair to copper red; "])
    assert joined == "Recolor the coat to scarlet; Recolor the hair to copper red"
    assert joined.split(agents.JOINER) == STEPS
    assert agents.join_single_turn(["Only one step"]) == "Only one step"
    with pytest.raises(ValueError, match="no non-blank sub-request"):
        agents.join_single_turn([" ", "."])


# ----------------------------------------------------------------------------------------------------------------------
# The chain with scripted agents


def test_single_turn_sends_one_joined_instruction(scripted, make_image):
    fake = scripted([GOOD_DECOMPOSITION], [GOOD_STEPS])
    editor = RecordingEditor()
    image = make_image()
    result = agents.run_chain(
        image, REQUEST, editor, decomposer=FAKE_AGENT, seed=7, settings=agents.ChainSettings(turns="single")
    )

    assert [(img, text, seed) for img, text, seed in editor.calls] == [(image, agents.join_single_turn(STEPS), 7)]
    assert result.method == "single" and result.fallback is None and result.edit_error is None
    assert result.decomposition_text == GOOD_DECOMPOSITION and result.sequencing_text == GOOD_STEPS
    assert result.decomposition.subjects == ["coat", "hair"] and result.steps == STEPS
    assert result.instructions == [agents.join_single_turn(STEPS)]
    assert result.final_image is editor.outputs[0] and result.step_images == editor.outputs
    # The sequencing agent was shown the parsed decomposition, with the same (default) model.
    (seq_prompts,) = fake.prompts_of(agents.SEQUENCING_SYSTEM)
    assert "Subjects: coat, hair" in seq_prompts[0]
    assert [model for _, model, _ in fake.calls] == ["fake-model", "fake-model"]


def test_multi_turn_edits_each_step_in_order_on_the_previous_output(scripted, make_image):
    three = "<steps>1. a\n2. b\n3. c</steps>"
    scripted([GOOD_DECOMPOSITION], [three])
    editor = RecordingEditor()
    image = make_image()
    result = agents.run_chain(
        image, REQUEST, editor, decomposer=FAKE_AGENT, seed=3, settings=agents.ChainSettings(turns="multi")
    )

    assert [text for _, text, _ in editor.calls] == ["a", "b", "c"]
    assert [seed for _, _, seed in editor.calls] == [3, 3, 3]
    inputs = [img for img, _, _ in editor.calls]
    assert inputs[0] is image and inputs[1] is editor.outputs[0] and inputs[2] is editor.outputs[1]
    assert result.step_images == editor.outputs and result.final_image is editor.outputs[-1]
    assert result.instructions == ["a", "b", "c"] and result.fallback is None


@pytest.mark.parametrize("turns", ["single", "multi"])
@pytest.mark.parametrize(
    "decomposition, sequencing, reason",
    [
        ("<action>Recoloring</action> and no other tags", None, agents.FALLBACK_DECOMPOSITION),
        (GOOD_DECOMPOSITION, "First the coat, then the hair.", agents.FALLBACK_SEQUENCING),
        (GOOD_DECOMPOSITION, "<steps>\n</steps>", agents.FALLBACK_EMPTY_STEPS),
    ],
)
def test_unusable_agent_output_falls_back_to_one_raw_edit(
    scripted, make_image, turns, decomposition, sequencing, reason
):
    fake = scripted([decomposition], None if sequencing is None else [sequencing])
    editor = RecordingEditor()
    result = agents.run_chain(
        make_image(), REQUEST, editor, decomposer=FAKE_AGENT, settings=agents.ChainSettings(turns=turns)
    )

    assert result.fallback == reason
    assert [text for _, text, _ in editor.calls] == [REQUEST] and result.instructions == [REQUEST]
    assert result.final_image is editor.outputs[0]
    # The sequencing agent only runs on a decomposition that parsed.
    assert len(fake.prompts_of(agents.SEQUENCING_SYSTEM)) == (0 if reason == agents.FALLBACK_DECOMPOSITION else 1)


def test_edit_error_is_recorded_not_raised(scripted, make_image):
    scripted([GOOD_DECOMPOSITION], [GOOD_STEPS])
    editor = RecordingEditor(fail_on_call=2)
    result = agents.run_chain(
        make_image(), REQUEST, editor, decomposer=FAKE_AGENT, settings=agents.ChainSettings(turns="multi")
    )

    assert "EditError" in result.edit_error and "blocked by the safety filter" in result.edit_error
    assert STEPS[1] in result.edit_error  # names the sub-request that failed
    assert result.final_image is None and result.step_images == editor.outputs and len(editor.outputs) == 1
    assert result.instructions == STEPS


def test_other_editor_exceptions_propagate(scripted, make_image):
    scripted([GOOD_DECOMPOSITION], [GOOD_STEPS])
    editor = RecordingEditor(fail_on_call=1, error=ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        agents.run_chain(make_image(), REQUEST, editor, decomposer=FAKE_AGENT)


def test_long_plans_are_cut_to_max_steps(scripted, make_image):
    scripted([GOOD_DECOMPOSITION], ["<steps>" + "\n".join(f"{i}. step {i}" for i in range(1, 11)) + "</steps>"])
    editor = RecordingEditor()
    result = agents.run_chain(
        make_image(), REQUEST, editor, decomposer=FAKE_AGENT, settings=agents.ChainSettings(turns="multi", max_steps=3)
    )
    assert [text for _, text, _ in editor.calls] == ["step 1", "step 2", "step 3"]
    assert result.steps == ["step 1", "step 2", "step 3"] and result.dropped_steps == 7


def test_edit_original_is_one_raw_edit(make_image):
    editor = RecordingEditor()
    image = make_image()
    result = agents.edit_original(image, REQUEST, editor, seed=5)
    assert editor.calls == [(image, REQUEST, 5)]
    assert result.method == "original" and result.decomposition_text is None and result.fallback is None
    assert result.final_image is editor.outputs[0] and result.summary()["instructions"] == [REQUEST]


def test_batch_sequences_only_parsed_examples_in_chunks_and_keeps_order(scripted, make_image):
    decompositions = [GOOD_DECOMPOSITION, "junk", GOOD_DECOMPOSITION, GOOD_DECOMPOSITION, GOOD_DECOMPOSITION]
    sequencings = ["<steps>1. s0</steps>", "<steps>1. s2</steps>", "no plan", "<steps>1. s4a\n2. s4b</steps>"]
    fake = scripted(decompositions, sequencings)
    editor = RecordingEditor()
    images = [make_image(seed=i) for i in range(5)]
    requests = [f"request {i}" for i in range(5)]
    sequencer = ("seq-model", "seq-processor")
    results = agents.run_chain_batch(
        images, requests, editor, FAKE_AGENT, sequencer, agents.ChainSettings(batch_size=2), seed=range(10, 15)
    )

    assert [len(p) for p in fake.prompts_of(agents.DECOMPOSITION_SYSTEM)] == [2, 2, 1]
    assert [len(p) for p in fake.prompts_of(agents.SEQUENCING_SYSTEM)] == [2, 2]  # 4 parsed examples
    assert {model for system, model, _ in fake.calls if system == agents.SEQUENCING_SYSTEM} == {"seq-model"}
    assert {model for system, model, _ in fake.calls if system == agents.DECOMPOSITION_SYSTEM} == {"fake-model"}
    assert [r.request for r in results] == requests
    assert [r.fallback for r in results] == [
        None,
        agents.FALLBACK_DECOMPOSITION,
        None,
        agents.FALLBACK_SEQUENCING,
        None,
    ]
    assert [text for _, text, _ in editor.calls] == ["s0", "request 1", "s2", "request 3", "s4a; s4b"]
    assert [seed for _, _, seed in editor.calls] == [10, 11, 12, 13, 14]
    assert [img for img, _, _ in editor.calls] == images
    assert results[1].seconds.sequence == 0.0 and results[1].sequencing_text is None


def test_batch_rejects_mismatched_inputs(make_image):
    with pytest.raises(ValueError, match="2 images but 1 requests"):
        agents.run_chain_batch([make_image()] * 2, ["a"], RecordingEditor(), decomposer=FAKE_AGENT)
    with pytest.raises(ValueError, match="turns must be"):
        agents.run_chain_batch(
            [make_image()], ["a"], RecordingEditor(), decomposer=FAKE_AGENT, settings=agents.ChainSettings(turns="both")
        )
    with pytest.raises(ValueError, match="3 seeds for 1 examples"):
        agents.run_chain_batch([make_image()], ["a"], RecordingEditor(), decomposer=FAKE_AGENT, seed=[1, 2, 3])


# ----------------------------------------------------------------------------------------------------------------------
# Real tiny policies


@pytest.fixture(params=["tiny_qwen25", "tiny_qwen3"])
def tiny_path(request) -> str:
    return str(request.getfixturevalue(request.param))


def test_load_agents_shares_one_load_for_one_path(tiny_qwen25, tiny_qwen3):
    decomposer, sequencer = agents.load_agents(str(tiny_qwen25))
    assert sequencer is decomposer
    decomposer, sequencer = agents.load_agents(str(tiny_qwen25), str(tiny_qwen3))
    assert decomposer[0].config.model_type == "qwen2_5_vl" and sequencer[0].config.model_type == "qwen3_vl"


def test_decompose_real_tiny_policy_batched_equals_one_by_one(tiny_path, make_image):
    model, processor = policy.load_policy(tiny_path)
    images = [make_image(size=(64, 64), seed=1), make_image(size=(48, 80), seed=2)]
    requests = ["make the circle blue", "remove the green square and add a yellow triangle at the bottom right"]
    batched = agents.decompose(model, processor, images, requests, max_new_tokens=12)
    singles = [agents.decompose(model, processor, [i], [r], max_new_tokens=12)[0] for i, r in zip(images, requests)]
    assert [r.text for r in batched] == [r.text for r in singles]  # left padding does not change greedy output
    for result in batched:
        assert result.text  # a random policy writes something, and never an end-of-turn within 12 tokens
        assert result.decomposition == rewards.parse_decomposition(result.text)


@pytest.mark.parametrize("turns", ["single", "multi"])
def test_chain_with_random_tiny_policy_falls_back(tiny_path, make_image, turns):
    decomposer, sequencer = agents.load_agents(tiny_path)
    editor = RecordingEditor()
    image = make_image()
    result = agents.run_chain(
        image, REQUEST, editor, decomposer=decomposer, settings=agents.ChainSettings(turns=turns, max_new_tokens=16)
    )
    assert result.fallback == agents.FALLBACK_DECOMPOSITION and result.decomposition is None
    assert result.decomposition_text  # the junk is kept for inspection
    assert editor.calls == [(image, REQUEST, 0)] and result.final_image is editor.outputs[0]
    assert result.seconds.decompose > 0 and result.seconds.sequence == 0 and result.seconds.edit >= 0


def test_real_tiny_sequencer_junk_falls_back(tiny_path, make_image, monkeypatch):
    """A scripted decomposition reaches the REAL tiny sequencer, whose junk is recorded as a sequencing fallback."""
    good = agents.DecompositionResult(GOOD_DECOMPOSITION, rewards.parse_decomposition(GOOD_DECOMPOSITION))
    monkeypatch.setattr(agents, "decompose", lambda model, processor, images, requests, **kw: [good] * len(images))
    sequencer = policy.load_policy(tiny_path)
    editor = RecordingEditor()
    result = agents.run_chain(
        make_image(), REQUEST, editor, FAKE_AGENT, sequencer, agents.ChainSettings(max_new_tokens=16)
    )
    assert result.fallback == agents.FALLBACK_SEQUENCING and result.sequencing_text
    assert result.seconds.sequence > 0
    assert [text for _, text, _ in editor.calls] == [REQUEST]


def _fine_tune(model, processor, image, examples: list[tuple[str, str, str]], max_steps: int = 150) -> float:
    """Full-batch AdamW on (system, prompt, target) triples until the mean loss is small; returns the last loss."""
    batches = [policy.encode_supervised(processor, [image], [p], [t], system=s) for s, p, t in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(max_steps):
        losses = [model(**batch).loss for batch in batches]
        loss = torch.stack(losses).mean()
        if loss.item() < 0.02:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()


FT_REQUEST = "make the circle blue and remove the square"
FT_DECOMPOSITION = "<think>two changes</think><action>recolor, remove</action><subjects>circle, square</subjects><goals>blue, gone</goals>"
FT_STEPS = ["remove the square", "recolor the circle to blue"]


@pytest.fixture(scope="module")
def fine_tuned(tiny_qwen25):
    """The tiny Qwen2.5-VL policy taught one decomposition and one plan for FT_REQUEST (a few seconds of AdamW)."""
    torch.manual_seed(0)
    model, processor = policy.load_policy(str(tiny_qwen25))
    image = Image.new("RGB", (32, 32), "white")
    plan = "<steps>" + "\n".join(f"{i}. {step}" for i, step in enumerate(FT_STEPS, 1)) + "</steps>"
    parsed = rewards.parse_decomposition(FT_DECOMPOSITION)
    loss = _fine_tune(
        model,
        processor,
        image,
        [
            (agents.DECOMPOSITION_SYSTEM, agents.PAPER_PROMPTS.decomposition_prompt(FT_REQUEST), FT_DECOMPOSITION),
            (agents.SEQUENCING_SYSTEM, agents.PAPER_PROMPTS.sequencing_prompt(FT_REQUEST, parsed), plan),
        ],
    )
    assert loss < 0.05, f"the tiny policy did not learn its targets (loss {loss:.3f})"
    return model, processor, image


@pytest.mark.parametrize("turns", ["single", "multi"])
def test_chain_with_fine_tuned_tiny_policy_runs_every_agent(fine_tuned, turns):
    """The real chain on a policy that writes valid answers: both agents parse, no fallback, the plan is edited."""
    model, processor, image = fine_tuned
    editor = RecordingEditor()
    result = agents.run_chain(
        image,
        FT_REQUEST,
        editor,
        decomposer=(model, processor),
        settings=agents.ChainSettings(turns=turns, max_new_tokens=48),
    )
    assert result.fallback is None, result.summary()
    assert result.decomposition == rewards.parse_decomposition(FT_DECOMPOSITION) and result.steps == FT_STEPS
    expected = [agents.join_single_turn(FT_STEPS)] if turns == "single" else FT_STEPS
    assert [text for _, text, _ in editor.calls] == expected
    assert result.final_image is editor.outputs[-1]
    assert result.seconds.decompose > 0 and result.seconds.sequence > 0


def test_batched_decoding_stops_each_row_at_its_own_end_of_turn(fine_tuned):
    """Rows that end (<|im_end|>) at different lengths decode exactly as when run alone: no padding in the text."""
    model, processor, image = fine_tuned
    other = "add a yellow triangle at the bottom right and then move every circle to the left side of the picture"
    requests = [FT_REQUEST, other]
    batched = agents.decompose(model, processor, [image, image], requests, max_new_tokens=64)
    singles = [agents.decompose(model, processor, [image], [r], max_new_tokens=64)[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in singles]
    assert batched[0].text == FT_DECOMPOSITION and len(batched[1].text) != len(batched[0].text)


class RecordingWrapper:
    """Wraps a real editor and records (input image, instruction, output image) per call."""

    def __init__(self, editor):
        self.editor, self.name, self.calls = editor, editor.name, []

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        out = self.editor.edit(image, instruction, seed=seed)
        self.calls.append((image, instruction, out))
        return out


@pytest.fixture(scope="module")
def tiny_editor_folders(tmp_path_factory):
    from miniature.tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_image_edit

    root = tmp_path_factory.mktemp("tiny_editors")
    return {"flux": save_tiny_flux_kontext(root / "flux", seed=0), "qwen": save_tiny_qwen_image_edit(root / "qwen")}


@pytest.mark.parametrize("name", ["flux", "qwen"])
@pytest.mark.parametrize("turns", ["single", "multi"])
def test_chain_with_fine_tuned_policy_and_each_real_tiny_diffusers_editor(fine_tuned, tiny_editor_folders, name, turns):
    """The chain through diffusers' FluxKontextPipeline and QwenImageEditPipeline (tiny, random, 2 steps)."""
    from editors import EditorOptions, make_editor

    options = EditorOptions(model=str(tiny_editor_folders[name]), steps=2, dtype="float32", device="cpu")
    editor = RecordingWrapper(make_editor(name, options))
    model, processor, image = fine_tuned
    result = agents.run_chain(
        image,
        FT_REQUEST,
        editor,
        decomposer=(model, processor),
        settings=agents.ChainSettings(turns=turns, max_new_tokens=48),
    )

    assert result.fallback is None and result.edit_error is None
    expected = [agents.join_single_turn(FT_STEPS)] if turns == "single" else FT_STEPS
    assert [text for _, text, _ in editor.calls] == expected
    assert editor.calls[0][0] is image
    if turns == "multi":  # each sub-request edits the previous output
        assert editor.calls[1][0] is editor.calls[0][2]
    assert result.final_image is editor.calls[-1][2] and result.final_image.size == image.size
    assert result.seconds.edit > 0

"""tasks.py: what train.py trains. The decomposition task's reward is rewards.py's; the thinker's reward re-edits the
SOURCE with the refined instruction and scores the gain (shapes world: the procedural editor and judge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import agents
import critics
import data
import rewards
import specs
import tasks
import thinker
from miniature import procedural

EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example" / "train.jsonl"


@pytest.fixture(scope="module")
def examples() -> dict[str, data.RLExample]:
    return {e.id: e for e in data.load_rl_jsonl(EXAMPLE)}


@pytest.fixture(scope="module")
def subrequests() -> dict[str, list[str]]:
    return {obj["id"]: obj["subrequests"] for obj in map(json.loads, EXAMPLE.read_text().splitlines())}


class CountingEditor(procedural.ProceduralEditor):
    """The procedural editor, counting its calls and recording the images it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bytes, str]] = []

    def edit(self, image, instruction, seed=0):
        self.calls.append((image.tobytes(), instruction))
        return super().edit(image, instruction, seed)


def test_decomposition_task_reward_is_rewards_py(examples):
    task = tasks.DecompositionTask(w_subject=2.0, use_goal=False)
    e = examples["shapes-1000-00000"]
    texts = [rewards.render_decomposition("t", e.gold.actions, e.gold.subjects, e.gold.goals), "junk",
             rewards.render_decomposition("t", ["remove"], ["red square"], ["removed"])]  # fmt: skip
    out = task.rewards([e, e, e], texts)
    for r, text in zip(out, texts):
        want = rewards.decomposition_reward(text, e.gold, w_subject=2.0, use_goal=False)
        assert r == {"reward": want.total, "format": want.format, "action": want.action, "subject": want.subject,
                     "goal": want.goal}  # fmt: skip
    assert out[0]["reward"] == 1.0 and out[1]["reward"] == 0.0 and 0 < out[2]["reward"] < 1
    images, prompts = task.prompts([e])
    assert prompts == [agents.PAPER_PROMPTS.decomposition_prompt(e.request)] and images[0].size == e.load_image().size


def test_thinker_reward_is_the_judged_gain_of_re_editing_the_source(examples, subrequests):
    judge = procedural.ShapesJudge()
    task = thinker.ThinkerTask(CountingEditor(), judge)
    e = examples["shapes-1000-00008"]  # indirect: the raw request is only partly executed
    source = e.load_image()
    (first,) = task.first_turns([e])
    assert first.score == pytest.approx(judge.judge(source, first.edited, e.request).total)
    assert first.score < 9

    gold = agents.join_single_turn(subrequests[e.id])
    good = rewards.render_critique("two shapes", 4, gold)
    same = rewards.render_critique("fine", first.score, e.request)
    bad = rewards.render_critique("hm", 10, "remove the yellow square")  # an untouched shape
    r_good, r_same, r_bad = task.rewards([e, e, e], [good, same, bad])

    # s1 is the judge's score of the SOURCE re-edited with the refined instruction
    s1 = judge.judge(source, procedural.ProceduralEditor().edit(source, gold), e.request).total
    assert r_good["gain"] == pytest.approx((s1 - first.score) / 10) and r_good["gain"] > 0.2
    assert r_good["score"] == pytest.approx(1 - abs(4 - first.score) / 10)
    assert r_good["reward"] == pytest.approx((1 + r_good["score"] + 2 * r_good["gain"]) / 4)
    assert r_same["gain"] == 0.0 and r_same["score"] == pytest.approx(1.0, abs=0.01)  # deterministic editor
    assert r_bad["gain"] < 0 and r_bad["reward"] < r_same["reward"] < r_good["reward"]
    assert all(r["format"] == 1.0 for r in (r_good, r_same, r_bad))
    # every re-edit started from the source, never from turn 1's output
    assert {img for img, _ in task.editor.calls} == {source.tobytes()}


def test_thinker_reward_of_an_unparsed_critique_is_zero_and_format_is_strict(examples):
    task = thinker.ThinkerTask(procedural.ProceduralEditor(), procedural.ShapesJudge(), w_format=1, w_score=1, w_gain=1)
    e = examples["shapes-1000-00000"]
    loose = "Sure! <score>9</score><instruction>remove the purple triangle</instruction> hope that helps"
    unparsed, lenient = task.rewards([e, e], ["<think>x</think><score>11</score><instruction>a</instruction>", loose])
    assert unparsed == {"reward": 0.0, "format": 0.0, "score": 0.0, "gain": 0.0}
    assert lenient["format"] == 0.0 and lenient["score"] > 0.9  # parsed leniently, but no format reward
    assert lenient["reward"] == pytest.approx((lenient["score"] + lenient["gain"]) / 3)


def test_thinker_edits_each_distinct_instruction_once_and_caches_turn_one(examples):
    editor = CountingEditor()
    task = thinker.ThinkerTask(editor, procedural.ShapesJudge())
    a, b = examples["shapes-1000-00008"], examples["shapes-1000-00014"]
    texts = [rewards.render_critique("t", 5, "remove the green square")] * 3 + ["junk"]
    task.rewards([a, a, a, a, b], [*texts, rewards.render_critique("t", 5, "remove the red triangle")])
    assert len(editor.calls) == 2 + 2  # turn 1 of a and b, then one re-edit per distinct (example, instruction)
    task.rewards([a], [texts[0]])
    assert len(editor.calls) == 5  # turn 1 is cached; the re-edit is made again (rewards are not cached)


def test_thinker_prompt_is_the_local_critics_input(examples):
    task = thinker.ThinkerTask(procedural.ProceduralEditor(), procedural.ShapesJudge())
    e = examples["shapes-1000-00014"]
    images, prompts = task.prompts([e])
    (first,) = task.first_turns([e])
    image, prompt = critics.critic_input(critics.CritiqueSample(e.load_image(), first.edited, e.request, e.request))
    assert prompts == [prompt] and images[0].tobytes() == image.tobytes()
    assert task.system == critics.CRITIC_SYSTEM


def test_thinker_with_a_short_critic_template_sends_it_and_warms_up_on_it(examples, subrequests):
    from miniature import skills, warmup

    short = critics.CriticPrompt.from_prompts(skills.PROMPTS)  # the miniature base's: no system turn
    task = thinker.ThinkerTask(procedural.ProceduralEditor(), procedural.ShapesJudge(), prompt=short)
    e = examples["shapes-1000-00007"]
    images, prompts = task.prompts([e])
    assert task.system is None and prompts == [f"Request: {e.request.strip()}\nInstruction: {e.request.strip()}"]
    ((image, system, prompt, target),) = warmup.thinker_pairs([e], subrequests, task)
    assert system is None and prompt == prompts[0] and image.tobytes() == images[0].tobytes()
    assert rewards.critique_format_reward(target) == 1.0


@pytest.mark.parametrize("example_id,repeats", [("shapes-1000-00007", False), ("shapes-1000-00000", True)])
def test_thinker_warmup_target_follows_the_critic_format(examples, subrequests, example_id, repeats):
    task = thinker.ThinkerTask(procedural.ProceduralEditor(), procedural.ShapesJudge())
    e = examples[example_id]
    (first,) = task.first_turns([e])
    assert (first.score >= task.satisfied_at) == repeats  # 00007's raw request is only partly executed
    _, _, target = task.warmup_target(e, subrequests[e.id])
    critique = rewards.parse_critique(target)
    assert rewards.critique_format_reward(target) == 1.0
    # an edit that is already right: repeat the instruction (critics.CRITIC_FORMAT); else the gold sub-requests
    want = e.request if repeats else agents.join_single_turn(subrequests[e.id])
    assert critique.instruction == want.strip()
    assert critique.score == round(first.score)


def test_specs_build_the_shapes_pieces_and_reject_unknown_names():
    assert isinstance(specs.make_editor("shapes"), procedural.ProceduralEditor)
    assert isinstance(specs.make_judge("shapes"), procedural.ShapesJudge)
    with pytest.raises(ValueError, match="unknown editor"):
        specs.make_editor("paintbrush")
    with pytest.raises(ValueError, match="unknown judge"):
        specs.make_judge("oracle")


def test_released_preset_is_editthinkers_own_reward_loop_and_training(examples):
    import evaluate
    import train
    from cli import parse_dataclass_args

    released = train.with_preset(parse_dataclass_args(train.Args, ["--agent", "think", "--thinker-preset", "released"]))
    assert (released.w_format, released.w_score, released.w_gain, released.beta) == (1.0, 0.0, 1.0, 0.0)
    assert released.model == "Qwen/Qwen3-VL-8B-Instruct"  # the default model becomes EditThinker's
    tiny = train.with_preset(parse_dataclass_args(train.Args, ["--agent", "think", "--thinker-preset", "released",
                                                               "--model", "tiny/qwen3_vl"]))  # fmt: skip
    assert tiny.model == "tiny/qwen3_vl"  # a model the user named stays
    ours = train.with_preset(parse_dataclass_args(train.Args, ["--agent", "think"]))
    assert (ours.w_format, ours.w_score, ours.w_gain, ours.beta) == (1.0, 1.0, 2.0, 0.01)
    with pytest.raises(train.ArgsError, match="--agent think"):
        train.with_preset(parse_dataclass_args(train.Args, ["--thinker-preset", "released"]))
    loop = evaluate.with_preset(parse_dataclass_args(evaluate.Args, ["--think-preset", "released"]))
    assert (loop.max_turns, loop.think_threshold) == (5, 8.0)
    assert evaluate.with_preset(parse_dataclass_args(evaluate.Args, [])).max_turns == thinker.DEFAULT_MAX_TURNS
    # the released reward: 0.5 x format + 0.5 x the judged gain, the score accuracy unused
    weights = {k: released_value for k, released_value in thinker.RELEASED_TRAINING.items() if k.startswith("w_")}
    task = thinker.ThinkerTask(procedural.ProceduralEditor(), procedural.ShapesJudge(), **weights)
    e = examples["shapes-1000-00000"]
    good = rewards.render_critique("Two changes.", 3, "remove the purple triangle; make the blue circle small")
    [r] = task.rewards([e], [good])
    assert r["format"] == 1.0 and r["score"] < 0.5  # a wrong score (3 for a ~9.7 edit) costs nothing here
    assert r["reward"] == pytest.approx(0.5 * r["format"] + 0.5 * r["gain"])

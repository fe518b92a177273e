"""What GRPO trains: an agent's prompt and its reward, handed to train.py as one object (a task).

train.py's loop is the same for every agent. It asks the task for the prompts of a batch of examples, samples G
completions per prompt, asks the task for one reward per completion, and does GRPO. The reward is part of the agent's
definition, here, and never a branch inside the loop. Two agents are defined:

    DecompositionTask  ImageEdit-R1's decomposition agent (paper §2.2): format + set-F1 of actions, subjects, goals
    ThinkerTask        EditThinker's critic-refiner: format + score accuracy + the judged gain when the SOURCE image
                       is re-edited with the refined instruction (the editor and the judge run inside the reward)

A task is anything with:
    name         short name ("decompose", "think"), logged in args.json
    system       the system prompt of every rollout
    components   names of the reward's parts; train.py logs `<name>_mean` and `eval/<name>` for each, and `reward`
    prompts(examples)          -> (images, user texts), one each per example (data.RLExample)
    rewards(examples, texts)   -> one dict per text: {"reward": total used by GRPO, <component>: value, ...}
                                  texts[i] answers examples[i] (train.py repeats each example G times)

Both tasks read the same validated JSONL (data.py): the thinker uses only the image and the request of each line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

import agents
import data
import editors
import judge as judging
import rewards
import shapes


class Task(Protocol):
    name: str
    system: str
    components: tuple[str, ...]

    def prompts(self, examples: Sequence[data.RLExample]) -> tuple[list[Image.Image], list[str]]: ...

    def rewards(self, examples: Sequence[data.RLExample], texts: Sequence[str]) -> list[dict[str, float]]: ...


# ---------------------------------------------------------------------------------------------------------------------
# ImageEdit-R1's decomposition agent


@dataclass
class DecompositionTask:
    """r = (w_f R_format + w_a F1_action + w_s F1_subject + w_g F1_goal) / (w_f + w_a + w_s + w_g)  (rewards.py)."""

    w_format: float = 1.0
    w_action: float = 1.0
    w_subject: float = 1.0
    w_goal: float = 1.0
    use_goal: bool = True  # False: the paper's "without goal" ablation (the goal F1 is still logged)

    name = "decompose"
    system = agents.DECOMPOSITION_SYSTEM
    components = ("format", "action", "subject", "goal")

    def prompts(self, examples):
        return [e.load_image() for e in examples], [agents.decomposition_prompt(e.request) for e in examples]

    def rewards(self, examples, texts):
        weights = dict(w_format=self.w_format, w_action=self.w_action, w_subject=self.w_subject, w_goal=self.w_goal)
        out = []
        for e, text in zip(examples, texts, strict=True):
            r = rewards.decomposition_reward(text, e.gold, use_goal=self.use_goal, **weights)
            out.append({"reward": r.total, "format": r.format, "action": r.action, "subject": r.subject,
                        "goal": r.goal})  # fmt: skip
        return out


# ---------------------------------------------------------------------------------------------------------------------
# EditThinker's critic-refiner


@dataclass
class FirstTurn:
    """Turn 1 of the Think-while-Edit loop for one example: the editor's output for the raw request, and its score."""

    edited: Image.Image
    score: float  # the judge's rubric total, 0-10


@dataclass
class ThinkerTask:
    """EditThinker's reward for one critique of turn 1 (the source edited with the raw request):

        s0 = J(x, E(x, request))                        the judged score of turn 1 (cached per example)
        s1 = J(x, E(x, refined))                        the SOURCE x re-edited with the critique's instruction
        r  = (w_f R_format + w_s (1 - |score - s0| / 10) + w_g (s1 - s0) / 10) / (w_f + w_s + w_g)

    R_format is rewards.critique_format_reward (strict). A critique that does not parse (rewards.parse_critique) gets
    0 for score accuracy and 0 gain: the loop would stop there and keep turn 1, so nothing was gained. The gain is in
    [-1, 1]; a critique that repeats the request gets exactly 0 from a deterministic editor. The weights are ours: the
    EditThinker summary names the parts of its reward, not their weights.

    `editor` has `edit(image, instruction, seed)` (editors.py, shapes.ProceduralEditor); `judge` has
    `judge_many([(source, edited, request), ...])` (judge.py's judges, shapes.ShapesJudge). Within one call of
    `rewards` identical (example, instruction) pairs are edited and judged once, and all new edits are judged in one
    `judge_many` call (API judges run it concurrently).
    """

    editor: editors.Editor
    judge: object
    w_format: float = 1.0
    w_score: float = 1.0
    w_gain: float = 2.0
    satisfied_at: float = agents.DEFAULT_THINK_THRESHOLD  # warm-up targets: repeat the instruction at this score
    seed: int = 0  # the editor's seed for every edit (a fixed seed: the gain measures the instruction, not the noise)
    _first: dict[str, FirstTurn] = field(default_factory=dict, repr=False)

    name = "think"
    system = agents.CRITIC_SYSTEM
    components = ("format", "score", "gain")

    def first_turns(self, examples: Sequence[data.RLExample]) -> list[FirstTurn]:
        """Turn 1 of each example, computed on first use and kept (an example's turn 1 never changes)."""
        new = list({e.id: e for e in examples if e.id not in self._first}.values())
        if new:
            sources = [e.load_image() for e in new]
            edited = [self.editor.edit(x, e.request, seed=self.seed) for x, e in zip(sources, new)]
            verdicts = self.judge.judge_many([(x, y, e.request) for x, y, e in zip(sources, edited, new)])
            for e, y, v in zip(new, edited, verdicts):
                self._first[e.id] = FirstTurn(y, v.total)
        return [self._first[e.id] for e in examples]

    def prompts(self, examples):
        images, texts = [], []
        for e, first in zip(examples, self.first_turns(examples)):
            sample = agents.CritiqueSample(e.load_image(), first.edited, e.request, e.request)
            image, text = agents.critic_input(sample)
            images.append(image)
            texts.append(text)
        return images, texts

    def rewards(self, examples, texts):
        firsts = self.first_turns(examples)
        critiques = [rewards.parse_critique(t) for t in texts]
        # one edit per distinct (example, refined instruction): G samples of a group often agree
        wanted = {(e.id, c.instruction): e for e, c in zip(examples, critiques) if c is not None}
        keys = list(wanted)
        sources = {e.id: e.load_image() for e in wanted.values()}
        edited = [self.editor.edit(sources[i], instruction, seed=self.seed) for i, instruction in keys]
        verdicts = self.judge.judge_many(
            [(sources[i], y, wanted[(i, ins)].request) for (i, ins), y in zip(keys, edited)]
        )
        s1 = {key: v.total for key, v in zip(keys, verdicts)}
        total_w = self.w_format + self.w_score + self.w_gain
        out = []
        for e, text, c, first in zip(examples, texts, critiques, firsts, strict=True):
            fmt = rewards.critique_format_reward(text)
            score = 0.0 if c is None else 1.0 - abs(c.score - first.score) / 10.0
            gain = 0.0 if c is None else (s1[(e.id, c.instruction)] - first.score) / 10.0
            total = (self.w_format * fmt + self.w_score * score + self.w_gain * gain) / total_w
            out.append({"reward": total, "format": fmt, "score": score, "gain": gain})
        return out

    def warmup_target(self, example: data.RLExample, subrequests: Sequence[str]) -> tuple[Image.Image, str, str]:
        """(image, user text, target critique) for a supervised warm-up (warmup.py), following agents.CRITIC_FORMAT:
        the judged score of turn 1 (rounded), then, when turn 1 already satisfies (score >= satisfied_at), the current
        instruction repeated; otherwise the gold sub-requests joined as one instruction. The think says which."""
        (image,), (text,) = self.prompts([example])
        first = self._first[example.id]  # computed by prompts()
        if first.score >= self.satisfied_at:
            think, instruction = "The edit is right.", example.request
        else:
            n = len(subrequests)
            think = f"The request asks for {n} change{'s' if n != 1 else ''}."
            instruction = agents.join_single_turn(subrequests)
        return image, text, agents.render_critique(think, round(first.score), instruction)


# ---------------------------------------------------------------------------------------------------------------------
# Editors and judges from a short spec (train.py, warmup.py and evaluate.py share these)


def make_editor(spec: str, options: editors.EditorOptions | None = None) -> editors.Editor:
    """ "shapes" (the miniature's procedural editor) or an editors.py name ("flux", "qwen", "nano-banana", ...)."""
    if spec == shapes.ProceduralEditor.name:
        return shapes.ProceduralEditor()
    return editors.make_editor(spec, options)


SHAPES_JUDGE_SPECS = ("shapes", shapes.ShapesJudge.name)  # the miniature's programmatic judge


def make_judge(spec: str, concurrency: int | None = None):
    """ "shapes" (the miniature's programmatic judge) or a judge.py spec ("gpt-4o", "openai:MODEL@URL", "local:PATH")."""
    if spec in SHAPES_JUDGE_SPECS:
        return shapes.ShapesJudge()
    if spec.startswith("local:") or concurrency is None:
        return judging.make_judge(spec)
    return judging.make_judge(spec, max_concurrency=concurrency)

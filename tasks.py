"""What GRPO trains: an agent's prompt and its reward, handed to train.py as one object (a task).

train.py's loop is the same for every agent. It asks the task for the prompts of a batch of examples, samples G
completions per prompt, asks the task for one reward per completion, and does GRPO. The reward is part of the agent's
definition, here, and never a branch inside the loop. Two agents are defined:

    DecompositionTask  ImageEdit-R1's decomposition agent (paper §2.2): format + set-F1 of actions, subjects, goals;
                       here
    thinker.ThinkerTask  EditThinker's critic-refiner: format + score accuracy + the judged gain when the SOURCE image
                       is re-edited with the refined instruction (the editor and the judge run inside the reward);
                       in thinker.py, which train.py imports only for `--agent think`

A task is anything with:
    name         short name ("decompose", "think"), logged in args.json
    system       the system prompt of every rollout (None: no system turn)
    components   names of the reward's parts; train.py logs `<name>_mean` and `eval/<name>` for each, and `reward`
    prompts(examples)          -> (images, user texts), one each per example (data.RLExample)
    rewards(examples, texts)   -> one dict per text: {"reward": total used by GRPO, <component>: value, ...}
                                  texts[i] answers examples[i] (train.py repeats each example G times)

Both tasks read the same validated JSONL (data.py): the thinker uses only the image and the request of each line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

import agents
import data
import rewards


class Task(Protocol):
    name: str
    system: str | None
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
    templates: agents.Prompts = agents.PAPER_PROMPTS  # the agent's prompt (train.py --prompts), the paper's by default

    name = "decompose"
    components = ("format", "action", "subject", "goal")

    @property
    def system(self) -> str | None:
        return self.templates.decomposition_system

    def prompts(self, examples):
        return [e.load_image() for e in examples], [self.templates.decomposition_prompt(e.request) for e in examples]

    def rewards(self, examples, texts):
        weights = dict(w_format=self.w_format, w_action=self.w_action, w_subject=self.w_subject, w_goal=self.w_goal)
        out = []
        for e, text in zip(examples, texts, strict=True):
            r = rewards.decomposition_reward(text, e.gold, use_goal=self.use_goal, **weights)
            out.append({"reward": r.total, "format": r.format, "action": r.action, "subject": r.subject,
                        "goal": r.goal})  # fmt: skip
        return out

"""A short supervised warm-up of a tiny policy: it stands in for the instruction tuning of the real base model.

A random tiny Qwen-VL samples near-uniform junk and never emits the tag format, so every GRPO group would have zero
reward spread and nothing to learn from. A few dozen cross-entropy steps on rendered gold decompositions
(`rewards.render_decomposition`) of a slice of the training data teach it the format and some content. Keep it short:
the point of the miniature is that RL, not this step, closes most of the gap.

When the data lines carry "subrequests" (the shapes world writes them), every batch also teaches the SEQUENCING agent:
the same model learns to turn the gold actions, subjects and goals into `<steps>1. ...</steps>`. The paper's
sequencing agent is the instruction-tuned base model, never trained; this warm-up stands in for that tuning.

EditThinker's critic-refiner is warmed up the same way (`--agent think`, as EditThinker's SFT stage precedes its RL):
its input is the source and turn 1 (the source edited with the raw request) side by side, and its target critique
(thinker.ThinkerTask.warmup_target) gives the judged score of turn 1 and the gold sub-requests as the instruction.

    python -m miniature.warmup --model tiny/qwen2_5_vl --train-data data/example/train.jsonl --out runs/warm --steps 60
    python -m miniature.warmup --agent think --editor shapes --judge shapes --out runs/thinker_warm ...
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Literal

import torch

import agents
import critics
import data
import policy
import rewards
import specs
import thinker
from cli import arg, parse_dataclass_args


@dataclass
class Args:
    """Supervised warm-up of the decomposition agent on gold decompositions (tiny models; ours, not the paper's)."""

    agent: Literal["decompose", "think"] = arg("decompose", "decompose: the decomposition (and sequencing) agent; "
                                               "think: EditThinker's critic-refiner (needs 'subrequests')")  # fmt: skip
    editor: str = arg("shapes", "think: the editor that makes turn 1 (specs.make_editor)")
    judge: str = arg("shapes", "think: the judge that scores turn 1 (specs.make_judge)")
    model: str = arg("tiny/qwen2_5_vl", "policy to warm up (a tiny model folder from `python -m miniature.tiny DIR`)")
    train_data: str = arg("data/example/train.jsonl", "RL examples (data.py format); their gold labels are targets")
    out: str = arg("runs/warmup", "where the warmed-up policy is saved (a from_pretrained folder)")
    steps: int = arg(60, "optimizer steps")
    batch_size: int = arg(8, "examples per step")
    lr: float = arg(3e-3, "AdamW learning rate (tiny random models need a large one)")
    max_examples: int | None = arg(None, "use only the first N examples (keeps the warm-up from seeing everything)")
    sequencing: bool = arg(True, "also teach the sequencing agent where lines have 'subrequests' (twice the cost)")
    seed: int = arg(0, "seed of the example order")
    prompts: str | None = arg(None, "a JSON file of the agents' prompts (agents.Prompts, e.g. the miniature base's "
                                    "prompts.json): the decomposer's and sequencer's, or with --agent think the "
                                    "critic's; default: the paper's prompts")  # fmt: skip


def target_text(example: data.RLExample) -> str:
    """The completion the policy is taught: a one-line think, then the gold lists in the canonical rendering.

    The think names only the actions: repeating the subjects there too would cost ~10 tokens per sampled completion
    in every GRPO step, and the format reward needs only a non-blank think.
    """
    g = example.gold
    think = f"The request asks to {', '.join(g.actions)}."
    return rewards.render_decomposition(think, g.actions, g.subjects, g.goals)


def read_subrequests(path: str) -> dict[str, list[str]]:
    """id -> gold sub-requests, for lines that have them (data.load_rl_jsonl has already validated the file)."""
    out = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            obj = json.loads(line)
            if obj.get("subrequests"):
                out[obj["id"]] = obj["subrequests"]
    return out


def supervised_pairs(chunk: list[data.RLExample], subrequests: dict[str, list[str]], templates: agents.Prompts):
    """(image, system, prompt, target) for each example's decomposition and, where known, its sequencing."""
    pairs = []
    for e in chunk:
        image = e.load_image()
        prompt = templates.decomposition_prompt(e.request)
        pairs.append((image, templates.decomposition_system, prompt, target_text(e)))
        if e.id in subrequests:
            prompt = templates.sequencing_prompt(e.request, e.gold)
            pairs.append((image, templates.sequencing_system, prompt, agents.render_steps(subrequests[e.id])))
    return pairs


def thinker_pairs(chunk: list[data.RLExample], subrequests: dict[str, list[str]], task: thinker.ThinkerTask):
    """(image, system, prompt, target) for each example's critique of its turn 1."""
    pairs = []
    for e in chunk:
        image, prompt, target = task.warmup_target(e, subrequests[e.id])
        pairs.append((image, task.system, prompt, target))
    return pairs


def main(argv=None) -> None:
    args = parse_dataclass_args(Args, argv)
    examples = data.load_rl_jsonl(args.train_data)[: args.max_examples]
    think_task = None
    try:
        templates = agents.Prompts.load(args.prompts) if args.prompts else agents.PAPER_PROMPTS
    except agents.PromptsError as err:
        raise SystemExit(f"warmup: --prompts: {err}") from None
    if args.agent == "think":
        critic = critics.CriticPrompt.from_prompts(templates)
        think_task = thinker.ThinkerTask(specs.make_editor(args.editor), specs.make_judge(args.judge), prompt=critic)
        subrequests = read_subrequests(args.train_data)
        examples = [e for e in examples if e.id in subrequests]
        if not examples:
            raise SystemExit(f"{args.train_data}: --agent think needs lines with 'subrequests' (the targets)")
    else:
        subrequests = read_subrequests(args.train_data) if args.sequencing else {}
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, processor = policy.load_policy(args.model, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        chunk = rng.sample(examples, min(args.batch_size, len(examples)))
        loss = 0.0
        if think_task:
            pairs = thinker_pairs(chunk, subrequests, think_task)
        else:
            pairs = supervised_pairs(chunk, subrequests, templates)
        for system in dict.fromkeys(p[1] for p in pairs):  # one batch per system turn (ordered: deterministic sums)
            group = [p for p in pairs if p[1] == system]
            batch = policy.encode_supervised(
                processor, [p[0] for p in group], [p[2] for p in group], [p[3] for p in group], system=system
            )
            # next-token cross-entropy on the target tokens only (labels mask the prompt), weighted by share
            loss = loss + model(**batch).loss * len(group) / len(pairs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"warm-up step {step + 1}/{args.steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    policy.save_policy(model, processor, args.out)
    print(f"saved the warmed-up policy to {args.out}")


if __name__ == "__main__":
    main()

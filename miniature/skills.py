"""The generic skills of the miniature's base model: its questions and templates, its training items, its measurements.

An instruction-tuned VLM brings these to ImageEdit-R1; the shapes world's versions of them are what miniature/base.py
trains and measures (none is a resolved decomposition of an indirect request: that is left for GRPO to teach):

    perception   "What is in the <cell>?" -> "<colour> <kind>" | "empty"; "Where is the <colour> <kind>?" -> "<cell>";
                 "How big is the <colour> <kind>?" -> "small" | "large"
    format, copy decompositions of DIRECT requests (their subjects are in the request) in the four-tag format
    sequencing   the gold action/subject/goal lists (no request text) -> the numbered sub-requests in <steps>

`evaluate` measures each on held-out items: per-cell accuracy against the always-"empty" answer and against another
scene's image (the swap control), copyable-subject F1, plan accuracy given gold lists, the format rate.
"""

from __future__ import annotations

import random

import torch

import agents
import policy
import rewards
from miniature import dataset, world

DECOMP_TEMPLATE = "Request: {request}"
SEQ_TEMPLATE = "Actions: {actions}\nSubjects: {subjects}\nGoals: {goals}"
# EditThinker's critic-refiner: not a skill of the base (nothing here trains it); the thinker's warm-up
# (miniature/warmup.py --agent think --prompts) teaches the critique on this short template, from the base's weights
CRITIC_TEMPLATE = "Request: {request}\nInstruction: {instruction}"
PROMPTS = agents.Prompts(None, DECOMP_TEMPLATE, None, SEQ_TEMPLATE, None, CRITIC_TEMPLATE)  # no system turns
CELL_Q = "What is in the {cell}?"
WHERE_Q = "Where is the {name}?"
SIZE_Q = "How big is the {name}?"
DESCRIBE_Q = "Describe the image."  # not trained in the shipped recipe; its words are in the vocabulary
EMPTY = "empty"


# ----------------------------------------------------------------------------------------------------------- data


def decomp_prompt(request: str) -> str:
    return PROMPTS.decomposition_prompt(request)  # the very prompt the agents send (train.py / evaluate.py --prompts)


def seq_prompt(actions, subjects, goals) -> str:
    return PROMPTS.sequencing_prompt(
        "", rewards.Decomposition(think="", actions=actions, subjects=subjects, goals=goals)
    )


def decomp_target(ex: world.Example) -> str:
    return rewards.render_decomposition(
        f"The request asks to {', '.join(ex.actions)}.", ex.actions, ex.subjects, ex.goals
    )


def random_scene(rng):
    return dataset.random_scene(rng)


def gen_task(task: str, rng: random.Random, split: str = "train"):
    """(image, user_text, target) for one item of `task`, drawn from `rng`."""
    if task in ("cell", "where", "size"):
        scene = random_scene(rng)
        img = world.render(scene)
        if task == "cell":
            cell = rng.choice(world.CELLS)
            s = scene.at(cell)
            return img, CELL_Q.format(cell=cell), s.name if s else EMPTY, world.CELLS.index(cell)
        if task == "where":
            s = rng.choice(scene.shapes)
            return img, WHERE_Q.format(name=s.name), s.cell, world.CELLS.index(s.cell)
        if task == "size":
            s = rng.choice(scene.shapes)
        return img, SIZE_Q.format(name=s.name), s.size, world.CELLS.index(s.cell)
    if task == "decomp":  # DIRECT requests only
        while True:
            ex = dataset.make_example(rng)
            if not ex.indirect:
                return ex.image, decomp_prompt(ex.request), decomp_target(ex)
    if task == "seq":
        ex = dataset.make_example(rng)
        return ex.image, seq_prompt(ex.actions, ex.subjects, ex.goals), agents.render_steps(ex.subrequests)
    raise ValueError(task)


# ------------------------------------------------------------------------------------------------------ evaluation


def norm(s):
    return " ".join(s.lower().strip().rstrip(".").split())


@torch.no_grad()
def greedy(model, processor, images, texts, max_new_tokens, bs=64):
    out = []
    for i in range(0, len(texts), bs):
        batch = policy.encode_prompts(processor, list(images[i : i + bs]), list(texts[i : i + bs]))
        out += policy.generate(model, processor, batch, max_new_tokens=max_new_tokens, greedy=True)
    return out


def eval_sets(n_scenes=40, n_decomp=80, n_seq=80, seed=12345):
    rng = random.Random(f"eval-{seed}")
    scenes = [random_scene(rng) for _ in range(n_scenes)]
    direct, indirect = [], []
    while len(direct) < n_decomp or len(indirect) < n_decomp // 2:
        ex = dataset.make_example(rng)
        if not ex.indirect and len(direct) < n_decomp:
            direct.append(ex)
        elif ex.indirect and len(indirect) < n_decomp // 2:
            indirect.append(ex)
    seq = [dataset.make_example(rng) for _ in range(n_seq)]
    return {"scenes": scenes, "direct": direct, "indirect": indirect, "seq": seq}


def evaluate(model, processor, sets, parts=("cell", "decomp", "seq")):
    model.eval()
    m = {}
    if "cell" in parts:
        scenes = sets["scenes"]
        imgs = [world.render(s) for s in scenes]
        qs, golds, ims, swap_ims = [], [], [], []
        for k, s in enumerate(scenes):
            for cell in world.CELLS:
                sh = s.at(cell)
                qs.append(CELL_Q.format(cell=cell))
                golds.append(sh.name if sh else EMPTY)
                ims.append(imgs[k])
                swap_ims.append(imgs[(k + 1) % len(imgs)])
        ans = greedy(model, processor, ims, qs, 6)
        m["cell_acc"] = sum(norm(a) == g for a, g in zip(ans, golds)) / len(golds)
        m["cell_majority"] = max(golds.count(EMPTY), len(golds) - golds.count(EMPTY)) / len(golds)
        occ = [i for i, g in enumerate(golds) if g != EMPTY]
        m["cell_acc_occupied"] = sum(norm(ans[i]) == golds[i] for i in occ) / len(occ)
        ans_sw = greedy(model, processor, swap_ims, qs, 6)
        m["cell_acc_swap"] = sum(norm(a) == g for a, g in zip(ans_sw, golds)) / len(golds)
        # chance of an image-blind answer: the swapped scene's true content agreeing with this scene's
        sw_gold = []
        for k in range(len(scenes)):
            o = scenes[(k + 1) % len(scenes)]
            sw_gold += [(o.at(c).name if o.at(c) else EMPTY) for c in world.CELLS]
        m["cell_swap_chance"] = sum(a == b for a, b in zip(sw_gold, golds)) / len(golds)
        # where / size probes
        wq, wg, wi, sq, sg = [], [], [], [], []
        for k, s in enumerate(scenes):
            for sh in s.shapes:
                wq.append(WHERE_Q.format(name=sh.name))
                wg.append(sh.cell)
                wi.append(imgs[k])
                sq.append(SIZE_Q.format(name=sh.name))
                sg.append(sh.size)
        wa = greedy(model, processor, wi, wq, 5)
        m["where_acc"] = sum(norm(a) == g for a, g in zip(wa, wg)) / len(wg)
        sa = greedy(model, processor, wi, sq, 4)
        m["size_acc"] = sum(norm(a) == g for a, g in zip(sa, sg)) / len(sg)
    if "decomp" in parts:
        for name in ("direct", "indirect"):
            exs = sets[name]
            outs = greedy(model, processor, [e.image for e in exs], [decomp_prompt(e.request) for e in exs], 96)
            fmt, f1s, f1c, f1a, f1g = [], [], [], [], []
            for e, o in zip(exs, outs):
                fmt.append(rewards.format_reward(o))
                d = rewards.parse_decomposition(o)
                sub = d.subjects if d else []
                f = rewards.set_f1(sub, e.subjects)
                f1s.append(f)
                f1a.append(rewards.set_f1(d.actions if d else [], e.actions, key=rewards.action_key))
                f1g.append(rewards.set_f1(d.goals if d else [], e.goals))
                if all(s in e.request.lower() for s in e.subjects):
                    f1c.append(f)
            m[f"{name}_format"] = sum(fmt) / len(fmt)
            m[f"{name}_subj_f1"] = sum(f1s) / len(f1s)
            m[f"{name}_action_f1"] = sum(f1a) / len(f1a)
            m[f"{name}_goal_f1"] = sum(f1g) / len(f1g)
            if name == "direct":
                m["copyable_subj_f1"] = sum(f1c) / max(1, len(f1c))
                m["n_copyable"] = len(f1c)
        m["example_decomp"] = outs[0]
    if "seq" in parts:
        exs = sets["seq"]
        outs = greedy(
            model, processor, [e.image for e in exs], [seq_prompt(e.actions, e.subjects, e.goals) for e in exs], 100
        )
        ok = []
        for e, o in zip(exs, outs):
            st = agents.parse_steps(o)
            ok.append(st is not None and [norm(x) for x in st] == [norm(x) for x in e.subrequests])
        m["plan_acc"] = sum(ok) / len(ok)
        m["example_seq"] = outs[0]
    model.train()
    return m

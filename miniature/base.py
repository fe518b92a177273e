"""The miniature's base model, built once and shipped: a tiny Qwen2.5-VL that can see, copy and sequence.

It stands in for Qwen2.5-VL-7B-Instruct: the skills an instruction-tuned VLM brings to ImageEdit-R1, so that GRPO
has only the decomposition left to teach. Built by

    python -m miniature.base --out miniature/base_model [--seed 0]     # ~20 minutes on one core of the 2-core box

which writes a `policy.load_policy` folder (safetensors weights, Qwen2Tokenizer, image-only Qwen2.5-VL processor),
its prompts.json (agents.Prompts: the short templates below, for train.py / evaluate.py --prompts) and
manifest.json (recipe, seed, data sizes, the skills measured after each stage and again after reloading the saved
folder, sha256 of the weights, build time). tests/test_base.py checks the shipped folder against its manifest.

What is in it
- The real `Qwen2_5_VLForConditionalGeneration`, small: text hidden H x L layers (head dim 32), a small vision tower
  with 14-px patches and 2x2 merge, so an 84x84 shapes image is 9 visual tokens, one per 28-px cell.
- Interleaved M-RoPE (mrope_section = [1]*16: frequency i goes to t/h/w by i % 3, which the stock
  `recomposition_frequencies` supports) with a small rope_theta, so grid rows/columns differ visibly in rotary angle.
- Tokenizer: stock Qwen2Tokenizer, byte-level (256 byte tokens, no merges), Qwen's special tokens, the agent tags,
  and one whole-word added token (single_word) for every word of the world, lower case and Capitalised. A word is
  therefore the same token id in a request, a list and an answer; spaces and punctuation are byte tokens.
- Chat template puts the IMAGE LAST in the user turn (text parts, then image parts, then <|im_end|>), so the offset
  from the first answer token back to each cell's visual token is a constant whatever the request length. No default
  system turn is added (a system turn, when given, is rendered first; it does not change that offset).
- Image processor normalisation mean 1.0 / std 0.5 (white background -> 0).

What it is trained on (miniature/skills.py: generic skills only; NO resolved decompositions of indirect requests)
- perception: "What is in the <cell>?" -> "<colour> <kind>" | "empty"; "Where is the <colour> <kind>?" -> "<cell>";
  "How big is the <colour> <kind>?" -> "small" | "large".
- format + copying: decompositions of DIRECT requests only (Example.indirect false), target as warmup.target_text.
- sequencing: given the gold action/subject/goal lists (no request text) -> the numbered sub-requests in <steps>.

Prompt templates (user text; the image follows it; no system turn):
  decomposition: skills.DECOMP_TEMPLATE = "Request: {request}"
  sequencing:    skills.SEQ_TEMPLATE    = "Actions: {actions}\\nSubjects: {subjects}\\nGoals: {goals}"  (items joined ", ")
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import AddedToken, pre_tokenizers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import policy
from miniature import dataset, skills, tiny, world

# Image last: text parts of the user turn first, then its images.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH = 14
MERGE = 2


# ---------------------------------------------------------------------------------------------------------- vocab


def world_words(n: int = 4000) -> list[str]:
    """Every word of the world's requests, answers and templates (lower case), sorted."""
    texts = [
        "system user assistant",
        skills.DECOMP_TEMPLATE,
        skills.SEQ_TEMPLATE,
        skills.CELL_Q,
        skills.WHERE_Q,
        skills.SIZE_Q,
        skills.DESCRIBE_Q,
        skills.EMPTY,
        "The request asks to",
    ]
    texts += list(world.CELLS) + list(world.COLOURS) + list(world.KINDS) + list(world.SIZES)
    texts += list(world.ACTIONS) + [world.REMOVED]
    texts += [
        world.explicit_instruction(world.Edit(a, "red circle", g))
        for a, g in [
            ("recolor", "blue"),
            ("remove", "removed"),
            ("add", "center"),
            ("move", "center"),
            ("resize", "small"),
        ]
    ]
    for i in range(n):
        ex = dataset.make_example(random.Random(f"vocab-{i}"))
        texts.append(ex.request)
    words = set()
    for t in texts:
        words.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    return sorted(words)


def build_tokenizer(words: list[str]) -> Qwen2Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=tiny.SPECIAL_TOKENS[0],
        eos_token=tiny.SPECIAL_TOKENS[0],
        pad_token=tiny.SPECIAL_TOKENS[0],
    )
    tok.add_special_tokens({"additional_special_tokens": tiny.SPECIAL_TOKENS[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tiny.TAG_TOKENS])
    forms = list(dict.fromkeys([w for w in words] + [w.capitalize() for w in words]))
    tok.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in forms])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_processor(tok):
    ip = Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=world.IMAGE_SIZE**2,
        max_pixels=world.IMAGE_SIZE**2,
        image_mean=[1.0, 1.0, 1.0],
        image_std=[0.5, 0.5, 0.5],
    )
    return policy.Qwen2_5_VLImageOnlyProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def build_model(
    tok,
    hidden=128,
    layers=4,
    head_dim=32,
    kv_heads=None,
    inter_mult=3,
    rope_theta=100.0,
    v_depth=2,
    v_hidden=64,
    mrope_section=None,
    init_range=0.02,
    seed=0,
):
    heads = hidden // head_dim
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    text = {
        "vocab_size": len(tok),
        "hidden_size": hidden,
        "intermediate_size": inter_mult * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "max_position_embeddings": 2048,
        "bos_token_id": None,
        "eos_token_id": im_end,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
        "initializer_range": init_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": mrope_section or [1] * (head_dim // 2),
        },
    }
    vision = {
        "depth": v_depth,
        "hidden_size": v_hidden,
        "intermediate_size": 2 * v_hidden,
        "num_heads": 2,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "out_hidden_size": hidden,
        "window_size": 112,
        "fullatt_block_indexes": list(range(v_depth)),
    }
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in ids.items()}
    vision["initializer_range"] = init_range
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, initializer_range=init_range, **ids
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = tiny.sampling_generation_config(tok)
    return model


class Encoder:
    """Fast batch encoding equal to policy.encode_supervised / encode_prompts (the same ids, masks and image inputs)."""

    def __init__(self, processor):
        self.p = processor
        self.tok = processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        self.pad = self.tok.pad_token_id
        self.n_img = (world.IMAGE_SIZE // PATCH // MERGE) ** 2
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        words = (
            list(world.COLOURS)
            + list(world.KINDS)
            + list(world.SIZES)
            + ["top", "bottom", "middle", "left", "right", "center"]
        )
        self.copy_ids = set(self.tok.convert_tokens_to_ids(words))

    def prompt_ids(self, text):
        s = policy.chat_prompt(self.p, text).replace("<|image_pad|>", "<|image_pad|>" * self.n_img)
        return self.tok(s, add_special_tokens=False)["input_ids"]

    def pixels(self, images):
        out = self.p.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def batch(self, items, with_labels=True):
        rows, labs = [], []
        for _image, text, target, *_ in items:
            p = self.prompt_ids(text)
            t = self.tok(target, add_special_tokens=False)["input_ids"] + [self.im_end] if with_labels else []
            rows.append(p + t)
            labs.append([-100] * len(p) + t)
        L = max(map(len, rows))
        ids = torch.full((len(rows), L), self.pad, dtype=torch.long)
        att = torch.zeros((len(rows), L), dtype=torch.long)
        lab = torch.full((len(rows), L), -100, dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labs)):
            ids[i, L - len(r) :] = torch.tensor(r)
            att[i, L - len(r) :] = 1
            lab[i, L - len(r) :] = torch.tensor(lb)
        pv, thw = self.pixels([it[0] for it in items])
        b = {
            "input_ids": ids,
            "attention_mask": att,
            "pixel_values": pv,
            "image_grid_thw": thw,
            "mm_token_type_ids": (ids == self.image_id).long(),
        }
        if with_labels:
            b["labels"] = lab
        # aux metadata: (row, query position, key position) for items that name a cell: the last prompt token
        # (it predicts the first answer token) should attend to that cell's visual token
        aux = []
        for i, (r, lb, it) in enumerate(zip(rows, labs, items)):
            if len(it) > 3 and it[3] is not None:
                off = L - len(r)
                img_pos = [off + j for j, x in enumerate(r) if x == self.image_id]
                q = off + next(j for j, x in enumerate(lb) if x != -100) - 1
                aux.append((i, q, [img_pos[it[3]]], "vis"))
                if " " in it[2]:  # "red circle": the token before "circle" looks at the cell again
                    aux.append((i, q + 2, [img_pos[it[3]]], "vis"))
            elif self.copy_ids:
                # copying: the token that predicts a content word of the answer attends to that word in the prompt
                off = L - len(r)
                start = next(j for j, x in enumerate(lb) if x != -100)
                for j in range(start, len(r)):
                    if r[j] in self.copy_ids:
                        keys = [off + k for k in range(start) if r[k] == r[j]]
                        if keys:
                            aux.append((i, off + j - 1, keys, "copy"))
        self.last_aux = aux
        return b


# -------------------------------------------------------------------------------------------------------- training


def train_stage(
    model,
    enc,
    mix,
    steps,
    lr,
    bs,
    rng,
    log,
    sets=None,
    eval_every=0,
    eval_parts=(),
    warmup_steps=20,
    min_lr_frac=0.1,
    processor=None,
    name="stage",
    stop=None,
    aux_attn=0.0,
    aux_layer=1,
    aux_heads=(0,),
    aux_tasks=("cell",),
    copy_attn=0.0,
    copy_layer=2,
    copy_heads=(1,),
    copy_tasks=("decomp", "seq"),
    pos_probe=0.0,
    probe_layer=1,
    content_probe=0.0,
):
    """AdamW + warm-up + cosine on a mix of tasks. aux_attn > 0 adds attention supervision (training only): in layer
    `aux_layer`, heads `aux_heads`, the last prompt token of an item of `aux_tasks` is taught to attend to the visual
    token of the cell the item is about (-log attention weight). The saved model is the stock class, unchanged."""
    if aux_attn or copy_attn:
        model.set_attn_implementation("eager")
    probe = None
    params = list(model.parameters())
    if pos_probe:
        # training-only linear probe (discarded): the hidden state of each visual token after layer `probe_layer`
        # must tell which cell it is, so the LM writes each visual token's grid position into its content
        probe = torch.nn.Linear(model.config.text_config.hidden_size, 9)
        params += list(probe.parameters())
    cprobe = None
    if content_probe:
        # training-only linear probe (discarded) on the LM's input embedding of each visual token (the vision
        # tower's output): colour (5 + empty), kind (3 + empty), size (2 + empty) of that cell
        cprobe = torch.nn.Linear(model.config.text_config.hidden_size, 6 + 4 + 3)
        params += list(cprobe.parameters())
    tasks, weights = zip(*mix.items())
    model.train()
    t0 = time.time()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    history = []
    aux_l = torch.tensor(0.0)
    probe_l = torch.tensor(0.0)
    cp_l = torch.tensor(0.0)
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup_steps)
        cos = min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * f * cos
        drawn = [rng.choices(tasks, weights)[0] for _ in range(bs)]
        loss = 0.0
        for task in dict.fromkeys(drawn):  # one micro-batch per task (little padding), weighted by its share
            group = [skills.gen_task(task, rng) for t in drawn if t == task]
            b = enc.batch(group)
            kind, coef, layer, heads = (
                ("vis", aux_attn, aux_layer, aux_heads)
                if task in aux_tasks
                else ("copy", copy_attn, copy_layer, copy_heads)
                if task in copy_tasks
                else (None, 0.0, 0, ())
            )
            entries = [e for e in enc.last_aux if e[3] == kind]
            use_aux = bool(coef) and bool(entries)
            outp = model(**b, output_attentions=use_aux, output_hidden_states=probe is not None or cprobe is not None)
            loss = loss + outp.loss * len(group) / bs
            if probe is not None:
                hs = outp.hidden_states[probe_layer]  # (B, L, H)
                vis = b["input_ids"] == enc.image_id  # (B, L), 9 per row in raster order
                logits = probe(hs[vis])  # (B*9, 9)
                probe_l = torch.nn.functional.cross_entropy(logits, torch.arange(9).repeat(len(group)))
                loss = loss + pos_probe * probe_l * len(group) / bs
            if cprobe is not None:
                vis = b["input_ids"] == enc.image_id
                lab = []
                for it in group:
                    sc = world.read_scene(it[0])
                    for c in world.CELLS:
                        s_ = sc.at(c)
                        lab.append(
                            [
                                world.COLOURS.index(s_.colour) if s_ else 5,
                                world.KINDS.index(s_.kind) if s_ else 3,
                                world.SIZES.index(s_.size) if s_ else 2,
                            ]
                        )
                lab = torch.tensor(lab)
                # cosine classifier with a fixed scale: the classes must be far apart in ANGLE, not merely
                # linearly separable, so the visual embedding carries colour/kind/size in large components
                hv = torch.nn.functional.normalize(outp.hidden_states[0][vis], dim=-1)
                lg = 8.0 * hv @ torch.nn.functional.normalize(cprobe.weight, dim=-1).T
                cp_l = sum(
                    torch.nn.functional.cross_entropy(x, lab[:, j]) for j, x in enumerate(lg.split([6, 4, 3], dim=-1))
                )
                loss = loss + content_probe * cp_l * len(group) / bs
            if use_aux:
                att = outp.attentions[layer][:, list(heads)]  # (B, h, L, L)
                terms = [att[row, :, q, keys].sum(-1) for row, q, keys, _ in entries]  # each (h,)
                aux_l = -(torch.stack(terms) + 1e-6).log().mean()
                loss = loss + coef * aux_l * len(group) / bs
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(
                f"[{name}] step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f}s"
                + (f" aux(last) {aux_l.item():.3f}" if aux_attn or copy_attn else "")
                + (f" probe {probe_l.item():.3f}" if pos_probe else "")
                + (f" cprobe {cp_l.item():.3f}" if content_probe else "")
            )
        if eval_every and ((step + 1) % eval_every == 0 or step == steps - 1):
            m = skills.evaluate(model, processor, sets, eval_parts)
            m = {k: v for k, v in m.items() if not k.startswith("example")}
            history.append({"step": step + 1, "time_s": round(time.time() - t0), **m})
            log(f"[{name}] eval step {step + 1}: {json.dumps(m)}")
            if stop and stop(m):
                log(f"[{name}] target reached, stopping stage")
                break
    if aux_attn or copy_attn:
        model.set_attn_implementation("sdpa")
    return history


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# The recipe of the shipped base, found by the experiments in the README's miniature section. Every stage keeps the
# perception items in its mix (replay) and the training-only attention supervision and probes (train_stage).
_PERCEPTION_AUX = {"aux_attn": 1.0, "aux_layer": 2, "aux_heads": [0], "aux_tasks": ["cell", "where", "size"],
                   "content_probe": 1.0, "pos_probe": 0.5, "probe_layer": 1}  # fmt: skip
_COPY_AUX = {**_PERCEPTION_AUX, "copy_attn": 0.5, "copy_layer": 2, "copy_heads": [1], "copy_tasks": ["decomp", "seq"]}
PRESETS = {
    "final": {
        "model": {"hidden": 128, "layers": 4, "head_dim": 32, "rope_theta": 10000.0, "v_depth": 2, "v_hidden": 64,
                  "mrope_section": [0, 1, 1, 0, 1, 1, 12], "init_range": 0.05},  # fmt: skip
        "bs": 32,
        "stages": [
            {"name": "perception", "steps": 400, "lr": 0.002, "mix": {"cell": 5, "where": 2, "size": 2},
             "train_kwargs": _PERCEPTION_AUX},
            {"name": "copy_format", "steps": 800, "lr": 0.002, "mix": {"cell": 2, "where": 1, "size": 1, "decomp": 6},
             "train_kwargs": _COPY_AUX},
            {"name": "sequencing", "steps": 1300, "lr": 0.002,
             "mix": {"cell": 2, "where": 1, "size": 1, "decomp": 3, "seq": 5}, "train_kwargs": _COPY_AUX},
        ],
    },
}  # fmt: skip


def finalize(out, manifest, t_start, log):
    """Reload the saved folder through the project's load path and the stock Auto classes, and measure the skills
    again on larger held-out sets (another seed than the in-training evaluation); write them to the manifest."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        stock = AutoProcessor.from_pretrained(out)
        manifest["autoprocessor"] = type(stock).__name__
    except Exception as err:  # transformers 5 wants a video processor (torchvision) for the stock Qwen processor
        manifest["autoprocessor"] = f"fails here without torchvision: {type(err).__name__}: {str(err)[:120]}"
    manifest["autotokenizer"] = type(AutoTokenizer.from_pretrained(out)).__name__
    manifest["autoimageprocessor"] = type(AutoImageProcessor.from_pretrained(out)).__name__
    reloaded, rproc = policy.load_policy(str(out), dtype=torch.float32)
    manifest["policy_load_processor"] = type(rproc).__name__
    big = skills.eval_sets(n_scenes=100, n_decomp=200, n_seq=200, seed=777)
    final = skills.evaluate(reloaded, rproc, big)
    manifest["final_eval"] = {"sizes": {k: len(v) for k, v in big.items()}, **final}
    manifest["weights_sha256"] = sha256(out / "model.safetensors")
    if t_start is not None:
        manifest["build_time_s"] = round(time.time() - t_start)
    json.dump(manifest, open(out / "manifest.json", "w"), indent=1)
    log(f"final eval (reloaded): {json.dumps(final)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the folder to write (the shipped one is miniature/base_model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="final")
    ap.add_argument("--recipe", default=None, help="JSON file overriding the preset")
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument(
        "--finalize-only",
        action="store_true",
        help="only re-run the reload checks and the large held-out evaluation of an existing --out",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the recipe was run single-threaded: the shipped weights' sha256 depends on it
    if args.finalize_only:
        out = Path(args.out)
        manifest = json.load(open(out / "manifest.json"))
        finalize(out, manifest, None, print)
        return
    recipe = PRESETS[args.preset] if not args.recipe else json.load(open(args.recipe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out.parent / f"{out.name}.log", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t_start = time.time()
    torch.manual_seed(args.seed)
    words = world_words()
    tok = build_tokenizer(words)
    processor = build_processor(tok)
    model = build_model(tok, seed=args.seed, **recipe["model"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"vocab {len(tok)} ({len(words)} world words), params {n_params}")
    enc = Encoder(processor)
    sets = skills.eval_sets()
    rng = random.Random(f"train-{args.seed}")
    manifest = {
        "recipe": recipe,
        "seed": args.seed,
        "n_params": n_params,
        "vocab_size": len(tok),
        "world_words": words,
        "templates": {
            "decomposition": skills.DECOMP_TEMPLATE,
            "sequencing": skills.SEQ_TEMPLATE,
            "cell": skills.CELL_Q,
            "where": skills.WHERE_Q,
            "size": skills.SIZE_Q,
            "describe": skills.DESCRIBE_Q,
            "system": None,
            "image": "last",
        },
        "eval_sizes": {k: len(v) for k, v in sets.items()},
        "stages": [],
    }
    for st in recipe["stages"]:
        ts = time.time()
        parts = ("cell",) if st["name"] == "perception" else ("cell", "decomp", "seq")
        hist = train_stage(
            model,
            enc,
            st["mix"],
            st["steps"],
            st["lr"],
            recipe["bs"],
            rng,
            log,
            sets=sets,
            eval_every=args.eval_every,
            eval_parts=parts,
            processor=processor,
            name=st["name"],
            **st.get("train_kwargs", {}),
        )
        m = skills.evaluate(model, processor, sets)
        log(f"[{st['name']}] end: {json.dumps(m)}")
        manifest["stages"].append(
            {
                **st,
                "train_items": st["steps"] * recipe["bs"],
                "time_s": round(time.time() - ts),
                "history": hist,
                "final": m,
            }
        )
        model.eval()
        policy.save_policy(model, processor, out)
        (out / "prompts.json").write_text(json.dumps(asdict(skills.PROMPTS), indent=1) + "\n")
        manifest["build_time_s"] = round(time.time() - t_start)
        manifest["weights_sha256"] = sha256(out / "model.safetensors")
        json.dump(manifest, open(out / "manifest.json", "w"), indent=1)
    finalize(out, manifest, t_start, log)
    log(f"done in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()

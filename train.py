"""GRPO training of ImageEdit-R1's decomposition agent (or EditThinker's critic) under DeepSpeed ZeRO (§2.2, §3.1).

    python train.py --gpus 8                                   # the paper's run: Qwen2.5-VL-7B-Instruct, G = 8
    python train.py --gpus 0 --model tiny/qwen2_5_vl ...       # the same file on a CPU, one process
    python train.py --gpus 2 --zero-stage 3 ...                # two processes (GPUs, or CPU processes with gloo)
    python train.py --agent think --editor shapes --judge shapes ...   # EditThinker's critic-refiner instead

What is trained is a task (tasks.py): the agent's prompt and its reward. `--agent` picks one of the two defined
there; `main(task=...)` takes any other object with the same few methods. Nothing below depends on which it is.

One step, top to bottom (see `main`):
    1. rollout:    each rank samples G completions for each of its prompts (all G of a prompt stay on one rank);
                   with --dynamic-sampling, groups whose G rewards are equal are replaced by fresh prompts (DAPO)
    2. reward:     the task's: format + set-F1 of actions, subjects, goals (decompose), or format + score accuracy +
                   the judged gain of re-editing the source with the refined instruction (think)
    3. advantage:  group-normalised within each prompt's G samples (grpo.group_advantages): no reward crosses ranks
    4. log-probs:  old policy (only when it differs from the current one) and the frozen reference policy
    5. update:     mu epochs over mini-batches, each split into micro-batches with gradient accumulation
    6. log, evaluate on the held-out split every k steps, checkpoint, export a from_pretrained folder

Distributed: `--gpus N` re-launches this script under torchrun when it is not already under a launcher. Every
collective is in this file and marked `# collective`. The loss of every micro-batch is divided by a denominator
summed over the whole global batch, then multiplied by (gradient-accumulation steps x world size), because DeepSpeed
divides by the former and averages over the latter: the update does not depend on how the batch is split.
Sampling is reseeded from (seed, step, rank) at every step and the data order is a function of (seed, step), so a
resumed run repeats exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import agents
import data
import grpo
import grpo_fast
import lora
import policy
import tasks
from cli import arg, parse_dataclass_args

PAPER_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@dataclass
class Args:
    """GRPO training of the decomposition agent (or EditThinker's critic). Defaults are the paper's setting; `(ours)`
    marks values the paper's text lost, filled with the common GRPO practice for Qwen2.5-VL-7B (shared/papers/README.md)."""

    # agent, model and data
    agent: Literal["decompose", "think"] = arg("decompose", "which agent to train (tasks.py): ImageEdit-R1's "
                                               "decomposition agent, or EditThinker's critic-refiner")  # fmt: skip
    model: str = arg(
        PAPER_MODEL, "policy to train: hub id, local path, or a tiny model from `python -m miniature.tiny DIR`"
    )
    ref_model: str | None = arg(None, "frozen reference policy for the KL term (default: the same as --model)")
    train_data: str = arg("data/rl/train.jsonl", "RL examples in the JSONL format of data.py")
    eval_data: str | None = arg(None, "held-out examples (JSONL); default: hold out --eval-size examples of train")
    eval_size: int = arg(64, "examples held out of --train-data when --eval-data is not given (ours)")
    output_dir: str = arg("runs/grpo", "metrics, samples, checkpoints and the exported policy go here")
    # GRPO (symbols of DeepSeekMath's eq. 3)
    group_size: int = arg(8, "G: completions sampled per prompt (paper: 8)")
    prompts_per_step: int = arg(32, "prompts per step over all ranks; B = prompts_per_step * G sequences (a third-"
                                    "party digest of the paper's EasyR1 run: global batch 32 prompts per update)")  # fmt: skip
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same (ours)")
    top_p: float = arg(1.0, "nucleus sampling threshold; must be 1 (the full softmax that the log-probs score; "
                            "see grpo.TOP_P_ERROR)")  # fmt: skip
    max_new_tokens: int = arg(256, "longest completion in tokens (ours)")
    lr: float = arg(1e-6, "AdamW learning rate, constant after warm-up (the digest: 1e-6)")
    warmup_steps: int = arg(0, "linear learning-rate warm-up steps (ours)")
    weight_decay: float = arg(1e-2, "AdamW weight decay (ours)")
    adam_eps: float = arg(1e-8, "AdamW epsilon (PyTorch's default)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (ours)")
    clip_eps_low: float = arg(0.2, "epsilon_low: ratio clipped below at 1 - eps_low (ours)")
    clip_eps_high: float = arg(0.2, "epsilon_high: ratio clipped above at 1 + eps_high; DAPO uses 0.28 (ours)")
    beta: float = arg(0.01, "beta: weight of the k3 KL penalty to the reference policy; 0 drops the reference (ours)")
    aggregation: Literal["sequence", "token", "constant"] = arg("sequence", "loss aggregation (see grpo.py)")
    adv_scale: Literal["group", "none"] = arg("group", "divide advantages by the group std ('none': Dr. GRPO)")
    importance: Literal["token", "sequence"] = arg("token", "importance ratio: per token (GRPO) or per sequence (GSPO, "
                                                   "arXiv 2507.18071: the geometric mean of a sequence's token "
                                                   "ratios, clipped per sequence; GSPO pairs it with --aggregation "
                                                   "sequence and clip ranges near 3e-4 / 4e-4)")  # fmt: skip
    mu: int = arg(1, "mu: passes (epochs) over each step's rollouts (DeepSeekMath's mu; 1 = on-policy)")
    mini_batches: int = arg(1, "optimizer updates per pass: the step's rollouts are split into this many parts")
    dynamic_sampling: int = arg(0, "DAPO's dynamic sampling (arXiv 2503.14476 sec. 3.2): drop groups whose G "
                                   "rewards are all equal and roll out more prompts, up to this many rollouts per "
                                   "step, until the step has its N informative groups; 0 = off (the paper's GRPO)")  # fmt: skip
    micro_batch_size: int = arg(4, "sequences per forward/backward on one rank (gradient accumulation covers the rest)")
    # reward
    w_format: float = arg(1.0, "weight of the format reward in the mean")
    w_action: float = arg(1.0, "weight of the action F1 reward")
    w_subject: float = arg(1.0, "weight of the subject F1 reward")
    w_goal: float = arg(1.0, "weight of the goal F1 reward")
    use_goal: bool = arg(True, "include the goal reward (--no-use-goal: the paper's 'without goal' ablation)")
    prompts: str | None = arg(None, "a JSON file of the agents' prompts (agents.Prompts, e.g. the miniature base's "
                                    "prompts.json): the decomposer's, or with --agent think the critic's; default: "
                                    "the paper's prompts")  # fmt: skip
    thinker_preset: Literal["ours", "released"] = arg("ours", "think: 'released' sets EditThinker's released reward "
                                                      "and training (thinker.RELEASED_TRAINING: 0.5 format + 0.5 "
                                                      "gain, beta 0; Qwen3-VL-8B if --model is left at its default) "
                                                      "over --w-format/--w-score/--w-gain/--beta")  # fmt: skip
    w_score: float = arg(1.0, "think: weight of the score accuracy 1 - |score - judged| / 10 (ours)")
    w_gain: float = arg(2.0, "think: weight of the judged gain (s1 - s0) / 10 of re-editing the source (ours)")
    editor: str = arg("shapes", "think: the editor the reward re-edits with (shapes | flux | qwen | nano-banana | "
                                "gpt-image)")  # fmt: skip
    judge: str = arg("shapes", "think: the judge the reward scores with (shapes | gpt-4o | gemini-2.5-flash | "
                               "openai:MODEL@URL | local:PATH)")  # fmt: skip
    # schedule
    epochs: int = arg(3, "passes over the training data (the paper's data ablation trains three epochs)")
    max_steps: int | None = arg(None, "stop after this many steps (overrides --epochs)")
    eval_every: int = arg(10, "k: evaluate the held-out split every k steps (greedy decoding); 0 disables")
    save_every: int = arg(50, "save a resumable checkpoint and export the policy every this many steps; 0: end only")
    keep_checkpoints: int = arg(2, "resumable checkpoints kept on disk (older ones are deleted)")
    samples_every: int = arg(10, "write a few sampled decompositions to samples.jsonl every this many steps")
    report_to: Literal["none", "tensorboard"] = arg("none", "also log every metric of metrics.jsonl, same names, to "
                                                    "this local tracker (tensorboard: OUTPUT_DIR/tensorboard; "
                                                    "`tensorboard --logdir` it); no account or network")  # fmt: skip
    resume: bool = arg(False, "continue from the last checkpoint in --output-dir")
    seed: int = arg(0, "seed of the data order, sampling and initialisation")
    # hardware
    gpus: int | None = arg(None, "processes to run: GPUs, or CPU processes with gloo when there is no GPU "
                                 "(default: all visible GPUs, else one CPU process); 0 = one CPU process")  # fmt: skip
    zero_stage: int = arg(2, "DeepSpeed ZeRO stage: 2 (shard optimizer state and gradients) or 3 (also parameters)")
    offload_optimizer: bool = arg(False, "keep optimizer state in CPU memory (ZeRO-Offload)")
    bf16: bool | None = arg(None, "bf16 weights and compute (default: on with a GPU, off on CPU)")
    lora_rank: int = arg(0, "LoRA rank r (lora.py): train a low-rank update of the target layers instead of every "
                            "weight; the reference is the base with the adapters off; 0 = full fine-tuning (paper)")  # fmt: skip
    lora_alpha: float | None = arg(None, "LoRA alpha: the update is scaled by alpha / r (default: 2 r, ours)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA branch's input (ours)")
    lora_targets: str = arg(",".join(lora.DEFAULT_TARGETS), "comma-separated names of the nn.Linear layers to adapt")
    lora_vision: bool = arg(False, "also adapt the vision tower's matching layers (default: the language model only)")
    freeze_vision: bool = arg(False, "freeze the vision tower and its patch merger: only the language model trains")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass to save memory")
    share_prompt: bool = arg(True, "run each prompt once and its G completions from copies of its KV cache, in "
                                   "sampling and scoring (grpo.py; same numbers, 2-3x faster on CPU)")  # fmt: skip
    static_cache: bool = arg(False, "decode into a preallocated KV cache (grpo.sample_group): fixed shapes, so on a "
                                    "GPU transformers compiles the decode step into a CUDA graph; same samples")  # fmt: skip
    pack: bool = arg(False, "score each micro-batch as ONE sequence of its rows' real tokens, no padding, under a "
                            "block-diagonal causal mask (grpo_fast.packed_logits); replaces --share-prompt in "
                            "scoring (the rollout still shares prompts); same numbers")  # fmt: skip
    attn_implementation: str | None = arg(None, "attention kernel of the policy and reference: sdpa (transformers' "
                                                "default), eager, flex_attention, or flash_attention_2 (flash-attn, "
                                                "GPU; with --pack, varlen attention instead of a dense mask)")  # fmt: skip
    logps_chunk: int = arg(0, "score log-probs this many tokens at a time from the hidden states, never holding the "
                              "(rows, T, vocab) logits (grpo.per_token_logps); 0 = all at once")  # fmt: skip
    gather_for_generation: bool = arg(True, "ZeRO-3: gather full weights once for generation (fast); "
                                            "--no-gather-for-generation uses generate(synced_gpus=True)")  # fmt: skip
    zero3_live_parameters: int | None = arg(None, "ZeRO-3 stage3_max_live_parameters / max_reuse_distance / "
                                                  "prefetch_bucket_size (tests set tiny values to release eagerly)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- distributed


def launch_if_needed(args: Args) -> None:
    """Re-run this script under torchrun with N processes, unless a launcher already started us."""
    if "LOCAL_RANK" in os.environ:
        return
    n = args.gpus if args.gpus is not None else torch.cuda.device_count()
    if n <= 1:  # one process: torch.distributed still wants the launcher's variables
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # N CPU processes with the default threads each crawl
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *sys.argv]
    os.execv(sys.executable, cmd)


def print0(*a, **k):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*a, **k, flush=True)


def deepspeed_config(args: Args, world_size: int, grad_accum: int, bf16: bool) -> dict:
    """The DeepSpeed config, built from Args so it can never drift from the CLI."""
    zero: dict = {"stage": args.zero_stage, "overlap_comm": False}
    config: dict = {}
    if args.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        # the one AdamW (PyTorch's) then steps the CPU copies; DeepSpeed's faster DeepSpeedCPUAdam needs a C++ build
        config["zero_force_ds_cpu_optimizer"] = False
    if args.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if args.zero3_live_parameters is not None:
            n = args.zero3_live_parameters
            zero.update(stage3_max_live_parameters=n, stage3_max_reuse_distance=n, stage3_prefetch_bucket_size=n,
                        stage3_param_persistence_threshold=0)  # fmt: skip
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": args.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": args.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # DeepSpeed accumulates gradients in the model dtype by default; summed over tens of bf16 micro-batches they
        # lose the small terms, so every micro-batch's reduced gradient is added into an fp32 buffer instead
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        **config,
    }


def reference_config(train_config: dict) -> dict:
    """The frozen reference model: ZeRO-3 shards it like the policy; under ZeRO-2 it is simply replicated."""
    zero = {k: v for k, v in train_config["zero_optimization"].items() if not k.startswith("offload")}
    return {**train_config, "zero_optimization": zero}


@contextmanager
def generation_model(engine, args: Args):
    """The module to call `generate` on. ZeRO-3 with different-length sequences per rank needs care: either gather
    all weights once and drop the per-layer fetch hooks (fast), or keep them and sync ranks every token."""
    if args.zero_stage == 3 and args.gather_for_generation:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(engine):
            yield engine.module, {}
    elif args.zero_stage == 3:
        yield engine.module, {"synced_gpus": True}
    else:
        yield engine.module, {}


def global_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over all ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)  # collective
    return t.tolist()


def batch_layout(args: Args, world: int) -> tuple[int, int]:
    """Prompts per rank per step, and micro-batches per optimizer update (DeepSpeed's gradient accumulation)."""
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be divisible by the {world} processes")
    local_prompts = args.prompts_per_step // world
    seqs = local_prompts * args.group_size  # sequences per rank per step
    if seqs % args.mini_batches or (seqs // args.mini_batches) % args.micro_batch_size:
        raise SystemExit(
            f"{seqs} sequences per rank per step must split into --mini-batches {args.mini_batches} "
            f"of whole micro-batches of --micro-batch-size {args.micro_batch_size}"
        )
    return local_prompts, seqs // args.mini_batches // args.micro_batch_size


def lora_config(args: Args) -> lora.LoRAConfig:
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return lora.LoRAConfig(args.lora_rank, alpha, args.lora_dropout, targets, args.lora_vision)


def build_engines(args: Args, world: int, grad_accum: int, bf16: bool, device):
    """The policy under DeepSpeed (with AdamW and a constant schedule after warm-up) and the frozen reference."""
    import deepspeed

    ds_config = deepspeed_config(args, world, grad_accum, bf16)
    if args.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        build_engines.hf_ds_config = HfDeepSpeedConfig(ds_config)  # must stay alive: from_pretrained reads it
    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(args.seed)
    model, processor = policy.load_policy(args.model, dtype=dtype, attn_implementation=args.attn_implementation)
    if args.freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.lora_rank:  # everything frozen but the adapters
        lora.add_lora(model, lora_config(args))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
        if args.lora_rank:  # frozen embeddings: checkpointed blocks need an input that requires grad
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=args.adam_eps
    )
    warmup = max(args.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    engine.train()
    ref_model = None
    if args.beta != 0.0 and not (args.lora_rank and args.ref_model is None):  # LoRA's reference: adapters off
        ref, _ = policy.load_policy(
            args.ref_model or args.model, dtype=dtype, attn_implementation=args.attn_implementation
        )
        ref.requires_grad_(False)
        if args.zero_stage == 3:
            ref_model, *_ = deepspeed.initialize(model=ref, config=reference_config(ds_config))
        else:
            ref_model = ref.to(device)
        ref_model.eval()
    return engine, ref_model, processor, scheduler


# ----------------------------------------------------------------------------------------------------------- data


# Seed arithmetic: every random draw is a function of --seed and a counter, so a resumed run redraws the same numbers.
# The multipliers are primes, so different (seed, counter) pairs do not collide into one generator seed.
HELD_OUT_SEED_OFFSET = 7919  # the held-out draw gets its own stream, distinct from the step draws of the same --seed
EPOCH_SEED_STRIDE = 100_003  # seed * stride + epoch: one permutation of the training set per (seed, epoch)
STEP_SEED_STRIDE = 1_000_003  # seed * stride + step * RANK_SEED_STRIDE + rank: one RNG state per (seed, step, rank)
RANK_SEED_STRIDE = 1009  # larger than any world size, so step s of rank r never meets step s' of rank r'
DYNAMIC_SEED_OFFSET = 104_729  # dynamic sampling's extra draws: a stream of their own per (seed, step, attempt)


def split_data(args: Args) -> tuple[list[data.RLExample], list[data.RLExample]]:
    """Validated train and held-out examples (held out from train by a seeded draw when no --eval-data)."""
    train = data.load_rl_jsonl(args.train_data)
    if args.eval_data:
        return train, data.load_rl_jsonl(args.eval_data)
    if len(train) <= args.eval_size:
        raise data.DataError(f"{args.train_data}: {len(train)} examples; need more than --eval-size {args.eval_size}")
    order = torch.randperm(
        len(train), generator=torch.Generator().manual_seed(args.seed + HELD_OUT_SEED_OFFSET)
    ).tolist()
    held = set(order[: args.eval_size])
    return [e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held]


def prompts_for_step(n_examples: int, step: int, prompts_per_step: int, seed: int) -> list[int]:
    """Example indices of one global step: consecutive slices of a fresh seeded permutation per epoch."""
    per_epoch = n_examples // prompts_per_step
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(
        n_examples, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    ).tolist()
    return order[k * prompts_per_step : (k + 1) * prompts_per_step]


def rank_examples(train_set: list, step: int, args: Args, rank: int, local_prompts: int) -> list:
    """This rank's prompts of a global step: its consecutive share of the step's seeded draw (G rows each follow)."""
    idx = prompts_for_step(len(train_set), step, args.prompts_per_step, args.seed)
    return [train_set[i] for i in idx[rank * local_prompts : (rank + 1) * local_prompts]]


def extra_examples(train_set: list, step: int, attempt: int, args: Args, rank: int, local_prompts: int) -> list:
    """Dynamic sampling's `attempt`-th extra draw of a step (attempt >= 1): this rank's share of --prompts-per-step
    prompts from a seeded permutation of its own, so the data order stays a function of (seed, step)."""
    seed = DYNAMIC_SEED_OFFSET + args.seed * STEP_SEED_STRIDE + step * RANK_SEED_STRIDE + attempt
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    idx = order[: args.prompts_per_step][rank * local_prompts : (rank + 1) * local_prompts]
    return [train_set[i] for i in idx]


def build_task(args: Args) -> tasks.Task:
    """The agent being trained: its prompts and its reward (tasks.py; the thinker's in thinker.py)."""
    templates = agents.Prompts.load(args.prompts) if args.prompts else agents.PAPER_PROMPTS
    if args.agent == "think":
        import critics  # imported here: the thinker's editor and judge (and the openai client) load only for it
        import specs
        import thinker

        return thinker.ThinkerTask(specs.make_editor(args.editor), specs.make_judge(args.judge),
                                   w_format=args.w_format, w_score=args.w_score, w_gain=args.w_gain,
                                   prompt=critics.CriticPrompt.from_prompts(templates))  # fmt: skip
    return tasks.DecompositionTask(w_format=args.w_format, w_action=args.w_action, w_subject=args.w_subject,
                                   w_goal=args.w_goal, use_goal=args.use_goal, templates=templates)  # fmt: skip


def encode(processor, task: tasks.Task, examples: list[data.RLExample]):
    images, texts = task.prompts(examples)
    return policy.encode_prompts(processor, images, texts, system=task.system)


def to_device(prompt: dict, device) -> dict:
    return {k: v.to(device) for k, v in prompt.items()}


# ---------------------------------------------------------------------------------------------------- GRPO pieces


def rollout(engine, processor, task: tasks.Task, examples: list, args: Args, timings: dict, device):
    """Steps 1 and 2 for a list of prompts: G samples each (each group's rows sorted by length, so micro-batches
    carry little padding) and the task's reward breakdown of every row (row i answers example i // G)."""
    t = time.perf_counter()
    prompt = to_device(encode(processor, task, examples), device)
    engine.eval()
    with generation_model(engine, args) as (gen_model, gen_kwargs):
        batch = grpo.sample_group(
            gen_model, processor, prompt, args.group_size, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, eos_token_ids=policy.eos_token_ids(processor),
            suppress_token_ids=policy.vision_token_ids(processor),  # an image token in a completion breaks scoring
            prefill=grpo_fast.shared_prompt_inputs if args.share_prompt else None, static_cache=args.static_cache,
            **gen_kwargs,
        )  # fmt: skip
    batch = grpo.select(batch, grpo_fast.rows_by_length(batch.completion_mask, args.group_size))
    engine.train()
    timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    breakdowns = task.rewards([e for e in examples for _ in range(args.group_size)], batch.texts)
    timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - t
    return batch, breakdowns


def informative_groups(first: tuple, examples: list, roll, more, args: Args, local_prompts: int, pad_id: int, device):
    """DAPO's dynamic sampling. A group whose G rewards are all equal has zero advantage on every row and adds
    nothing to the gradient. Keep the informative groups of the step's rollout `first` = (batch, breakdowns) and
    roll out more prompts (`roll(more(attempt))`) until every rank holds `local_prompts` informative groups or
    --dynamic-sampling rollouts were made; a shortfall is filled with uninformative groups, so every rank keeps its
    N * G rows and the collectives stay matched. Returns (batch, breakdowns, examples, counts)."""
    g_size = args.group_size
    rollouts = [(*first, examples)]
    informative, flat = [], []  # (rollout, group) in draw order
    for attempt in range(1, args.dynamic_sampling + 1):
        batch, breakdowns, exs = rollouts[-1]
        totals = torch.tensor([r["reward"] for r in breakdowns], dtype=torch.float64).view(-1, g_size)  # (N, G)
        spread = (totals.max(1).values - totals.min(1).values > grpo.EQUAL_TOL).tolist()  # (N,)
        for group, keep in enumerate(spread):
            (informative if keep else flat).append((len(rollouts) - 1, group))
        short = torch.tensor([float(len(informative) < local_prompts)], device=device)
        torch.distributed.all_reduce(short, op=torch.distributed.ReduceOp.MAX)  # collective: all ranks roll again
        if attempt == args.dynamic_sampling or not short.item():
            break
        exs = more(attempt)
        rollouts.append((*roll(exs), exs))
    chosen = (informative + flat)[:local_prompts]
    parts, breakdowns, examples = [], [], []
    for r, (batch, rewards_r, exs) in enumerate(rollouts):
        groups = [group for rr, group in chosen if rr == r]
        if not groups:
            continue
        rows = torch.tensor([group * g_size + j for group in groups for j in range(g_size)])  # (n_r * G,)
        parts.append(grpo.select(batch, rows))
        breakdowns += [rewards_r[i] for i in rows.tolist()]
        examples += [exs[group] for group in groups]
    counts = {"drawn": sum(len(r[2]) for r in rollouts), "informative": len(informative), "rollouts": len(rollouts)}
    return grpo.concat(parts, pad_id), breakdowns, examples, counts


def scoring_forward(args: Args):
    """The forward of every scoring pass (old, reference, current): one for all three, because the ratio and the KL
    must compare computations that are identical when the weights are (the shared-prompt and full paths differ by
    rounding, up to 0.12 nats in bf16 at 7B). Gradient checkpointing drops the KV cache, so it forces the full path
    (or the packed one, which needs no cache)."""
    if args.pack:
        return grpo_fast.packed_logits
    shared = args.share_prompt and not args.gradient_checkpointing
    return grpo_fast.shared_prompt_logits if shared else grpo.full_sequence_logits


@torch.no_grad()
def batched_logps(model, batch: grpo.Batch, args: Args) -> torch.Tensor:
    """grpo.per_token_logps over micro-batches, without gradients: (B, T)."""
    T = batch.completion_ids.shape[1]
    parts = []
    for mb in grpo.split_micro_batches(batch, _n_micro(batch, args)):
        lp = grpo.per_token_logps(model, grpo_fast.trim_padding(mb), args.temperature, forward=scoring_forward(args),
                                  chunk_tokens=args.logps_chunk)  # fmt: skip
        parts.append(torch.nn.functional.pad(lp, (0, T - lp.shape[1])))  # (b, T) back to the batch's width
    return torch.cat(parts)  # (B, T)


def reference_logps(engine, ref_model, batch: grpo.Batch, args: Args) -> torch.Tensor | None:
    """The frozen reference policy's log-probs (B, T): a loaded reference model, or with LoRA the policy itself with
    its adapters switched off (the base); None when beta = 0 and nothing is loaded."""
    if ref_model is not None:
        return batched_logps(ref_model, batch, args)  # (B, T)
    if args.lora_rank and args.beta != 0.0:
        with lora.disabled(engine.module):
            return batched_logps(engine, batch, args)  # (B, T)
    return None


def _n_micro(batch: grpo.Batch, args: Args) -> int:
    return math.ceil(len(batch) / args.micro_batch_size)


def update_policy(engine, batch: grpo.Batch, args: Args, world_size: int, device) -> dict[str, float]:
    """mu passes over the rollouts; each pass is `mini_batches` optimizer steps of accumulated micro-batches.

    Each mini-batch's loss denominator is summed over ranks (the mini-batch is global), and every micro-batch loss is
    scaled by (micro-batches per update x world size) to undo DeepSpeed's division by gradient-accumulation steps and
    its average over ranks. The result is the gradient of the global mini-batch's loss, however it is split.
    Returns this rank's token-weighted means of grpo_loss's metrics, the max ratio, the mean loss per update and the
    mean pre-clip gradient norm.
    """
    token_sums: dict[str, float] = {}  # metric * tokens, summed over micro-batches
    tokens = ratio_max = loss_sum = grad_norm_sum = 0.0
    n_updates = 0
    for _ in range(args.mu):
        for mini in grpo.split_micro_batches(batch, args.mini_batches):
            local = grpo.loss_denominator(mini.completion_mask, args.aggregation, args.max_new_tokens)
            (denominator,) = global_sum([local], device)  # collective
            micro_batches = grpo.split_micro_batches(mini, _n_micro(mini, args))
            for mb in micro_batches:
                mb = grpo_fast.trim_padding(mb)  # drop completion columns that are padding in every row of this slice
                logps, entropy = grpo.per_token_logps(
                    engine, mb, args.temperature, return_entropy=True, forward=scoring_forward(args),
                    chunk_tokens=args.logps_chunk,
                )  # (b, T)  # fmt: skip
                # on-policy (mu = 1, one mini-batch): the sampling policy is this very policy, so old = current
                old = mb.old_per_token_logps if mb.old_per_token_logps is not None else logps.detach()
                loss, metrics = grpo.grpo_loss(
                    logps, old, mb.ref_per_token_logps, mb.advantages, mb.completion_mask,
                    clip_eps_low=args.clip_eps_low, clip_eps_high=args.clip_eps_high, beta=args.beta,
                    aggregation=args.aggregation, max_completion_length=args.max_new_tokens, denominator=denominator,
                    importance=args.importance,
                )  # fmt: skip
                engine.backward(loss * len(micro_batches) * world_size)  # collective (gradient reduction)
                engine.step()  # steps the optimizer only at the accumulation boundary
                mask = mb.completion_mask.float()  # (b, T)
                metrics["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
                n_tok = metrics.pop("tokens")
                ratio_max = max(ratio_max, metrics.pop("ratio_max"))
                for k, v in metrics.items():
                    token_sums[k] = token_sums.get(k, 0.0) + v * n_tok
                tokens += n_tok
                loss_sum += float(loss.detach())
            n_updates += 1
            grad_norm_sum += float(engine.get_global_grad_norm() or 0.0)
    out = {k: v / max(tokens, 1.0) for k, v in token_sums.items()}
    out.update(ratio_max=ratio_max, loss=loss_sum / n_updates, grad_norm=grad_norm_sum / n_updates)
    return out


@torch.no_grad()
def evaluate_heldout(
    engine, processor, task, examples: list[data.RLExample], args: Args, rank: int, world: int, device
) -> dict:
    """Greedy completions for this rank's share of the held-out split; mean of each reward component over all.

    Every rank makes the same number of `generate` calls with the same number of rows: under ZeRO-3 with
    `synced_gpus` a rank that stopped early would sit in the all-reduce below while the others still gather weights
    for their next call (a hang). Short shares are padded with copies of an example, whose rewards are not counted.
    """
    share = math.ceil(len(examples) / world)  # the longest rank's share
    mine = examples[rank::world]
    padded = mine + [examples[0]] * (share - len(mine))  # same length on every rank
    names = ["reward", *task.components]
    totals = np.zeros(len(names) + 1)  # sums of each component, then the count
    with generation_model(engine, args) as (model, gen_kwargs):
        for i in range(0, share, args.micro_batch_size):
            chunk = padded[i : i + args.micro_batch_size]
            real = chunk[: max(len(mine) - i, 0)]  # the rows that are this rank's own examples
            prompt = to_device(encode(processor, task, chunk), device)
            texts = policy.generate(model, processor, prompt, max_new_tokens=args.max_new_tokens, **gen_kwargs)
            for r in task.rewards(real, texts[: len(real)]) if real else []:
                totals += [*(r[k] for k in names), 1]
    sums = global_sum(totals.tolist(), device)  # collective
    n = max(sums[-1], 1)
    return {f"eval/{k}": sums[i] / n for i, k in enumerate(names)}


def step_metrics(breakdowns: list[dict], batch: grpo.Batch, stats: dict, group_size: int, device) -> dict[str, float]:
    """The step's logged means over ALL ranks: reward components (mean, std), zero-spread groups, token-weighted
    loss metrics, completion length and the loss. Every rank contributes sums; one all_reduce adds them up."""
    components = list(breakdowns[0])  # "reward", then the task's components (the same keys on every rank)
    values = np.array([[r[k] for k in components] for r in breakdowns])  # (B, 1 + components)
    totals = values[:, 0].reshape(-1, group_size)  # (N, G)
    tokens = float(batch.completion_mask.sum())
    sums = {"n": len(breakdowns), "groups": len(totals), "tokens": tokens, "loss": stats["loss"]}
    sums["zero_spread"] = float((totals.max(1) - totals.min(1) <= grpo.EQUAL_TOL).sum())
    for i, name in enumerate(components):
        sums[name], sums[name + "^2"] = values[:, i].sum(), (values[:, i] ** 2).sum()
    # "kl" only when a reference is loaded (beta > 0): absent, not 0, when nothing measures the drift
    token_weighted = [k for k in ("kl", "ratio_mean", "clip_frac_low", "clip_frac_high", "entropy") if k in stats]
    for name in token_weighted:
        sums[name] = stats[name] * tokens
    g = dict(zip(sums, global_sum(list(sums.values()), device)))  # collective
    out = {}
    for name in components:
        mean = g[name] / g["n"]
        out[f"{name}_mean"], out[f"{name}_std"] = mean, math.sqrt(max(g[name + "^2"] / g["n"] - mean**2, 0.0))
    out["zero_spread_frac"] = g["zero_spread"] / g["groups"]
    out.update({name: g[name] / max(g["tokens"], 1.0) for name in token_weighted})
    out["loss"] = g["loss"]  # each rank's loss is its share of the global loss (global denominator)
    out["completion_len"] = g["tokens"] / g["n"]
    return out


# ------------------------------------------------------------------------------------------------- checkpoints


def export_policy(engine, processor, out_dir: Path, args: Args, rank: int) -> None:
    """A plain from_pretrained folder (safetensors + processor); under ZeRO-3 the shards are gathered first. With
    LoRA the adapters are merged into the saved weights and also saved alone in OUT/adapter/."""

    def save() -> None:
        if not args.lora_rank:
            policy.save_policy(engine.module, processor, out_dir, original_format=args.zero_stage != 3)
            return
        with lora.merged_for_save(engine.module):  # W + (alpha / r) B A in plain nn.Linear layers, for the save only
            policy.save_policy(engine.module, processor, out_dir, original_format=args.zero_stage != 3)
        lora.save_adapter(engine.module, lora_config(args), out_dir / "adapter")

    if args.zero_stage == 3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(engine.module.parameters()), modifier_rank=None):  # collective
            if rank == 0:
                save()
    elif rank == 0:
        save()
    torch.distributed.barrier()  # collective: nobody reads the folder before it is complete


def save_checkpoint(engine, processor, step: int, args: Args, rank: int) -> None:
    ckpt_dir = Path(args.output_dir) / "checkpoints"
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step}", client_state={"step": step})  # collective
    export_policy(engine, processor, Path(args.output_dir) / "exports" / f"step_{step}", args, rank)
    if rank == 0:  # keep the newest few resumable checkpoints
        tags = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for old in tags[: -args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def open_reporter(args: Args, out_dir: Path, start_step: int):
    """Experiment logging beside metrics.jsonl (rank 0 only): returns (report(record), close()).

    TensorBoard gets every numeric metric under its metrics.jsonl name at its step; `purge_step` drops the events a
    killed run wrote after the checkpoint it resumes from, as `truncate_jsonl` does for the JSONL files.
    """
    if args.report_to == "none":
        return (lambda record: None), (lambda: None)
    from torch.utils.tensorboard import SummaryWriter  # imported late: only this option needs tensorboard

    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def report(record: dict) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                writer.add_scalar(name, value, record["step"])
        writer.flush()

    return report, writer.close


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so a resumed run never duplicates a step."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= last_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def seed_step(seed: int, step: int, rank: int) -> None:
    """All randomness of a step is a function of (seed, step, rank): resuming needs no saved RNG state."""
    s = (seed * STEP_SEED_STRIDE + step * RANK_SEED_STRIDE + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ------------------------------------------------------------------------------------------------------------ main


class ArgsError(ValueError):
    """A setting that cannot train what the README says; reported (exit 2) before any process or model starts."""


def check_args(args: Args) -> None:
    if args.top_p != 1.0:
        raise ArgsError("--" + grpo.TOP_P_ERROR.format(top_p=args.top_p).replace("_", "-", 1))
    if args.prompts:
        agents.Prompts.load(args.prompts)  # a bad prompts file fails here, before any process or model starts
    for name in ("lora_rank", "dynamic_sampling", "logps_chunk"):
        if getattr(args, name) < 0:
            raise ArgsError(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 0")
    if args.logps_chunk and args.zero_stage == 3:
        # each chunk calls the output layer once, and ZeRO-3 all-gathers its weights on every call: ranks scoring
        # different numbers of tokens would wait on each other's gathers forever (measured: a 2-rank run hung)
        raise ArgsError("--logps-chunk needs --zero-stage 2: under ZeRO-3 ranks with different token counts would make "
                        "different numbers of weight gathers and hang")  # fmt: skip
    if args.lora_rank and not lora_config(args).targets:
        raise ArgsError("--lora-targets: name at least one nn.Linear layer (e.g. q_proj,v_proj)")


def with_preset(args: Args) -> Args:
    """--thinker-preset released: EditThinker's released reward weights and training settings over the flags."""
    if args.thinker_preset == "ours":
        return args
    if args.agent != "think":
        raise ArgsError("--thinker-preset released is for --agent think")
    import thinker

    model = thinker.RELEASED_MODEL if args.model == PAPER_MODEL else args.model
    return replace(args, **thinker.RELEASED_TRAINING, model=model)


def main(argv=None, task: tasks.Task | None = None) -> None:
    args = with_preset(parse_dataclass_args(Args, argv))
    check_args(args)
    train_set, eval_set = split_data(args)  # every line is validated before any process or model starts
    launch_if_needed(args)
    import deepspeed  # imported late: it is slow to import and the launcher parent does not need it

    use_cuda = torch.cuda.is_available() and args.gpus != 0
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    bf16 = use_cuda if args.bf16 is None else args.bf16
    out_dir = Path(args.output_dir)

    # ---- batch layout and models
    if len(train_set) < args.prompts_per_step:
        raise SystemExit(f"{args.train_data}: {len(train_set)} training examples < --prompts-per-step")
    local_prompts, grad_accum = batch_layout(args, world)
    steps_per_epoch = len(train_set) // args.prompts_per_step
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    engine, ref_model, processor, scheduler = build_engines(args, world, grad_accum, bf16, device)
    task = task or build_task(args)

    # ---- resume
    start_step = 0
    if args.resume:
        ckpt_dir = out_dir / "checkpoints"
        if not (ckpt_dir / "latest").exists():
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
        _, client_state = engine.load_checkpoint(str(ckpt_dir))  # collective
        start_step = client_state["step"]
        if rank == 0:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(out_dir / name, start_step)
        print0(f"resumed from step {start_step}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps({**asdict(args), "task": task.name}, indent=2))
        print0(f"{len(train_set)} train / {len(eval_set)} held-out examples, {world} process(es) on {device}, "
               f"{total_steps} steps of {args.prompts_per_step} prompts x G={args.group_size}")  # fmt: skip

    progress = None
    report, close_reporter = open_reporter(args, out_dir, start_step) if rank == 0 else (None, None)
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="grpo", dynamic_ncols=True)

    for step in range(start_step, total_steps):
        seed_step(args.seed, step, rank)
        timings: dict[str, float] = {}
        examples = rank_examples(train_set, step, args, rank, local_prompts)

        # 1. rollout: G samples per prompt, and 2. the task's rewards
        batch, breakdowns = rollout(engine, processor, task, examples, args, timings, device)
        if args.dynamic_sampling:  # drop groups with no reward spread, roll out more prompts in their place
            batch, breakdowns, examples, dynamic = informative_groups(
                (batch, breakdowns), examples,
                roll=functools.partial(rollout, engine, processor, task, args=args, timings=timings, device=device),
                more=functools.partial(extra_examples, train_set, step, args=args, rank=rank, local_prompts=local_prompts),
                args=args, local_prompts=local_prompts, pad_id=processor.tokenizer.pad_token_id, device=device,
            )  # fmt: skip

        # 3. advantages (a prompt's G samples are all on this rank)
        total = torch.tensor([r["reward"] for r in breakdowns])  # (B,)
        batch.advantages = grpo.group_advantages(total, args.group_size, args.adv_scale).to(device)  # (B,)

        # 4. log-probs of the old policy (only needed when the policy moves within the step) and the reference
        t = time.perf_counter()
        if args.mu > 1 or args.mini_batches > 1:
            batch.old_per_token_logps = batched_logps(engine, batch, args)  # (B, T)
        batch.ref_per_token_logps = reference_logps(engine, ref_model, batch, args)  # (B, T) or None
        timings["logps"] = time.perf_counter() - t

        # 5. update
        t = time.perf_counter()
        stats = update_policy(engine, batch, args, world, device)
        timings["update"] = time.perf_counter() - t

        # 6. log: means over the global batch (one collective), then evaluate, write, checkpoint
        record = {"step": step + 1, **step_metrics(breakdowns, batch, stats, args.group_size, device)}
        record["grad_norm"] = stats["grad_norm"]
        if args.dynamic_sampling:  # prompts rolled out over all ranks, and the share of them that was informative
            drawn, informative, rollouts = global_sum(
                [dynamic["drawn"], dynamic["informative"], dynamic["rollouts"]], device
            )  # collective
            record.update({"dynamic/prompts_drawn": drawn, "dynamic/informative_frac": informative / drawn,
                           "dynamic/rollouts": rollouts / world})  # fmt: skip
        record["lr"] = scheduler.get_last_lr()[0]
        record.update({f"time/{k}": v for k, v in timings.items()})
        tokens = record["completion_len"] * len(breakdowns) * world
        record["tokens_per_s"] = tokens / max(sum(timings.values()), 1e-9)
        record["gen_tokens_per_s"] = tokens / max(timings["generate"], 1e-9)

        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total_steps):
            engine.eval()
            record.update(evaluate_heldout(engine, processor, task, eval_set, args, rank, world, device))
            engine.train()

        if rank == 0:
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            report(record)
            if args.samples_every and (step + 1) % args.samples_every == 0:
                with (out_dir / "samples.jsonl").open("a") as f:
                    for e, j in ((e, i * args.group_size) for i, e in enumerate(examples[:2])):
                        f.write(json.dumps({"step": step + 1, "id": e.id, "request": e.request,
                                            "completion": batch.texts[j], "reward": breakdowns[j]["reward"]}) + "\n")  # fmt: skip
            progress.update(1)
            kl = {"kl": f"{record['kl']:.4f}"} if "kl" in record else {}
            progress.set_postfix(reward=f"{record['reward_mean']:.3f}", **kl, len=f"{record['completion_len']:.0f}")

        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(engine, processor, step + 1, args, rank)

    save_checkpoint(engine, processor, total_steps, args, rank)
    export_policy(engine, processor, out_dir / "policy", args, rank)
    if progress is not None:
        progress.close()
        close_reporter()
    print0(f"exported the trained policy to {out_dir / 'policy'}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ArgsError, data.DataError, policy.PolicyNotFoundError, agents.PromptsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

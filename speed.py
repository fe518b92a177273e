"""The GRPO step's speed benchmark: what one step costs, phase by phase, and what each rollout optimisation saves.

    python speed.py                          # CPU: the tiny Qwen2.5-VL policy, built and warmed up here (~30 s)
    python speed.py --compare                # every variant below, taking turns step by step, in one process
    python speed.py --model qwen2_5_vl_7b    # GPU: the full-size Qwen2.5-VL-7B architecture with random weights
    python speed.py --model PATH --json out.json
    python speed.py --rewards                # the reward parsers on long adversarial completions (linear time)

A step is train.py's step without DeepSpeed, on one process: (1) rollout: G samples for each of N prompts,
(2) reward and group advantages, (3) the reference policy's log-probs (train.batched_logps), (4) the update: forward,
backward and one optimizer step over train.py's micro-batches, each trimmed to its own padding as train.py does. For each phase the table gives the wall time, completion tokens per second (tokens
up to and including EOS: the work GRPO needs), and the model FLOPs the phase really ran, counted by hooks on the
language model, the vision tower and the output layer (2 FLOPs per weight per token forward, 6 forward + backward;
attention scores are left out, so MFU is slightly understated). MFU is those FLOPs per second over the measured peak
of a large matmul in the model's dtype; the rollout is also set against the memory-bandwidth bound of decoding, where
every step reads all language-model weights once for all rows and each row's KV cache. The "vision" column is the
vision tower's share of a phase's forward FLOPs: the most that caching image features could save there. Peak memory
is torch.cuda.max_memory_allocated on a GPU, and the process's maximum resident set size so far on a CPU.

Variants (each adds one optimisation to the one before; in fp32 all give the same samples and log-probs, see the
tests; in bf16 on a GPU the shared and repeated prefills round differently, so the samples drift apart):
    plain          every prompt repeated G times before generation and scoring, rows in sampling order
    shared_rollout sample_group(prefill=grpo_fast.shared_prompt_inputs): each prompt prefilled once, its KV cache
                   copied to G rows
    shared_logps   per_token_logps(forward=grpo_fast.shared_prompt_logits) in the reference and update passes too
                   (train.py's --share-prompt: train.scoring_forward)
    sorted_trim    rows sorted by completion length within each group (grpo_fast.rows_by_length), so that cutting
                   every micro-batch to its own longest prompt and completion (grpo_fast.trim_padding, which
                   train.py's scoring passes do in every variant) removes most padding: train.py as it runs
    static_cache   sample_group(static_cache=True) (train.py --static-cache): the decode step writes into a KV cache
                   preallocated to a multiple of 256 tokens, so on a GPU transformers compiles it and replays it as
                   a CUDA graph (the first step of each new shape pays the compile; the untimed step takes it)
    chunked_logps  per_token_logps(chunk_tokens=1024) (train.py --logps-chunk 1024): the output layer and log-softmax
                   run on 1,024 positions at a time, checkpointed, so the (rows, T, vocab) fp32 logits never exist
    packed         static_cache with per_token_logps(forward=grpo_fast.packed_logits) (train.py --pack) in scoring
                   instead of the shared prompt: each micro-batch's rows run as one sequence without padding or
                   post-EOS tokens, under a block-diagonal causal mask (dense with SDPA; varlen with flash-attention)

Measuring choices: the reference pass runs the policy's own weights (same architecture, same cost, no second copy in
memory); the optimizer's learning rate is 0, so every variant and every repeat sees the same weights and draws the same
samples from the same seed, and only the path differs. One untimed step warms each variant up. The tiny policy gets a
short supervised warm-up first (as warmup.py does), so that it stops at EOS after varied lengths as a real policy does;
the full-size model has random weights and never stops early, the worst case for padding. Its prompts are tokenised by
the tiny tokenizer (longer text than Qwen's, same image tokens: 1,369 for a 1024x1024 image).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

import agents
import data
import grpo
import grpo_fast
import policy
import rewards
import train
from cli import arg, parse_dataclass_args
from miniature import tiny


@dataclass
class Args:
    """Benchmark one GRPO step phase by phase (tiny policy on CPU, full-size Qwen2.5-VL-7B architecture on a GPU)."""

    model: str = arg("auto", "'tiny', 'qwen2_5_vl_7b' or 'qwen2_5_vl_3b' (full-size, random weights), or a policy "
                             "folder; 'auto' is tiny on CPU and qwen2_5_vl_7b on a GPU")  # fmt: skip
    prompts: int = arg(4, "N: prompts per step")
    group_size: int = arg(8, "G: completions per prompt (B = N * G rows)")
    max_new_tokens: int | None = arg(None, "longest completion in tokens (default: 64 tiny, 256 otherwise)")
    micro_batch_size: int | None = arg(None, "rows per scoring / update forward (default: 4 tiny, 2 otherwise)")
    image_size: int | None = arg(None, "images are resized to this square side in pixels (default: 128 tiny, 1024 "
                                       "otherwise; 1024 gives Qwen2.5-VL 1,369 image tokens)")  # fmt: skip
    variant: Literal[
        "plain", "shared_rollout", "shared_logps", "sorted_trim", "static_cache", "chunked_logps", "packed"
    ] = arg("sorted_trim", "which path to measure without --compare (see the module docstring)")
    compare: bool = arg(False, "measure every variant in one run and print each table and a summary")
    steps: int = arg(3, "timed steps per variant (after one untimed warm-up step); each phase shows its fastest")
    threads: int = arg(1, "CPU threads for torch (tiny models only lose time to more; ignored on a GPU)")
    warmup_steps: int | None = arg(None, "supervised warm-up steps before measuring (default: 20 tiny, 0 otherwise)")
    optimizer: Literal["auto", "adamw", "sgd"] = arg("auto", "update's optimizer; 'auto': AdamW, or stateless SGD "
                                                     "for full-size models (AdamW state does not fit beside 7B)")  # fmt: skip
    dtype: Literal["auto", "float32", "bfloat16"] = arg("auto", "weights and compute; 'auto': bf16 on GPU, fp32 CPU")
    json: str | None = arg(None, "write the results here as JSON")
    rewards: bool = arg(False, "instead: time the reward parsers on long adversarial completions and exit")
    seed: int = arg(0, "seed of the prompts, the warm-up and the sampling")
    attn_implementation: str | None = arg(None, "attention kernel (train.py's flag): sdpa by default; "
                                                "flash_attention_2 on a GPU is what --pack's varlen case needs")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- models

# Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct config.json values (the hub is unreachable here, so they are written out).
FULL_SIZE = {
    "qwen2_5_vl_7b": {
        "text": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        "vision_out": 3584,
    },
    "qwen2_5_vl_3b": {
        "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        "vision_out": 2048,
    },
}  # fmt: skip
FULL_SIZE_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                        tokens_per_second=2, hidden_act="silu")  # fmt: skip
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 16384  # Qwen2.5-VL's image processor defaults
EXAMPLE_DATA = Path(__file__).with_name("data") / "example" / "train.jsonl"  # the shipped shapes examples
TINY_WARMUP_STEPS = 20  # enough for varied lengths: mean ~39 of 64 tokens, a quarter of the rows never stop
WARMUP_LR = 3e-3  # as warmup.py: tiny random models need a large one
WARMUP_IMAGE_SIZE = 64  # the warm-up teaches the answer format, small images keep it at a few seconds


def full_size_config(name: str, tokenizer):
    """The Qwen2.5-VL config of `name` (7B or 3B sizes), with the special-token ids of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    sizes = FULL_SIZE[name]
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    text = sizes["text"] | {
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision = FULL_SIZE_VISION | {"out_hidden_size": sizes["vision_out"]}
    token_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in ids.items()}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)


def full_size_processor(tokenizer):
    """Qwen2.5-VL's image geometry (14-pixel patches, 2x2 merge) around the tiny tokenizer."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS
    )
    return policy.IMAGE_ONLY_PROCESSORS["qwen2_5_vl"](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny.CHAT_TEMPLATE
    )


def load_model(args: Args, device: torch.device, dtype: torch.dtype):
    """(model, processor, label) for --model: the tiny policy, a full-size random one, or a folder."""
    name = args.model
    if name in FULL_SIZE:
        from transformers import Qwen2_5_VLForConditionalGeneration

        tokenizer = tiny.build_tokenizer()
        torch.manual_seed(args.seed)
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(
                full_size_config(name, tokenizer), dtype=dtype, attn_implementation=args.attn_implementation
            )
        return model.eval(), full_size_processor(tokenizer), f"{name} (random weights)"
    if name == "tiny":
        with tempfile.TemporaryDirectory(prefix="speed_tiny_") as tmp:  # saved and loaded like a real checkpoint
            folder = tiny.save_tiny_policy(tmp, "qwen2_5_vl", seed=args.seed)
            model, processor = policy.load_policy(
                str(folder), dtype=dtype, device=str(device), attn_implementation=args.attn_implementation
            )
        return model, processor, "tiny qwen2_5_vl"
    model, processor = policy.load_policy(
        name, dtype=dtype, device=str(device), attn_implementation=args.attn_implementation
    )
    return model, processor, name


def example_prompts(processor, n: int, image_size: int, device):
    """N decomposition prompts of the shipped example data, images resized to image_size, and their gold labels."""
    examples = data.load_rl_jsonl(EXAMPLE_DATA)[:n]
    if len(examples) < n:
        raise SystemExit(f"{EXAMPLE_DATA} has {len(examples)} examples; --prompts asks for {n}")
    images = [e.load_image().resize((image_size, image_size), Image.Resampling.BICUBIC) for e in examples]
    texts = [agents.PAPER_PROMPTS.decomposition_prompt(e.request) for e in examples]
    prompts = policy.encode_prompts(processor, images, texts, system=agents.DECOMPOSITION_SYSTEM)
    return {k: v.to(device) for k, v in prompts.items()}, examples


def warm_up(model, processor, examples: list[data.RLExample], steps: int, seed: int) -> None:
    """A few supervised steps on the examples' gold decompositions, so the tiny policy ends at EOS like a real one."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chunk = [examples[i] for i in torch.randperm(len(examples), generator=g)[:8].tolist()]
        gold = [rewards.render_decomposition(f"Edit the {', '.join(e.gold.subjects)}.", e.gold.actions,
                                             e.gold.subjects, e.gold.goals) for e in chunk]  # fmt: skip
        images = [e.load_image().resize((WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE)) for e in chunk]
        prompts = [agents.PAPER_PROMPTS.decomposition_prompt(e.request) for e in chunk]
        batch = policy.encode_supervised(processor, images, prompts, gold, system=agents.DECOMPOSITION_SYSTEM)
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


# ------------------------------------------------------------------------------------------------------ measuring


class FlopCounter:
    """Counts the tokens each part of the model runs, per phase, with forward pre-hooks; FLOPs = 2 x weights x tokens.

    The language model's hook sees (rows, length) of every forward, padding included (it is executed work); the vision
    tower's sees the patches; the output layer's sees the positions whose logits are kept.
    """

    def __init__(self, model):
        inner = model.model
        self.lm_weights = sum(p.numel() for n, p in inner.language_model.named_parameters() if "embed_tokens" not in n)
        merger = sum(p.numel() for p in inner.visual.merger.parameters())
        self.vision_weights = sum(p.numel() for p in inner.visual.parameters()) - merger
        self.merger_weights = merger  # runs on merged tokens: one per merge_size**2 patches
        self.merge = inner.visual.spatial_merge_size**2
        self.head_weights = model.lm_head.weight.numel()
        self.phase = "other"
        self.counts: dict[str, dict[str, int]] = {}
        inner.language_model.register_forward_pre_hook(self._lm, with_kwargs=True)
        inner.visual.register_forward_pre_hook(self._vision, with_kwargs=True)
        model.lm_head.register_forward_pre_hook(self._head)

    def _add(self, key: str, n: int) -> None:
        phase = self.counts.setdefault(self.phase, {"lm_tokens": 0, "patches": 0, "logit_rows": 0})
        phase[key] += n

    def _lm(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]  # (rows, length, hidden)
        self._add("lm_tokens", embeds.shape[0] * embeds.shape[1])

    def _vision(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["hidden_states"]  # (patches, channels * patch volume)
        self._add("patches", pixels.shape[0])

    def _head(self, module, args):
        hidden = args[0]  # (rows, kept, hidden), or (tokens, hidden) for a chunk of --logps-chunk
        self._add("logit_rows", hidden.numel() // hidden.shape[-1])

    def forward_flops(self, phase: str) -> tuple[float, float]:
        """(all forward FLOPs of the phase, the vision tower's part of them)."""
        c = self.counts.get(phase, {"lm_tokens": 0, "patches": 0, "logit_rows": 0})
        vision = 2.0 * c["patches"] * (self.vision_weights + self.merger_weights / self.merge)
        return 2.0 * (c["lm_tokens"] * self.lm_weights + c["logit_rows"] * self.head_weights) + vision, vision

    def reset(self) -> None:
        self.counts = {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of the best of a few large square matmuls in `dtype` (the hardware's practical peak)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def memory_bandwidth(device: torch.device) -> float:
    """Measured bytes/s of copying a large buffer (read + write), the bound of memory-bound decoding."""
    n = 2**28 if device.type == "cuda" else 2**25  # 1 GiB / 128 MiB of float32
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * 4 * n / best


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: most memory allocated since the last reset. CPU: the process's maximum resident set size so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------- one GRPO step


@dataclass(frozen=True)
class Variant:
    """Which rollout optimisations a step uses."""

    name: str
    share_rollout: bool
    share_logps: bool
    sort_rows: bool
    static_cache: bool = False
    logps_chunk: int = 0
    pack: bool = False


LOGPS_CHUNK = 1024  # tokens per chunk of the chunked_logps variant: (1024, 152k) fp32 logits are 0.6 GB at 7B

VARIANTS = {
    v.name: v
    for v in (
        Variant("plain", False, False, False),
        Variant("shared_rollout", True, False, False),
        Variant("shared_logps", True, True, False),
        Variant("sorted_trim", True, True, True),
        Variant("static_cache", True, True, True, static_cache=True),
        Variant("chunked_logps", True, True, True, static_cache=True, logps_chunk=LOGPS_CHUNK),
        Variant("packed", True, False, True, static_cache=True, pack=True),
    )
}


def train_args(args: Args, variant: Variant) -> train.Args:
    """The train.py settings of this step that train.py's scoring passes read (micro-batches, the shared prompt)."""
    return train.Args(
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro_batch_size,
        share_prompt=variant.share_logps,
        static_cache=variant.static_cache,
        logps_chunk=variant.logps_chunk,
        pack=variant.pack,
    )


def grpo_step(model, processor, optimizer, prompts, examples, args: Args, variant: Variant, flops: FlopCounter):
    """One GRPO step as train.py runs it; returns ({phase: seconds}, completion tokens, the batch)."""
    device, G = model.device, args.group_size
    settings = train_args(args, variant)
    timings: dict[str, float] = {}

    def phase(name: str):
        sync(device)
        flops.phase = name
        return time.perf_counter()

    t = phase("rollout")
    batch = grpo.sample_group(
        model, processor, prompts, G, max_new_tokens=args.max_new_tokens, eos_token_ids=policy.eos_token_ids(processor),
        suppress_token_ids=policy.vision_token_ids(processor),
        prefill=grpo_fast.shared_prompt_inputs if variant.share_rollout else None, static_cache=variant.static_cache,
    )  # fmt: skip
    if variant.sort_rows:
        batch = grpo.select(batch, grpo_fast.rows_by_length(batch.completion_mask, G))
    sync(device)
    timings["rollout"] = time.perf_counter() - t

    t = phase("reward")
    golds = [e.gold for e in examples for _ in range(G)]
    total = torch.tensor([rewards.decomposition_reward(text, gold).total for text, gold in zip(batch.texts, golds)])
    batch.advantages = grpo.group_advantages(total, G).to(device)  # (B,)
    timings["reward"] = time.perf_counter() - t

    t = phase("ref_logps")
    batch.ref_per_token_logps = train.batched_logps(model, batch, settings)  # (B, T)
    sync(device)
    timings["ref_logps"] = time.perf_counter() - t

    t = phase("update")
    model.train()
    denominator = grpo.loss_denominator(batch.completion_mask, settings.aggregation, args.max_new_tokens)
    # train.update_policy's loop for mu = 1 and one mini-batch (update_policy itself all-reduces the denominator, which
    # needs a process group): the same micro-batches, the same forward, and the entropy it logs
    forward = train.scoring_forward(settings)
    for mb in grpo.split_micro_batches(batch, train._n_micro(batch, settings)):
        mb = grpo_fast.trim_padding(mb)
        logps, _ = grpo.per_token_logps(
            model, mb, return_entropy=True, forward=forward, chunk_tokens=settings.logps_chunk
        )  # (b, T')
        loss, _ = grpo.grpo_loss(logps, logps.detach(), mb.ref_per_token_logps, mb.advantages, mb.completion_mask,
                                 max_completion_length=args.max_new_tokens, denominator=denominator)  # fmt: skip
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    sync(device)
    timings["update"] = time.perf_counter() - t
    return timings, int(batch.completion_mask.sum()), batch


def measure(model, processor, prompts, examples, args: Args, variants: list[Variant], hw: dict, flops) -> list[dict]:
    """Phase times of each variant over args.steps seeded steps (after one untimed round), with tokens/s, FLOPs, MFU.

    The variants take turns step by step, so a burst of load from other processes hits them alike, and each phase
    reports its fastest repeat: every repeat does identical work, so the minimum is the least disturbed one.
    """
    device = model.device
    optimizers = {v.name: make_optimizer(model, args) for v in variants}
    runs: dict[str, list] = {v.name: [] for v in variants}
    peaks = dict.fromkeys(optimizers, 0)
    failed: dict[str, str] = {}  # variants that ran out of memory: a result too, and the others go on
    for i in range(args.steps + 1):
        for v in variants:
            if v.name in failed:
                continue
            torch.manual_seed(args.seed)  # the same samples in every repeat and every variant
            flops.reset()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                timings, tokens, batch = grpo_step(model, processor, optimizers[v.name], prompts, examples, args, v,
                                                   flops)  # fmt: skip
            except torch.OutOfMemoryError as e:
                failed[v.name] = str(e).split("\n")[0]
            if v.name in failed:  # outside the except block, so that its traceback no longer holds the tensors
                print(f"{v.name}: out of memory in phase {flops.phase}: {failed[v.name]}", flush=True)
                failed[v.name] = f"out of memory in phase {flops.phase}"
                optimizers[v.name].zero_grad(set_to_none=True)
                model.eval()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            peaks[v.name] = max(peaks[v.name], peak_memory_bytes(device))
            if i > 0:
                runs[v.name].append((timings, tokens, {p: flops.forward_flops(p) for p in timings}, checksum(batch)))
    prompt_len = prompts["input_ids"].shape[1]
    return [
        {"variant": v.name, "error": failed[v.name]}
        if v.name in failed
        else summarise(v, runs[v.name], peaks[v.name], args, hw, flops, model, prompt_len)
        for v in variants
    ]


def checksum(batch: grpo.Batch) -> int:
    """A fingerprint of the sampled tokens that ignores the order of rows (sorted_trim reorders them)."""
    T = batch.completion_ids.shape[1]
    weights = torch.arange(1, T + 1, device=batch.completion_ids.device)  # (T,) so that token order within a row counts
    return int((batch.completion_ids * weights).sum())


def decode_bound(config, flops: FlopCounter, dtype, rows: int, context: float, bytes_per_s: float) -> float:
    """Tokens/s if decoding were limited by memory bandwidth alone: every step reads the language model's weights once
    for all rows, plus each row's KV cache (`context` tokens on average)."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype.itemsize
    step_bytes = (flops.lm_weights + flops.head_weights) * dtype.itemsize + rows * context * kv_bytes_per_token
    return rows * bytes_per_s / step_bytes


def summarise(variant: Variant, runs: list, peak_bytes: int, args: Args, hw: dict, flops, model, prompt_len) -> dict:
    dtype, model_config = model.dtype, model.config
    phases = {}
    tokens = runs[0][1]
    context = prompt_len + tokens / (args.prompts * args.group_size) / 2  # mean KV length while decoding
    for name in runs[0][0]:
        seconds = min(r[0][name] for r in runs)
        forward, vision = runs[0][2][name]
        executed = forward * (3 if name == "update" else 1)  # backward costs twice the forward
        phases[name] = {
            "seconds": seconds,
            "completion_tokens_per_s": tokens / seconds,
            "tflops": executed / 1e12,
            "mfu": executed / seconds / hw["matmul_flops_per_s"],
            "vision_flops_share": vision / forward if forward else 0.0,
        }
    rows = args.prompts * args.group_size
    return {
        "variant": variant.name,
        "phases": phases,
        "step_seconds": sum(p["seconds"] for p in phases.values()),  # the sum of each phase's fastest repeat
        "completion_tokens": tokens,
        "rows": rows,
        "mean_completion_length": tokens / rows,
        "decode_bound_tokens_per_s": decode_bound(model_config, flops, dtype, rows, context, hw["memory_bytes_per_s"]),
        "peak_memory_gib": peak_bytes / 2**30,
        "samples_checksum": runs[0][3],  # equal for every variant: they draw the same samples
    }


def make_optimizer(model, args: Args):
    """lr = 0: the step costs what it costs, and the weights (hence the samples) stay the same for every variant."""
    if args.optimizer == "sgd" or (args.optimizer == "auto" and args.model in FULL_SIZE):
        return torch.optim.SGD(model.parameters(), lr=0.0)
    return torch.optim.AdamW(model.parameters(), lr=0.0)


# ----------------------------------------------------------------------------------------------------------- main


def print_table(result: dict) -> None:
    if "error" in result:
        print(f"\n{result['variant']}: {result['error']}")
        return
    print(f"\n{result['variant']}: step {result['step_seconds']:.3f} s, {result['rows']} rows, "
          f"mean completion {result['mean_completion_length']:.1f} tokens, peak memory "
          f"{result['peak_memory_gib']:.2f} GiB")  # fmt: skip
    print(f"  {'phase':<10} {'seconds':>8} {'share':>6} {'compl. tok/s':>13} {'TFLOP':>9} {'MFU':>7} {'vision':>7}")
    for name, p in result["phases"].items():
        share = p["seconds"] / result["step_seconds"]
        print(f"  {name:<10} {p['seconds']:>8.3f} {share:>6.1%} {p['completion_tokens_per_s']:>13.1f} "
              f"{p['tflops']:>9.4f} {p['mfu']:>7.2%} {p['vision_flops_share']:>7.1%}")  # fmt: skip
    print(f"  rollout {result['phases']['rollout']['completion_tokens_per_s']:.1f} tokens/s; memory-bandwidth bound "
          f"of decoding {result['decode_bound_tokens_per_s']:.0f} tokens/s")  # fmt: skip


# Completions a policy could write that would make a backtracking regex take minutes; each is 100-200 kB.
ADVERSARIAL_COMPLETIONS = {
    "open-tags": "<action>" * 20000, "close-tags": "</action>" * 20000, "brackets": "[" * 100_000,
    "json-nesting": '["' * 50_000, "long-think": "<think>" + "a," * 50_000, "bullets": "- " * 50_000 + "x",
    "spaces": " " * 100_000 + "x" + " " * 100_000,
}  # fmt: skip


def time_reward_parsers() -> None:
    """Seconds per adversarial completion for the whole reward (format, parse, F1): linear work is ~10 ms."""
    gold = rewards.gold_from_lists(["recolor"], ["circle"], ["blue"])
    for name, text in ADVERSARIAL_COMPLETIONS.items():
        t = time.perf_counter()
        rewards.decomposition_reward(text, gold)
        rewards.parse_items(text)
        rewards.action_key(text)
        print(f"{name:>13}: {len(text) / 1e3:6.0f} kB in {(time.perf_counter() - t) * 1e3:8.1f} ms")


def main(argv=None) -> None:
    args = parse_dataclass_args(Args, argv)
    if args.rewards:
        return time_reward_parsers()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.model == "auto":
        args.model = "qwen2_5_vl_7b" if device.type == "cuda" else "tiny"
    small = args.model == "tiny"
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    args.max_new_tokens = args.max_new_tokens or (64 if small else 256)
    args.micro_batch_size = args.micro_batch_size or (4 if small else 2)
    args.image_size = args.image_size or (128 if small else 1024)
    model, processor, label = load_model(args, device, dtype)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (TINY_WARMUP_STEPS if small else 0)
    t = time.perf_counter()
    if warmup_steps:
        warm_up(model, processor, data.load_rl_jsonl(EXAMPLE_DATA), warmup_steps, args.seed)
    warmup_seconds = time.perf_counter() - t
    prompts, examples = example_prompts(processor, args.prompts, args.image_size, device)
    hw = {"matmul_flops_per_s": matmul_peak(device, dtype), "memory_bytes_per_s": memory_bandwidth(device)}
    flops = FlopCounter(model)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{label} on {machine} ({dtype}); N={args.prompts} G={args.group_size} T<={args.max_new_tokens}, "
          f"prompt {prompts['input_ids'].shape[1]} tokens ({int(prompts['mm_token_type_ids'][0].sum())} image), "
          f"micro-batch {args.micro_batch_size}; warm-up {warmup_steps} steps ({warmup_seconds:.1f} s); peak "
          f"{hw['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, {hw['memory_bytes_per_s'] / 1e9:.1f} GB/s")  # fmt: skip
    variants = list(VARIANTS.values()) if args.compare else [VARIANTS[args.variant]]
    results = measure(model, processor, prompts, examples, args, variants, hw, flops)
    for result in results:
        print_table(result)
    done = [r for r in results if "error" not in r]
    if args.compare and done:
        base = done[0]["step_seconds"]
        same = len({r["samples_checksum"] for r in done}) == 1
        print("\nstep time by variant: " + ", ".join(f"{r['variant']} {r['step_seconds']:.3f} s "
                                                     f"(x{base / r['step_seconds']:.2f})" for r in done)
              + f"; same samples in every variant: {'yes' if same else 'NO'}")  # fmt: skip
    if args.json:
        record = {
            "model": label,
            "machine": machine,
            "dtype": str(dtype),
            "args": asdict(args),
            **hw,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()

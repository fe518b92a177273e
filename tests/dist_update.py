"""One GRPO update of train.py on a fixed global batch, for tests that vary the world size and micro-batching.

    python tests/dist_update.py MODEL OUT_DIR --world 1|2 --micro M [--stage 2|3] [--aggregation A]

Under `--world 2` it re-launches itself with torchrun. Every rank builds the same global batch (fixed prompts, fixed
completions with ragged lengths, fixed advantages), keeps its contiguous share of the prompts, runs
`train.update_policy` once, and the exported policy plus the pre-clip gradient norm are written to OUT_DIR.
AdamW's epsilon is 1, far above every gradient, so the first step is lr * g / (|g| + 1), about lr * g: the weights then
show the gradient itself (with its scale), not Adam's near sign(g) first step that hides scale and amplifies noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import agents  # noqa: E402
import grpo  # noqa: E402
import train  # noqa: E402

N_PROMPTS, G, T = 4, 2, 6


def fixed_batch(processor) -> grpo.Batch:
    images = []
    for i in range(N_PROMPTS):
        im = Image.new("RGB", (64, 48 + 16 * (i % 2)), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((8 * i, 8, 8 * i + 24, 32), fill=(200, 40 * i, 30))
        images.append(im)
    texts = [f"make shape {i} blue and move it left" + " please" * i for i in range(N_PROMPTS)]
    prompt = train.policy.encode_prompts(processor, images, texts, system=agents.DECOMPOSITION_SYSTEM)
    prompt = grpo.repeat_prompts(dict(prompt), G)
    g = torch.Generator().manual_seed(0)
    B = N_PROMPTS * G
    vocab = len(processor.tokenizer)
    completion_ids = torch.randint(0, vocab - 20, (B, T), generator=g)
    lengths = torch.tensor([1, 6, 3, 5, 2, 6, 4, 1])
    mask = (torch.arange(T).expand(B, T) < lengths.unsqueeze(1)).long()
    advantages = torch.randn(B, generator=g)
    return grpo.Batch(prompt=prompt, completion_ids=completion_ids, completion_mask=mask, advantages=advantages)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--aggregation", default="token")
    a = p.parse_args()
    args = train.Args(
        model=a.model, gpus=a.world, prompts_per_step=N_PROMPTS, group_size=G, micro_batch_size=a.micro,
        max_new_tokens=T, zero_stage=a.stage, aggregation=a.aggregation, beta=0.1, lr=1e-3, grad_clip=1e9, adam_eps=1.0,
        output_dir=a.out,
    )  # fmt: skip
    train.launch_if_needed(args)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_prompts, grad_accum = train.batch_layout(args, world)
    engine, ref_model, processor, _ = train.build_engines(args, world, grad_accum, False, torch.device("cpu"))

    batch = fixed_batch(processor)
    rows = torch.arange(rank * local_prompts * G, (rank + 1) * local_prompts * G)
    local = grpo.select(batch, rows)
    local.ref_per_token_logps = train.batched_logps(ref_model, local, args)
    stats = train.update_policy(engine, local, args, world, torch.device("cpu"))
    train.export_policy(engine, processor, Path(a.out) / "policy", args, rank)
    if rank == 0:
        (Path(a.out) / "stats.json").write_text(json.dumps(stats))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

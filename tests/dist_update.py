"""One GRPO update of train.py on a fixed global batch, for tests that vary the world size and micro-batching.

    python tests/dist_update.py MODEL OUT_DIR --world 1|2 --micro M [--stage 2|3] [--logps-chunk K]

Under `--world 2` it re-launches itself with torchrun. Each rank takes its prompts of step 0 exactly as `train.main`
does (`train.rank_examples` over `train.split_data`), encodes them with train.py's own prompt builder, and gives
their rows fixed completions (ragged lengths) and fixed advantages, both a function of the example id alone, so the
global batch is the same however it is split. For each of the three aggregations it builds the engines afresh, runs
`train.update_policy` once and writes the exported policy and the pre-clip gradient norm to OUT_DIR/<aggregation>/.
AdamW's epsilon is 1, far above every gradient, and weight decay is 0, so the first step is lr * g / (|g| + 1), about
lr * g: the weights then show the gradient itself (with its scale), not Adam's near sign(g) first step that hides
scale and amplifies noise, and nothing but the gradient moves them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import grpo  # noqa: E402
import train  # noqa: E402

N_PROMPTS, G, T = 4, 2, 6
EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "example" / "train.jsonl"


def fixed_rows(examples, processor) -> grpo.Batch:
    """The G rows of each example: its prompt, and completions and advantages seeded by the example's id."""
    prompt = grpo.repeat_prompts(dict(train.encode(processor, train.build_task(train.Args()), examples)), G)
    vocab = len(processor.tokenizer)
    ids, masks, advantages = [], [], []
    for e in examples:
        g = torch.Generator().manual_seed(zlib.crc32(e.id.encode()))
        ids.append(torch.randint(0, vocab - 20, (G, T), generator=g))  # (G, T) no special tokens
        lengths = torch.randint(1, T + 1, (G,), generator=g)  # (G,)
        masks.append((torch.arange(T).expand(G, T) < lengths.unsqueeze(1)).long())  # (G, T)
        advantages.append(torch.randn(G, generator=g))  # (G,)
    return grpo.Batch(prompt=prompt, completion_ids=torch.cat(ids), completion_mask=torch.cat(masks),
                      advantages=torch.cat(advantages))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--logps-chunk", type=int, default=0)
    a = p.parse_args()
    base = dict(model=a.model, gpus=a.world, train_data=str(EXAMPLE), eval_size=8, prompts_per_step=N_PROMPTS,
                group_size=G, micro_batch_size=a.micro, max_new_tokens=T, zero_stage=a.stage, beta=0.1, lr=1e-3,
                grad_clip=1e9, adam_eps=1.0, weight_decay=0.0, output_dir=a.out, logps_chunk=a.logps_chunk)  # fmt: skip
    train.launch_if_needed(train.Args(**base))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for aggregation in ("sequence", "token", "constant"):
        args = train.Args(**base, aggregation=aggregation)
        local_prompts, grad_accum = train.batch_layout(args, world)
        train_set, _ = train.split_data(args)
        engine, ref_model, processor, _ = train.build_engines(args, world, grad_accum, False, torch.device("cpu"))
        local = fixed_rows(train.rank_examples(train_set, 0, args, rank, local_prompts), processor)
        local.ref_per_token_logps = train.batched_logps(ref_model, local, args)
        stats = train.update_policy(engine, local, args, world, torch.device("cpu"))
        out = Path(a.out) / aggregation
        train.export_policy(engine, processor, out / "policy", args, rank)
        if rank == 0:
            (out / "stats.json").write_text(json.dumps(stats))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

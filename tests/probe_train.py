"""train.py as a user runs it, with a recorder on the GRPO calls, for tests of what each flag does inside a step.

    python tests/probe_train.py TRAIN_ARGS... [--letter-task]

Every call of `grpo.per_token_logps` (which path, with or without gradients), of `grpo.grpo_loss` (the slice's
ratio metrics and each row's mean log-ratio, numbered in call order) and of `grpo.group_advantages` (rewards in, advantages out) is appended, one
JSON object a line, to OUTPUT_DIR/probe_rank{R}.jsonl. After every optimizer update the pre-clip gradient norm and
the dtype DeepSpeed accumulates gradients in are recorded too.
Nothing else changes: the recorder calls the real functions and returns their results.

`--letter-task` trains tests/custom_task.py's LetterTask (reward: the share of "a" in the answer; with `--half-flat`,
a constant for half the examples, whose groups then have no spread) instead of the
decomposition task: a random tiny policy gets rewards that differ within a group, so every step has non-zero
advantages and a real policy gradient, which weight decay alone cannot imitate.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from custom_task import LetterTask  # noqa: E402

import grpo  # noqa: E402
import train  # noqa: E402


def main() -> None:
    argv = [a for a in sys.argv[1:] if a not in ("--letter-task", "--half-flat")]
    out_dir = Path(argv[argv.index("--output-dir") + 1])
    out_dir.mkdir(parents=True, exist_ok=True)
    counters = {"loss_calls": 0}

    def record(event: dict) -> None:
        rank = int(os.environ.get("RANK", "0"))
        with (out_dir / f"probe_rank{rank}.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")

    real_logps, real_loss = grpo.per_token_logps, grpo.grpo_loss

    def per_token_logps(model, batch, *args, **kwargs):
        forward = kwargs.get("forward") or grpo.full_sequence_logits  # which path scores
        record({"call": "logps", "forward": forward.__name__, "grad": torch.is_grad_enabled(), "rows": len(batch),
                "chunk_tokens": kwargs.get("chunk_tokens", 0)})  # fmt: skip
        return real_logps(model, batch, *args, **kwargs)

    def grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, completion_mask, **kwargs):
        loss, metrics = real_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages,
                                  completion_mask, **kwargs)  # fmt: skip
        counters["loss_calls"] += 1
        mask = completion_mask.float()  # (b, T)
        # each row's mean log-ratio log(pi_theta / pi_old): how far the updates so far moved that completion
        log_ratio = ((per_token_logps.detach() - old_per_token_logps) * mask).sum(1) / mask.sum(1).clamp(min=1)
        record({"call": "loss", "n": counters["loss_calls"], "metrics": metrics, "row_log_ratio": log_ratio.tolist()})
        return loss, metrics

    real_update = train.update_policy

    def update_policy(engine, *args, **kwargs):
        real_step = engine.step

        def step():
            boundary = engine.is_gradient_accumulation_boundary()
            real_step()
            if boundary:
                accum = getattr(engine.optimizer, "gradient_accumulation_dtype", None)  # what DeepSpeed really uses
                record({"call": "update", "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                        "grad_accum_dtype": str(accum)})  # fmt: skip

        engine.step = step
        try:
            return real_update(engine, *args, **kwargs)
        finally:
            engine.step = real_step

    real_advantages = grpo.group_advantages

    def group_advantages(rewards, group_size, scale="group"):
        advantages = real_advantages(rewards, group_size, scale)
        record({"call": "advantages", "rewards": rewards.tolist(), "advantages": advantages.tolist(), "scale": scale})
        return advantages

    grpo.per_token_logps, grpo.grpo_loss, grpo.group_advantages = per_token_logps, grpo_loss, group_advantages
    train.update_policy = update_policy
    half_flat = "--half-flat" in sys.argv  # LetterTask with a constant reward for half the examples
    task = LetterTask(out_dir / "task_rewards.jsonl", half_flat) if "--letter-task" in sys.argv else None
    train.main(argv, task=task)


if __name__ == "__main__":
    main()

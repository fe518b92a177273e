"""train.py's update does not depend on how the batch is split, and a killed two-rank run resumes exactly.

Split from test_train.py so that `make test`'s two workers (one test file each at a time) share the longest runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_train import EXAMPLE, loaded, max_diff, run, weights
from test_train_flags import tensorboard_scalars


def test_update_is_independent_of_world_size_micro_batches_and_zero_stage(tiny_qwen25, tmp_path):
    # every aggregation, ZeRO-2 and ZeRO-3, ranks split by train.main's own rank_examples; the "token" and
    # "sequence" denominators are the ones a per-rank or per-micro-batch normaliser gets wrong. The two-rank ZeRO-2 run
    # also scores in chunks of 5 tokens (--logps-chunk: the output layer checkpointed, under DeepSpeed's gradient hooks)
    outs = {}
    for world, micro, stage, chunk in [(1, 8, 2, 0), (1, 2, 2, 0), (2, 1, 2, 5), (2, 2, 3, 0)]:
        out = tmp_path / f"w{world}m{micro}z{stage}c{chunk}"
        proc = run(["tests/dist_update.py", str(tiny_qwen25), str(out), "--world", str(world), "--micro", str(micro),
                    "--stage", str(stage), "--logps-chunk", str(chunk)])  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[(world, micro, stage)] = out
    start = loaded(tiny_qwen25)
    for aggregation in ("sequence", "token", "constant"):
        base = loaded(outs[(1, 8, 2)] / aggregation / "policy")
        base_norm = json.loads((outs[(1, 8, 2)] / aggregation / "stats.json").read_text())["grad_norm"]
        # weight decay is 0: only the gradient moves the weights, by about lr * g (see tests/dist_update.py)
        assert base_norm > 1e-2 and max_diff(base, start) > 1e-5, aggregation
        for key, out in outs.items():
            stats = json.loads((out / aggregation / "stats.json").read_text())
            assert abs(stats["grad_norm"] - base_norm) <= 1e-5 * base_norm, (aggregation, key)
            # lr * (gradient difference) plus float32 rounding of the weights
            assert max_diff(base, loaded(out / aggregation / "policy")) < 2e-8, (aggregation, key)


def test_resumed_two_rank_run_matches_uninterrupted_run(tiny_qwen25, tmp_path):
    # two ranks, the LetterTask (rewards differ within groups, so every step has a real policy gradient), no weight
    # decay: a no-op update would leave the weights where they started, and the first check below catches it
    common = ["--eval-every", "0", "--save-every", "2", "--beta", "0.05", "--weight-decay", "0", "--letter-task",
              "--max-new-tokens", "12", "--report-to", "tensorboard"]  # fmt: skip

    def letter_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        args = ["tests/probe_train.py", "--gpus", "2", "--model", str(tiny_qwen25), "--train-data", str(EXAMPLE),
                "--eval-size", "8", "--output-dir", str(out), "--prompts-per-step", "4", "--group-size", "4",
                "--micro-batch-size", "4", "--lr", "1e-3", *common, *extra]  # fmt: skip
        proc = run(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    full, part = tmp_path / "full", tmp_path / "part"
    letter_run(full, "--max-steps", "4")
    # a run killed after logging step 3 but before its step-3 checkpoint was complete: run 3 steps, then point
    # DeepSpeed's `latest` back at step 2 and drop step 3's checkpoint
    letter_run(part, "--max-steps", "3")
    (part / "checkpoints" / "latest").write_text("step_2")
    shutil.rmtree(part / "checkpoints" / "step_3")
    assert [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    proc = letter_run(part, "--max-steps", "4", "--resume")
    assert "resumed from step 2" in proc.stdout
    assert max_diff(weights(full / "policy"), weights(tiny_qwen25)) > 1e-4, "the run never moved the weights"
    assert max_diff(weights(full / "policy"), weights(part / "policy")) < 1e-6
    full_records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    part_records = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in part_records] == [1, 2, 3, 4]
    assert all(r["grad_norm"] > 1e-3 for r in full_records)
    for name in ("reward_mean", "kl", "grad_norm", "entropy"):
        assert [r[name] for r in part_records] == pytest.approx([r[name] for r in full_records], rel=1e-5), name
    # the resumed run's TensorBoard log: the killed run's step 3 purged and redone, each step once, the same values
    logged = tensorboard_scalars(part / "tensorboard")["reward_mean"]
    assert sorted(logged) == [1, 2, 3, 4]
    assert [logged[s] for s in (1, 2, 3, 4)] == pytest.approx([r["reward_mean"] for r in full_records], rel=1e-6)

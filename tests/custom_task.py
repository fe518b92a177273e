"""train.py with a task handed in by code (`train.main(argv, task=...)`), for the test that the loop has no agent
branch: whatever the task's `rewards` returns is what GRPO logs and optimises.

    python tests/custom_task.py TRAIN_ARGS...

The task here asks for short answers made of the letter "a": its reward is the share of "a" among the first 16
characters. Every batch of rewards it returns is appended to OUT_DIR/task_rewards.jsonl, so the test can compare it
with train.py's metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tasks  # noqa: E402
import train  # noqa: E402


class LetterTask:
    name = "letter-a"
    system = "Answer with the letter a, many times."
    components = ("share_a", "length")

    def __init__(self, log: Path, half_flat: bool = False) -> None:
        self.log = log
        self.half_flat = half_flat  # examples with an even last id digit score a constant: groups with no spread

    def prompts(self, examples):
        images, _ = tasks.DecompositionTask().prompts(examples)  # reuse the images; the text is ours
        return images, [f"Write the letter a. ({e.request})" for e in examples]

    def rewards(self, examples, texts):
        out = []
        for example, text in zip(examples, texts):
            head = text[:16]
            share = head.count("a") / max(len(head), 1)
            if self.half_flat and int(example.id[-1]) % 2 == 0:
                share = 0.25
            out.append({"reward": share, "share_a": share, "length": float(len(text))})
        with self.log.open("a") as f:
            f.write(json.dumps([r["reward"] for r in out]) + "\n")
        return out


if __name__ == "__main__":
    argv = sys.argv[1:]
    out_dir = Path(argv[argv.index("--output-dir") + 1])
    out_dir.mkdir(parents=True, exist_ok=True)
    train.main(argv, task=LetterTask(out_dir / "task_rewards.jsonl"))

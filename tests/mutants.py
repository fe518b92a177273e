"""Mutation check of the GRPO update: each mutant breaks one thing, and some fast test must fail for it (issue 19).

    python tests/mutants.py                  # every mutant, in a fresh copy of the tree each
    python tests/mutants.py --only flip-adv  # one of them

Each mutant replaces one exact line of a module (the text must occur exactly once, or the check itself fails: a
refactor that moves the line must move the mutant too). The copy is the tree as git sees it (tracked files and
untracked ones it does not ignore), so uncommitted work is checked. The fast tests below run with `-x` in order,
cheapest first, and never tests/test_learning.py (the slow statistical check): a mutant is caught when one of them
fails, and the first failing test is printed. Exit status 1 if any mutant escapes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAST_TESTS = ["tests/test_grpo.py", "tests/test_rewards.py", "tests/test_tasks.py", "tests/test_grpo_models.py",
              "tests/test_train_flags.py", "tests/test_train.py"]  # fmt: skip

# name: (file, the exact original text, its replacement, what breaks)
MUTANTS = {
    "std-ddof0": (
        "grpo.py",
        "centred / (r.std(dim=1, keepdim=True) + ADV_EPS)",
        "centred / (r.std(dim=1, keepdim=True, correction=0) + ADV_EPS)",
        "population std in the advantage",
    ),
    "no-shift": (
        "grpo.py",
        "logits = logits[:, :-1, :].float() / temperature",
        "logits = logits[:, 1:, :].float() / temperature",
        "the one-token shift of the log-probs dropped",
    ),
    "goal-ignored": (
        "rewards.py",
        "w_goal_used = w_goal if use_goal else 0.0",
        "w_goal_used = w_goal",
        "use_goal=False still weights the goal",
    ),
    "old-not-detached": (
        "train.py",
        "else logps.detach()",
        "else logps",
        "on-policy old log-probs keep their graph: the surrogate's gradient is exactly 0",
    ),
    "flip-adv": (
        "train.py",
        "batch.advantages = grpo.group_advantages(",
        "batch.advantages = -grpo.group_advantages(",
        "the advantage sign flipped in the loop",
    ),
    "rank-denominator": (
        "train.py",
        "(denominator,) = global_sum([local], device)  # collective",
        "denominator = local",
        "each rank normalises by its own share, not the global batch",
    ),
    "kl-reversed": (
        "grpo.py",
        "delta = ref_per_token_logps - per_token_logps  # (B, T)",
        "delta = per_token_logps - ref_per_token_logps  # (B, T)",
        "k3 of KL(ref || pi) instead",
    ),
    "kl-sign": (
        "grpo.py",
        "per_token_loss = per_token_loss + beta * kl",
        "per_token_loss = per_token_loss - beta * kl",
        "the KL penalty rewarded instead of charged",
    ),
    "clip-off": (
        "grpo.py",
        "surrogate = torch.min(ratio * adv, clipped_ratio * adv)",
        "surrogate = ratio * adv",
        "no PPO clipping",
    ),
}


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()  # fmt: skip
    for name in files:
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_mutant(name: str) -> tuple[bool, str, float]:
    """(caught, the first failing test or why not, seconds)."""
    file, old, new, _ = MUTANTS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        text = (tree / file).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name}: {file} holds {text.count(old)} copies of {old!r}; update the mutant")
        (tree / file).write_text(text.replace(old, new))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                               *FAST_TESTS], cwd=tree, env=env, capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 0:
        return False, "every fast test passed", seconds
    return True, failed[0] if failed else proc.stdout.strip().splitlines()[-1], seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(MUTANTS), action="append", help="run just these mutants")
    names = p.parse_args().only or list(MUTANTS)
    escaped = []
    for name in names:
        caught, test, seconds = run_mutant(name)
        print(
            f"{name:>17}  {'caught' if caught else 'ESCAPED'}  {seconds:6.0f} s  {MUTANTS[name][3]}: {test}", flush=True
        )
        if not caught:
            escaped.append(name)
    sys.exit(1 if escaped else 0)


if __name__ == "__main__":
    main()

"""The dependency direction of ../shared/STYLE.md, checked by parsing every module's imports (including lazy ones).

example -> agents -> editors -> judge -> rewards -> grpo -> train: the leaves import nothing of ours, nothing imports
the entry scripts, and only train.py touches DeepSpeed or torch.distributed.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in REPO.glob("*.py")}
ENTRY_SCRIPTS = {"train", "evaluate", "warmup", "bench", "demo"}  # run, never imported


def imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in the file (lazy imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def ours(path: Path) -> set[str]:
    return {n.split(".")[0] for n in imports(path)} & MODULES.keys()


def test_leaves_import_nothing_of_ours_and_only_what_they_may():
    stdlib = set(sys.stdlib_module_names)
    assert {n.split(".")[0] for n in imports(MODULES["rewards"])} <= stdlib | {"__future__"}
    assert {n.split(".")[0] for n in imports(MODULES["grpo"])} <= stdlib | {"__future__", "torch"}
    for leaf in ("rewards", "grpo", "cli", "benchmarks", "editors"):
        assert ours(MODULES[leaf]) == set(), leaf
    # grpo's speed-ups sit on the plain path and nothing else: torch and grpo's batch layout
    assert {n.split(".")[0] for n in imports(MODULES["grpo_fast"])} <= stdlib | {"__future__", "torch", "grpo"}


def test_nothing_imports_an_entry_script():
    for name, path in MODULES.items():
        assert not ours(path) & ENTRY_SCRIPTS, f"{name} imports {ours(path) & ENTRY_SCRIPTS}"


def test_wrappers_import_only_leaves_and_the_policy_loader():
    allowed = {
        "policy": {"grpo"},  # grpo.generate: the one generation call, under an explicit config
        "tiny": {"policy"},
        "judge": {"policy"},  # lazily, for the local judge
        "shapes": {"judge"},  # the Verdict record and the rubric's maxima
        "agents": {"rewards", "policy", "editors", "grpo"},
        "tasks": {"agents", "data", "editors", "judge", "rewards", "shapes"},  # never policy, grpo or an entry script
    }
    for name, ok in allowed.items():
        assert ours(MODULES[name]) <= ok, f"{name} imports {ours(MODULES[name]) - ok}"


def distributed_uses(path: Path) -> set[str]:
    """Every way a module reaches DeepSpeed or torch.distributed: imports, and attribute chains such as
    `torch.distributed.all_reduce` reached through a plain `import torch`."""
    found = {n for n in imports(path) if n.startswith(("deepspeed", "torch.distributed"))}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name):
                dotted = ".".join([inner.id, *reversed(chain)])
                if dotted.startswith(("torch.distributed", "deepspeed.")) or dotted == "torch.distributed":
                    found.add(dotted)
    return found


def test_only_train_touches_distributed():
    for name, path in MODULES.items():
        if name == "train":
            continue
        assert not distributed_uses(path), f"{name} uses {distributed_uses(path)}"


def test_the_distributed_check_sees_calls_through_import_torch(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("import torch\n\n\ndef f(t):\n    torch.distributed.all_reduce(t)\n")
    assert "torch.distributed.all_reduce" in distributed_uses(sneaky)
    assert "torch.distributed.barrier" in distributed_uses(MODULES["train"])

"""The layout of ../shared/STYLE.md, checked by parsing every module's imports (including lazy ones).

One-way dependencies: the leaves import nothing of ours, nothing imports an entry script, only train.py touches
DeepSpeed or torch.distributed, and the system's modules never import the miniature (miniature/): only the entry
scripts, specs.py (which resolves the spec "shapes") and the tests do. `import train` loads neither the openai client
nor the miniature.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {p.stem: p for p in REPO.glob("*.py")}  # the flat system at the top
MINIATURE = {f"miniature.{p.stem}": p for p in (REPO / "miniature").glob("*.py") if p.stem != "__init__"}
MODULES = {**SYSTEM, **MINIATURE}
ENTRY_SCRIPTS = {"train", "evaluate", "label", "speed", "miniature.warmup", "miniature.demo"}  # run, never imported
MAY_IMPORT_THE_MINIATURE = {"specs", "speed"}  # specs lazily, for the spec "shapes"; speed's tiny policy


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (lazy imports count); `from miniature import world` counts
    as miniature.world."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "miniature":
                names |= {f"miniature.{a.name}" for a in node.names}
    return names


def ours(path: Path) -> set[str]:
    """Our modules that `path` imports: top-level names, and miniature.X for the miniature's."""
    return {n if n.startswith("miniature.") else n.split(".")[0] for n in imports(path)} & MODULES.keys()


def test_leaves_import_nothing_of_ours_and_only_what_they_may():
    stdlib = set(sys.stdlib_module_names)
    assert {n.split(".")[0] for n in imports(MODULES["rewards"])} <= stdlib | {"__future__"}
    assert {n.split(".")[0] for n in imports(MODULES["grpo"])} <= stdlib | {"__future__", "torch"}
    for leaf in ("rewards", "grpo", "cli", "benchmarks", "editors", "records"):
        assert ours(MODULES[leaf]) == set(), leaf
    # grpo's speed-ups sit on the plain path and nothing else: torch, grpo's batch layout, and transformers' static
    # KV cache (the fixed-shape cache the decode step is compiled on), that one class only
    fast = {n.split(".")[0] for n in imports(MODULES["grpo_fast"])}
    assert fast <= stdlib | {"__future__", "torch", "grpo", "transformers"}
    transformers_lines = [
        x for x in MODULES["grpo_fast"].read_text().splitlines() if "import" in x and "transformers" in x
    ]
    assert transformers_lines == ["from transformers import StaticCache"]


def test_nothing_imports_an_entry_script():
    benchmark = {"speed": {"train"}}  # the step benchmark times train.py's own step functions
    for name, path in MODULES.items():
        reached = ours(path) & ENTRY_SCRIPTS - benchmark.get(name, set())
        assert not reached, f"{name} imports {reached}"


def test_wrappers_import_only_what_they_build_on():
    allowed = {
        "policy": {"grpo"},  # grpo.generate: the one generation call, under an explicit config
        "judge": {"policy"},  # lazily, for the local judge
        "data": {"benchmarks", "rewards"},  # the RL data format: benchmarks.py's image decoder, rewards' lists
        "agents": {"rewards", "policy", "editors"},
        "critics": {"agents", "judge", "policy", "rewards"},
        "thinker": {"agents", "critics", "data", "editors", "rewards"},
        "tasks": {"agents", "data", "rewards"},  # never policy, grpo, the thinker or an entry script
        "results": {"agents", "records"},
        "report": {"judge", "records", "results"},
        "specs": {"editors", "judge", "critics", "miniature.procedural"},
    }
    for name, ok in allowed.items():
        assert ours(MODULES[name]) <= ok, f"{name} imports {ours(MODULES[name]) - ok}"


def test_the_system_never_imports_the_miniature():
    for name, path in SYSTEM.items():
        if name in ENTRY_SCRIPTS or name in MAY_IMPORT_THE_MINIATURE:
            continue
        reached = {n for n in ours(path) if n.startswith("miniature")}
        assert not reached, f"{name} imports the miniature ({reached}); resolve the spec in specs.py instead"
    # and the miniature's world, editor and judge build on nothing of the system but the judge's Verdict record
    for name in ("miniature.world", "miniature.language", "miniature.dataset", "miniature.procedural"):
        assert {n for n in ours(MODULES[name]) if not n.startswith("miniature")} <= {"judge"}, name


def test_import_train_loads_neither_the_openai_client_nor_the_miniature():
    probe = (
        "import sys, train, evaluate\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('openai', 'miniature'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert loaded.startswith("["), out.stdout
    train_only = subprocess.run([sys.executable, "-c", probe.replace(", evaluate", "")], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    assert train_only == "[]", f"import train loaded {train_only}"
    assert "miniature" not in loaded, f"import evaluate loaded {loaded}"


def test_every_module_says_its_one_job_in_its_first_docstring_line():
    for name, path in {**MODULES, "miniature": REPO / "miniature" / "__init__.py"}.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip().endswith((".", ")", ":")), f"{name}: no one-line docstring"


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


# ---------------------------------------------------------------------------------------------------------------------
# The README's file map is generated from the tree: `python tests/test_layout.py` prints it

FILE_MAP_START, FILE_MAP_END = "<!-- file map: python tests/test_layout.py -->", "<!-- end of file map -->"


def module_job(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())).splitlines()[0].strip()


def file_map() -> str:
    """One Markdown row per module: its path, its lines, its one job (first docstring line), what of ours it imports."""
    rows = ["| file | lines | its one job | imports (ours) |", "| --- | ---: | --- | --- |"]
    for name, path in sorted(MODULES.items(), key=lambda kv: (kv[0].startswith("miniature"), kv[0])):
        uses = ", ".join(sorted(n.removeprefix("miniature.") for n in ours(path) if n != name)) or "—"
        lines = len(path.read_text().splitlines())
        rows.append(f"| `{path.relative_to(REPO)}` | {lines} | {module_job(path)} | {uses} |")
    return "\n".join(rows)


def test_the_readme_file_map_is_the_tree():
    readme = (REPO / "README.md").read_text()
    assert FILE_MAP_START in readme and FILE_MAP_END in readme, "the README lost its file map markers"
    shown = readme.split(FILE_MAP_START)[1].split(FILE_MAP_END)[0].strip().splitlines()
    want = file_map().splitlines()
    strip_lines = [lambda row: row.split(" | ")[0] + row.split(" | ", 2)[2] if row.count(" | ") > 2 else row]
    # every file, job and import list exactly; line counts within 10% (they drift with every edit)
    assert [strip_lines[0](r) for r in shown] == [strip_lines[0](r) for r in want], "run: python tests/test_layout.py"
    for a, b in zip(shown[2:], want[2:]):
        old, new = int(a.split(" | ")[1]), int(b.split(" | ")[1])
        assert abs(old - new) <= max(10, new // 10), f"{a.split(' | ')[0]}: {old} lines shown, {new} in the tree"


if __name__ == "__main__":
    print(FILE_MAP_START)
    print(file_map())
    print(FILE_MAP_END)

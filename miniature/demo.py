"""The miniature: ImageEdit-R1's whole method, end to end, on a laptop CPU in minutes (`make demo`).

The paper's claim needs 8 GPUs, a 7B policy, a diffusion editor and GPT-4o as judge. Here the SAME code runs on a
synthetic world (world.py, language.py, dataset.py): a tiny Qwen2.5-VL policy of the real architecture (tiny.py), the real `train.py`
(GRPO, one CPU process), the real agents and the real `evaluate.py`, with a procedural editor and a programmatic judge
standing in for FLUX and GPT-4o. Each stage runs as a user would run it (the scripts in subprocesses), per seed:

    1. data      OUT/seed{S}/data/{train,val,test}.jsonl: shapes scenes and requests; train, validation and the
                 HELD-OUT test scenes come from three different generator seeds, so no test scene is trained on
    2. base      the agents' base model, miniature/base_model (`--base`): a small Qwen2.5-VL built once by
                 `python -m miniature.base` and shipped, standing in for Qwen2.5-VL-7B-Instruct. It can see (per-cell
                 perception), copy, follow the tag format and sequence given lists, and was never trained on indirect
                 decompositions or the RL data. It is the decomposer of "chain w/o RL" and the sequencer of both
                 chains, prompted with its prompts.json, and the start of the thinker (below). (`--base none`: the
                 old path, a random tiny Qwen2.5-VL (hidden 64, 2 layers), OUT/seed{S}/tiny, built offline from the
                 seed and warmed up by `warmup.py` on gold decompositions and plans, OUT/seed{S}/warm; it is the
                 thinker's start too, with the paper's critic prompt)
    3. GRPO      OUT/seed{S}/grpo: `train.py --gpus 0` trains the decomposition agent from the base
    4. evaluate  OUT/seed{S}/eval: `evaluate.py --editor shapes --judges shapes` on the held-out test scenes, rows
                 Original, chain w/o RL and chain with RL, single- and multi-turn (Table 1 and the §4.2 ablation);
                 it writes table1.md/.csv, subscores.md/.csv and report.html
    5. plot      OUT/seed{S}/reward_curves.png: the reward components over GRPO steps (the paper's Figure 3)
EditThinker (the second paper; `--no-thinker` skips it), per seed:
    6. thinker   OUT/seed{S}/think_warm: `warmup.py --agent think`, a supervised warm-up of a critic-refiner from the
                 base (EditThinker's SFT stage), on the base's short critic template (prompts.json's "critic"): score
                 turn 1, then repeat the instruction when the edit is right, else write the gold sub-requests;
                 OUT/seed{S}/think_grpo: `train.py --agent think`, GRPO with the thinker's reward (format + score
                 accuracy + judged gain of re-editing the source)
    7. evaluate  OUT/seed{S}/eval_think and eval_think_untrained: `evaluate.py` rows `think` (the loop on the raw
                 request) and `chain-rl+think` (the loop seeded by the RL chain's plan), with the GRPO-trained
                 thinker and with the warm-up-only one as the local critic
Stages 3-5 and 6's warm-up and GRPO need nothing of each other, so they run as two lanes side by side (`--jobs 2`:
each script is single-threaded, so the two lanes use both cores of the 2-core box), and the two think evaluations
after them run side by side too; each script logs to its own file in OUT/seed{S}/, and the terminal shows every line
prefixed with that file's name.
Then OUT/results.md and OUT/results.csv gather every seed: each row's mean ± sample standard deviation (n-1) over
seeds, the per-seed totals, and the paired gaps (chain with RL minus each baseline, seed by seed).

Resuming: every stage folder records the settings it was made with (`demo_stage.json`, including the settings of
the stages before it). A stage whose record matches is skipped; one whose settings changed is redone, and so is
everything after it. An interrupted GRPO run continues from its last checkpoint, an interrupted evaluation from its
last record. `--force` redoes everything.

Why the settings are what they are (measured on this 2-core box; each Args field's help gives the number behind it)
    - The agents start from the shipped base (miniature/base_model, built by `python -m miniature.base`): it can see,
      copy, follow the format and sequence, which the old random policy plus a few minutes of warm-up could not.
    - GRPO's lr (3e-4) is far above the paper's 1e-6 because the policy has 1.2M parameters, not 7B; 1e-3
      collapsed the reward; 8 prompts x G=8 per step.
    - The editor and judge rules are fixed in procedural.py and were not touched to make any row win.

What it shows, and what it does not (seeds 0, 1, 2, 128 held-out scenes each; the README has the details)
    With the base: Original 8.09 ± 0.08, chain w/o RL 7.53 ± 0.11, chain with RL 7.46 ± 0.15 (paired gaps of the
    chain with RL: -0.07 ± 0.04 and -0.64 ± 0.07). GRPO raises the decomposition reward (Figure 3: the action and
    goal F1 rise; the held-out greedy reward rises on every seed), but it does not teach the policy to name a shape
    it must find in the image ("the shape in the bottom middle"), so the chains still edit some wrong shapes and stay
    below the editor alone, which ignores what it cannot ground. The old path (`--base none`) scored 8.09 / 5.54 /
    5.47.

    EditThinker (thinker warmed up from the base on its short critic template): chain-rl+think minus chain-rl
    -0.14 ± 0.09, the GRPO-trained thinker minus the warm-up-only one -0.00 ± 0.14 (chain-rl+think) and +0.06 ± 0.07
    (think), think on the raw request minus Original -0.29 ± 0.19; within the noise of the old random-policy thinker
    (-0.16, +0.07, +0.06, -0.33). The thinker's GRPO raises its sampled reward and gain, but the held-out judged gain
    of its re-edits stays near -0.2: it cannot name the right shapes either, and mostly learns to call turn 1 right.

    python -m miniature.demo                         # one seed: ~6.5 minutes on the quiet 2-core box (two lanes)
    python -m miniature.demo --seeds 0,1,2           # the README's table: three seeds, mean ± std (~20-26 min)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from cli import arg, parse_dataclass_args
from miniature import dataset, summary, tiny

REPO = Path(__file__).resolve().parents[1]  # scripts run from the repository root
ARCH = "qwen2_5_vl"  # the paper's policy architecture, at tiny size
DONE_FILE = "demo_stage.json"  # in every stage folder: the settings it was made with
# Generator seeds of each split, offset by the demo seed: three disjoint streams of scenes (dataset.make_dataset).
DATA_SEED_OFFSETS = {"train": 10_000, "val": 20_000, "test": 30_000}
# The methods of the think evaluations (evaluate.py ids); summary.THINK_ROWS names their rows.
THINK_METHODS = ("think", "chain-rl+think")


@dataclass
class Args:
    """ImageEdit-R1 in miniature: shapes world, tiny Qwen2.5-VL, warm-up, GRPO with train.py, evaluate.py.
    See the module docstring for the stages and why each default is what it is."""

    out: str = arg("runs/demo", "results folder: one seed{S}/ folder per seed, results.md/.csv for all of them")
    seeds: str = arg("0", "comma-separated seeds; each runs the whole pipeline (the README's table uses 0,1,2)")
    force: bool = arg(False, "redo every stage even when its output exists")
    base: str = arg("miniature/base_model", "the agents' base model (decomposer and sequencer before RL): the shipped "
                    "base (python -m miniature.base builds it; its prompts.json gives the agents' prompts), or "
                    "'none' for the old path: a random tiny policy and a short supervised warm-up")  # fmt: skip
    # data (dataset.py)
    train_scenes: int = arg(512, "training scenes: 100 GRPO steps of 8 prompts see each about 1.6 times")
    val_scenes: int = arg(32, "validation scenes: train.py's greedy held-out reward every --eval-every steps")
    test_scenes: int = arg(128, "held-out test scenes for evaluate.py; 128 puts a row's sampling error near 0.2")
    # warm-up (warmup.py), only with --base none: the decomposer and sequencer from a random tiny policy
    warmup_steps: int = arg(300, "supervised steps. Measured: after 60 no sample parses (no reward spread, GRPO "
                                 "cannot start); after 300 the sampled reward is ~0.25 with room above it")  # fmt: skip
    warmup_lr: float = arg(
        3e-3, "warm-up AdamW learning rate (a random tiny model needs a large one; 1e-2 is no faster)"
    )
    warmup_batch_size: int = arg(8, "examples per warm-up step (each gives a decomposition and a sequencing target)")
    warmup_examples: int = arg(256, "the warm-up sees only the first N training scenes; GRPO sees all of them")
    # GRPO (train.py)
    grpo_steps: int = arg(100, "GRPO steps (~3 s each on the base, one core). Measured on seed 0: the held-out "
                               "reward plateaus by step 50 (0.77 at 10, 0.83 at 50, 0.82-0.84 to 200) and 200 "
                               "steps do not beat 60 in the chain; 100 keeps `make demo` under 15 minutes")  # fmt: skip
    grpo_lr: float = arg(3e-4, "GRPO AdamW learning rate. On the base: 3e-4 raises the held-out reward 0.77 -> 0.83 "
                               "in 60 steps, 1e-3 collapses it. On --base none (a warmed-up random policy) 5e-4 "
                               "was best over 30 steps")  # fmt: skip
    beta: float = arg(0.01, "beta: weight of the k3 KL penalty to the starting policy (train.py's default)")
    prompts_per_step: int = arg(8, "prompts per GRPO step (B = prompts x G = 64 sequences); 4 was too noisy")
    group_size: int = arg(8, "G: sampled decompositions per prompt (paper: 8)")
    max_new_tokens: int = arg(64, "longest sampled decomposition in tokens (a gold one is 20-45)")
    micro_batch_size: int = arg(32, "sequences per forward/backward in train.py")
    dynamic_sampling: int = arg(0, "train.py --dynamic-sampling K: replace groups with no reward spread by fresh "
                                   "prompts, up to K rollouts per step (DAPO); 0 = off")  # fmt: skip
    clip_eps_high: float = arg(0.2, "train.py --clip-eps-high: the ratio's upper clip 1 + eps (DAPO's clip-higher "
                                    "uses 0.28 against entropy collapse)")  # fmt: skip
    temperature: float = arg(1.0, "train.py --temperature: GRPO's rollout (and scoring) temperature")
    eval_every: int = arg(10, "train.py's held-out evaluation every k steps (plotted next to the training reward)")
    # evaluation (evaluate.py)
    turns: str = arg("single,multi", "chain turns to evaluate (single,multi: the paper's §4.2 ablation)")
    agent_max_new_tokens: int = arg(96, "longest agent answer at evaluation (decomposition or plan)")
    threads: int = arg(1, "OMP threads per subprocess (tiny models lose time to threading)")
    jobs: int = arg(2, "stage lanes run side by side: the decomposer's GRPO and evaluation beside the thinker's "
                       "warm-up and GRPO, then the two think evaluations (2 for the 2-core box; 1: one at a time)")  # fmt: skip
    # EditThinker (warmup.py --agent think, train.py --agent think, evaluate.py think rows)
    thinker: bool = arg(True, "also warm up and GRPO-train EditThinker's critic-refiner and evaluate the think rows")
    thinker_warmup_steps: int = arg(300, "thinker warm-up steps (after 300 the greedy critique always parses)")
    thinker_grpo_steps: int = arg(50, "thinker GRPO steps (~4 s each: the reward calls the editor and judge). "
                                      "Measured on seed 0: the held-out greedy reward is 0.353 at step 10 and 0.350 "
                                      "at 100 (format 1.0 throughout), so 50 lose nothing measured")  # fmt: skip
    thinker_max_new_tokens: int = arg(96, "longest sampled critique in tokens (a gold one is 25-50)")
    max_turns: int = arg(3, "think rows: most edits per scene, each critiqued (evaluate.py --max-turns)")


# ---------------------------------------------------------------------------------------------------------------------
# Stages: skip what is done with the same settings, redo what is not


# per lane (thread): stages that did work (a fresh folder or a script run), for run_seed's timings
_WORK = threading.local()
_LIVE: set[subprocess.Popen] = set()  # scripts running now, in any lane: stopped when another lane fails


def _work_done() -> int:
    return getattr(_WORK, "n", 0)


def _count_work(n: int = 1) -> None:
    _WORK.n = _work_done() + n


def stage_done(folder: Path, settings: dict) -> bool:
    marker = folder / DONE_FILE
    return marker.is_file() and json.loads(marker.read_text()) == settings


def mark_done(folder: Path, settings: dict) -> None:
    (folder / DONE_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def fresh(folder: Path) -> None:
    """Empty a stage folder whose settings changed (its old outputs must not be mixed with new ones)."""
    _count_work()
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def run_script(args: Args, cmd: list[str], log: Path) -> None:
    """Run one of the project's scripts as a user would; its output goes to `log` and to the terminal, each line
    prefixed with the log's name when lanes run side by side (`--jobs`)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    _count_work()
    line = " ".join([Path(sys.executable).name, *cmd])
    tag = f"[{log.stem}] " if args.jobs > 1 else ""
    print(f"{tag}$ {line}", flush=True)
    with log.open("a") as f:
        f.write(f"$ {line}\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        _LIVE.add(proc)
        try:
            for text in proc.stdout:  # universal newlines: a progress bar's \r updates arrive as lines
                sys.stdout.write(tag + text)
                f.write(text)
            code = proc.wait()
        finally:
            _LIVE.discard(proc)
        if code != 0:
            raise SystemExit(f"demo: `{line}` failed with exit code {code}; its output is in {log}")


def run_lanes(args: Args, lanes: list[Callable[[], object]]) -> list:
    """Run independent chains of stages side by side, `args.jobs` at a time (each script is single-threaded, so two
    lanes use both cores of the 2-core box), and return their results in order. When one lane fails, the scripts of
    the others are stopped (every stage resumes: GRPO from its checkpoint, an evaluation from its records) and its
    error is raised."""
    if args.jobs == 1:
        return [lane() for lane in lanes]

    def counted(lane: Callable[[], object]) -> tuple[object, int]:  # a lane's result and the work its thread did
        _WORK.n = 0
        return lane(), _WORK.n

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(counted, lane) for lane in lanes]
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in finished and f.exception() is not None]
        if failed:  # stop the others' scripts (they fail in turn), then raise the failure that came first
            for proc in list(_LIVE):
                proc.terminate()
            wait(futures)
            raise failed[0].exception()
        done = [f.result() for f in futures]
    _count_work(sum(n for _, n in done))  # the caller's stage did that work
    return [result for result, _ in done]


def make_data(args: Args, seed: int, folder: Path) -> dict:
    settings = {"seed": seed, "train": args.train_scenes, "val": args.val_scenes, "test": args.test_scenes}
    if not stage_done(folder, settings):
        fresh(folder)
        for split, n in (("train", args.train_scenes), ("val", args.val_scenes), ("test", args.test_scenes)):
            dataset.write_jsonl(dataset.make_dataset(n, DATA_SEED_OFFSETS[split] + seed), folder, split)
        mark_done(folder, settings)
    return settings


def make_policy(seed: int, folder: Path) -> dict:
    settings = {"seed": seed, "arch": ARCH}
    if not stage_done(folder, settings):
        fresh(folder)
        tiny.save_tiny_policy(folder, ARCH, seed=seed)
        mark_done(folder, settings)
    return settings


def warm_up(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    return _warm_up(args, seed, root, root / "warm", args.warmup_steps, [], "warmup.log", upstream)


def _warm_up(args: Args, seed: int, root: Path, folder: Path, steps: int, agent: list[str], log: str,
             upstream: dict, start: Path | None = None) -> dict:  # fmt: skip
    """warmup.py from `start` (default: the random tiny policy): the decomposition agent (agent=[]) or the thinker
    (agent: --agent think ..., with the start's --prompts)."""
    settings = {**upstream, "steps": steps, "lr": args.warmup_lr, "batch_size": args.warmup_batch_size,
                "examples": args.warmup_examples}  # fmt: skip
    start = start or root / "tiny"
    if not stage_done(folder, settings):
        fresh(folder)
        run_script(args, ["-m", "miniature.warmup", *agent, "--model", str(start), "--train-data", str(root / "data/train.jsonl"),
                          "--out", str(folder), "--steps", str(steps), "--lr", str(args.warmup_lr),
                          "--batch-size", str(args.warmup_batch_size), "--max-examples", str(args.warmup_examples),
                          "--seed", str(seed)], root / log)  # fmt: skip
        mark_done(folder, settings)
    return settings


def base_dir(args: Args) -> Path:
    """The --base folder (a relative path is from the repository root)."""
    return Path(args.base) if Path(args.base).is_absolute() else REPO / args.base


def base_agent(args: Args, root: Path) -> tuple[Path, list[str]]:
    """The policy the agents start from and the prompt flag that goes with it: the shipped base with its short
    prompts (prompts.json), or with `--base none` this seed's warmed-up random policy with the paper's prompts."""
    if args.base == "none":
        return root / "warm", []
    prompts = base_dir(args) / "prompts.json"
    return base_dir(args), (["--prompts", str(prompts)] if prompts.is_file() else [])


def use_base(args: Args) -> dict:
    """The base stage: nothing to build, but its settings name the weights (by sha256), so a rebuilt base redoes every
    stage after it."""
    weights = base_dir(args) / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"demo: --base {args.base}: {weights} not found (build it: python -m miniature.base --out "
                         f"{args.base}; or pass --base none)")  # fmt: skip
    return {"base": args.base, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def train_grpo(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    settings = {**upstream, "steps": args.grpo_steps, "max_new_tokens": args.max_new_tokens}
    start, prompts = base_agent(args, root)
    return _grpo(args, seed, root, root / "grpo", start, settings, "train.log", prompts, args.grpo_steps,
                 args.max_new_tokens)  # fmt: skip


def _grpo(args: Args, seed: int, root: Path, folder: Path, start: Path, settings: dict, log: str, agent: list[str],
          steps: int, max_new_tokens: int) -> dict:  # fmt: skip
    """train.py from the policy in `start`: the decomposition agent (agent=[]) or the thinker (--agent think)."""
    settings = {**settings, "lr": args.grpo_lr, "beta": args.beta, "prompts": args.prompts_per_step,
                "G": args.group_size, "micro_batch_size": args.micro_batch_size, "eval_every": args.eval_every,
                "dynamic_sampling": args.dynamic_sampling, "clip_eps_high": args.clip_eps_high,
                "temperature": args.temperature}  # fmt: skip
    if stage_done(folder, settings) and (folder / "policy").is_dir():
        return settings
    resume = stage_done(folder, settings) and (folder / "checkpoints" / "latest").is_file()
    if not resume:
        fresh(folder)
        mark_done(folder, settings)  # written first: a killed run with these settings resumes from its checkpoint
    # checkpoints every quarter of the run make an interrupted run lose little
    save_every = max(1, steps // 4)
    run_script(args, ["train.py", "--gpus", "0", *agent, "--model", str(start),
                      "--train-data", str(root / "data/train.jsonl"), "--eval-data", str(root / "data/val.jsonl"),
                      "--output-dir", str(folder), "--max-steps", str(steps), "--lr", str(args.grpo_lr),
                      "--beta", str(args.beta), "--prompts-per-step", str(args.prompts_per_step),
                      "--group-size", str(args.group_size), "--max-new-tokens", str(max_new_tokens),
                      "--micro-batch-size", str(args.micro_batch_size), "--eval-every", str(args.eval_every),
                      "--save-every", str(save_every), "--keep-checkpoints", "1", "--seed", str(seed),
                      "--dynamic-sampling", str(args.dynamic_sampling), "--clip-eps-high", str(args.clip_eps_high),
                      "--temperature", str(args.temperature), *(["--resume"] if resume else [])],
               root / log)  # fmt: skip
    return settings


def thinker_start(args: Args, root: Path) -> tuple[Path, list[str]]:
    """Where the thinker's warm-up starts, and its prompt flag: the shipped base with its short critic template
    (prompts.json's "critic"), or with `--base none` the random tiny policy with the paper's critic prompt."""
    return (root / "tiny", []) if args.base == "none" else base_agent(args, root)


def warm_up_thinker(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    start, prompts = thinker_start(args, root)
    agent = ["--agent", "think", "--editor", "shapes", "--judge", summary.JUDGE_LABEL, *prompts]
    return _warm_up(
        args, seed, root, root / "think_warm", args.thinker_warmup_steps, agent, "think_warmup.log", upstream, start
    )


def train_thinker(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    settings = {**upstream, "steps": args.thinker_grpo_steps, "max_new_tokens": args.thinker_max_new_tokens}
    agent = ["--agent", "think", "--editor", "shapes", "--judge", summary.JUDGE_LABEL, *thinker_start(args, root)[1]]
    return _grpo(args, seed, root, root / "think_grpo", root / "think_warm", settings, "think_train.log", agent,
                 args.thinker_grpo_steps, args.thinker_max_new_tokens)  # fmt: skip


def evaluated(folder: Path, settings: dict) -> bool:
    """An evaluate.py run with these settings that finished (report.html is its last file); a killed one resumes."""
    return stage_done(folder, settings) and (folder / "report.html").is_file()


def evaluate_thinkers(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    """The think rows twice, side by side: with the GRPO-trained thinker and with the warm-up-only one (same seeds,
    same chain); each folder logs to its own evaluate_<folder>.log."""
    settings = {**upstream, "max_turns": args.max_turns, "agent_max_new_tokens": args.agent_max_new_tokens}
    agent, prompts = base_agent(args, root)

    def evaluate_with(folder: Path, critic: Path) -> None:
        if evaluated(folder, settings):
            return
        if not stage_done(folder, settings):
            fresh(folder)
            mark_done(folder, settings)
        run_script(args, ["evaluate.py", "--editor", "shapes", "--judges", summary.JUDGE_LABEL,
                          "--benchmark", f"{summary.BENCHMARK_LABEL}={root / 'data/test.jsonl'}", "--limit", "0",
                          "--seed", str(seed), "--methods", ",".join(THINK_METHODS), "--turns", "single",
                          "--agent-model", str(agent), *prompts, "--decomposer", str(root / "grpo/policy"),
                          "--critic", f"local:{critic}", "--max-turns", str(args.max_turns),
                          "--max-new-tokens", str(args.agent_max_new_tokens), "--out", str(folder),
                          "--no-progress"], root / f"evaluate_{folder.name}.log")  # fmt: skip

    run_lanes(args, [lambda: evaluate_with(root / "eval_think", root / "think_grpo/policy"),
                     lambda: evaluate_with(root / "eval_think_untrained", root / "think_warm")])  # fmt: skip
    return settings


def evaluate_methods(args: Args, seed: int, root: Path, upstream: dict) -> dict:
    folder = root / "eval"
    settings = {**upstream, "turns": args.turns, "agent_max_new_tokens": args.agent_max_new_tokens}
    agent, prompts = base_agent(args, root)
    if evaluated(folder, settings):
        return settings
    if not stage_done(folder, settings):  # evaluate.py resumes a run with the same settings by itself
        fresh(folder)
        mark_done(folder, settings)
    run_script(args, ["evaluate.py", "--editor", "shapes", "--judges", summary.JUDGE_LABEL,
                      "--benchmark", f"{summary.BENCHMARK_LABEL}={root / 'data/test.jsonl'}", "--limit", "0",
                      "--seed", str(seed), "--methods", ",".join(summary.TABLE1_ROWS), "--turns", args.turns,
                      "--agent-model", str(agent), *prompts, "--decomposer", str(root / "grpo/policy"),
                      "--max-new-tokens", str(args.agent_max_new_tokens), "--out", str(folder),
                      "--no-progress"], root / "evaluate.log")  # fmt: skip
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# main


def run_seed(args: Args, seed: int) -> tuple[dict[str, dict[str, float]], dict]:
    root = Path(args.out) / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    # stage -> seconds of the run that did its work: a stage skipped as done keeps the time it took then
    timings_path = root / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() and not args.force else {}

    def timed(name: str, fn, *a):
        start, work = time.perf_counter(), _work_done()
        print(f"\n==== seed {seed}: {name}", flush=True)
        result = fn(*a)
        if _work_done() != work or name not in timings:
            timings[name] = time.perf_counter() - start
        return result

    if args.force:
        for name in ("data", "tiny", "warm", "grpo", "eval", "think_warm", "think_grpo", "eval_think",
                     "eval_think_untrained"):  # fmt: skip
            shutil.rmtree(root / name, ignore_errors=True)
    seed_start, seed_work = time.perf_counter(), _work_done()
    data_settings = timed("data", make_data, args, seed, root / "data")
    # the random tiny policy is the start of the warm-up and of the thinker with --base none; else the base is both's
    if args.base == "none":
        policy_settings = timed("tiny policy", make_policy, seed, root / "tiny")
        agent_settings = {"warm": timed("warm-up", warm_up, args, seed, root, {"data": data_settings,
                                                                               "policy": policy_settings})}  # fmt: skip
    else:
        policy_settings = timed("base", use_base, args)
        agent_settings = {"data": data_settings, "base": policy_settings}

    def decomposer_lane() -> tuple[dict, list[dict]]:  # GRPO's settings and its metrics
        grpo_settings = timed("GRPO", train_grpo, args, seed, root, agent_settings)
        timed("evaluate", evaluate_methods, args, seed, root, {"grpo": grpo_settings})
        metrics = summary.read_metrics(root / "grpo" / "metrics.jsonl")
        title = f"GRPO reward components, seed {seed}"
        timed("plot", summary.plot_rewards, metrics, root / "reward_curves.png", title)
        return grpo_settings, metrics

    def thinker_lane() -> dict:  # needs only the data and its start (the base, or the random tiny policy)
        up = {"data": data_settings, "policy": policy_settings}
        think_warm = timed("thinker warm-up", warm_up_thinker, args, seed, root, up)
        return timed("thinker GRPO", train_thinker, args, seed, root, {"think_warm": think_warm})

    lanes = [decomposer_lane, *([thinker_lane] if args.thinker else [])]
    (grpo_settings, metrics), *think_grpo = run_lanes(args, lanes)
    scores, training = summary.read_scores(root / "eval"), summary.training_summary(metrics)
    if args.thinker:
        up = {"think_grpo": think_grpo[0], "grpo": grpo_settings}
        timed("evaluate thinkers", evaluate_thinkers, args, seed, root, up)
        think_metrics = summary.read_metrics(root / "think_grpo" / "metrics.jsonl")
        title = f"thinker GRPO reward components, seed {seed}"
        summary.plot_rewards(think_metrics, root / "thinker_reward_curves.png", title, summary.THINKER_COMPONENTS)
        for folder, suffix in ((root / "eval_think", ""), (root / "eval_think_untrained", "/untrained")):
            scores |= {f"{m}{suffix}": v for m, v in summary.read_scores(folder).items()}
        training["thinker"] = summary.thinker_summary(think_metrics)
    if _work_done() != seed_work or "seed, wall clock" not in timings:  # lanes overlap: stages sum to more
        timings["seed, wall clock"] = time.perf_counter() - seed_start
    timings_path.write_text(json.dumps(timings, indent=2) + "\n")
    print(f"seed {seed} stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    return scores, training


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass_args(Args, argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit(f"--seeds {args.seeds!r}: give at least one seed")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2) + "\n")
    start = time.perf_counter()
    per_seed, training = {}, {}
    for seed in seeds:
        per_seed[seed], training[seed] = run_seed(args, seed)
    text = summary.write_results(out, per_seed, training)
    print(f"\n{text}\nDone in {time.perf_counter() - start:.0f} s. Results: {out / 'results.md'}; per seed: "
          f"{out}/seed*/eval/report.html, {out}/seed*/reward_curves.png")  # fmt: skip


if __name__ == "__main__":
    main()

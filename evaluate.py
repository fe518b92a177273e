"""Evaluate an editor alone and inside ImageEdit-R1's chain: the paper's Table 1, resumable, with a visual report.

    python evaluate.py --editor flux --benchmark realedit --root data/realedit \\
        --methods original,chain,chain-rl --decomposer runs/grpo/policy \\
        --judges gpt-4o,gemini-2.5-flash --turns single --limit 1000 --seed 0 --out runs/eval/flux
    python evaluate.py --editor shapes --benchmark data/shapes/test.jsonl --judges shapes ...   # the CPU miniature
    python evaluate.py --human-scores humans.csv --out runs/eval/flux                          # paper §4.1

Rows and columns (Table 1)
    A row is a METHOD, one per `--methods` entry and `--turns` value:
        original    the editor alone on the raw request                        paper: "Original"
        chain       the chain with the untrained decomposer (--agent-model)    paper: "ImageEdit-R1 (w/o RL)"
        chain-rl    the chain with the trained decomposer (--decomposer)       paper: "ImageEdit-R1"
        think           EditThinker's Think-while-Edit loop on the raw request (--critic, --max-turns)
        chain-rl+think  the same loop, its first instruction the chain-rl plan (sub-requests joined, single-turn)
    The sequencing agent is --agent-model in both chains (or --sequencer). With `--turns single,multi` (the paper's
    §4.2 ablation) each chain gives two rows, "chain-rl" (single-turn) and "chain-rl/multi"; "original" has no turns.
    A column is a (benchmark, judge) pair, then "Average", the mean of the row's cells as in the paper. A cell is the
    mean 0-10 total over the edits that judge scored. Failures are EXCLUDED from the means and COUNTED in the
    sub-score table: an example that cannot be read ("bad-example": corrupt image, missing field), an edit the editor
    refused ("edit-error"), a judge that gave no verdict after its retries ("judge-error").
    To add a method, add a `MethodSpec` to METHODS and, if it runs differently, a branch in `MethodRunner.run`.

The Think-while-Edit rows (agents.run_think_batch; EditThinker, ../shared/papers/003)
    Turn 1 edits the source with the first instruction; the critic scores the edit (0-10, the judge's scale) and
    proposes a refined instruction; the SOURCE is re-edited with it, until the score reaches --think-threshold, the
    instruction repeats one already tried, or --max-turns edits were made. Every edit is critiqued (so the last one
    can be ranked) and the best-scored edit is the row's image; every turn's image is saved and shown in the report.
    Turns use the example's seed, so turn 1 of "think" is the "original" edit and turn 1 of "chain-rl+think" the
    "chain-rl" edit: the rows differ from those only by what thinking changed. --critic SPEC:
        gpt-4o, gemini-2.5-flash, openai:MODEL@URL   a VLM behind an OpenAI-compatible API (keys as for --judges)
        local:PATH                                   a Qwen-VL checkpoint in this process (e.g. a trained thinker)
        shapes                                       the miniature: the shapes judge's rubric total as the score, the
                                                     instruction restated by a rule that uses no hidden answer
        shapes+local:PATH                            the shapes rubric's score, the instruction from a local model
    Caveat: with a judge-scored critic ("shapes...") and that same judge in --judges, picking the best turn selects
    with the evaluator's own eyes (best of k draws): part of the gain is selection, not refinement.

Stages, each resumable (run the same command again after a kill: done work is skipped, never repeated)
    0. Setup. The benchmark samples are drawn (`benchmarks.sample`: the same examples for the same --limit/--seed),
       the results files are read, and everything the remaining work needs is checked before any of it starts:
       judges are constructed (a missing API key fails here), editor weights are looked up on disk without loading
       them, API editors get their client, agent checkpoints' configs are read. All problems are reported at once.
    1. Edit. Every (example, method) edit is written as an image, then appended as one line of `edits.jsonl` the
       moment it exists (a batch of --agent-batch-size examples at a time). With `--gpus N` (N > 1) the examples are
       dealt round-robin to N worker processes, each with its own editor and agents on GPU r (CUDA_VISIBLE_DEVICES;
       on a CPU, N processes), each appending to its own `edits.rank{r}.jsonl`; all `edits*.jsonl` are merged.
    2. Judge. Every (example, method, judge) verdict is appended to `judgements.jsonl`. Judging reads only the saved
       images, so adding a judge later re-uses the edits.
    3. Summary. Tables and the HTML report are rebuilt from the results files alone, printed and written.
    Crash safety: an image is written to a temporary name, fsynced and renamed; only then is its record appended,
    flushed and fsynced. A kill can leave at most a partial LAST line, which the next run cuts off and redoes (any
    other unreadable line is an error naming file and line). A lock file keeps two runs out of one --out folder, and
    `run.json` (also written by rename) refuses a resume whose edit settings (editor, agents, seed, ...) differ from
    the first run's; a torn one (from before it was written by rename) is reported with what to do.
    `--retry-failed` redoes failed edits and judgements; a later success supersedes the failure record.

Files in --out
    edits.jsonl / edits.rank{r}.jsonl   one `EditRecord` a line (the chain's decomposition and sub-requests included)
    judgements.jsonl                    one `JudgeRecord` a line
    images/<benchmark>/<method>/*.png   the edits; images/<benchmark>/source/*.png the originals
    table1.md / .csv                    Table 1: rows methods, columns benchmark x judge, plus Average
    subscores.md / .csv                 fulfilment (0-4), quality (0-3), preservation (0-3), total, failure counts
    report.html                         per example: the original, every method's edit side by side, the scores,
                                        the decomposition and sub-requests, the thinking turns (relative image
                                        paths: keep the folder)
    images/<benchmark>/<method>/turns/  every Think-while-Edit turn's edit (*.turn<k>.png)
    alignment.md / .csv                 with --human-scores: humans versus each judge (paper §4.1)

Human alignment (`--human-scores FILE.csv`): a CSV with columns example_id, method, fulfilment, quality,
preservation (optional: benchmark; several rows for one edit = several raters, averaged). For each judge it pairs
the human scores with that judge's verdicts on the same edits and reports, per criterion, the human mean, the
judge mean and Pearson's r over the paired edits. Nothing is edited or judged in this mode.

Notes
    - Getting the benchmarks, their columns and the seeded draw: see benchmarks.py. --root may hold DIR/psr,
      DIR/realedit, DIR/ultraedit, so that `--benchmark psr,realedit,ultraedit` gives the paper's whole table.
    - Every editor call for an example uses the seed hash(--seed, example id), the same for every method, so rows are
      compared on the same noise.
    - Memory: 'chain-rl' holds the trained decomposer AND the base sequencer (two 7B agents in bf16, ~32 GB) next to
      the editor; each checkpoint is loaded once per process.
    - The progress bar counts edits and judgements together. Its ETA follows the recent rate, so it is pessimistic
      while slow edits run and corrects itself when the (faster) judging starts.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import html
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import huggingface_hub
import torch
from PIL import Image
from tqdm import tqdm

import agents
import benchmarks
import editors
import judge as judging
import policy
import records
import shapes
import tasks
from cli import arg, parse_dataclass_args

PAPER_AGENT = "Qwen/Qwen2.5-VL-7B-Instruct"
SHAPES_JUDGE_SPECS = tasks.SHAPES_JUDGE_SPECS  # the miniature's programmatic judge
JUDGE_BATCH_PER_WORKER = 4  # a judge batch is 4 x --judge-concurrency edits: records land often, the pool stays full
CRITERIA = ("fulfilment", "quality", "preservation")  # the rubric's sub-scores (judge.Verdict's fields)
POLL_SECONDS = 0.5  # how often the main process counts the workers' records for the progress bar


# train.py's default export (its --output-dir, runs/grpo, plus policy/): `python train.py --gpus 8` writes it and
# `python evaluate.py --editor flux` reads it, so the design card's two commands meet without flags
TRAIN_EXPORT = "runs/grpo/policy"


def default_decomposer() -> str:
    """chain-rl's decomposer when --decomposer is not given: train.py's default export, said out loud."""
    if not (Path(TRAIN_EXPORT) / "config.json").is_file():
        raise SetupError(f"method 'chain-rl' needs the trained decomposition agent: pass --decomposer PATH, or run "
                         f"train.py first (its default export is {TRAIN_EXPORT})")  # fmt: skip
    print(f"chain-rl: using train.py's export {TRAIN_EXPORT} (--decomposer PATH picks another)", file=sys.stderr)
    return TRAIN_EXPORT


@dataclass
class Args:
    """Evaluate an editor alone and inside ImageEdit-R1's chain (the paper's Table 1). See the module docstring."""

    # what to edit
    benchmark: str = arg(
        "realedit",
        "psr | realedit | ultraedit | PATH.jsonl (a manifest, or a file written by shapes.write_jsonl); several "
        "comma-separated; LABEL=SPEC names a column (e.g. shapes=data/shapes/test.jsonl)",
    )
    root: str = arg(benchmarks.DEFAULT_ROOT, "the benchmark's local copy, or a folder with one subfolder per "
                                             "benchmark (DIR/psr), as the README's download commands fill it")  # fmt: skip
    limit: int = arg(benchmarks.DEFAULT_EVAL_LIMIT, "examples drawn per benchmark, 0 = all (paper: 1,000)")
    seed: int = arg(benchmarks.DEFAULT_EVAL_SEED, "seed of the draw and of every edit's noise")
    # the rows
    methods: str = arg(
        "original,chain,chain-rl", "comma-separated rows, of: original, chain, chain-rl, think, chain-rl+think"
    )
    turns: str = arg("single", "single | multi | single,multi: how the chain's editor runs (paper §4.2 ablation)")
    agent_model: str = arg(PAPER_AGENT, "the untrained base VLM: the 'chain' decomposer and every chain's sequencer")
    decomposer: str | None = arg(None, "the trained decomposition agent for 'chain-rl' (a train.py export folder; "
                                       f"default: train.py's own export {TRAIN_EXPORT} when it exists)")  # fmt: skip
    sequencer: str | None = arg(None, "a different sequencing agent for both chains (default: --agent-model)")
    agent_batch_size: int = arg(agents.DEFAULT_BATCH_SIZE, "examples per agent generate call (and per edit batch)")
    max_new_tokens: int = arg(agents.DEFAULT_MAX_NEW_TOKENS, "longest agent answer, in tokens")
    max_steps: int = arg(agents.DEFAULT_MAX_STEPS, "most sub-requests sent to the editor per example")
    # the Think-while-Edit rows (think, chain-rl+think)
    critic: str | None = arg(
        None,
        "the critic-refiner of the think rows: gpt-4o, gemini-2.5-flash, openai:MODEL@URL, local:PATH, shapes, "
        "shapes+local:PATH (module docstring)",
    )
    max_turns: int = arg(agents.DEFAULT_MAX_TURNS, "most edits (each one critiqued) per example in the think rows")
    think_threshold: float = arg(
        agents.DEFAULT_THINK_THRESHOLD, "critic score (0-10) at which the think loop stops, satisfied"
    )
    # the editing agent
    editor: str = arg("flux", "flux | qwen | nano-banana | gpt-image | shapes (the miniature's procedural editor)")
    editor_path: str | None = arg(None, "local pipeline folder or hub id (diffusion), or API model name")
    editor_steps: int | None = arg(None, "denoising steps (default: 28 FLUX, 50 Qwen)")
    editor_guidance: float | None = arg(None, "FLUX guidance_scale (2.5) / Qwen true_cfg_scale (4.0)")
    editor_dtype: str = arg("bfloat16", "bfloat16 | float16 | float32: diffusion editors' weights")
    editor_max_area: int | None = arg(None, "pixel cap of the diffusion editors' working size (default 1024*1024)")
    editor_offload: bool = arg(False, "diffusers model CPU offload (less GPU memory, slower)")
    # the columns
    judges: str = arg(
        "gpt-4o,gemini-2.5-flash",
        "comma-separated judge specs: gpt-4o, gemini-2.5-flash, openai:MODEL@URL, local:PATH, shapes; "
        "LABEL=SPEC names a column",
    )
    judge_concurrency: int = arg(8, "API judge requests in flight at once")
    # the run
    out: str = arg("runs/eval", "results folder; re-running the same command there resumes")
    gpus: int = arg(1, "edit-stage worker processes, one editor each on GPU r (CPU: N processes); 1 = this process")
    retry_failed: bool = arg(False, "redo edits and judgements whose record is a failure")
    progress: bool = arg(True, "show a progress bar with an ETA")
    human_scores: str | None = arg(None, "CSV of human scores: report alignment with the judges in --out and stop")


# Settings that change what an edit looks like: a resume must use the same ones (checked against run.json).
EDIT_SETTINGS = (
    "editor", "editor_path", "editor_steps", "editor_guidance", "editor_dtype", "editor_max_area",
    "agent_model", "decomposer", "sequencer", "max_new_tokens", "max_steps", "seed",
    "critic", "max_turns", "think_threshold",
)  # fmt: skip


class SetupError(RuntimeError):
    """The run cannot start (a missing key, model or weights, a bad flag); the message lists every problem."""


class HumanScoresError(ValueError):
    """The human-scores CSV is malformed; the message names file, line and column."""


# ---------------------------------------------------------------------------------------------------------------------
# Methods (the rows)


@dataclass(frozen=True)
class MethodSpec:
    """A family of Table 1 rows. decomposer: "none" = the editor alone on the raw request; "base" = the chain with
    --agent-model; "trained" = the chain with --decomposer. think: the Think-while-Edit loop with --critic, started
    from the raw request (decomposer "none") or from the chain's single-turn plan."""

    name: str
    paper_row: str
    decomposer: Literal["none", "base", "trained"]
    think: bool = False

    @property
    def has_turns(self) -> bool:
        return self.decomposer != "none" and not self.think  # the loop edits one joined instruction per turn


METHODS = {
    "original": MethodSpec("original", "Original", "none"),
    "chain": MethodSpec("chain", "ImageEdit-R1 (w/o RL)", "base"),
    "chain-rl": MethodSpec("chain-rl", "ImageEdit-R1", "trained"),
    "think": MethodSpec("think", "EditThinker loop (editor + critic)", "none", think=True),
    "chain-rl+think": MethodSpec("chain-rl+think", "ImageEdit-R1 + EditThinker loop", "trained", think=True),
}
MULTI_SUFFIX = "/multi"


@dataclass(frozen=True)
class Method:
    """One row: a MethodSpec run single- or multi-turn. Its id keys the results files."""

    spec: MethodSpec
    turns: agents.Turns = "single"

    @property
    def id(self) -> str:
        return self.spec.name + (MULTI_SUFFIX if self.turns == "multi" else "")

    @property
    def label(self) -> str:
        return self.spec.paper_row + (", multi-turn" if self.turns == "multi" else "")


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_methods(methods: str, turns: str) -> list[Method]:
    """`--methods original,chain --turns single,multi` -> rows original, chain, chain/multi (in that order)."""
    turn_list = _items(turns)
    bad = [t for t in turn_list if t not in ("single", "multi")]
    if bad or not turn_list:
        raise SetupError(f"--turns {turns!r}: expected single, multi or single,multi")
    rows = []
    for name in _items(methods):
        if name not in METHODS:
            raise SetupError(f"--methods: unknown method {name!r}; expected some of {', '.join(METHODS)}")
        spec = METHODS[name]
        rows += [Method(spec, t) for t in turn_list] if spec.has_turns else [Method(spec)]
    if not rows or len({m.id for m in rows}) != len(rows):
        raise SetupError(f"--methods {methods!r}: give each method once, at least one")
    return rows


_LABEL_RE = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")


def parse_labelled(text: str, flag: str) -> list[tuple[str, str]]:
    """(column label, spec) pairs with distinct labels: "a,lab=b" -> [("a", "a"), ("lab", "b")]."""
    pairs = []
    for item in _items(text):
        match = _LABEL_RE.match(item)
        pairs.append((match.group(1), match.group(2)) if match else (item, item))
    labels = [label for label, _ in pairs]
    if not pairs or len(set(labels)) != len(labels):
        raise SetupError(f"{flag} {text!r}: give at least one, each with a distinct label")
    return pairs


# ---------------------------------------------------------------------------------------------------------------------
# Records (one JSONL line each) and the files that hold them

OK = "ok"  # the status of a record that did its job; the failures:
BAD_EXAMPLE, EDIT_ERROR, JUDGE_ERROR = "bad-example", "edit-error", "judge-error"
EditKey = tuple[str, str, str]  # (benchmark, example id, method id)
JudgeKey = tuple[str, str, str, str]  # (benchmark, example id, method id, judge label)


@dataclass
class EditRecord:
    """One (example, method) edit. status: OK, BAD_EXAMPLE (reason: why the example is unreadable) or EDIT_ERROR
    (reason: the editor's refusal). Image paths are relative to --out; chain is ChainResult.summary()."""

    benchmark: str
    example_id: str
    method: str
    status: str
    reason: str | None
    request: str
    source_image: str | None
    image: str | None
    chain: dict | None
    seconds: float

    @property
    def key(self) -> EditKey:
        return (self.benchmark, self.example_id, self.method)


@dataclass
class JudgeRecord:
    """One (example, method, judge) verdict. status OK with the rubric scores and the judge's reason, or JUDGE_ERROR
    with the reason the judge gave none (scores None)."""

    benchmark: str
    example_id: str
    method: str
    judge: str
    status: str
    reason: str
    fulfilment: float | None = None
    quality: float | None = None
    preservation: float | None = None
    total: float | None = None

    @property
    def key(self) -> JudgeKey:
        return (self.benchmark, self.example_id, self.method, self.judge)


def latest(found: Sequence) -> dict:
    """key -> record. Records repeat a key only after --retry-failed: a success wins, else the last one."""
    by_key = {}
    for record in found:
        previous = by_key.get(record.key)
        if previous is None or previous.status != OK or record.status == OK:
            by_key[record.key] = record
    return by_key


def edit_files(out: Path) -> list[Path]:
    """edits.jsonl and the workers' edits.rank{r}.jsonl shards."""
    return sorted(out.glob("edits*.jsonl"))


def read_edits(out: Path, repair: bool = False) -> dict[EditKey, EditRecord]:
    return latest([r for path in edit_files(out) for r in records.read_records(path, EditRecord, repair)])


def read_judgements(out: Path, repair: bool = False) -> dict[JudgeKey, JudgeRecord]:
    return latest(records.read_records(out / "judgements.jsonl", JudgeRecord, repair))


def image_path(benchmark: str, folder: str, example_id: str) -> str:
    """Where an image lives, relative to --out: images/<benchmark>/<method id or 'source'>/<stem>.png."""
    return f"images/{records.safe_name(benchmark)}/{records.safe_name(folder)}/{records.file_stem(example_id)}.png"


# ---------------------------------------------------------------------------------------------------------------------
# Setup: samples, editor, agents, judges, all checked before any work


def example_seed(seed: int, example_id: str) -> int:
    """Each example's editor seed: independent across examples, the same for every method (paired comparisons)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()[:4], "little")


def benchmark_root(root: str | None, spec: str) -> str | None:
    """--root is the benchmark's copy, or holds one folder per benchmark (DIR/realedit), as benchmarks.py fetches."""
    if root is not None and spec in benchmarks.BENCHMARKS and (Path(root) / spec).is_dir():
        return str(Path(root) / spec)
    return root


def load_samples(args: Args) -> dict[str, list[benchmarks.EditExample]]:
    """benchmark label -> its seeded sample of --limit examples (BenchmarkError for an unreadable benchmark)."""
    samples = {}
    for label, spec in parse_labelled(args.benchmark, "--benchmark"):
        label = Path(spec).stem if label == spec and spec not in benchmarks.BENCHMARKS else label
        if label in samples:
            raise SetupError(f"--benchmark: two benchmarks are labelled {label!r}; name them with LABEL=PATH")
        examples = benchmarks.load_benchmark(spec, benchmark_root(args.root, spec))
        samples[label] = benchmarks.sample(examples, args.limit, args.seed)
    return samples


def build_editor(args: Args) -> editors.Editor:
    """The editing agent; nothing is loaded until its first edit."""
    options = editors.EditorOptions(
        model=args.editor_path,
        dtype=args.editor_dtype,
        cpu_offload=args.editor_offload,
        max_area=args.editor_max_area,
        steps=args.editor_steps,
        guidance=args.editor_guidance,
    )
    return tasks.make_editor(args.editor, options)


def check_editor(editor: editors.Editor) -> None:
    """EditorSetupError now if the editor could not run, without loading weights or sending a request."""
    if isinstance(editor, editors.FluxKontextEditor | editors.QwenImageEditor):
        model = editor.model
        if Path(model).exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:  # meant as a folder
            if not (Path(model) / "model_index.json").is_file():
                raise editors.EditorSetupError(
                    f"weights {model!r}: no diffusers pipeline folder there (model_index.json). {editor.how_to_get()}"
                )
            editors.check_local_folder(model, editor.how_to_get())  # pickle weights are refused now, not mid-run
        elif not isinstance(huggingface_hub.try_to_load_from_cache(model, "model_index.json"), str):
            raise editors.EditorSetupError(
                f"weights {model!r} are not in the local Hugging Face cache (nothing is downloaded at run time). "
                f"{editor.how_to_get()}"
            )
    elif isinstance(editor, editors.NanoBananaEditor | editors.GPTImageEditor):
        editor.client()  # reads the API key and imports the SDK; sends nothing


def build_judge(spec: str, concurrency: int) -> judging.OpenAIJudge | judging.LocalJudge | shapes.ShapesJudge:
    return tasks.make_judge(spec, concurrency)


# The critic of the think rows. An API critic is a judge.ChatEndpoint, so it keeps the judges' conventions (key from
# the environment variable the spec names, the openai client's retries, redacted errors) and sends PNG data URLs like
# them; agents.py may not import judge.py, so the API critic lives here, next to the judges it mirrors.


def critic_messages(sample: agents.CritiqueSample) -> list[dict]:
    """System turn, then one user turn: the critic prompt, the ORIGINAL image, the EDITED image (judge.py's order)."""
    content = [
        {"type": "text", "text": agents.critic_prompt(sample.request, sample.instruction, side_by_side=False)},
        {"type": "image_url", "image_url": {"url": judging.png_data_url(sample.source)}},
        {"type": "image_url", "image_url": {"url": judging.png_data_url(sample.edited)}},
    ]
    return [{"role": "system", "content": agents.CRITIC_SYSTEM}, {"role": "user", "content": content}]


class OpenAICritic(judging.ChatEndpoint):
    """The critic-refiner behind an OpenAI-compatible chat API (GPT-4o, Gemini, a vLLM server): a ChatEndpoint.

    The reply is free text in the critique format (agents.CRITIC_FORMAT; no JSON schema, the tags are the format), and
    is returned as it is: one that does not parse ends that example's loop, counted as "critique did not parse". An
    API failure after the client's retries becomes an agents.CriticFailure with a redacted reason. At most
    `max_concurrency` requests are in flight. endpoint: ChatEndpoint's keyword arguments (base_url, api_key_env,
    default_key, timeout, max_retries, temperature).
    """

    def __init__(self, model: str, *, max_concurrency: int = 8, **endpoint: Any) -> None:
        super().__init__(model, role="critic", **endpoint)
        self.max_concurrency = max(1, max_concurrency)

    def critique_many(self, samples: Sequence[agents.CritiqueSample]) -> list[str | agents.CriticFailure]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="critic") as pool:
            return list(pool.map(self._critique, samples))

    def _critique(self, sample: agents.CritiqueSample) -> str | agents.CriticFailure:
        try:
            return self.complete(critic_messages(sample)).text  # the text and the errors are already redacted
        except judging.ChatError as err:  # an API failure after the client's retries
            return agents.CriticFailure(str(err))
        except judging.ReplyError as err:  # a 200 reply with no usable text: an HTML page, a refusal, no text
            return agents.CriticFailure(f"{self.name}: {err}")


SHAPES_REFINED_PREFIX = "shapes+"  # "shapes+local:PATH": the shapes rubric's score, a local model's instruction


def build_critic(spec: str, args: Args, load_agent: Callable[[str], agents.Agent]) -> agents.Critic:
    """The --critic: see the module docstring for the specs. load_agent loads (or reuses) a local checkpoint."""
    if spec in SHAPES_JUDGE_SPECS:
        return agents.JudgeCritic(shapes.ShapesJudge(), name="shapes")
    if spec.startswith(SHAPES_REFINED_PREFIX + "local:"):
        refiner = build_critic(spec.removeprefix(SHAPES_REFINED_PREFIX), args, load_agent)
        return agents.JudgeCritic(shapes.ShapesJudge(), refiner=refiner, name=spec)
    if spec.startswith("local:"):
        path = spec.removeprefix("local:")
        if not path:
            raise ValueError(f"critic spec {spec!r} should look like 'local:PATH'")
        model, processor = load_agent(path)
        return agents.LocalCritic(
            model, processor, name=spec, max_new_tokens=args.max_new_tokens, batch_size=args.agent_batch_size
        )
    endpoint = judging.parse_api_spec(spec, "critic", judging.LOCAL_SERVER_KEY_ENV)
    if endpoint is not None:
        return OpenAICritic(**endpoint, max_concurrency=args.judge_concurrency)
    choices = ", ".join([*judging.PRESETS, "openai:MODEL@URL", "local:PATH", "shapes", "shapes+local:PATH"])
    raise ValueError(f"unknown critic spec {spec!r}; expected one of: {choices}")


def check_critic(spec: str, args: Args) -> None:
    """Build the critic with local checkpoints' configs read instead of their weights loaded (fails like build)."""

    def read_config_only(path: str) -> agents.Agent:
        policy.load_config(path)
        return (None, None)

    build_critic(spec, args, read_config_only)


def agent_paths(args: Args, methods: Sequence[Method]) -> list[str]:
    """The agent checkpoints the given rows load (decomposers, then the sequencer), without repeats."""
    paths = []
    for method in methods:
        if method.spec.decomposer == "base":
            paths.append(args.agent_model)
        if method.spec.decomposer == "trained":
            paths.append(args.decomposer)
        if method.spec.decomposer != "none":
            paths.append(args.sequencer or args.agent_model)
    return list(dict.fromkeys(paths))


def preflight(
    args: Args, judge_specs: list[tuple[str, str]], edit_methods: Sequence[Method]
) -> tuple[editors.Editor | None, dict]:
    """Construct the judges and check the editor and agents that the remaining edits need; SetupError lists every
    problem at once. Returns (editor or None when no edit is left, {judge label: judge})."""
    problems = []
    judges = {}
    for label, spec in judge_specs:
        try:
            judges[label] = build_judge(spec, args.judge_concurrency)
        except (judging.MissingAPIKeyError, policy.PolicyNotFoundError, ValueError) as err:
            problems.append(f"judge {label!r}: {err}")
    editor = None
    if edit_methods:
        try:
            editor = build_editor(args)
            check_editor(editor)
        except (editors.EditorSetupError, ValueError) as err:
            problems.append(f"editor {args.editor!r}: {err}")
        for path in agent_paths(args, edit_methods):
            try:
                policy.load_config(path)
            except (policy.PolicyNotFoundError, ValueError) as err:
                problems.append(f"agent model {path!r}: {err}")
        if any(m.spec.think for m in edit_methods):
            try:
                check_critic(args.critic, args)
            except (judging.MissingAPIKeyError, policy.PolicyNotFoundError, ValueError) as err:
                problems.append(f"critic {args.critic!r}: {err}")
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if args.gpus > 1 and torch.cuda.is_available() and args.gpus > (len(visible) or torch.cuda.device_count()):
            problems.append(f"--gpus {args.gpus}: only {len(visible) or torch.cuda.device_count()} GPU(s) visible")
    if problems:
        raise SetupError("cannot start, nothing was run:\n  - " + "\n  - ".join(problems))
    return editor, judges


def check_run_settings(out: Path, args: Args) -> list[str]:
    """Differences between this command's edit settings and those in out/run.json (empty on a first run)."""
    path = out / "run.json"
    if not path.is_file():
        return []
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return [
            f"{path} is torn ({err}), so the first run's edit settings are unknown; if this is the command that made "
            f"the folder's results, delete it and run again (it is written anew), else use a new --out"
        ]
    now = asdict(args)
    return [
        f"--{name.replace('_', '-')} was {before.get(name)!r} in {path}, now {now[name]!r}: use a new --out"
        for name in EDIT_SETTINGS
        if before.get(name) != now[name]
    ]


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold out/.lock for the whole run: a second evaluate.py on the same folder would duplicate records. The OS
    releases the lock when the process dies, even by SIGKILL."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(f"another evaluate.py is running on {out} (it holds {out / '.lock'})") from None
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: edits


@dataclass
class Task:
    """The edits one example still needs (method ids in row order)."""

    benchmark: str
    example: benchmarks.EditExample
    methods: list[str]


def plan_edits(
    samples: dict[str, list[benchmarks.EditExample]], methods: Sequence[Method], done: set[EditKey]
) -> list[Task]:
    tasks = []
    for label, examples in samples.items():
        for example in examples:
            todo = [m.id for m in methods if (label, example.id, m.id) not in done]
            if todo:
                tasks.append(Task(label, example, todo))
    return tasks


def agent_placement() -> dict:
    """Agents in bf16 on the GPU when there is one, else as stored, on the CPU."""
    return {"device": "cuda", "dtype": torch.bfloat16} if torch.cuda.is_available() else {}


class MethodRunner:
    """Runs one row on a batch of examples with one editor; each agent checkpoint (a local critic's too) is loaded
    once, on first use, and the critic is built on first use."""

    def __init__(self, args: Args, editor: editors.Editor) -> None:
        self.args, self.editor = args, editor
        self._agents: dict[str, agents.Agent] = {}
        self._critic: agents.Critic | None = None

    def agent(self, path: str) -> agents.Agent:
        if path not in self._agents:
            self._agents[path] = policy.load_policy(path, **agent_placement())
        return self._agents[path]

    def critic(self) -> agents.Critic:
        if self._critic is None:
            self._critic = build_critic(self.args.critic, self.args, self.agent)
        return self._critic

    def run(
        self, method: Method, images: list[Image.Image], requests: list[str], seeds: list[int]
    ) -> list[agents.ChainResult | agents.ThinkResult]:
        if method.spec.think:
            return self.think(method, images, requests, seeds)
        if method.spec.decomposer == "none":
            return [agents.edit_original(i, r, self.editor, seed=s) for i, r, s in zip(images, requests, seeds)]
        decomposer = self.args.decomposer if method.spec.decomposer == "trained" else self.args.agent_model
        return agents.run_chain_batch(
            images,
            requests,
            self.editor,
            decomposer=self.agent(decomposer),
            sequencer=self.agent(self.args.sequencer or self.args.agent_model),
            turns=method.turns,
            seed=seeds,
            max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.agent_batch_size,
            max_steps=self.args.max_steps,
        )

    def think(
        self, method: Method, images: list[Image.Image], requests: list[str], seeds: list[int]
    ) -> list[agents.ThinkResult]:
        """The Think-while-Edit loop from the raw request, or from the chain's plan (single-turn)."""
        loop = {"seed": seeds, "max_turns": self.args.max_turns, "threshold": self.args.think_threshold}
        if method.spec.decomposer == "none":
            return agents.run_think_batch(images, requests, self.editor, self.critic(), **loop)
        decomposer = self.args.decomposer if method.spec.decomposer == "trained" else self.args.agent_model
        return agents.run_chain_think_batch(
            images,
            requests,
            self.editor,
            self.critic(),
            decomposer=self.agent(decomposer),
            sequencer=self.agent(self.args.sequencer or self.args.agent_model),
            max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.agent_batch_size,
            max_steps=self.args.max_steps,
            **loop,
        )


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def run_edits(
    tasks: Sequence[Task], args: Args, methods: Sequence[Method], editor: editors.Editor, log_path: Path, bar=None
) -> None:
    """Edit every task, a batch of examples at a time, appending one EditRecord per (example, method)."""
    out = Path(args.out)
    runner = MethodRunner(args, editor)
    with records.RecordLog(log_path) as log:
        for batch in _chunks(tasks, args.agent_batch_size):
            ready = []  # (task, image, source image path)
            for task in batch:
                image = task.example.load_image()  # None with example.error set: a corrupt image, a missing field
                if image is None:
                    for method_id in task.methods:
                        log.append(bad_example_record(task, method_id))
                        if bar is not None:
                            bar.update(1)
                    continue
                source = image_path(task.benchmark, "source", task.example.id)
                if not (out / source).is_file():
                    records.save_png(image, out / source)
                ready.append((task, image, source))
            for method in methods:
                rows = [row for row in ready if method.id in row[0].methods]
                if not rows:
                    continue
                results = runner.run(
                    method,
                    [image for _, image, _ in rows],
                    [task.example.request for task, _, _ in rows],
                    [example_seed(args.seed, task.example.id) for task, _, _ in rows],
                )
                for (task, _, source), result in zip(rows, results):
                    log.append(edit_record(out, task, method, source, result))
                    if bar is not None:
                        bar.update(1)


def bad_example_record(task: Task, method_id: str) -> EditRecord:
    """An example that cannot be edited at all: its reason is the one benchmarks.py gives (file, row, field)."""
    example = task.example
    return EditRecord(
        benchmark=task.benchmark,
        example_id=example.id,
        method=method_id,
        status=BAD_EXAMPLE,
        reason=example.error,
        request=example.request,
        source_image=None,
        image=None,
        chain=None,
        seconds=0.0,
    )


def turn_image_path(benchmark: str, method_id: str, example_id: str, turn: int) -> str:
    """Where a think row's turn image lives, relative to --out: images/<benchmark>/<method>/turns/<stem>.turn<k>.png."""
    return f"images/{records.safe_name(benchmark)}/{records.safe_name(method_id)}/turns/{records.file_stem(example_id)}.turn{turn}.png"


def edit_record(
    out: Path, task: Task, method: Method, source: str, result: agents.ChainResult | agents.ThinkResult
) -> EditRecord:
    """Save the edited image (when there is one) and, for a think row, every turn's image; describe the edit."""
    edited = None
    if result.final_image is not None:
        edited = image_path(task.benchmark, method.id, task.example.id)
        records.save_png(result.final_image, out / edited)
    summary = result.summary()
    if isinstance(result, agents.ThinkResult):
        for turn, turn_summary in zip(result.turns, summary["turns"]):
            turn_summary["image"] = None
            if turn.image is not None:
                turn_summary["image"] = turn_image_path(task.benchmark, method.id, task.example.id, turn.number)
                records.save_png(turn.image, out / turn_summary["image"])
    status = OK if result.edit_error is None else EDIT_ERROR
    return EditRecord(
        benchmark=task.benchmark,
        example_id=task.example.id,
        method=method.id,
        status=status,
        reason=result.edit_error,
        request=task.example.request,
        source_image=source,
        image=edited,
        chain=summary,
        seconds=result.seconds.total,
    )


def shard_path(out: Path, rank: int) -> Path:
    return out / f"edits.rank{rank}.jsonl"


def edit_worker(args: Args, methods: list[Method], tasks: list[Task], rank: int, device: str) -> None:
    """One --gpus worker: its own editor and agents on one GPU, appending to its own shard file."""
    # Set before this process's first CUDA call (torch reads it then): this worker sees one GPU, as cuda:0.
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.gpus))  # share the cores, do not oversubscribe
    run_edits(tasks, args, methods, build_editor(args), shard_path(Path(args.out), rank))


def run_edits_in_workers(tasks: Sequence[Task], args: Args, methods: Sequence[Method], bar) -> None:
    """Deal the examples round-robin to --gpus worker processes, count their records for the bar, join them."""
    out = Path(args.out)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible or [str(rank) for rank in range(args.gpus)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited from this one
    workers, offsets = [], {}
    for rank in range(args.gpus):
        share = list(tasks[rank :: args.gpus])
        if not share:
            continue
        path = shard_path(out, rank)
        offsets[path] = path.stat().st_size if path.exists() else 0
        worker = context.Process(
            target=edit_worker,
            args=(args, list(methods), share, rank, devices[rank % len(devices)]),
            name=f"edit-worker-{rank}",
        )
        worker.start()
        workers.append(worker)
    while any(worker.is_alive() for worker in workers):
        time.sleep(POLL_SECONDS)
        for path, offset in offsets.items():  # one record = one line: count the new newlines
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    new = f.read()
                offsets[path] = offset + len(new)
                bar.update(new.count(b"\n"))
    failed = [f"{w.name} (exit code {w.exitcode})" for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"edit workers failed: {', '.join(failed)}; their records are kept, re-run to resume")


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: judgements


def judge_record(edit: EditRecord, label: str, result: judging.Verdict | judging.JudgeFailure) -> JudgeRecord:
    if isinstance(result, judging.JudgeFailure):
        return JudgeRecord(edit.benchmark, edit.example_id, edit.method, label, JUDGE_ERROR, result.reason)
    scores = {name: getattr(result, name) for name in (*CRITERIA, "total")}
    return JudgeRecord(edit.benchmark, edit.example_id, edit.method, label, OK, result.reason, **scores)


def run_judgements(todo: dict[str, list[EditRecord]], judges: dict, args: Args, bar) -> None:
    """Judge each label's edits in batches; a batch's records are appended as soon as it returns."""
    out = Path(args.out)
    with records.RecordLog(out / "judgements.jsonl") as log:
        for label, edits in todo.items():
            for batch in _chunks(edits, JUDGE_BATCH_PER_WORKER * args.judge_concurrency):
                samples = [
                    (records.open_rgb(out / e.source_image), records.open_rgb(out / e.image), e.request) for e in batch
                ]
                results = judges[label].judge_many(samples, progress=bar.update)
                for edit, result in zip(batch, results):
                    log.append(judge_record(edit, label, result))


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: the tables (pure functions of the records)


@dataclass
class Cell:
    """One (method, benchmark, judge) cell: means over the judged edits and the failures, counted."""

    judged: int = 0
    fulfilment: float | None = None
    quality: float | None = None
    preservation: float | None = None
    total: float | None = None
    bad_examples: int = 0
    edit_errors: int = 0
    judge_errors: int = 0
    missing: int = 0  # no record yet (an unfinished run)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(
    samples: dict[str, list[str]],
    methods: Sequence[str],
    judges: Sequence[str],
    edits: dict[EditKey, EditRecord],
    judgements: dict[JudgeKey, JudgeRecord],
) -> dict[tuple[str, str, str], Cell]:
    """(method, benchmark, judge) -> Cell over the sampled example ids (benchmark -> ids) only."""
    cells = {}
    for method in methods:
        for benchmark, ids in samples.items():
            for label in judges:
                cell, scores = Cell(), {name: [] for name in (*CRITERIA, "total")}
                for example_id in ids:
                    edit = edits.get((benchmark, example_id, method))
                    verdict = judgements.get((benchmark, example_id, method, label))
                    if edit is None:
                        cell.missing += 1
                    elif edit.status == BAD_EXAMPLE:
                        cell.bad_examples += 1
                    elif edit.status == EDIT_ERROR:
                        cell.edit_errors += 1
                    elif verdict is None:
                        cell.missing += 1
                    elif verdict.status == JUDGE_ERROR:
                        cell.judge_errors += 1
                    else:
                        for name in scores:
                            scores[name].append(getattr(verdict, name))
                cell.judged = len(scores["total"])
                for name, values in scores.items():
                    setattr(cell, name, _mean(values))
                cells[(method, benchmark, label)] = cell
    return cells


def row_average(cells: dict, method: str, columns: Sequence[tuple[str, str]]) -> float | None:
    """The paper's Average: the mean of a row's cells (None while any cell has no judged edit)."""
    totals = [cells[(method, b, j)].total for b, j in columns]
    return None if any(t is None for t in totals) else sum(totals) / len(totals)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def table1(cells: dict, methods: Sequence[Method], columns: Sequence[tuple[str, str]]) -> tuple[list, list, list]:
    """(header, Markdown rows, CSV rows) of Table 1. CSV values keep full precision; empty = no judged edit."""
    header = ["method", "paper row", *(f"{b} / {j}" for b, j in columns), "Average"]
    md, rows = [], []
    for method in methods:
        values = [cells[(method.id, b, j)].total for b, j in columns] + [row_average(cells, method.id, columns)]
        md.append([method.id, method.label, *map(_fmt, values)])
        rows.append([method.id, method.label, *("" if v is None else repr(v) for v in values)])
    return header, md, rows


SUBSCORE_HEADER = [
    "method", "benchmark", "judge", "judged", "fulfilment (0-4)", "quality (0-3)", "preservation (0-3)",
    "total (0-10)", "bad examples", "edit errors", "judge errors", "missing",
]  # fmt: skip


def subscore_rows(cells: dict, digits: int | None) -> list[list[str]]:
    """One row per cell; digits None keeps full precision (CSV)."""

    def show(value: float | None) -> str:
        return ("" if value is None else repr(value)) if digits is None else _fmt(value, digits)

    return [
        [method, benchmark, label, str(c.judged), *(show(getattr(c, n)) for n in (*CRITERIA, "total")),
         str(c.bad_examples), str(c.edit_errors), str(c.judge_errors), str(c.missing)]
        for (method, benchmark, label), c in cells.items()
    ]  # fmt: skip


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_tables(out: Path, cells: dict, methods: Sequence[Method], columns: Sequence[tuple[str, str]]) -> str:
    """Write table1.md/.csv and subscores.md/.csv; return the Markdown of both, for printing."""
    header, md_rows, csv_rows = table1(cells, methods, columns)
    first_judge = columns[0][1]
    per_edit = [c for (_, _, label), c in cells.items() if label == first_judge]  # one cell per (method, benchmark)
    bad, refused = sum(c.bad_examples for c in per_edit), sum(c.edit_errors for c in per_edit)
    failed, missing = sum(c.judge_errors for c in cells.values()), sum(c.missing for c in cells.values())
    note = (
        f"Mean 0-10 total over judged edits. Failures are excluded from the means and counted in subscores.md: "
        f"{bad} edits of unreadable examples, {refused} refused edits, {failed} failed judgements"
        f"{f', {missing} not done yet' if missing else ''}."
    )
    table1_md = f"{markdown_table(header, md_rows)}\n\n{note}\n"
    subscores_md = markdown_table(SUBSCORE_HEADER, subscore_rows(cells, 2)) + "\n"
    (out / "table1.md").write_text(table1_md, encoding="utf-8")
    write_csv(out / "table1.csv", header, csv_rows)
    (out / "subscores.md").write_text(subscores_md, encoding="utf-8")
    write_csv(out / "subscores.csv", SUBSCORE_HEADER, subscore_rows(cells, None))
    return f"Table 1\n\n{table1_md}\nSub-scores and failures\n\n{subscores_md}"


# ---------------------------------------------------------------------------------------------------------------------
# The HTML report

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
section { border-top: 2px solid #ddd; padding: 1em 0; }
.row { display: flex; gap: 12px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; width: 260px; } figure img { width: 256px; image-rendering: pixelated; border: 1px solid #bbb; }
figcaption { font-size: 13px; } .failed { background: #fee; padding: 6px; width: 244px; font-size: 13px; }
.score { font-weight: bold; } .chain { margin-top: 6px; } details { font-size: 12px; } pre { white-space: pre-wrap; }
.turn { clear: both; overflow: hidden; margin: 4px 0; padding: 2px; border-left: 3px solid #ddd; }
.turn.best { border-left-color: #2a7; } .turn img { width: 64px; float: left; margin-right: 6px; }
"""


def _short(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")  # 2.69813 -> "2.7", 4.0 -> "4"


def _e(value: object) -> str:
    return html.escape(str(value))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plan_parts(chain: dict) -> list[str]:
    """The decomposition, the sub-requests and the fallback of a chain's summary, as HTML snippets."""
    parts = []
    if chain.get("actions") is not None:
        for name in ("actions", "subjects", "goals"):
            parts.append(f"<b>{name}</b>: {_e(', '.join(chain[name]) or '(none)')}")
    if chain.get("steps"):
        parts.append("<b>sub-requests</b>:<ol>" + "".join(f"<li>{_e(s)}</li>" for s in chain["steps"]) + "</ol>")
    if chain.get("fallback"):
        parts.append(f"<b>fallback</b>: {_e(chain['fallback'])} (the raw request was edited)")
    return parts


def _raw_answers(chain: dict) -> str:
    raw = "".join(
        f"<p>{name}:</p><pre>{_e(chain[key])}</pre>"
        for name, key in (("decomposition agent", "decomposition_text"), ("sequencing agent", "sequencing_text"))
        if chain.get(key) is not None
    )
    return f"<details><summary>raw agent answers</summary>{raw}</details>" if raw else ""


def _think_html(think: dict) -> str:
    """A think row's turns: each turn's edit, instruction, score and critique; the returned turn is marked."""
    parts = _plan_parts(think["plan"]) if think.get("plan") else []
    for turn in think["turns"]:
        best = turn["turn"] == think.get("best_turn")
        image = f"<img loading='lazy' src='{_e(turn['image'])}' alt='turn {turn['turn']}'>" if turn.get("image") else ""
        score = "no score" if turn["score"] is None else f"score {_short(turn['score'])}"
        head = f"<b>turn {turn['turn']}</b>: {score}{' (returned)' if best else ''}"
        problem = turn.get("edit_error") or turn.get("critic_error")
        critique = turn.get("critique_text")
        parts.append(
            f"<div class='turn{' best' if best else ''}'>{image}{head}<br>{_e(turn['instruction'])}"
            + (f"<br><i>{_e(problem)}</i>" if problem else "")
            + (f"<details><summary>critique</summary><pre>{_e(critique)}</pre></details>" if critique else "")
            + "</div>"
        )
    parts.append(f"<b>stopped</b>: {_e(think.get('stop_reason'))}")
    return "<br>".join(parts) + (_raw_answers(think["plan"]) if think.get("plan") else "")


def _chain_html(chain: dict | None) -> str:
    """The decomposition, the plan and what the editor was asked (or a think row's turns), for one edit."""
    if not chain or chain.get("method") == "original":
        return ""
    if "turns" in chain:
        return _think_html(chain)
    parts = _plan_parts(chain)
    parts.append("<b>editor calls</b>: " + " | ".join(_e(i) for i in chain.get("instructions", [])))
    return "<br>".join(parts) + _raw_answers(chain)


def _edit_figure(method: Method, edit: EditRecord | None, verdicts: list[tuple[str, JudgeRecord | None]]) -> str:
    if edit is None:
        return f"<figure><div class='failed'>{_e(method.id)}: not edited yet</div></figure>"
    if edit.status != OK:  # the chain's plan is still worth seeing when the editor refused it
        failure = f"<b>{_e(method.id)}</b>: {_e(edit.status)}<br>{_e(edit.reason)}"
        return f"<figure><div class='failed'>{failure}</div><div class='chain'>{_chain_html(edit.chain)}</div></figure>"
    scores = []
    for label, verdict in verdicts:
        if verdict is None:
            scores.append(f"{_e(label)}: not judged yet")
        elif verdict.status != OK:
            scores.append(f"{_e(label)}: <span title='{_e(verdict.reason)}'>judge error</span>")
        else:
            parts = "/".join(_short(getattr(verdict, name)) for name in CRITERIA)
            scores.append(
                f"{_e(label)}: <span class='score' title='{_e(verdict.reason)}'>{verdict.total:.2f}</span> ({parts})"
            )
    return (
        f"<figure><img loading='lazy' src='{_e(edit.image)}' alt='{_e(method.id)}'>"
        f"<figcaption><b>{_e(method.label)}</b> <code>{_e(method.id)}</code><br>{'<br>'.join(scores)}"
        f"<div class='chain'>{_chain_html(edit.chain)}</div></figcaption></figure>"
    )


def write_report(
    out: Path,
    samples: dict[str, list[str]],
    methods: Sequence[Method],
    judges: Sequence[str],
    edits: dict,
    judgements: dict,
    cells: dict,
) -> Path:
    """report.html: the tables, then per example the original and every method's edit side by side."""
    columns = [(b, j) for b in samples for j in judges]
    header, md_rows, _ = table1(cells, methods, columns)
    sections = []
    for benchmark, ids in samples.items():
        for example_id in ids:
            found = [edits.get((benchmark, example_id, m.id)) for m in methods]
            known = [r for r in found if r is not None]
            if not known:
                continue
            source = next((r.source_image for r in known if r.source_image), None)
            if source:
                original = f"<img loading='lazy' src='{_e(source)}' alt='original'><figcaption>Original</figcaption>"
            else:
                original = f"<div class='failed'>the example could not be read:<br>{_e(known[0].reason)}</div>"
            figures = [
                _edit_figure(m, r, [(j, judgements.get((benchmark, example_id, m.id, j))) for j in judges])
                for m, r in zip(methods, found)
            ]
            sections.append(
                f"<section><h3>{_e(benchmark)} / {_e(example_id)}</h3><p>Request: <q>{_e(known[0].request)}</q></p>"
                f"<div class='row'><figure>{original}</figure>{''.join(figures)}</div></section>"
            )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ImageEdit-R1 evaluation</title>"
        f"<style>{REPORT_STYLE}</style></head><body><h1>ImageEdit-R1 evaluation: {_e(out.name)}</h1>"
        f"<h2>Table 1 (mean 0-10 total over judged edits)</h2>{_html_table(header, md_rows)}"
        f"<h2>Sub-scores and failures</h2>{_html_table(SUBSCORE_HEADER, subscore_rows(cells, 2))}"
        f"<h2>Examples</h2><p>Scores: total (fulfilment/quality/preservation); hover for the judge's reason.</p>"
        f"{''.join(sections)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Human alignment (paper §4.1)

HUMAN_ALIASES = {"fulfillment": "fulfilment", "id": "example_id"}  # the paper's spelling; a short id column


def read_human_scores(path: Path) -> dict[tuple[str | None, str, str], dict[str, float]]:
    """(benchmark or None, example id, method) -> criterion -> mean over the rows (raters) for that edit."""
    if not path.is_file():
        raise HumanScoresError(f"{path}: human-scores file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = {HUMAN_ALIASES.get(c.strip().lower(), c.strip().lower()): c for c in reader.fieldnames or []}
        missing = [c for c in ("example_id", "method", *CRITERIA) if c not in columns]
        if missing:
            raise HumanScoresError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        ratings: dict[tuple, dict[str, list[float]]] = {}
        for lineno, row in enumerate(reader, start=2):
            cell = {name: (row.get(column) or "").strip() for name, column in columns.items()}
            key = (cell.get("benchmark") or None, cell["example_id"], cell["method"])
            scores = ratings.setdefault(key, {c: [] for c in CRITERIA})
            for criterion in CRITERIA:
                text = cell[criterion]
                try:
                    value = float(text)
                except ValueError:
                    raise HumanScoresError(f"{path}:{lineno}: column {criterion!r} is not a number: {text!r}") from None
                if not 0 <= value <= judging.SCORE_MAX[criterion]:
                    raise HumanScoresError(
                        f"{path}:{lineno}: {criterion} {value:g} is outside 0-{judging.SCORE_MAX[criterion]}"
                    )
                scores[criterion].append(value)
    return {key: {c: sum(v) / len(v) for c, v in scores.items()} for key, scores in ratings.items()}


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; None when it is undefined (fewer than two pairs, or a constant series)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


ALIGNMENT_HEADER = ["judge", "edits", "row", *(f"{c} (0-{judging.SCORE_MAX[c]})" for c in CRITERIA)]


def alignment_rows(
    human: dict[tuple[str | None, str, str], dict[str, float]], judgements: dict[JudgeKey, JudgeRecord]
) -> list[list]:
    """Per judge (in order of first record): the human means, the judge's means and Pearson's r over the edits that
    both scored, as [judge, n, "human" | "judge" | "pearson r", fulfilment, quality, preservation] rows."""
    judges = list(dict.fromkeys(r.judge for r in judgements.values()))
    rows = []
    for label in judges:
        verdicts = {k: r for k, r in judgements.items() if r.judge == label and r.status == OK}
        by_short_key: dict[tuple[str, str], list[JudgeRecord]] = {}
        for (_, example_id, method, _), record in verdicts.items():
            by_short_key.setdefault((example_id, method), []).append(record)
        pairs = []
        for (benchmark, example_id, method), scores in human.items():
            if benchmark is not None:
                record = verdicts.get((benchmark, example_id, method, label))
            else:
                candidates = by_short_key.get((example_id, method), [])
                if len(candidates) > 1:
                    raise HumanScoresError(
                        f"example {example_id!r} ({method}) is in several benchmarks: add a benchmark column"
                    )
                record = candidates[0] if candidates else None
            if record is not None:
                pairs.append((scores, record))
        n = len(pairs)
        h = {c: [s[c] for s, _ in pairs] for c in CRITERIA}
        j = {c: [getattr(r, c) for _, r in pairs] for c in CRITERIA}
        rows.append([label, n, "human", *(_mean(h[c]) for c in CRITERIA)])
        rows.append([label, n, "judge", *(_mean(j[c]) for c in CRITERIA)])
        rows.append([label, n, "pearson r", *(pearson(h[c], j[c]) for c in CRITERIA)])
    return rows


def report_alignment(args: Args) -> str:
    """Write alignment.md/.csv in --out from --human-scores and judgements.jsonl; return the Markdown."""
    out = Path(args.out)
    human = read_human_scores(Path(args.human_scores))
    judgements = read_judgements(out)  # read only: a run may be appending right now
    if not judgements:
        raise HumanScoresError(f"{out / 'judgements.jsonl'}: no judgements to compare with; run the evaluation first")
    rows = alignment_rows(human, judgements)
    write_csv(
        out / "alignment.csv",
        ALIGNMENT_HEADER,
        [[*r[:3], *("" if v is None else repr(v) for v in r[3:])] for r in rows],
    )
    md_rows = [[str(r[0]), str(r[1]), r[2], *(_fmt(v) for v in r[3:])] for r in rows]
    text = f"Human alignment ({len(human)} human-scored edits)\n\n{markdown_table(ALIGNMENT_HEADER, md_rows)}\n"
    (out / "alignment.md").write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The run


def pending_judgements(
    edits: dict[EditKey, EditRecord], wanted: Sequence[EditKey], labels: Sequence[str], done: set[JudgeKey]
) -> dict[str, list[EditRecord]]:
    """judge label -> the successful edits among `wanted` that it has not judged yet."""
    ok = [edits[k] for k in wanted if k in edits and edits[k].status == OK]
    return {label: [e for e in ok if (*e.key, label) not in done] for label in labels}


def write_summary(
    out: Path, sample_ids: dict[str, list[str]], methods: Sequence[Method], labels: Sequence[str]
) -> dict[tuple[str, str, str], Cell]:
    """Stage 3: the tables and the report, from the results files alone; printed, written, and returned as cells."""
    edits, judgements = read_edits(out), read_judgements(out)
    cells = summarize(sample_ids, [m.id for m in methods], labels, edits, judgements)
    text = write_tables(out, cells, methods, [(b, j) for b in sample_ids for j in labels])
    report = write_report(out, sample_ids, methods, labels, edits, judgements, cells)
    print(f"\n{text}\nResults in {out}/ (report: {report})")
    return cells


def evaluate(args: Args) -> dict[tuple[str, str, str], Cell]:
    """Setup, edit, judge, summarise (module docstring). Returns the table cells; writes everything to --out."""
    out = Path(args.out)
    methods = parse_methods(args.methods, args.turns)
    judge_specs = parse_labelled(args.judges, "--judges")
    labels = [label for label, _ in judge_specs]
    if any(m.spec.decomposer == "trained" for m in methods) and not args.decomposer:
        args.decomposer = default_decomposer()
    if any(m.spec.think for m in methods) and not args.critic:
        raise SetupError("the think methods need a critic: pass --critic SPEC (e.g. gpt-4o, local:PATH, shapes)")
    if args.max_turns < 1:
        raise SetupError(f"--max-turns must be at least 1, got {args.max_turns}")
    if args.gpus < 1:
        raise SetupError(f"--gpus must be at least 1, got {args.gpus}")
    with run_lock(out):
        # 0. Setup: what is left to do, and is everything it needs there?
        samples = load_samples(args)
        sample_ids = {label: [e.id for e in examples] for label, examples in samples.items()}
        wanted = [(b, i, m.id) for b, ids in sample_ids.items() for i in ids for m in methods]
        edits, judgements = read_edits(out, repair=True), read_judgements(out, repair=True)
        keep = {OK} if args.retry_failed else {OK, BAD_EXAMPLE, EDIT_ERROR}
        tasks = plan_edits(samples, methods, {k for k, r in edits.items() if r.status in keep})
        judged = {k for k, r in judgements.items() if r.status == OK or not args.retry_failed}
        problems = check_run_settings(out, args)
        if problems:
            raise SetupError("cannot resume, nothing was run:\n  - " + "\n  - ".join(problems))
        to_edit = {method_id for task in tasks for method_id in task.methods}
        editor, judges = preflight(args, judge_specs, [m for m in methods if m.id in to_edit])
        records.write_atomic(out / "run.json", (json.dumps(asdict(args), indent=2) + "\n").encode())

        # 1. Edits. The bar counts edits and judgements; it first assumes every new edit succeeds and gets judged.
        n_edits = sum(len(task.methods) for task in tasks)
        n_judgements = sum(map(len, pending_judgements(edits, wanted, labels, judged).values()))
        total = n_edits * (1 + len(labels)) + n_judgements
        bar = tqdm(total=total, desc="edit", unit="step", disable=not args.progress, dynamic_ncols=True)
        if tasks and args.gpus > 1:
            run_edits_in_workers(tasks, args, methods, bar)
        elif tasks:
            run_edits(tasks, args, methods, editor, out / "edits.jsonl", bar)

        # 2. Judgements of every successful edit, by every judge that has not scored it yet.
        todo = pending_judgements(read_edits(out), wanted, labels, judged)
        bar.total = bar.n + sum(map(len, todo.values()))  # exact now that the edits are known
        bar.set_description("judge")
        run_judgements(todo, judges, args, bar)
        bar.close()

        # 3. Summary.
        return write_summary(out, sample_ids, methods, labels)


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass_args(Args, argv, description=__doc__.split("\n\n")[0])
    if args.human_scores:
        print(report_alignment(args))
    else:
        evaluate(args)


if __name__ == "__main__":
    try:
        main()
    except (SetupError, benchmarks.BenchmarkError, HumanScoresError, records.RecordFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)  # bad input or setup, as train.py and data.py report it

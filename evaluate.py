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
    The rows, the records and the tables are defined in results.py (to add a method: a `MethodSpec` there).

The Think-while-Edit rows (thinker.py; EditThinker, ../shared/papers/003)
    The critic scores each edit and refines the instruction; the SOURCE is re-edited until the score reaches
    --think-threshold, the instruction repeats, or --max-turns edits were made; the best-scored edit is the row's
    image. Turns use the example's seed, so turn 1 of "think" is the "original" edit and turn 1 of "chain-rl+think" the
    "chain-rl" edit. --critic: gpt-4o, gemini-2.5-flash, openai:MODEL@URL, local:PATH, shapes, shapes+local:PATH
    (specs.make_critic). Caveat: with a judge-scored critic ("shapes...") and that same judge in --judges, picking the
    best turn selects with the evaluator's own eyes (best of k draws): part of the gain is selection, not refinement.

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

Files in --out: edits.jsonl, judgements.jsonl, images/, table1.md/.csv, subscores.md/.csv (results.py), report.html
and, with --human-scores FILE.csv, alignment.md/.csv (report.py: humans versus each judge, paper §4.1).

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

import fcntl
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import huggingface_hub
import torch
from tqdm import tqdm

import agents
import benchmarks
import editing
import editors
import judge
import policy
import records
import report
import results
import specs
import thinker
from cli import arg, parse_dataclass_args

PAPER_AGENT = "Qwen/Qwen2.5-VL-7B-Instruct"
JUDGE_BATCH_PER_WORKER = 4  # a judge batch is 4 x --judge-concurrency edits: records land often, the pool stays full
POLL_SECONDS = 0.5  # how often the main process counts the workers' records for the progress bar


# train.py's default export (its --output-dir, runs/grpo, plus policy/): `python train.py --gpus 8` writes it and
# `python evaluate.py --editor flux` reads it, so the design card's two commands meet without flags
TRAIN_EXPORT = "runs/grpo/policy"


def default_decomposer() -> str:
    """chain-rl's decomposer when --decomposer is not given: train.py's default export, said out loud."""
    if not (Path(TRAIN_EXPORT) / "config.json").is_file():
        raise results.SetupError(f"method 'chain-rl' needs the trained decomposition agent: pass --decomposer PATH, or run "
                         f"train.py first (its default export is {TRAIN_EXPORT})")  # fmt: skip
    print(f"chain-rl: using train.py's export {TRAIN_EXPORT} (--decomposer PATH picks another)", file=sys.stderr)
    return TRAIN_EXPORT


@dataclass
class Args:
    """Evaluate an editor alone and inside ImageEdit-R1's chain (the paper's Table 1). See the module docstring."""

    # what to edit
    benchmark: str = arg(
        "realedit",
        "psr | realedit | ultraedit | PATH.jsonl (a manifest, or a file written by miniature.dataset.write_jsonl); several "
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
    prompts: str | None = arg(None, "a JSON file of the agents' prompts (agents.Prompts, e.g. the miniature base's "
                                    "prompts.json); default: the paper's prompts")  # fmt: skip
    # the Think-while-Edit rows (think, chain-rl+think)
    critic: str | None = arg(
        None,
        "the critic-refiner of the think rows: gpt-4o, gemini-2.5-flash, openai:MODEL@URL, local:PATH, shapes, "
        "shapes+local:PATH (module docstring)",
    )
    max_turns: int = arg(thinker.DEFAULT_MAX_TURNS, "most edits (each one critiqued) per example in the think rows")
    think_threshold: float = arg(
        thinker.DEFAULT_THINK_THRESHOLD, "critic score (0-10) at which the think loop stops, satisfied"
    )
    think_preset: Literal["ours", "released"] = arg("ours", "'released': EditThinker's released loop "
                                                    "(thinker.RELEASED_LOOP: at most 5 turns, stop at score 8) over "
                                                    "--max-turns and --think-threshold")  # fmt: skip
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
    "agent_model", "decomposer", "sequencer", "max_new_tokens", "max_steps", "prompts", "seed",
    "critic", "max_turns", "think_threshold",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Setup: samples, editor, agents, judges, all checked before any work


def benchmark_root(root: str | None, spec: str) -> str | None:
    """--root is the benchmark's copy, or holds one folder per benchmark (DIR/realedit), as benchmarks.py fetches."""
    if root is not None and spec in benchmarks.BENCHMARKS and (Path(root) / spec).is_dir():
        return str(Path(root) / spec)
    return root


def load_samples(args: Args) -> dict[str, list[benchmarks.EditExample]]:
    """benchmark label -> its seeded sample of --limit examples (BenchmarkError for an unreadable benchmark)."""
    samples = {}
    for label, spec in results.parse_labelled(args.benchmark, "--benchmark"):
        label = Path(spec).stem if label == spec and spec not in benchmarks.BENCHMARKS else label
        if label in samples:
            raise results.SetupError(f"--benchmark: two benchmarks are labelled {label!r}; name them with LABEL=PATH")
        examples = benchmarks.load_benchmark(spec, benchmark_root(args.root, spec))
        samples[label] = benchmarks.sample(examples, args.limit, args.seed)
    return samples


def editor_options(args: Args) -> editors.EditorOptions:
    return editors.EditorOptions(model=args.editor_path, dtype=args.editor_dtype, cpu_offload=args.editor_offload,
                                 max_area=args.editor_max_area, steps=args.editor_steps,
                                 guidance=args.editor_guidance)  # fmt: skip


def edit_settings(args: Args) -> editing.EditSettings:
    """The edit stage's one record, from the command line."""
    prompts = agents.Prompts.load(args.prompts) if args.prompts else agents.PAPER_PROMPTS
    chain = agents.ChainSettings(max_new_tokens=args.max_new_tokens, batch_size=max(1, args.agent_batch_size),
                                 max_steps=args.max_steps, prompts=prompts)  # fmt: skip
    return editing.EditSettings(
        out=Path(args.out), seed=args.seed, batch_size=args.agent_batch_size, gpus=args.gpus, editor=args.editor,
        editor_options=editor_options(args), agent_model=args.agent_model, decomposer=args.decomposer, sequencer=args.sequencer,
        chain=chain, critic=args.critic, max_turns=args.max_turns, think_threshold=args.think_threshold,
        critic_concurrency=args.judge_concurrency,
    )  # fmt: skip


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


def check_critic(spec: str, args: Args) -> None:
    """Build the critic with local checkpoints' configs read instead of their weights loaded (fails like build)."""

    def read_config_only(path: str) -> agents.Agent:
        policy.load_config(path)
        return agents.Agent(None, None)

    editing.make_critic(edit_settings(args), read_config_only)


def agent_paths(args: Args, methods: Sequence[results.Method]) -> list[str]:
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
    args: Args, judge_specs: list[tuple[str, str]], edit_methods: Sequence[results.Method]
) -> tuple[editors.Editor | None, dict]:
    """Construct the judges and check the editor and agents that the remaining edits need; results.SetupError lists every
    problem at once. Returns (editor or None when no edit is left, {judge label: judge})."""
    problems = []
    judges = {}
    for label, spec in judge_specs:
        try:
            judges[label] = specs.make_judge(spec, args.judge_concurrency)
        except (judge.MissingAPIKeyError, policy.PolicyNotFoundError, ValueError) as err:
            problems.append(f"judge {label!r}: {err}")
    editor = None
    if edit_methods:
        try:
            editor = specs.make_editor(args.editor, editor_options(args))
            check_editor(editor)
        except (editors.EditorSetupError, ValueError) as err:
            problems.append(f"editor {args.editor!r}: {err}")
        if args.prompts:
            try:
                agents.Prompts.load(args.prompts)
            except agents.PromptsError as err:
                problems.append(f"--prompts: {err}")
        for path in agent_paths(args, edit_methods):
            try:
                policy.load_config(path)
            except (policy.PolicyNotFoundError, ValueError) as err:
                problems.append(f"agent model {path!r}: {err}")
        if any(m.spec.think for m in edit_methods):
            try:
                check_critic(args.critic, args)
            except (judge.MissingAPIKeyError, policy.PolicyNotFoundError, ValueError) as err:
                problems.append(f"critic {args.critic!r}: {err}")
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if args.gpus > 1 and torch.cuda.is_available() and args.gpus > (len(visible) or torch.cuda.device_count()):
            problems.append(f"--gpus {args.gpus}: only {len(visible) or torch.cuda.device_count()} GPU(s) visible")
    if problems:
        raise results.SetupError("cannot start, nothing was run:\n  - " + "\n  - ".join(problems))
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
            raise results.SetupError(f"another evaluate.py is running on {out} (it holds {out / '.lock'})") from None
        yield


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: judgements


def judge_record(
    edit: results.EditRecord, label: str, result: judge.Verdict | judge.JudgeFailure
) -> results.JudgeRecord:
    if isinstance(result, judge.JudgeFailure):
        return results.JudgeRecord(
            edit.benchmark, edit.example_id, edit.method, label, results.JUDGE_ERROR, result.reason
        )
    scores = {name: getattr(result, name) for name in (*results.CRITERIA, "total")}
    return results.JudgeRecord(edit.benchmark, edit.example_id, edit.method, label, results.OK, result.reason, **scores)


def run_judgements(todo: dict[str, list[results.EditRecord]], judges: dict, args: Args, bar) -> None:
    """Judge each label's edits in batches; a batch's records are appended as soon as it returns."""
    out = Path(args.out)
    with records.RecordLog(out / "judgements.jsonl") as log:
        for label, edits in todo.items():
            size = JUDGE_BATCH_PER_WORKER * max(1, args.judge_concurrency)
            for batch in (edits[start : start + size] for start in range(0, len(edits), size)):
                samples = [
                    (records.open_rgb(out / e.source_image), records.open_rgb(out / e.image), e.request) for e in batch
                ]
                verdicts = judges[label].judge_many(samples, progress=bar.update)
                for edit, result in zip(batch, verdicts):
                    log.append(judge_record(edit, label, result))


# ---------------------------------------------------------------------------------------------------------------------
# The run


def pending_judgements(
    edits: dict[results.EditKey, results.EditRecord],
    wanted: Sequence[results.EditKey],
    labels: Sequence[str],
    done: set[results.JudgeKey],
) -> dict[str, list[results.EditRecord]]:
    """judge label -> the successful edits among `wanted` that it has not judged yet."""
    ok = [edits[k] for k in wanted if k in edits and edits[k].status == results.OK]
    return {label: [e for e in ok if (*e.key, label) not in done] for label in labels}


def write_summary(
    out: Path, sample_ids: dict[str, list[str]], methods: Sequence[results.Method], labels: Sequence[str]
) -> dict[tuple[str, str, str], results.Cell]:
    """Stage 3: the tables and the report, from the results files alone; printed, written, and returned as cells."""
    edits, judgements = results.read_edits(out), results.read_judgements(out)
    cells = results.summarize(sample_ids, [m.id for m in methods], labels, edits, judgements)
    text = results.write_tables(out, cells, methods, [(b, j) for b in sample_ids for j in labels])
    page = report.write_report(out, sample_ids, methods, labels, edits, judgements, cells)
    print(f"\n{text}\nResults in {out}/ (report: {page})")
    return cells


def evaluate(args: Args) -> dict[tuple[str, str, str], results.Cell]:
    """Setup, edit, judge, summarise (module docstring). Returns the table cells; writes everything to --out."""
    out = Path(args.out)
    methods = results.parse_methods(args.methods, args.turns)
    judge_specs = results.parse_labelled(args.judges, "--judges")
    labels = [label for label, _ in judge_specs]
    if any(m.spec.decomposer == "trained" for m in methods) and not args.decomposer:
        args.decomposer = default_decomposer()
    if any(m.spec.think for m in methods) and not args.critic:
        raise results.SetupError(
            "the think methods need a critic: pass --critic SPEC (e.g. gpt-4o, local:PATH, shapes)"
        )
    if args.max_turns < 1:
        raise results.SetupError(f"--max-turns must be at least 1, got {args.max_turns}")
    if args.gpus < 1:
        raise results.SetupError(f"--gpus must be at least 1, got {args.gpus}")
    with run_lock(out):
        # 0. Setup: what is left to do, and is everything it needs there?
        samples = load_samples(args)
        sample_ids = {label: [e.id for e in examples] for label, examples in samples.items()}
        wanted = [(b, i, m.id) for b, ids in sample_ids.items() for i in ids for m in methods]
        edits, judgements = results.read_edits(out, repair=True), results.read_judgements(out, repair=True)
        keep = {results.OK} if args.retry_failed else {results.OK, results.BAD_EXAMPLE, results.EDIT_ERROR}
        jobs = editing.pending_edits(samples, methods, {k for k, r in edits.items() if r.status in keep})
        judged = {k for k, r in judgements.items() if r.status == results.OK or not args.retry_failed}
        problems = check_run_settings(out, args)
        if problems:
            raise results.SetupError("cannot resume, nothing was run:\n  - " + "\n  - ".join(problems))
        to_edit = {method_id for job in jobs for method_id in job.methods}
        editor, judges = preflight(args, judge_specs, [m for m in methods if m.id in to_edit])
        records.write_atomic(out / "run.json", (json.dumps(asdict(args), indent=2) + "\n").encode())

        # 1. Edits. The bar counts edits and judgements; it first assumes every new edit succeeds and gets judged.
        n_edits = sum(len(job.methods) for job in jobs)
        n_judgements = sum(map(len, pending_judgements(edits, wanted, labels, judged).values()))
        total = n_edits * (1 + len(labels)) + n_judgements
        bar = tqdm(total=total, desc="edit", unit="step", disable=not args.progress, dynamic_ncols=True)
        if jobs and args.gpus > 1:
            editing.run_edits_in_workers(jobs, edit_settings(args), methods, bar)
        elif jobs:
            editing.run_edits(jobs, edit_settings(args), methods, editor, out / "edits.jsonl", bar)

        # 2. Judgements of every successful edit, by every judge that has not scored it yet.
        todo = pending_judgements(results.read_edits(out), wanted, labels, judged)
        bar.total = bar.n + sum(map(len, todo.values()))  # exact now that the edits are known
        bar.set_description("judge")
        run_judgements(todo, judges, args, bar)
        bar.close()

        # 3. Summary.
        return write_summary(out, sample_ids, methods, labels)


def with_preset(args: Args) -> Args:
    """--think-preset released: EditThinker's released loop settings over --max-turns and --think-threshold."""
    return replace(args, **thinker.RELEASED_LOOP) if args.think_preset == "released" else args


def main(argv: list[str] | None = None) -> None:
    args = with_preset(parse_dataclass_args(Args, argv, description=__doc__.split("\n\n")[0]))
    if args.human_scores:
        print(report.report_alignment(Path(args.human_scores), Path(args.out)))
    else:
        evaluate(args)


if __name__ == "__main__":
    try:
        main()
    except (results.SetupError, benchmarks.BenchmarkError, results.HumanScoresError, records.RecordFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)  # bad input or setup, as train.py and data.py report it

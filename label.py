"""The teacher labeller: gold actions, subjects and goals for (image, request) pairs, written as train.py's JSONL.

`python label.py --benchmark realedit --teacher gpt-4o --out data/rl` (from data/benchmarks/realedit) writes
`train.jsonl` and `heldout.jsonl` in the format of data.py. No public set has gold actions, subjects and goals; the
paper trained on up to about 4,000 examples (§4.2, gains flatten there). This labeller makes them from any
(image, request) pairs that `benchmarks.py` can read:

1. List the examples of the training split (RealEdit: train; PSR and UltraEdit have one pool; or a manifest), drop
   every example of evaluate.py's sample (`benchmarks.evaluation_ids`, by default the paper's 1,000 with seed 0), and
   draw `--limit` of the rest with the same seeded draw evaluate.py uses.
2. For each example, in id order: read the image (an unreadable one is a reject), shrink it to `--max-image-side`,
   and drop it as a duplicate if an earlier example had the same pixels and the same request (before paying for it).
3. Ask the teacher (teachers.py: `TEACHER_SYSTEM` + the image + `teacher_prompt(request)`) for a JSON object
   {"actions": [...], "subjects": [...], "goals": [...]}, constrained by a strict JSON schema on OpenAI-compatible
   servers. `parse_label` validates it and normalises every item with `rewards.gold_from_lists`; a reply that is not
   such an object is asked again `--parse-retries` times. Every failure is a counted reject with a reason
   (`REJECT_REASONS`), never a stop.
4. Append each outcome to the journal `OUT/labels.jsonl` (a `records.RecordLog`) the moment it exists (accepted ones
   after their PNG is in `OUT/images/`). A killed run, re-run with the same command, skips every id already in the
   journal, except API failures, which are tried again. At most `--max-concurrency` requests are in flight.
5. At the end, write `train.jsonl` and `heldout.jsonl` (each accepted example goes to held-out when
   sha256(seed, id) falls under `--heldout-fraction`, so the split does not move as more examples are labelled) by
   an atomic rename, check that no id of evaluate.py's sample is in either file, validate both with `load_rl_jsonl`,
   and print a report (also `report.md`): the label vocabulary, items per field, rejects by reason.

A cost estimate (requests, input and output tokens, dollars at `--price-*`) is printed before any request is sent;
`--dry-run` prints it with the first prompts and exits without contacting the teacher (and needs no API key).

Teachers (teachers.py): "gpt-4o" and "gemini-2.5-flash" (the presets and key variables of `judge.py`),
"openai:MODEL@URL" for any OpenAI-compatible server such as vLLM (key in TEACHER_API_KEY, or the dummy "EMPTY"), or
"local:PATH" for a Qwen-VL model run in this process through `policy.load_policy`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import benchmarks
import judge
import records
import teachers
from cli import arg, parse_dataclass_args
from data import DataError, load_rl_jsonl, rl_record

# The labeller's own rejects, beside the teacher's (teachers.LABEL_ERROR_REASONS).
REJECT_EXAMPLE = "unreadable example"  # the benchmark row has no request, or its image does not decode
REJECT_DUPLICATE = "duplicate"  # the same pixels and request as an earlier example: never sent
REJECT_REASONS = (*teachers.LABEL_ERROR_REASONS, REJECT_EXAMPLE, REJECT_DUPLICATE)

# ---------------------------------------------------------------------------------------------------------------------
# The journal: one Outcome per line, appended as each example finishes

JOURNAL, TRAIN_FILE, HELDOUT_FILE, REPORT_FILE, RUN_FILE, IMAGE_DIR = (
    "labels.jsonl",
    "train.jsonl",
    "heldout.jsonl",
    "report.md",
    "run.json",
    "images",
)
OK, REJECTED = "ok", "rejected"


@dataclass(frozen=True)
class Outcome:
    """What happened to one example: accepted with its gold lists and PNG, or rejected with a reason."""

    id: str
    status: str  # OK or REJECTED
    request: str = ""
    reason: str = ""  # one of REJECT_REASONS when rejected
    detail: str = ""
    key: str = ""  # sha256 of the pixels and the normalised request: duplicates share it
    image: str = ""  # the PNG, relative to the output folder (accepted examples only)
    actions: list[str] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def final(self) -> bool:
        """API failures are tried again by the next run; every other outcome stands."""
        return self.reason != teachers.REJECT_API


def read_journal(path: Path) -> dict[str, Outcome]:
    """id -> its latest outcome, in the order ids first appear. A partial last line left by a killed run is cut off
    (that example is redone); records.RecordFileError names the line of a corrupt record."""
    outcomes = records.read_records(path, Outcome, repair=True, hint="; move the file away to start over")
    return {outcome.id: outcome for outcome in outcomes}


def prepare_image(image: Image.Image, max_side: int) -> Image.Image:
    """RGB, shrunk (never enlarged) so its longer side is at most `max_side` (0 keeps the size)."""
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def example_key(image: Image.Image, request: str) -> str:
    """Same pixels and same request (up to case and spacing) give the same key."""
    digest = hashlib.sha256(f"{image.mode} {image.size}\0{' '.join(request.casefold().split())}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_filename(example_id: str) -> str:
    """A file name for an id: readable, filesystem-safe, and unique (a short hash of the full id)."""
    stem = records.file_stem(example_id, keep=80)
    # An id with no letter or digit: file_stem names it "_-HASH", journals written before it "-HASH"; keep those names.
    return (stem.removeprefix("_") if records.safe_name(example_id) == "_" else stem) + ".png"


def label_into_journal(
    examples: Sequence[benchmarks.EditExample],
    teacher: teachers.Teacher,
    out: Path,
    done: dict[str, Outcome],
    max_image_side: int,
) -> None:
    """Label `examples` in order and append one Outcome per example to OUT/labels.jsonl.

    The main thread reads images, drops duplicates and writes every file; worker threads only call the teacher, so
    at most `teacher.max_concurrency` images are in memory and the journal has one writer.
    """
    first_with_key = {}  # key -> id of the first example with it, across this and earlier runs
    for outcome in done.values():
        if outcome.key:
            first_with_key.setdefault(outcome.key, outcome.id)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    in_flight: dict[Future, tuple[benchmarks.EditExample, Image.Image, str]] = {}

    with (
        records.RecordLog(out / JOURNAL) as journal,
        ThreadPoolExecutor(teacher.max_concurrency, thread_name_prefix="teacher") as pool,
        tqdm(total=len(examples), desc="labelling", unit="example") as bar,
    ):

        def record(outcome: Outcome) -> None:
            journal.append(outcome)  # on disk as soon as it exists: a kill loses at most the requests in flight
            bar.update(1)

        def finish_one() -> None:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in finished:
                example, image, key = in_flight.pop(future)
                record(_outcome(future, example, image, key, out))

        for example in examples:
            while len(in_flight) >= teacher.max_concurrency:
                finish_one()
            raw = example.load_image()
            if raw is None:
                record(Outcome(example.id, REJECTED, example.request, REJECT_EXAMPLE, example.error or ""))
                continue
            image = prepare_image(raw, max_image_side)
            key = example_key(image, example.request)
            first = first_with_key.setdefault(key, example.id)
            if first != example.id:
                record(Outcome(example.id, REJECTED, example.request, REJECT_DUPLICATE, f"same as {first}", key))
                continue
            in_flight[pool.submit(teacher.label, image, example.request)] = (example, image, key)
        while in_flight:
            finish_one()


def _outcome(future: Future, example: benchmarks.EditExample, image: Image.Image, key: str, out: Path) -> Outcome:
    """A finished teacher request -> its Outcome (saving the PNG of an accepted example first)."""
    try:
        reply: teachers.TeacherReply = future.result()  # any exception but LabelError is a bug and propagates
    except teachers.LabelError as e:
        return Outcome(example.id, REJECTED, example.request, e.reason, e.detail, key)
    relative = f"{IMAGE_DIR}/{image_filename(example.id)}"
    records.save_png(image, out / relative)
    gold = reply.gold
    return Outcome(
        example.id,
        OK,
        example.request,
        key=key,
        image=relative,
        actions=gold.actions,
        subjects=gold.subjects,
        goals=gold.goals,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The run: draw, estimate, label, write, check, report


@dataclass
class Args:
    """Label (image, request) pairs with gold actions, subjects and goals by a teacher VLM; write train.py's JSONL."""

    benchmark: str = arg("realedit", "psr | realedit | ultraedit | PATH of a JSONL manifest (see benchmarks.py)")
    root: str | None = arg(None, "folder of the benchmark's local copy (default: data/benchmarks/NAME, where the "
                                 "README's download commands put it)")  # fmt: skip
    split: str | None = arg(
        None,
        "split to label; none = the benchmark's training split (RealEdit: train; PSR and "
        "UltraEdit: all files); 'all' = every file",
    )
    teacher: str = arg("gpt-4o", "gpt-4o | gemini-2.5-flash | openai:MODEL@URL | local:PATH")
    out: str = arg("data/rl", "output folder: train.jsonl, heldout.jsonl, images/, report.md, labels.jsonl (journal)")
    limit: int = arg(0, "label this many examples, drawn with benchmarks.sample and --seed (0 = all)")
    seed: int = arg(0, "seed of the --limit draw and of the held-out split")
    heldout_fraction: float = arg(0.05, "expected fraction of accepted examples that go to heldout.jsonl")
    exclude_eval_limit: int = arg(
        benchmarks.DEFAULT_EVAL_LIMIT,
        "leave out evaluate.py's sample of this size (its --limit; 0 = the whole evaluation split; -1 = leave out "
        "nothing, only for data you never evaluate on)",
    )
    exclude_eval_seed: int = arg(benchmarks.DEFAULT_EVAL_SEED, "evaluate.py's --seed of the sample to leave out")
    max_concurrency: int = arg(8, "teacher requests in flight at once (API teachers)")
    max_new: int = arg(0, "label at most this many new examples in this run, then write the files (0 = no limit)")
    max_image_side: int = arg(1024, "shrink images so the longer side is at most this many pixels (0 = keep)")
    parse_retries: int = arg(1, "extra requests after a reply that is empty or not the JSON object")
    timeout: float = arg(120.0, "seconds per HTTP attempt")
    max_retries: int = arg(5, "transport retries of the openai client (429, 5xx, timeouts)")
    price_input_per_m: float = arg(2.5, "dollars per million input tokens, for the estimate (GPT-4o list price)")
    price_output_per_m: float = arg(10.0, "dollars per million output tokens, for the estimate (GPT-4o list price)")
    dry_run: bool = arg(False, "print the estimate and the first prompts, then exit without calling the teacher")


DRY_RUN_SHOWN = 3  # prompts printed by --dry-run
VOCABULARY_SHOWN = 15  # most common items per field in the report


@dataclass
class Draw:
    """Which examples this output folder labels, and which ones it must never contain."""

    examples: list[benchmarks.EditExample]  # to label, in id order
    eval_ids: set[str]  # evaluate.py's sample
    split: str
    candidates: int  # examples in the split
    excluded: int  # of those, in evaluate.py's sample


def draw_examples(args: Args) -> Draw:
    """List the split, leave out evaluate.py's sample, draw --limit of the rest."""
    is_benchmark = args.benchmark in benchmarks.BENCHMARKS
    split = args.split or (benchmarks.BENCHMARKS[args.benchmark].train_split if is_benchmark else None)
    if args.root is None and is_benchmark:
        args.root = str(Path(benchmarks.DEFAULT_ROOT) / args.benchmark)
    examples = benchmarks.load_benchmark(args.benchmark, args.root, split)
    eval_ids = set()  # --exclude-eval-limit -1: data that is never evaluated on
    if args.exclude_eval_limit >= 0:
        eval_ids = benchmarks.evaluation_ids(args.benchmark, args.root, args.exclude_eval_limit, args.exclude_eval_seed)
    pool = [example for example in examples if example.id not in eval_ids]
    chosen = benchmarks.sample(pool, args.limit, args.seed)
    return Draw(chosen, eval_ids, split or "manifest", len(examples), len(examples) - len(pool))


def _run_config(args: Args, split: str) -> dict:
    prompt = hashlib.sha256((teachers.TEACHER_SYSTEM + teachers.TEACHER_INSTRUCTIONS).encode()).hexdigest()
    return {
        "benchmark": args.benchmark,
        "split": split,
        "teacher": args.teacher,
        "prompt_sha256": prompt,
        "max_image_side": args.max_image_side,
    }


def _check_run_config(out: Path, config: dict) -> None:
    """Refuse to mix labels from another benchmark, teacher or prompt into one journal."""
    path = out / RUN_FILE
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"{path} is torn ({e}), so the labels in {out} cannot be checked against this run's benchmark, "
                f"teacher and prompt; if this is the command that made them, delete it and run again, else use "
                f"another --out"
            ) from None
        changed = [f"{k}: {earlier.get(k)!r} -> {v!r}" for k, v in config.items() if earlier.get(k) != v]
        if changed:
            raise DataError(f"{out} holds labels of another run ({'; '.join(changed)}); use another --out")
    else:
        records.write_atomic(path, json.dumps(config, indent=2) + "\n")


def _is_heldout(example_id: str, fraction: float, seed: int) -> bool:
    """sha256(seed, id) read as a number in [0, 1): the same answer for an id however many examples there are."""
    digest = hashlib.sha256(f"heldout\0{seed}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def check_no_eval_examples(paths: Sequence[Path], eval_ids: set[str]) -> None:
    """The explicit split check: no written example may be one of evaluate.py's. DataError naming them otherwise."""
    for path in paths:
        ids = {example.id for example in load_rl_jsonl(path)} if path.stat().st_size else set()
        leaked = sorted(ids & eval_ids)
        if leaked:
            raise DataError(f"{path}: {len(leaked)} examples of evaluate.py's sample, e.g. {leaked[:3]}")


@dataclass
class Summary:
    """Everything the report shows."""

    benchmark: str
    split: str
    teacher: str
    candidates: int
    excluded: int
    drawn: int
    accepted: list[Outcome]
    rejected: list[Outcome]
    remaining: int  # drawn examples with no final outcome yet (--max-new, or API failures to retry)
    train: int
    heldout: int


def write_outputs(out: Path, draw: Draw, args: Args) -> Summary:
    """Read the journal back, write train.jsonl and heldout.jsonl atomically, check them, write the report."""
    journal = read_journal(out / JOURNAL)
    outcomes = [journal[example.id] for example in draw.examples if example.id in journal]
    accepted = [o for o in outcomes if o.status == OK]
    rejected = [o for o in outcomes if o.status == REJECTED and o.final]
    files: dict[str, list[str]] = {TRAIN_FILE: [], HELDOUT_FILE: []}
    for o in accepted:
        record = rl_record(
            o.id, o.image, o.request, o.actions, o.subjects, o.goals, source=args.benchmark, teacher=args.teacher
        )
        name = HELDOUT_FILE if _is_heldout(o.id, args.heldout_fraction, args.seed) else TRAIN_FILE
        files[name].append(json.dumps(record, ensure_ascii=False) + "\n")
    # Write both files beside their targets, check them with train.py's reader, and only then rename them in place.
    staged = {name: out / f"{name}.tmp" for name in files}
    for name, lines in files.items():
        staged[name].write_text("".join(lines), encoding="utf-8")
    check_no_eval_examples(list(staged.values()), draw.eval_ids)
    for name, path in staged.items():
        os.replace(path, out / name)
    summary = Summary(
        args.benchmark,
        draw.split,
        args.teacher,
        draw.candidates,
        draw.excluded,
        len(draw.examples),
        accepted,
        rejected,
        len(draw.examples) - len(accepted) - len(rejected),
        len(files[TRAIN_FILE]),
        len(files[HELDOUT_FILE]),
    )
    report = render_report(summary, args)
    records.write_atomic(out / REPORT_FILE, report)
    print(report)
    return summary


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render_report(s: Summary, args: Args) -> str:
    """The Markdown report: counts, rejects by reason, items per field, the most common items."""
    lines = [f"# Gold decompositions: {s.benchmark} ({s.split}), teacher {s.teacher}", ""]
    lines += _table(
        ["examples", "count"],
        [
            ["in the split", s.candidates],
            [
                f"left out: evaluate.py's sample (limit {args.exclude_eval_limit}, seed {args.exclude_eval_seed})",
                s.excluded,
            ],
            ["drawn for labelling", s.drawn],
            ["accepted", len(s.accepted)],
            ["rejected", len(s.rejected)],
            ["not labelled yet (re-run to continue)", s.remaining],
            [f"{TRAIN_FILE} / {HELDOUT_FILE}", f"{s.train} / {s.heldout}"],
        ],
    )
    used_in = sum(o.input_tokens for o in s.accepted)
    used_out = sum(o.output_tokens for o in s.accepted)
    lines += ["", f"Tokens reported for accepted replies: {used_in:,} input, {used_out:,} output.", ""]
    lines += ["## Rejects by reason", ""]
    by_reason = Counter(o.reason for o in s.rejected)
    first = {}
    for o in s.rejected:
        first.setdefault(o.reason, f"{o.id}: {o.detail}"[:150].replace("|", "\\|").replace("\n", " "))
    rows = [[reason, n, first[reason]] for reason, n in by_reason.most_common()]
    lines += _table(["reason", "count", "first example"], rows) if rows else ["None."]
    lines += ["", "## Items per example (accepted)", ""]
    rows = []
    for name in teachers.LABEL_FIELDS:
        counts = [len(getattr(o, name)) for o in s.accepted] or [0]
        rows.append([name, f"{sum(counts) / len(counts):.2f}", min(counts), max(counts)])
    lines += _table(["field", "mean", "min", "max"], rows)
    lines += ["", f"## Label vocabulary (the {VOCABULARY_SHOWN} most common items)", ""]
    columns = [
        Counter(item for o in s.accepted for item in getattr(o, name)).most_common(VOCABULARY_SHOWN)
        for name in teachers.LABEL_FIELDS
    ]
    depth = max(map(len, columns), default=0)
    vocabulary = [[f"{c[i][0]} ({c[i][1]})" if i < len(c) else "" for c in columns] for i in range(depth)]
    lines += _table(list(teachers.LABEL_FIELDS), vocabulary) if vocabulary else ["No accepted labels yet."]
    return "\n".join(lines) + "\n"


def show_prompts(examples: Sequence[benchmarks.EditExample], max_image_side: int) -> None:
    """--dry-run: print what the teacher would receive for the first examples."""
    for example in examples[:DRY_RUN_SHOWN]:
        image = example.load_image()
        size = "unreadable: " + (example.error or "") if image is None else prepare_image(image, max_image_side).size
        prompt = teachers.teacher_prompt(example.request)
        print(f"--- {example.id} (image {size})\n[system] {teachers.TEACHER_SYSTEM}\n[user] <image>\n{prompt}")


def run(args: Args, teacher: teachers.Teacher | None = None) -> Summary | None:
    """The whole labelling run (see the module docstring); returns None for --dry-run."""
    if not 0 <= args.heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    if teacher is None and not args.dry_run:  # a missing key or model fails here, before any work
        teacher = teachers.make_teacher(
            args.teacher,
            max_concurrency=args.max_concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            parse_retries=args.parse_retries,
        )
    draw = draw_examples(args)
    out = Path(args.out)
    done = read_journal(out / JOURNAL)
    todo = [e for e in draw.examples if e.id not in done or not done[e.id].final]
    if args.max_new:
        todo = todo[: args.max_new]
    print(
        f"{draw.candidates} examples in {args.benchmark} ({draw.split}), {draw.excluded} left out as "
        f"evaluate.py's sample, {len(draw.examples)} drawn, {len(draw.examples) - len(todo)} already "
        f"done, {len(todo)} to label"
    )
    print(
        teachers.estimate_cost(
            [e.request for e in todo], args.max_image_side, args.price_input_per_m, args.price_output_per_m
        )
    )
    if args.dry_run:
        show_prompts(todo, args.max_image_side)
        return None
    out.mkdir(parents=True, exist_ok=True)
    _check_run_config(out, _run_config(args, draw.split))
    label_into_journal(todo, teacher, out, done, args.max_image_side)
    return write_outputs(out, draw, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass_args(Args, argv, description=__doc__.split("\n\n")[0])
    try:
        run(args)
    except (benchmarks.BenchmarkError, DataError, records.RecordFileError, judge.MissingAPIKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # bad input, as train.py and evaluate.py report it


if __name__ == "__main__":
    main()

"""What an evaluation is made of and what it leaves behind: its rows, its records, and Table 1 computed from them.

Rows (`METHODS`, `parse_methods`): a row is a method, "original", "chain", "chain-rl", "think", "chain-rl+think", with
a "/multi" twin for each chain under `--turns single,multi`. To add a method, add a `MethodSpec` to METHODS and, if it
runs differently, a branch in `evaluate.MethodRunner.run`.

Files in --out (written by evaluate.py, read by everything here; records.py makes the writes crash-safe)
    edits.jsonl / edits.rank{r}.jsonl   one `EditRecord` a line (the chain's decomposition and sub-requests included)
    judgements.jsonl                    one `JudgeRecord` a line
    images/<benchmark>/<method>/*.png   the edits; images/<benchmark>/source/*.png the originals
    images/<benchmark>/<method>/turns/  every Think-while-Edit turn's edit (*.turn<k>.png)
    table1.md / .csv                    Table 1: rows methods, columns benchmark x judge, plus Average
    subscores.md / .csv                 fulfilment (0-4), quality (0-3), preservation (0-3), total, failure counts
    report.html, alignment.md / .csv    report.py

The tables are pure functions of the records: `summarize` -> cells, `table1`, `subscore_rows`, `write_tables`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import agents
import records

CRITERIA = ("fulfilment", "quality", "preservation")  # the rubric's sub-scores (judge.Verdict's fields)


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


def mean(values: Sequence[float]) -> float | None:
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
                    setattr(cell, name, mean(values))
                cells[(method, benchmark, label)] = cell
    return cells


def row_average(cells: dict, method: str, columns: Sequence[tuple[str, str]]) -> float | None:
    """The paper's Average: the mean of a row's cells (None while any cell has no judged edit)."""
    totals = [cells[(method, b, j)].total for b, j in columns]
    return None if any(t is None for t in totals) else sum(totals) / len(totals)


def fmt(value: float | None, digits: int = 2) -> str:
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
        md.append([method.id, method.label, *map(fmt, values)])
        rows.append([method.id, method.label, *("" if v is None else repr(v) for v in values)])
    return header, md, rows


SUBSCORE_HEADER = [
    "method", "benchmark", "judge", "judged", "fulfilment (0-4)", "quality (0-3)", "preservation (0-3)",
    "total (0-10)", "bad examples", "edit errors", "judge errors", "missing",
]  # fmt: skip


def subscore_rows(cells: dict, digits: int | None) -> list[list[str]]:
    """One row per cell; digits None keeps full precision (CSV)."""

    def show(value: float | None) -> str:
        return ("" if value is None else repr(value)) if digits is None else fmt(value, digits)

    return [
        [method, benchmark, label, str(c.judged), *(show(getattr(c, n)) for n in (*CRITERIA, "total")),
         str(c.bad_examples), str(c.edit_errors), str(c.judge_errors), str(c.missing)]
        for (method, benchmark, label), c in cells.items()
    ]  # fmt: skip


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A CSV written atomically (records.write_atomic): a reader never sees half a table."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    records.write_atomic(path, buffer.getvalue())


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
    records.write_atomic(out / "table1.md", table1_md)
    write_csv(out / "table1.csv", header, csv_rows)
    records.write_atomic(out / "subscores.md", subscores_md)
    write_csv(out / "subscores.csv", SUBSCORE_HEADER, subscore_rows(cells, None))
    return f"Table 1\n\n{table1_md}\nSub-scores and failures\n\n{subscores_md}"

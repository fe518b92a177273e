"""The evaluation's HTML report and its alignment with human scores (paper §4.1), made from the records alone.

report.html: the tables, then per example the original and every row's edit side by side, with the scores, the
decomposition and sub-requests, and the thinking turns (relative image paths: keep the folder).

Human alignment (`evaluate.py --human-scores FILE.csv`): a CSV with columns example_id, method, fulfilment, quality,
preservation (optional: benchmark; several rows for one edit = several raters, averaged). For each judge it pairs
the human scores with that judge's verdicts on the same edits and reports, per criterion, the human mean, the
judge mean and Pearson's r over the paired edits. Nothing is edited or judged in this mode.
"""

from __future__ import annotations

import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path

import judge
import records
import results
from results import CRITERIA, EditRecord, JudgeRecord, Method

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
    if edit.status != results.OK:  # the chain's plan is still worth seeing when the editor refused it
        failure = f"<b>{_e(method.id)}</b>: {_e(edit.status)}<br>{_e(edit.reason)}"
        return f"<figure><div class='failed'>{failure}</div><div class='chain'>{_chain_html(edit.chain)}</div></figure>"
    scores = []
    for label, verdict in verdicts:
        if verdict is None:
            scores.append(f"{_e(label)}: not judged yet")
        elif verdict.status != results.OK:
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
    header, md_rows, _ = results.table1(cells, methods, columns)
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
        f"<h2>Sub-scores and failures</h2>{_html_table(results.SUBSCORE_HEADER, results.subscore_rows(cells, 2))}"
        f"<h2>Examples</h2><p>Scores: total (fulfilment/quality/preservation); hover for the judge's reason.</p>"
        f"{''.join(sections)}</body></html>"
    )
    path = out / "report.html"
    records.write_atomic(path, page)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Human alignment (paper §4.1)

HUMAN_ALIASES = {"fulfillment": "fulfilment", "id": "example_id"}  # the paper's spelling; a short id column


def read_human_scores(path: Path) -> dict[tuple[str | None, str, str], dict[str, float]]:
    """(benchmark or None, example id, method) -> criterion -> mean over the rows (raters) for that edit."""
    if not path.is_file():
        raise results.HumanScoresError(f"{path}: human-scores file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = {HUMAN_ALIASES.get(c.strip().lower(), c.strip().lower()): c for c in reader.fieldnames or []}
        missing = [c for c in ("example_id", "method", *CRITERIA) if c not in columns]
        if missing:
            raise results.HumanScoresError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
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
                    raise results.HumanScoresError(
                        f"{path}:{lineno}: column {criterion!r} is not a number: {text!r}"
                    ) from None
                if not 0 <= value <= judge.SCORE_MAX[criterion]:
                    raise results.HumanScoresError(
                        f"{path}:{lineno}: {criterion} {value:g} is outside 0-{judge.SCORE_MAX[criterion]}"
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


ALIGNMENT_HEADER = ["judge", "edits", "row", *(f"{c} (0-{judge.SCORE_MAX[c]})" for c in CRITERIA)]


def alignment_rows(
    human: dict[tuple[str | None, str, str], dict[str, float]], judgements: dict[results.JudgeKey, JudgeRecord]
) -> list[list]:
    """Per judge (in order of first record): the human means, the judge's means and Pearson's r over the edits that
    both scored, as [judge, n, "human" | "judge" | "pearson r", fulfilment, quality, preservation] rows."""
    judges = list(dict.fromkeys(r.judge for r in judgements.values()))
    rows = []
    for label in judges:
        verdicts = {k: r for k, r in judgements.items() if r.judge == label and r.status == results.OK}
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
                    raise results.HumanScoresError(
                        f"example {example_id!r} ({method}) is in several benchmarks: add a benchmark column"
                    )
                record = candidates[0] if candidates else None
            if record is not None:
                pairs.append((scores, record))
        n = len(pairs)
        h = {c: [s[c] for s, _ in pairs] for c in CRITERIA}
        j = {c: [getattr(r, c) for _, r in pairs] for c in CRITERIA}
        rows.append([label, n, "human", *(results.mean(h[c]) for c in CRITERIA)])
        rows.append([label, n, "judge", *(results.mean(j[c]) for c in CRITERIA)])
        rows.append([label, n, "pearson r", *(pearson(h[c], j[c]) for c in CRITERIA)])
    return rows


def report_alignment(human_scores: Path, out: Path) -> str:
    """Write alignment.md/.csv in `out` from the human scores CSV and judgements.jsonl; return the Markdown."""
    human = read_human_scores(human_scores)
    judgements = results.read_judgements(out)  # read only: a run may be appending right now
    if not judgements:
        raise results.HumanScoresError(
            f"{out / 'judgements.jsonl'}: no judgements to compare with; run the evaluation first"
        )
    rows = alignment_rows(human, judgements)
    results.write_csv(
        out / "alignment.csv",
        ALIGNMENT_HEADER,
        [[*r[:3], *("" if v is None else repr(v) for v in r[3:])] for r in rows],
    )
    md_rows = [[str(r[0]), str(r[1]), r[2], *(results.fmt(v) for v in r[3:])] for r in rows]
    text = f"Human alignment ({len(human)} human-scored edits)\n\n{results.markdown_table(ALIGNMENT_HEADER, md_rows)}\n"
    records.write_atomic(out / "alignment.md", text)
    return text

"""Tests for evaluate.py: end-to-end runs on CPU that write results, tables and the report; a run killed part-way and
resumed gives the same table as an uninterrupted one; broken examples are failures with reasons; missing keys and
weights stop the run before any work; the human-alignment table matches a hand computation.

The worlds used: the shapes miniature (procedural editor and programmatic judge, milliseconds per edit) with the tiny
Qwen-VL agents, plus a GPT-4o-like judge served by the local OpenAI-compatible server (its verdict is a hash of the
edited image, so it is deterministic, and it refuses one chosen request, to make judge failures); and once a tiny
FLUX Kontext pipeline on a RealEdit-like parquet fixture with the real column names.

Every table is checked against an independent recomputation from the JSONL files (sums of the sub-scores, grouped
here with plain dicts), never against numbers written in this file.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_openai import HTML_PAGE, FakeOpenAIServer, Reply, chat_completion, verdict
from PIL import Image

import editing
import evaluate
import records
import results
from benchmarks import EditExample
from editors import EditError
from miniature import dataset
from results import SetupError

REPO = Path(__file__).resolve().parents[1]
N_SHAPES = 8  # readable shapes examples; the manifest adds two broken ones
METHODS = ["original", "chain", "chain/multi", "chain-rl", "chain-rl/multi"]
JUDGES = ["gpt-4o", "shapes"]


def judge_behaviour(refused_request: str):
    """The fake GPT-4o: scores from a hash of the EDITED image; a non-JSON reply for one request (a judge failure)."""

    def behaviour(request):
        if any(refused_request in text for text in request.texts()):
            return chat_completion("I cannot judge this image.")
        digest = hashlib.sha256(request.image_urls()[1].encode()).digest()
        return verdict(digest[0] % 5, digest[1] % 4, digest[2] % 4, reason="hash of the edited image")

    return behaviour


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory) -> Path:
    """The miniature's test file (dataset.write_jsonl) plus a line with a corrupt image and one without a request."""
    folder = tmp_path_factory.mktemp("shapes_data")
    path = dataset.write_jsonl(dataset.make_dataset(N_SHAPES, seed=3), folder, "test")
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG this is not an image")
    with path.open("a") as f:
        f.write(json.dumps({"id": "zz-corrupt-image", "image": "images/broken.png", "request": "remove the circle"}))
        f.write("\n" + json.dumps({"id": "zz-no-request", "image": "images/shapes-3-00000.png"}) + "\n")
    return path


@pytest.fixture(scope="module")
def server(shapes_manifest):
    refused = json.loads(shapes_manifest.read_text().splitlines()[1])["request"]
    with FakeOpenAIServer(judge_behaviour(refused)) as fake:
        fake.refused_request = refused
        yield fake


def shapes_argv(out: Path, manifest: Path, server: FakeOpenAIServer, agents: dict) -> list[str]:
    return [
        "--editor", "shapes", "--benchmark", f"shapes={manifest}", "--limit", "0", "--seed", "0",
        "--methods", "original,chain,chain-rl", "--turns", "single,multi",
        "--agent-model", str(agents["qwen2_5_vl"]), "--decomposer", str(agents["qwen3_vl"]),
        "--judges", f"gpt-4o=openai:gpt-4o@{server.base_url},shapes", "--judge-concurrency", "2",
        "--agent-batch-size", "1", "--max-new-tokens", "40", "--no-progress", "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, shapes_manifest, server, tiny_models) -> Path:
    """One uninterrupted run, in this process; several tests read its folder."""
    out = tmp_path_factory.mktemp("eval") / "full"
    evaluate.main(shapes_argv(out, shapes_manifest, server, tiny_models))
    return out


# --- independent readers --------------------------------------------------------------------------------------------


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_edits(out: Path) -> list[dict]:
    return [record for path in sorted(out.glob("edits*.jsonl")) for record in jsonl(path)]


def recompute_table1(out: Path, methods: list[str], columns: list[tuple[str, str]]) -> dict[str, list[float]]:
    """method -> [mean total per (benchmark, judge) column..., average], from the JSONL files alone."""
    totals = defaultdict(list)
    for r in jsonl(out / "judgements.jsonl"):
        if r["status"] == "ok":
            totals[(r["method"], r["benchmark"], r["judge"])].append(r["fulfilment"] + r["quality"] + r["preservation"])
    table = {}
    for method in methods:
        cells = [statistics.fmean(totals[(method, b, j)]) for b, j in columns]
        table[method] = cells + [statistics.fmean(cells)]
    return table


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_table_matches_records(out: Path, methods: list[str], columns: list[tuple[str, str]]) -> None:
    expected = recompute_table1(out, methods, columns)
    rows = {row["method"]: row for row in read_csv(out / "table1.csv")}
    assert list(rows) == methods
    for method in methods:
        got = [float(rows[method][f"{b} / {j}"]) for b, j in columns] + [float(rows[method]["Average"])]
        assert got == pytest.approx(expected[method], rel=1e-12)


# --- end to end -----------------------------------------------------------------------------------------------------


def test_end_to_end_run_writes_results_tables_and_report(full_run: Path, shapes_manifest: Path) -> None:
    columns = [("shapes", j) for j in JUDGES]
    assert_table_matches_records(full_run, METHODS, columns)

    edits = all_edits(full_run)
    assert sorted((r["example_id"], r["method"]) for r in edits) == sorted(
        (json.loads(line)["id"], m) for line in shapes_manifest.read_text().splitlines() for m in METHODS
    )
    ok = [r for r in edits if r["status"] == "ok"]
    assert len(ok) == N_SHAPES * len(METHODS)
    for r in ok:  # every edit's image and original are on disk, the same size
        assert Image.open(full_run / r["image"]).size == Image.open(full_run / r["source_image"]).size == (84, 84)
        turns = "original" if r["method"] == "original" else ("multi" if r["method"].endswith("/multi") else "single")
        assert r["chain"]["method"] == turns and r["chain"]["instructions"]
    chained = next(r for r in ok if r["method"] == "chain-rl")
    assert chained["chain"]["decomposition_text"] is not None  # the agents really ran

    judgements = jsonl(full_run / "judgements.jsonl")
    assert len(judgements) == len(ok) * len(JUDGES)
    # Sub-scores: the means of each criterion over the judged edits, and the failures counted.
    subscores = {(r["method"], r["judge"]): r for r in read_csv(full_run / "subscores.csv")}
    for (method, judge_label), row in subscores.items():
        scored = [j for j in judgements if (j["method"], j["judge"], j["status"]) == (method, judge_label, "ok")]
        assert int(row["judged"]) == len(scored)
        assert float(row["quality (0-3)"]) == pytest.approx(statistics.fmean(j["quality"] for j in scored))
        assert int(row["bad examples"]) == 2 and int(row["edit errors"]) == 0 and int(row["missing"]) == 0
        assert int(row["judge errors"]) == (1 if judge_label == "gpt-4o" else 0)  # the refused request

    table_md = (full_run / "table1.md").read_text()
    assert "| chain-rl/multi | ImageEdit-R1, multi-turn |" in table_md and "shapes / gpt-4o" in table_md
    report = (full_run / "report.html").read_text()
    for r in ok:
        assert f"src='{r['image']}'" in report and f"src='{r['source_image']}'" in report
    assert "does not decode" in report and "decomposition did not parse" in report


def _figures(report: str) -> dict[tuple[str, str], str]:
    """(example id, method id) -> the HTML of that edit's figure, cut out of report.html with plain regexes."""
    figures = {}
    for section in re.findall(r"<section>(.*?)</section>", report, flags=re.S):
        example_id = html.unescape(re.search(r"<h3>[^<]*? / ([^<]*)</h3>", section).group(1))
        for figure in re.findall(r"<figure>(.*?)</figure>", section, flags=re.S):
            method = re.search(r"<code>([^<]*)</code>", figure)
            if method:
                figures[(example_id, html.unescape(method.group(1)))] = figure
    return figures


def test_report_shows_each_edits_scores_decomposition_and_sub_requests(full_run: Path, tmp_path: Path) -> None:
    # the tiny random agents write no parsable plan, so one chain-rl record is given a known decomposition and plan
    # on disk, and the report is rebuilt from the results files as a resumed run's summary stage does
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    plan = {"actions": ["recolor", "remove"], "subjects": ["red circle", "blue <square>"], "goals": ["green", "removed"],
            "steps": ["Recolor the red circle to green", "Remove the blue <square>"], "fallback": None}  # fmt: skip
    plan["instructions"] = [" and ".join(plan["steps"])]
    shard = sorted(out.glob("edits*.jsonl"))[0]
    records = jsonl(shard)
    target = next(r for r in records if r["method"] == "chain-rl" and r["status"] == "ok")
    target["chain"].update(plan)
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = sorted({r["example_id"] for r in all_edits(out)})
    evaluate.write_summary(out, {"shapes": ids}, results.parse_methods("original,chain,chain-rl", "single,multi"),
                           JUDGES)  # fmt: skip

    figures = _figures((out / "report.html").read_text())
    verdicts = defaultdict(dict)
    for j in jsonl(out / "judgements.jsonl"):
        verdicts[(j["example_id"], j["method"])][j["judge"]] = j
    ok = [r for r in all_edits(out) if r["status"] == "ok"]
    assert ok and {(r["example_id"], r["method"]) for r in ok} <= set(figures)
    for r in ok:  # every judged edit shows each judge's total and sub-scores, or says the judge failed
        figure = figures[(r["example_id"], r["method"])]
        for judge_label, j in verdicts[(r["example_id"], r["method"])].items():
            if j["status"] == "ok":
                total = j["fulfilment"] + j["quality"] + j["preservation"]
                assert re.search(rf"{re.escape(judge_label)}: <span class='score'[^>]*>{total:.2f}</span>", figure)
            else:
                assert f"{html.escape(judge_label)}: <span title=" in figure and "judge error" in figure
        if r["method"] != "original":  # what the editor was asked, in order
            assert html.escape(" | ".join(r["chain"]["instructions"])) in figure
    figure = figures[(target["example_id"], "chain-rl")]
    for name in ("actions", "subjects", "goals"):  # the decomposition as the agent wrote it, escaped
        assert f"<b>{name}</b>: {html.escape(', '.join(plan[name]))}" in figure
    steps = re.search(r"<b>sub-requests</b>:<ol>(.*?)</ol>", figure, flags=re.S).group(1)
    assert re.findall(r"<li>(.*?)</li>", steps) == [html.escape(step) for step in plan["steps"]]
    assert "<square>" not in figure  # model text never becomes markup


def test_two_worker_run_equals_the_single_process_run(full_run, shapes_manifest, server, tiny_models, tmp_path):
    # --gpus 2 deals the examples to two worker processes with their own agents and editor, appending to their own
    # shard files; the run must be the same run, record for record and pixel for pixel
    out = tmp_path / "two_workers"
    evaluate.main([*shapes_argv(out, shapes_manifest, server, tiny_models), "--gpus", "2"])
    assert len(list(out.glob("edits*.jsonl"))) >= 2  # the workers really wrote their own shards

    def edits_of(folder: Path) -> dict:
        return {(r["example_id"], r["method"]): (r["status"], (r.get("chain") or {}).get("instructions"),
                hashlib.sha256((folder / r["image"]).read_bytes()).hexdigest() if r["status"] == "ok" else None)
                for r in all_edits(folder)}  # fmt: skip

    def judgements_of(folder: Path) -> dict:
        keys = ("status", "fulfilment", "quality", "preservation")
        return {(j["example_id"], j["method"], j["judge"]): tuple(j.get(k) for k in keys)
                for j in jsonl(folder / "judgements.jsonl")}  # fmt: skip

    assert edits_of(out) == edits_of(full_run)
    assert judgements_of(out) == judgements_of(full_run)
    assert read_csv(out / "table1.csv") == read_csv(full_run / "table1.csv")
    assert read_csv(out / "subscores.csv") == read_csv(full_run / "subscores.csv")


def test_corrupt_image_and_missing_field_are_failures_with_reasons(full_run: Path) -> None:
    by_example = defaultdict(list)
    for r in all_edits(full_run):
        by_example[r["example_id"]].append(r)
    for example_id, needle in [("zz-corrupt-image", "does not decode"), ("zz-no-request", "field 'request'")]:
        records = by_example[example_id]
        assert sorted(r["method"] for r in records) == sorted(METHODS)
        assert all(r["status"] == "bad-example" and needle in r["reason"] and r["image"] is None for r in records)
    judged = {r["example_id"] for r in jsonl(full_run / "judgements.jsonl")}
    assert not judged & {"zz-corrupt-image", "zz-no-request"}


def test_judge_failure_is_recorded_with_its_reason(full_run: Path, server: FakeOpenAIServer) -> None:
    failures = [r for r in jsonl(full_run / "judgements.jsonl") if r["status"] != "ok"]
    assert len(failures) == len(METHODS)  # the refused example, under every method, by the fake GPT-4o only
    assert {r["judge"] for r in failures} == {"gpt-4o"}
    assert all("not valid JSON" in r["reason"] and r["total"] is None for r in failures)


# --- a killed run resumes ---------------------------------------------------------------------------------------------


def lines_in(paths) -> int:
    return sum(p.read_bytes().count(b"\n") for p in paths if p.exists())


def start_and_kill(argv: list[str], out: Path, files, at_least: int, timeout: float = 60.0) -> int:
    """Start evaluate.py in its own process group, SIGKILL the group once `files` hold `at_least` records; return
    how many records they held then."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "evaluate.py"), *argv], cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while lines_in(files(out)) < at_least:
            assert process.poll() is None, (
                f"evaluate.py ended before the kill: {process.stderr.read().decode()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no records appeared in time"
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the workers of --gpus share the group
        process.wait()
        process.stderr.close()
    return lines_in(files(out))


def test_killed_run_resumes_to_the_same_table_without_duplicates(
    tmp_path: Path, full_run: Path, shapes_manifest: Path, server: FakeOpenAIServer, tiny_models
) -> None:
    out = tmp_path / "killed"
    argv = shapes_argv(out, shapes_manifest, server, tiny_models)
    n_edits = (N_SHAPES + 2) * len(METHODS)

    # 1. Killed during the edit stage, with two worker processes writing shards.
    held = start_and_kill([*argv, "--gpus", "2"], out, lambda o: sorted(o.glob("edits*.jsonl")), at_least=2)
    assert 2 <= held < n_edits and {p.name for p in out.glob("edits*.jsonl")} <= {
        "edits.rank0.jsonl",
        "edits.rank1.jsonl",
    }
    with (out / "edits.rank0.jsonl").open("ab") as f:  # what a kill in the middle of a write would leave
        f.write(b'{"benchmark": "shapes", "example_id": "shap')

    # 2. Killed during the judge stage (judge replies slowed down so that it is mid-way).
    server.latency = 0.1
    try:
        held = start_and_kill(argv, out, lambda o: [o / "judgements.jsonl"], at_least=2)
    finally:
        server.latency = 0.0
    assert lines_in(sorted(out.glob("edits*.jsonl"))) == n_edits  # the edit stage had finished
    assert 2 <= held < N_SHAPES * len(METHODS) * len(JUDGES)

    # 3. Resumed to the end.
    data = (out / "judgements.jsonl").read_bytes()
    judged_before = data[: data.rfind(b"\n") + 1]  # the complete lines the killed runs left
    evaluate.main(argv)
    assert read_csv(out / "table1.csv") == read_csv(full_run / "table1.csv")
    assert read_csv(out / "subscores.csv") == read_csv(full_run / "subscores.csv")
    edit_keys = [(r["benchmark"], r["example_id"], r["method"]) for r in all_edits(out)]
    judge_keys = [(r["example_id"], r["method"], r["judge"]) for r in jsonl(out / "judgements.jsonl")]
    assert len(edit_keys) == len(set(edit_keys)) == n_edits  # the partial line was cut off and its edit redone once
    assert len(judge_keys) == len(set(judge_keys)) == N_SHAPES * len(METHODS) * len(JUDGES)
    assert (out / "judgements.jsonl").read_bytes().startswith(judged_before)  # done verdicts kept, none redone


def test_adding_a_judge_reuses_the_edits_and_retry_redoes_only_failures(
    tmp_path: Path, full_run: Path, shapes_manifest: Path, server: FakeOpenAIServer, tiny_models
) -> None:
    out = tmp_path / "more"
    shutil.copytree(full_run, out)
    edits_before = (out / "edits.jsonl").read_bytes()
    argv = shapes_argv(out, shapes_manifest, server, tiny_models)
    judges_at = argv.index("--judges") + 1
    argv[judges_at] += ",again=shapes"
    evaluate.main(argv)
    assert (out / "edits.jsonl").read_bytes() == edits_before  # not one edit redone
    new = [r for r in jsonl(out / "judgements.jsonl") if r["judge"] == "again"]
    assert len(new) == N_SHAPES * len(METHODS)
    assert_table_matches_records(out, METHODS, [("shapes", j) for j in [*JUDGES, "again"]])

    # --retry-failed asks again for the failed verdicts only (the judge now answers), and the table uses the success.
    server.route("POST", "/v1/chat/completions", judge_behaviour("no request contains this"))
    try:
        requests_before = len(server.requests)
        evaluate.main([*argv, "--retry-failed"])
    finally:
        server.route("POST", "/v1/chat/completions", judge_behaviour(server.refused_request))
    assert len(server.requests) - requests_before == len(METHODS)
    subscores = read_csv(out / "subscores.csv")
    assert all(row["judge errors"] == "0" and row["bad examples"] == "2" for row in subscores)
    assert all(row["judged"] == str(N_SHAPES) for row in subscores)


def test_an_html_page_for_one_sample_is_a_recorded_failure_that_retry_failed_fills_in(
    tmp_path: Path, shapes_manifest: Path, monkeypatch
) -> None:
    """A proxy answers every judge request about one example with an HTML page (status 200), and the first request
    about another: the run finishes, the second is judged on its retry, the first is a judge-error record with the
    reason; `--retry-failed`, the proxy gone, asks again for that one verdict only and the table has all of them.
    The server also echoes the Authorization header into one valid verdict's reason: the key stays out of the file."""
    secret = "sk-test-ECHOED0key0in0a0reason"
    monkeypatch.setenv("JUDGE_API_KEY", secret)
    lines = [json.loads(line) for line in shapes_manifest.read_text().splitlines()][:N_SHAPES]  # the readable ones
    unlucky, glitched, echoed = lines[2], lines[5], lines[6]
    proxy = {"on": True, "glitched": 0}

    def behaviour(request):
        asked = request.texts()[0]
        glitch = f'Edit Request: "{glitched["request"]}"' in asked and proxy["glitched"] == 0
        proxy["glitched"] += glitch
        if proxy["on"] and (f'Edit Request: "{unlucky["request"]}"' in asked or glitch):
            return Reply(200, HTML_PAGE, content_type="text/html")
        if f'Edit Request: "{echoed["request"]}"' in asked:
            return verdict(3, 2, 1, reason=f"fine; you sent {request.headers['authorization']}")
        return verdict(3, 2, 1, reason="fine")

    out = tmp_path / "out"
    with FakeOpenAIServer(behaviour) as server:
        argv = [
            "--editor", "shapes", "--benchmark", f"shapes={shapes_manifest}", "--limit", "0", "--methods", "original",
            "--judges", f"gpt-4o=openai:gpt-4o@{server.base_url}", "--no-progress", "--out", str(out),
        ]  # fmt: skip
        evaluate.main(argv)
        records = jsonl(out / "judgements.jsonl")
        assert sorted(r["example_id"] for r in records) == sorted(line["id"] for line in lines)
        (failure,) = [r for r in records if r["status"] != "ok"]
        assert failure["example_id"] == unlucky["id"] and failure["status"] == "judge-error"
        assert "not JSON (text/html)" in failure["reason"] and "<!DOCTYPE html>" in failure["reason"]
        assert next(r for r in records if r["example_id"] == glitched["id"])["status"] == "ok"
        assert next(r for r in records if r["example_id"] == echoed["id"])["reason"] == (
            "fine; you sent Bearer [redacted API key]"
        )
        assert secret not in (out / "judgements.jsonl").read_text()
        assert read_csv(out / "subscores.csv")[0]["judge errors"] == "1"

        proxy["on"] = False
        asked_before = len(server.requests)
        evaluate.main([*argv, "--retry-failed"])
        assert len(server.requests) - asked_before == 1
    (row,) = read_csv(out / "subscores.csv")
    assert row["judge errors"] == "0" and row["judged"] == str(N_SHAPES)
    assert_table_matches_records(out, ["original"], [("shapes", "gpt-4o")])


def test_resume_with_different_edit_settings_is_refused(
    full_run: Path, shapes_manifest: Path, server: FakeOpenAIServer, tiny_models
) -> None:
    before = sorted((p.name, p.stat().st_size) for p in full_run.iterdir())
    argv = shapes_argv(full_run, shapes_manifest, server, tiny_models)
    argv[argv.index("--max-new-tokens") + 1] = "41"
    with pytest.raises(SetupError, match="--max-new-tokens was 40"):
        evaluate.main(argv)
    assert sorted((p.name, p.stat().st_size) for p in full_run.iterdir()) == before


# --- a diffusion editor on a benchmark fixture -----------------------------------------------------------------------

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_tiny_flux_on_a_realedit_fixture(tmp_path: Path, server: FakeOpenAIServer, tiny_qwen25, monkeypatch) -> None:
    """RealEdit's columns (input_image, output_image, instruction), one corrupt image and one null instruction;
    --root holds one folder per benchmark; the real "gpt-4o" judge preset, pointed at the local server."""
    from miniature.tiny_pipelines import save_tiny_flux_kontext

    flux = save_tiny_flux_kontext(tmp_path / "flux", seed=0)
    inputs = [{"bytes": png((40 * i, 200, 90)), "path": f"{i}.png"} for i in range(5)]
    inputs[1] = {"bytes": b"\x89PNG truncated", "path": "1.png"}
    instructions = ["make the sky pink", "remove the car", None, "add a hat", "turn it into winter"]
    table = pa.table({
        "input_image": pa.array(inputs, type=HF_IMAGE),
        "output_image": pa.array(inputs, type=HF_IMAGE),
        "instruction": instructions,
        "input_image_name": [f"{i}.jpg" for i in range(5)],
    })  # fmt: skip
    (tmp_path / "data" / "realedit" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "data" / "realedit" / "data" / "test-00000-of-00001.parquet")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    out = tmp_path / "out"
    evaluate.main([
        "--editor", "flux", "--editor-path", str(flux), "--editor-steps", "2", "--editor-dtype", "float32",
        "--benchmark", "realedit", "--root", str(tmp_path / "data"), "--limit", "0",
        "--methods", "original,chain", "--agent-model", str(tiny_qwen25), "--max-new-tokens", "16",
        "--judges", "gpt-4o", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    edits = {(r["example_id"].rsplit("/", 1)[1], r["method"]): r for r in all_edits(out)}
    assert len(edits) == 10
    for row in ("000000", "000003", "000004"):
        for method in ("original", "chain"):
            assert edits[(row, method)]["status"] == "ok"
            assert Image.open(out / edits[(row, method)]["image"]).size == (32, 32)
    assert "does not decode" in edits[("000001", "original")]["reason"]
    assert "field 'instruction' is missing" in edits[("000002", "chain")]["reason"]
    assert len(jsonl(out / "judgements.jsonl")) == 6
    assert_table_matches_records(out, ["original", "chain"], [("realedit", "gpt-4o")])


# --- setup errors -----------------------------------------------------------------------------------------------------


def test_missing_keys_weights_and_models_are_reported_before_any_work(
    tmp_path: Path, shapes_manifest: Path, monkeypatch
) -> None:
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    with pytest.raises(SetupError) as caught:
        evaluate.main([
            "--editor", "flux", "--editor-path", str(tmp_path / "no-flux-here"), "--benchmark", str(shapes_manifest),
            "--methods", "original,chain", "--agent-model", str(tmp_path / "no-agent-here"),
            "--judges", "gpt-4o,gemini-2.5-flash", "--no-progress", "--out", str(out),
        ])  # fmt: skip
    message = str(caught.value)
    for missing in ("OPENAI_API_KEY", "GEMINI_API_KEY", "no-flux-here", "no-agent-here"):
        assert missing in message  # every problem at once, each named
    assert not list(out.glob("*.jsonl")) and not (out / "images").exists() and not (out / "run.json").exists()

    with pytest.raises(SetupError, match="--decomposer"):
        evaluate.main(["--editor", "shapes", "--benchmark", str(shapes_manifest), "--methods", "chain-rl"])


# --- results files ----------------------------------------------------------------------------------------------------


def test_results_reader_cuts_a_partial_last_line_and_rejects_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "judgements.jsonl"
    record = results.JudgeRecord("b", "x", "original", "j", "ok", "fine", 4.0, 3.0, 3.0, 10.0)
    with records.RecordLog(path) as log:
        log.append(record)
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"benchmark": "b", "exam')
    assert records.read_records(path, results.JudgeRecord) == [record]  # read-only: the file is left alone
    assert path.read_bytes() != whole
    assert records.read_records(path, results.JudgeRecord, repair=True) == [record]
    assert path.read_bytes() == whole
    path.write_bytes(b"not json\n" + whole)
    with pytest.raises(records.RecordFileError, match="judgements.jsonl:1"):
        records.read_records(path, results.JudgeRecord)


# --- human alignment --------------------------------------------------------------------------------------------------


def test_human_alignment_matches_a_hand_computation(tmp_path: Path) -> None:
    judge_scores = {  # (example, method) -> judge -> (fulfilment, quality, preservation)
        ("e1", "original"): {"gpt-4o": (4, 3, 3), "gemini": (3, 2, 3)},
        ("e2", "original"): {"gpt-4o": (2, 2, 1), "gemini": (2, 3, 2)},
        ("e3", "chain-rl"): {"gpt-4o": (1, 1, 2), "gemini": (0, 1, 1)},
        ("e4", "chain-rl"): {"gpt-4o": (3, 0, 0)},  # gemini failed on this one: not paired
    }
    with records.RecordLog(tmp_path / "judgements.jsonl") as log:
        for (example, method), by_judge in judge_scores.items():
            for label, (f, q, p) in by_judge.items():
                log.append(results.JudgeRecord("bench", example, method, label, "ok", "", f, q, p, f + q + p))
        log.append(results.JudgeRecord("bench", "e4", "chain-rl", "gemini", "judge-error", "timeout"))
    human_rows = [  # e1 has two raters: their mean is the human score
        ("e1", "original", 4, 2, 3), ("e1", "original", 3, 3, 2), ("e2", "original", 2, 1, 1),
        ("e3", "chain-rl", 1, 1, 3), ("e4", "chain-rl", 2, 0, 1), ("e9", "original", 4, 3, 3),
    ]  # fmt: skip
    with (tmp_path / "humans.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("example_id", "method", "fulfillment", "quality", "preservation"), *human_rows])

    evaluate.main(["--human-scores", str(tmp_path / "humans.csv"), "--out", str(tmp_path)])
    rows = {(r["judge"], r["row"]): r for r in read_csv(tmp_path / "alignment.csv")}

    human = {"e1": (3.5, 2.5, 2.5), "e2": (2, 1, 1), "e3": (1, 1, 3), "e4": (2, 0, 1)}  # by hand, from human_rows
    for label, examples in [("gpt-4o", ["e1", "e2", "e3", "e4"]), ("gemini", ["e1", "e2", "e3"])]:
        pairs = [(human[e], next(v[label] for k, v in judge_scores.items() if k[0] == e)) for e in examples]
        for i, name in enumerate(["fulfilment (0-4)", "quality (0-3)", "preservation (0-3)"]):
            h, j = [p[0][i] for p in pairs], [p[1][i] for p in pairs]
            assert rows[(label, "human")]["edits"] == str(len(examples))
            assert float(rows[(label, "human")][name]) == pytest.approx(sum(h) / len(h))
            assert float(rows[(label, "judge")][name]) == pytest.approx(sum(j) / len(j))
            assert float(rows[(label, "pearson r")][name]) == pytest.approx(statistics.correlation(h, j))
    # One value fully by hand: gpt-4o fulfilment, humans (3.5, 2, 1, 2) against the judge's (4, 2, 1, 3). Deviations
    # from the means 2.125 and 2.5: (1.375, -0.125, -1.125, -0.125) and (1.5, -0.5, -1.5, 0.5), so
    # r = 3.75 / sqrt(3.1875 * 5).
    assert float(rows[("gpt-4o", "pearson r")]["fulfilment (0-4)"]) == pytest.approx(3.75 / (3.1875 * 5) ** 0.5)


# --- an editor that refuses -------------------------------------------------------------------------------------------


class RefusingEditor:
    """Inverts the image, but refuses (EditError, as a safety block would) any instruction with 'forbidden'."""

    name = "refusing"

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        if "forbidden" in instruction:
            raise EditError("blocked by the safety filter")
        return Image.eval(image, lambda v: 255 - v)


def test_an_editor_refusal_is_an_edit_error_record_and_counted(tmp_path: Path, make_image) -> None:
    examples = [
        EditExample("a", make_image(seed=1), "make it brighter", "manifest"),
        EditExample("b", make_image(seed=2), "do the forbidden thing", "manifest"),
    ]
    args = evaluate.Args(out=str(tmp_path), methods="original", judges="unused")
    methods = results.parse_methods(args.methods, args.turns)
    jobs = editing.pending_edits({"mine": examples}, methods, done=set())
    editing.run_edits(jobs, evaluate.edit_settings(args), methods, RefusingEditor(), tmp_path / "edits.jsonl")

    records = {r["example_id"]: r for r in jsonl(tmp_path / "edits.jsonl")}
    assert records["a"]["status"] == "ok" and records["a"]["reason"] is None
    edited = Image.open(tmp_path / records["a"]["image"])
    assert edited.getpixel((0, 0)) == tuple(255 - v for v in examples[0].image.getpixel((0, 0)))
    assert records["b"]["status"] == "edit-error" and records["b"]["image"] is None
    assert "blocked by the safety filter" in records["b"]["reason"]
    assert (tmp_path / records["b"]["source_image"]).is_file()  # the original is kept for the report

    cells = results.summarize({"mine": ["a", "b"]}, ["original"], ["j"], results.read_edits(tmp_path), {})
    assert cells[("original", "mine", "j")].edit_errors == 1 and cells[("original", "mine", "j")].missing == 1


def test_the_design_cards_two_commands_meet(tmp_path: Path, monkeypatch, tiny_qwen25, capsys) -> None:
    # `python train.py --gpus 8` then `python evaluate.py --editor flux`: evaluate.py reads train.py's default export
    import train

    assert evaluate.TRAIN_EXPORT == str(Path(train.Args().output_dir) / "policy")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SetupError, match="run train.py first"):
        evaluate.default_decomposer()
    shutil.copytree(tiny_qwen25, tmp_path / evaluate.TRAIN_EXPORT)
    assert evaluate.default_decomposer() == evaluate.TRAIN_EXPORT
    assert "using train.py's export runs/grpo/policy" in capsys.readouterr().err
    # and the benchmarks come from the folder the README's download commands fill
    assert evaluate.Args().root == "data/benchmarks"
    assert evaluate.benchmark_root("data/benchmarks", "realedit") == "data/benchmarks"  # not there: reported below
    (tmp_path / "data" / "benchmarks" / "realedit").mkdir(parents=True)
    assert evaluate.benchmark_root("data/benchmarks", "realedit") == "data/benchmarks/realedit"

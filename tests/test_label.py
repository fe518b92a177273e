"""Tests for label.py and teachers.py, against the local OpenAI-compatible test server (tests/fake_openai.py).

The fake teacher reads the request out of the prompt ("make the <subject> <goal>") and answers the label a careful
teacher would give, with untidy case and punctuation so that normalisation is exercised; special requests get
malformed, empty, refused or failing replies. The benchmark is a synthetic PSR copy (taesiri/PhotoshopRequests'
real column names) or a manifest; each image is a solid colour that identifies its row.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_openai import FakeOpenAIServer, RecordedRequest, Reply, chat_completion, server_error, slow
from PIL import Image

import benchmarks
import data
import judge
import label
import rewards
import teachers

REPO = Path(__file__).resolve().parents[1]
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SUBJECTS = ["circle", "square", "sky", "car", "hat", "tree", "dog", "cup", "door", "lamp", "boat", "kite"]
GOALS = ["blue", "red", "green", "yellow", "purple"]
N_ROWS, EVAL_LIMIT = 12, 4


def colour(i: int) -> tuple[int, int, int]:
    return (20 * i % 256, 200 - 9 * i % 200, 5 * i % 256)


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), colour(i)).save(buffer, format="PNG")
    return buffer.getvalue()


def request_for(i: int) -> str:
    return f"make the {SUBJECTS[i % len(SUBJECTS)]} {GOALS[i % len(GOALS)]}"


def request_of(sent: RecordedRequest) -> str:
    """The edit request inside a teacher prompt (the last text part starts with "Edit request: ...")."""
    return sent.texts()[-1].split("\n", 1)[0].removeprefix("Edit request: ")


def good_label(request: str) -> Reply:
    _, subject, goal = request.rsplit(" ", 2)
    label = {"actions": ["Recoloring"], "subjects": [f" {subject.title()}"], "goals": [f"{goal.upper()}."]}
    return chat_completion(json.dumps(label))


def expected_gold(request: str) -> tuple[list[str], list[str], list[str]]:
    _, subject, goal = request.rsplit(" ", 2)
    return ["recoloring"], [subject], [goal]


def teacher(special: dict[str, Reply] | None = None):
    """A server behaviour: the special reply for a request if there is one, else the good label."""
    special = special or {}
    return lambda sent: special.get(request_of(sent)) or good_label(request_of(sent))


@pytest.fixture
def psr_root(tmp_path: Path) -> Path:
    root = tmp_path / "psr"
    (root / "data").mkdir(parents=True)
    table = pa.table(
        {
            "original_image": pa.array([{"bytes": png(i), "path": f"{i}.png"} for i in range(N_ROWS)], HF_IMAGE),
            "edit_image": pa.array([{"bytes": png(50 + i), "path": f"e{i}.png"} for i in range(N_ROWS)], HF_IMAGE),
            "description": [request_for(i) for i in range(N_ROWS)],
        }
    )
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet", row_group_size=5)
    return root


@pytest.fixture
def server():
    with FakeOpenAIServer(teacher()) as fake:
        yield fake


def make_args(out: Path, server: FakeOpenAIServer, **kw) -> label.Args:
    settings = {
        "benchmark": "psr",
        "teacher": f"openai:fake-teacher@{server.base_url}",
        "out": str(out),
        "exclude_eval_limit": EVAL_LIMIT,
        "heldout_fraction": 0.3,
        "max_concurrency": 3,
        "max_retries": 0,  # a 5xx is an API failure at once (the client's retries are judge.py's tests' business)
        "timeout": 5.0,
    }
    return label.Args(**(settings | kw))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- parsing a reply ------------------------------------------------------------------------------------------------


def test_parse_label_normalises_exactly_like_rewards() -> None:
    raw = {
        "actions": ["Recoloring", "recoloring "],
        "subjects": [" “Coat.” ", "HAIR"],
        "goals": ["Scarlet", "copper  red"],
    }
    expected = rewards.gold_from_lists(raw["actions"], raw["subjects"], raw["goals"])
    assert teachers.parse_label(json.dumps(raw)) == expected
    assert expected.actions == ["recoloring"] and expected.subjects == ["coat", "hair"]
    assert teachers.parse_label("```json\n" + json.dumps(raw) + "\n```") == expected  # a local model's fence
    assert teachers.parse_label("Sure! Here it is:\n```json\n" + json.dumps(raw) + "\n```\nDone.") == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", teachers.REJECT_EMPTY_REPLY),
        ("   \n", teachers.REJECT_EMPTY_REPLY),
        ("Recoloring: coat, hair", teachers.REJECT_MALFORMED),
        ('{"actions": ["Recoloring"], "subjects": ["coat"]', teachers.REJECT_MALFORMED),
        ('["Recoloring"]', teachers.REJECT_MALFORMED),
        ('{"actions": "Recoloring", "subjects": ["coat"], "goals": ["red"]}', teachers.REJECT_MALFORMED),
        ('{"actions": ["Recoloring"], "subjects": [3], "goals": ["red"]}', teachers.REJECT_MALFORMED),
        ('{"actions": ["Recoloring"], "subjects": ["coat"]}', teachers.REJECT_MALFORMED),
        ("[" * 100_000, teachers.REJECT_MALFORMED),
        ('{"actions": [], "subjects": [], "goals": []}', teachers.REJECT_EMPTY_FIELD),
        ('{"actions": ["Recoloring"], "subjects": ["..."], "goals": ["red"]}', teachers.REJECT_EMPTY_FIELD),
    ],
)
def test_parse_label_rejects_with_its_reason(text: str, reason: str) -> None:
    with pytest.raises(teachers.LabelError) as info:
        teachers.parse_label(text)
    assert info.value.reason == reason


# --- a whole run ----------------------------------------------------------------------------------------------------


def test_labelling_a_benchmark_split_gives_valid_train_input(psr_root, tmp_path, server) -> None:
    out = tmp_path / "rl"
    summary = label.run(make_args(out, server, root=str(psr_root)))
    eval_ids = benchmarks.evaluation_ids("psr", psr_root, EVAL_LIMIT, 0)  # what evaluate.py --limit 4 would use
    train, heldout = data.load_rl_jsonl(out / "train.jsonl"), data.load_rl_jsonl(out / "heldout.jsonl")
    written = {e.id: e for e in train + heldout}
    everything = {e.id: e for e in benchmarks.load_benchmark("psr", psr_root)}
    assert set(written) == set(everything) - eval_ids and len(written) == N_ROWS - EVAL_LIMIT
    assert summary.excluded == EVAL_LIMIT and summary.rejected == [] and summary.remaining == 0
    assert {request_of(sent) for sent in server.requests} == {everything[i].request for i in written}
    for example in train + heldout:
        row = everything[example.id].meta["row"]
        assert example.request == request_for(row)
        gold = example.gold
        assert (gold.actions, gold.subjects, gold.goals) == expected_gold(request_for(row))
        assert example.load_image().getpixel((3, 3)) == colour(row)  # the row's own picture, saved as PNG
    assert {e.id for e in heldout} == {i for i in written if label._is_heldout(i, 0.3, 0)}
    assert train and heldout  # this fixture's ids put examples on both sides
    report = (out / "report.md").read_text()
    assert "| recoloring (8) |" in report and "| accepted | 8 |" in report and "| left out" in report


def test_bad_teacher_replies_are_rejected_with_reasons_and_the_run_goes_on(tmp_path, server) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(i))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG but no image")
    rows = [
        ("good0", "0.png", request_for(0)),
        ("good1", "1.png", request_for(1)),
        ("bad-json", "2.png", "make the bad json"),
        ("empty-reply", "2.png", "make the empty reply"),
        ("empty-field", "2.png", "make the nothing"),
        ("refused", "2.png", "make the refused one"),
        ("api-down", "3.png", "make the server fail"),
        ("good0-copy", "0.png", request_for(0).upper()),  # same pixels, same request up to case
        ("broken-image", "broken.png", request_for(5)),
        ("good2", "3.png", request_for(2)),
    ]
    records = [{"id": i, "image": f"img/{f}", "request": r} for i, f, r in rows]
    records.append({"id": "no-request", "image": "img/0.png"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records))
    special = {
        "make the bad json": chat_completion('{"actions": ["Recoloring"'),
        "make the empty reply": chat_completion(""),
        "make the nothing": chat_completion(json.dumps({"actions": ["Recoloring"], "subjects": [], "goals": ["x"]})),
        "make the refused one": chat_completion(None, refusal="I can't help with that."),
        "make the server fail": server_error(503),
    }
    server.route("POST", "/v1/chat/completions", teacher(special))
    summary = label.run(make_args(tmp_path / "rl", server, benchmark=str(manifest), exclude_eval_limit=-1))

    reasons = {o.id: o.reason for o in summary.rejected}
    assert reasons == {
        "bad-json": teachers.REJECT_MALFORMED,
        "empty-reply": teachers.REJECT_EMPTY_REPLY,
        "empty-field": teachers.REJECT_EMPTY_FIELD,
        "refused": teachers.REJECT_REFUSAL,
        "good0-copy": label.REJECT_DUPLICATE,
        "broken-image": label.REJECT_EXAMPLE,
        "no-request": label.REJECT_EXAMPLE,
    }
    assert summary.remaining == 1  # the API failure is not final: the next run asks again
    assert {o.id for o in summary.accepted} == {"good0", "good1", "good2"}
    sent = Counter(request_of(request) for request in server.requests)
    assert sent["make the bad json"] == 2 and sent["make the empty reply"] == 2  # asked again once (parse_retries=1)
    assert sent["make the refused one"] == 1 and sent["make the nothing"] == 1  # answers, not glitches
    assert sent[request_for(0)] == 1 and sent[request_for(0).upper()] == 0  # the duplicate was never sent
    assert sent[request_for(5)] == 0  # nor the unreadable example
    journal = {o["id"]: o for o in lines(tmp_path / "rl" / "labels.jsonl")}
    assert journal["api-down"]["reason"] == teachers.REJECT_API and "HTTP 503" in journal["api-down"]["detail"]
    assert "does not decode" in journal["broken-image"]["detail"]
    assert "same as good0" in journal["good0-copy"]["detail"]
    report = (tmp_path / "rl" / "report.md").read_text()
    for reason in ("malformed json", "empty reply", "empty field", "refusal", "duplicate", "unreadable example"):
        assert f"| {reason} |" in report

    # The next run asks only for the API failure again, and now it succeeds.
    server.route("POST", "/v1/chat/completions", teacher())
    before = len(server.requests)
    summary = label.run(make_args(tmp_path / "rl", server, benchmark=str(manifest), exclude_eval_limit=-1))
    assert [request_of(r) for r in server.requests[before:]] == ["make the server fail"]
    assert summary.remaining == 0 and {o.id for o in summary.accepted} == {"good0", "good1", "good2", "api-down"}
    ids = [e.id for e in data.load_rl_jsonl(tmp_path / "rl" / "train.jsonl")]
    ids += [e.id for e in data.load_rl_jsonl(tmp_path / "rl" / "heldout.jsonl")] if summary.heldout else []
    assert sorted(ids) == ["api-down", "good0", "good1", "good2"]


def test_a_killed_run_resumes_without_duplicates_and_ends_as_an_uninterrupted_one(psr_root, tmp_path) -> None:
    # The first two replies come at once; later ones hang until the test has killed the labelling process, so the
    # kill always lands mid-run with exactly two results in the journal and two requests in flight.
    gate = {"open": False, "answered": 0}

    def gated(sent: RecordedRequest) -> Reply:
        gate["answered"] += 1  # behaviours run one at a time under the server's lock
        reply = teacher()(sent)
        return reply if gate["open"] or gate["answered"] <= 2 else slow(reply, 60)

    with FakeOpenAIServer(gated) as server:
        killed_out = tmp_path / "killed"
        args = make_args(killed_out, server, root=str(psr_root), max_concurrency=2)
        command = [
            sys.executable,
            str(REPO / "label.py"),
            "--benchmark",
            "psr",
            "--root",
            str(psr_root),
            "--teacher",
            args.teacher,
            "--out",
            str(killed_out),
            "--exclude-eval-limit",
            str(EVAL_LIMIT),
            "--heldout-fraction",
            "0.3",
            "--max-concurrency",
            "2",
            "--max-retries",
            "0",
        ]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        journal = killed_out / "labels.jsonl"
        deadline = time.monotonic() + 30
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 2 and len(server.requests) >= 4):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the labelling subprocess did not get going in 30 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        gate["open"] = True
        assert len(lines(journal)) == 2 and not (killed_out / "train.jsonl").exists()
        with journal.open("a") as f:  # a kill in the middle of a write leaves half a line
            f.write('{"id": "psr/data/train-00000-of-00001/0000')

        sent_before = len(server.requests)
        resumed = label.run(args)
        resent = [request_of(r) for r in server.requests[sent_before:]]
        assert len(resent) == N_ROWS - EVAL_LIMIT - 2  # only what the journal did not hold, each once
        assert len(set(resent)) == len(resent) and not set(resent) & {o["request"] for o in lines(journal)[:2]}

        # The same teacher (the records name it) writing into a fresh folder without interruption.
        whole = label.run(make_args(tmp_path / "whole", server, root=str(psr_root)))
    journal_ids = [o["id"] for o in lines(journal)]
    assert len(journal_ids) == len(set(journal_ids)) == N_ROWS - EVAL_LIMIT
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (killed_out / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert resumed.train == whole.train and resumed.heldout == whole.heldout


def test_image_file_names_are_readable_unique_and_the_same_as_before() -> None:
    def digest(example_id: str) -> str:
        return hashlib.sha256(example_id.encode()).hexdigest()[:10]

    assert label.image_filename("psr/data/train/0007") == f"psr_data_train_0007-{digest('psr/data/train/0007')}.png"
    long_id = "x" * 70 + "/" + "y" * 30 + "."
    assert label.image_filename(long_id) == f"{('x' * 70 + '_' + 'y' * 30)[-80:]}-{digest(long_id)}.png"
    assert label.image_filename("../") == f"-{digest('../')}.png"  # no letter or digit: journals hold this name


def test_max_new_labels_in_chunks_that_add_up_to_one_run(psr_root, tmp_path, server) -> None:
    chunked = tmp_path / "chunked"
    sizes = []
    for _ in range(3):
        summary = label.run(make_args(chunked, server, root=str(psr_root), max_new=3))
        sizes.append(len(summary.accepted))
        assert data.load_rl_jsonl(chunked / "train.jsonl")  # every chunk leaves valid files
    assert sizes == [3, 6, 8]
    label.run(make_args(tmp_path / "whole", server, root=str(psr_root)))
    assert len(server.requests) == 2 * (N_ROWS - EVAL_LIMIT)  # each example asked once per output folder
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (chunked / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_no_evaluation_example_can_reach_the_training_files(psr_root, tmp_path, server) -> None:
    label.run(make_args(tmp_path / "rl", server, root=str(psr_root), exclude_eval_limit=0))  # 0: the whole split
    assert (tmp_path / "rl" / "train.jsonl").read_text() == ""
    assert server.requests == []

    leaked = tmp_path / "leak"
    leaked.mkdir()
    Image.new("RGB", (4, 4)).save(leaked / "x.png")
    record = data.rl_record("psr/x/000001", "x.png", "r", ["a"], ["s"], ["g"])
    (leaked / "train.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(data.DataError, match="1 examples of evaluate.py's sample"):
        label.check_no_eval_examples([leaked / "train.jsonl"], {"psr/x/000001"})


def test_dry_run_sends_nothing_writes_nothing_and_needs_no_key(psr_root, tmp_path, server, monkeypatch, capsys):
    label.run(make_args(tmp_path / "rl", server, root=str(psr_root), dry_run=True))
    assert server.requests == [] and not (tmp_path / "rl").exists()
    printed = capsys.readouterr().out
    assert "cost estimate: 8 requests" in printed and printed.count("[system]") == label.DRY_RUN_SHOWN
    assert "Edit request: make the" in printed and "(image (16, 12))" in printed

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert label.run(make_args(tmp_path / "rl", server, root=str(psr_root), teacher="gpt-4o", dry_run=True)) is None


def test_a_missing_key_is_reported_before_any_work(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = label.Args(benchmark="psr", root=str(tmp_path / "no-such-copy"), teacher="gpt-4o", out=str(tmp_path / "o"))
    with pytest.raises(judge.MissingAPIKeyError, match="OPENAI_API_KEY"):
        label.run(args)  # the key is checked before the (missing) benchmark is even listed
    assert not (tmp_path / "o").exists()


def test_a_corrupt_journal_stops_the_run_with_its_line_and_what_to_do(psr_root, tmp_path, server, capsys) -> None:
    out = tmp_path / "rl"
    out.mkdir()
    (out / "labels.jsonl").write_text('{"id": "a", "status": "ok"}\nnot json\n')
    argv = ["--benchmark", "psr", "--root", str(psr_root), "--teacher", f"openai:fake-teacher@{server.base_url}",
            "--out", str(out), "--exclude-eval-limit", str(EVAL_LIMIT)]  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        label.main(argv)
    assert caught.value.code == 2  # bad input, not a traceback
    err = capsys.readouterr().err
    assert f"{out / 'labels.jsonl'}:2:" in err and "move the file away to start over" in err
    assert server.requests == []


def test_an_output_folder_refuses_labels_of_another_teacher(psr_root, tmp_path, server) -> None:
    label.run(make_args(tmp_path / "rl", server, root=str(psr_root), max_new=1))
    other = make_args(tmp_path / "rl", server, root=str(psr_root))
    other.teacher = other.teacher.replace("fake-teacher", "other-teacher")
    with pytest.raises(data.DataError, match="holds labels of another run.*teacher"):
        label.run(other)


def test_cost_estimate_follows_openais_image_rule() -> None:
    # OpenAI's worked examples for GPT-4o "high" detail: 1024x1024 -> 765 tokens, 2048x4096 -> 1105 tokens.
    assert teachers.gpt4o_image_tokens(1024, 1024) == 765
    assert teachers.gpt4o_image_tokens(2048, 4096) == 1105
    assert teachers.gpt4o_image_tokens(500, 300) == 85 + 170
    requests = ["make the hat red", "crop"]
    estimate = teachers.estimate_cost(requests, 1024, price_input=2.0, price_output=8.0)
    chars = sum(len(teachers.TEACHER_SYSTEM) + len(teachers.teacher_prompt(r)) for r in requests)
    expected_input = -(-chars // 4) + 2 * teachers.gpt4o_image_tokens(1024, 768)
    assert (estimate.requests, estimate.input_tokens, estimate.output_tokens) == (2, expected_input, 120)
    assert estimate.dollars == pytest.approx((expected_input * 2.0 + 120 * 8.0) / 1e6)


def test_teacher_request_has_the_image_prompt_and_strict_schema(psr_root, tmp_path, server) -> None:
    label.run(make_args(tmp_path / "rl", server, root=str(psr_root), max_new=1, max_image_side=8))
    body = server.requests[0].json()
    assert body["model"] == "fake-teacher" and body["temperature"] == 0
    assert body["response_format"] == teachers.LABEL_RESPONSE_FORMAT
    assert body["messages"][0] == {"role": "system", "content": teachers.TEACHER_SYSTEM}
    [url] = server.requests[0].image_urls()
    image = benchmarks.decode_image(base64.b64decode(url.split(",", 1)[1]), "the sent image")
    assert image.size == (8, 6)  # shrunk to --max-image-side before sending, aspect kept
    assert server.requests[0].texts()[-1].endswith(teachers.TEACHER_INSTRUCTIONS)


def test_local_teacher_junk_is_rejected_and_the_run_finishes(psr_root, tmp_path, tiny_qwen25) -> None:
    local = teachers.LocalTeacher(str(tiny_qwen25), max_new_tokens=8)
    args = label.Args(
        benchmark="psr",
        root=str(psr_root),
        teacher=f"local:{tiny_qwen25}",
        out=str(tmp_path / "rl"),
        exclude_eval_limit=EVAL_LIMIT,
        max_new=2,
    )
    summary = label.run(args, teacher=local)
    assert len(summary.rejected) == 2 and not summary.accepted  # a random tiny model writes no JSON
    assert {o.reason for o in summary.rejected} <= {teachers.REJECT_MALFORMED, teachers.REJECT_EMPTY_REPLY}


def test_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        label.main(["--help"])
    text = capsys.readouterr().out
    for field in label.Args.__dataclass_fields__.values():
        assert "--" + field.name.replace("_", "-") in text and field.metadata["help"][:20] in " ".join(text.split())

"""Every OpenAI-compatible caller against every fault of tests/fake_openai.py's catalogue (`FAULTS`).

The callers: the judge (`judge.OpenAIJudge`), the critic (`critics.OpenAICritic`), the labelling teacher
(`teachers.OpenAITeacher`) and the GPT-Image editor (`editors.GPTImageEditor`). Each fault is tried twice per caller:
once (the next request is healthy) and always (every request of that sample gets it). The contract: each sample ends
as an answer (a verdict, a critique, a label, an image), possibly after a retry, or as the caller's typed, recorded
failure (`JudgeFailure`, `CriticFailure`, `LabelError`, `EditError`), never as another exception that would take its
batch down; and the API key is in no answer, failure or exception. A mixed batch of faults and healthy samples loses
none of them.

Clients get max_retries=1 and a 0.5 s timeout, so each transport fault costs at most about a second.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections import Counter

import pytest
from fake_openai import (
    ANSWERING_FAULTS,
    FATAL_KEY_ECHO,
    FAULTS,
    HTML_PAGE,
    HUNG_SECONDS,
    FakeOpenAIServer,
    RecordedRequest,
    Reply,
    chat_completion,
    verdict,
)
from PIL import Image

import critics
import editing
import editors
import evaluate
import judge
import label
import results
import rewards
import teachers
from benchmarks import EditExample
from judge import JudgeFailure, Verdict

KEY_ENV = "FAULT_TEST_KEY"
SECRET = "sk-test-FAULTS9distinctive0key"
ENDPOINT = {"api_key_env": KEY_ENV, "max_retries": 1, "timeout": 0.5}
VERDICT = {"fulfilment": 3, "quality": 2, "preservation": 1, "reason": "the sky is purple"}
LABEL = {"actions": ["Recoloring"], "subjects": ["sky"], "goals": ["purple"]}
CRITIQUE = rewards.render_critique("The sky is still blue.", 4, "Make the sky purple")
TALLY: Counter = Counter()  # faults tried and survived, by caller, for the closing figures


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def images() -> tuple[Image.Image, Image.Image]:
    return Image.new("RGB", (8, 6), (200, 10, 10)), Image.new("RGB", (8, 6), (10, 10, 200))


def faulty(fault, answer: str, times: int | None):
    """A behaviour: `fault` for the first `times` requests (None: all of them), then a healthy reply of `answer`."""
    seen = itertools.count()

    def behaviour(request: RecordedRequest) -> Reply:
        if times is None or next(seen) < times:
            return fault(answer, request)
        return chat_completion(answer)

    return behaviour


def assert_no_key(*things: object) -> None:
    for thing in things:
        assert SECRET not in f"{thing!s} {thing!r}"


MODES = {"once": 1, "always": None}
CASES = [(name, mode) for name in FAULTS for mode in MODES]


# --- the judge -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_judge_turns_each_fault_into_a_verdict_or_a_recorded_failure(name, mode, images) -> None:
    TALLY["tried"] += 1
    answer = json.dumps(VERDICT)
    with FakeOpenAIServer(faulty(FAULTS[name], answer, MODES[mode])) as server:
        j = judge.OpenAIJudge("fake", base_url=server.base_url, parse_retries=1, **ENDPOINT)
        (result,) = j.judge_many([(*images, "make the sky purple")])
    if mode == "once" or name in ANSWERING_FAULTS:  # retried to a healthy reply, or the answer read as a person would
        assert isinstance(result, Verdict), result
        assert (result.fulfilment, result.quality, result.preservation) == (3.0, 2.0, 1.0)
        assert result.reason.startswith(VERDICT["reason"])
    else:
        assert isinstance(result, JudgeFailure) and result.reason.startswith(j.name)
    assert_no_key(result)
    TALLY["survived"] += 1


def test_judge_mixed_batch_of_faults_and_healthy_samples_loses_nothing(images) -> None:
    """20 samples each get one fault on every request, 20 are healthy; concurrency mixes them on the wire."""
    faults = {**FAULTS, "401 echoing the key": FATAL_KEY_ECHO, "out-of-range scores": lambda a, r: verdict(9, 3, -2)}
    assert len(faults) == 20
    requests = [f"fault {name}" for name in faults] + [f"healthy {i}" for i in range(20)]

    def behaviour(request: RecordedRequest) -> Reply:
        text = request.texts()[0]
        fault = next((f for name, f in faults.items() if f'Edit Request: "fault {name}"' in text), None)
        return verdict(*VERDICT.values()) if fault is None else fault(json.dumps(VERDICT), request)

    TALLY["batches"], TALLY["batch samples"] = TALLY["batches"] + 1, TALLY["batch samples"] + len(requests)
    with FakeOpenAIServer(behaviour) as server:
        j = judge.OpenAIJudge("fake", base_url=server.base_url, max_concurrency=8, parse_retries=1, **ENDPOINT)
        results = j.judge_many([(*images, request) for request in requests])
    assert len(results) == len(requests)
    for request, result in zip(requests, results):
        name = request.removeprefix("fault ")
        if request.startswith("healthy") or name in ANSWERING_FAULTS | {"out-of-range scores"}:
            assert isinstance(result, Verdict), (request, result)
        else:
            assert isinstance(result, JudgeFailure), (request, result)
    assert_no_key(results)
    TALLY["batches finished"] += 1
    TALLY["batch results"] += len(results)


# --- the critic ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_critic_turns_each_fault_into_text_or_a_recorded_failure(name, mode, images) -> None:
    TALLY["tried"] += 1
    sample = critics.CritiqueSample(*images, "make the sky purple", "make the sky purple")
    with FakeOpenAIServer(faulty(FAULTS[name], CRITIQUE, MODES[mode])) as server:
        critic = critics.OpenAICritic("fake", base_url=server.base_url, **ENDPOINT)
        (result,) = critic.critique_many([sample])
    transport = name in {"503 page", "429 without Retry-After", "connection reset", "half a body", "hung reply"}
    if name in ANSWERING_FAULTS or (mode == "once" and transport):  # the client retries transport faults itself
        assert isinstance(result, str) and CRITIQUE in result, result
    else:  # a 200 reply with no usable text ends this example's loop, recorded with its reason
        assert isinstance(result, critics.CriticFailure) and result.reason.startswith(critic.name)
    assert_no_key(result)
    TALLY["survived"] += 1


def test_critic_mixed_batch_loses_nothing(images) -> None:
    samples = [critics.CritiqueSample(*images, f"fault {name}", "x") for name in FAULTS]
    samples += [critics.CritiqueSample(*images, f"healthy {i}", "x") for i in range(len(FAULTS))]

    def behaviour(request: RecordedRequest) -> Reply:
        text = " ".join(request.texts())
        name = next((n for n in FAULTS if f"fault {n}" in text), None)
        return chat_completion(CRITIQUE) if name is None else FAULTS[name](CRITIQUE, request)

    TALLY["batches"], TALLY["batch samples"] = TALLY["batches"] + 1, TALLY["batch samples"] + len(samples)
    with FakeOpenAIServer(behaviour) as server:
        results = critics.OpenAICritic("fake", base_url=server.base_url, max_concurrency=8, **ENDPOINT).critique_many(
            samples
        )
    assert len(results) == len(samples)
    assert all(isinstance(r, str) for s, r in zip(samples, results) if s.request.startswith("healthy"))
    assert all(isinstance(r, str | critics.CriticFailure) for r in results)
    assert_no_key(results)
    TALLY["batches finished"] += 1
    TALLY["batch results"] += len(results)


# --- the teacher -----------------------------------------------------------------------------------------------------

# A fault the teacher saw on every request ends as this reject. A reply that is not a chat completion is not the
# model's answer: like an HTTP error it is an API failure, which the next run asks again.
TEACHER_REJECT = {
    "503 page": teachers.REJECT_API,
    "429 without Retry-After": teachers.REJECT_API,
    "connection reset": teachers.REJECT_API,
    "half a body": teachers.REJECT_API,
    "hung reply": teachers.REJECT_API,
    "HTML page": teachers.REJECT_API,
    "HTML labelled JSON": teachers.REJECT_API,
    "empty body": teachers.REJECT_API,
    "JSON array": teachers.REJECT_API,
    "error object with 200": teachers.REJECT_API,
    "no choices": teachers.REJECT_EMPTY_REPLY,
    "choices not a list": teachers.REJECT_API,
    "null message": teachers.REJECT_API,
    "null content": teachers.REJECT_EMPTY_REPLY,
    "refusal": teachers.REJECT_REFUSAL,
}


def test_the_teacher_table_covers_every_fault() -> None:
    assert set(TEACHER_REJECT) | ANSWERING_FAULTS == set(FAULTS)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_teacher_turns_each_fault_into_a_label_or_a_reject_with_its_reason(name, mode, images) -> None:
    TALLY["tried"] += 1
    with FakeOpenAIServer(faulty(FAULTS[name], json.dumps(LABEL), MODES[mode])) as server:
        teacher = teachers.OpenAITeacher("fake", base_url=server.base_url, parse_retries=1, **ENDPOINT)
        try:
            outcome = teacher.label(images[0], "make the sky purple")
        except teachers.LabelError as err:
            outcome = err
    if name in ANSWERING_FAULTS or (mode == "once" and name != "refusal"):  # a refusal is an answer: not asked again
        assert isinstance(outcome, teachers.TeacherReply), outcome
        assert outcome.gold.subjects[0] == "sky" and outcome.gold.goals[0] == "purple"
    else:
        assert isinstance(outcome, teachers.LabelError) and outcome.reason == TEACHER_REJECT[name], outcome
    assert_no_key(outcome, getattr(outcome, "gold", ""))
    TALLY["survived"] += 1


def test_teacher_mixed_batch_labels_every_example_and_the_next_run_retries_the_api_failures(tmp_path) -> None:
    """20 examples meet a fault on every request, 20 are healthy: every one gets a journal line in the first run,
    and the second run (a healthy server) asks again exactly for the API failures."""
    faults = {**FAULTS, "401 echoing the key": FATAL_KEY_ECHO}
    names = [*faults, "hung reply again"]  # 20 fault examples
    (tmp_path / "img").mkdir()
    rows = []
    for i, name in enumerate([*names, *(f"healthy {i}" for i in range(20))]):
        Image.new("RGB", (8, 6), (i, 2 * i, 3 * i)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"id": f"ex{i:02d}", "image": f"img/{i}.png", "request": f"make the sky purple ({name})"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def behaviour(request: RecordedRequest) -> Reply:
        text = request.texts()[-1]
        name = next((n for n in sorted(faults, key=len, reverse=True) if f"({n}" in text), None)
        return chat_completion(json.dumps(LABEL)) if name is None else faults[name](json.dumps(LABEL), request)

    TALLY["batches"], TALLY["batch samples"] = TALLY["batches"] + 1, TALLY["batch samples"] + len(rows)
    args = label.Args(
        benchmark=str(manifest), exclude_eval_limit=-1, out=str(tmp_path / "rl"), max_concurrency=8,
        max_retries=1, timeout=0.5, teacher="unused",
    )  # fmt: skip
    with FakeOpenAIServer(behaviour) as server:
        teacher = teachers.OpenAITeacher("fake", base_url=server.base_url, max_concurrency=8, **ENDPOINT)
        summary = label.run(args, teacher)
    journal = [json.loads(line) for line in (tmp_path / "rl" / "labels.jsonl").read_text().splitlines()]
    assert sorted(o["id"] for o in journal) == sorted(r["id"] for r in rows)  # one outcome each, none lost
    assert_no_key((tmp_path / "rl" / "labels.jsonl").read_text(), (tmp_path / "rl" / "train.jsonl").read_text())
    retry = {o["id"] for o in journal if o["reason"] == teachers.REJECT_API}
    assert len(summary.accepted) >= 20 and summary.remaining == len(retry) > 0

    with FakeOpenAIServer(lambda request: chat_completion(json.dumps(LABEL))) as server:
        teacher = teachers.OpenAITeacher("fake", base_url=server.base_url, max_concurrency=8, **ENDPOINT)
        summary = label.run(args, teacher)
        assert len(server.requests) == len(retry)
    assert summary.remaining == 0
    TALLY["batches finished"] += 1
    TALLY["batch results"] += len(journal)


# --- GPT-Image -------------------------------------------------------------------------------------------------------


def image_reply(colour: tuple[int, int, int] = (0, 200, 0)) -> Reply:
    b64 = base64.b64encode(editors.png_bytes(Image.new("RGB", (16, 16), colour))).decode()
    return Reply(200, {"created": 0, "data": [{"b64_json": b64}]})


IMAGE_FAULTS = {
    "503 page": FAULTS["503 page"],
    "429 without Retry-After": FAULTS["429 without Retry-After"],
    "connection reset": FAULTS["connection reset"],
    "half a body": lambda answer, request: Reply(200, image_reply().body, cut=True),
    "hung reply": lambda answer, request: Reply(200, image_reply().body, delay=HUNG_SECONDS),
    "HTML page": FAULTS["HTML page"],
    "HTML labelled JSON": FAULTS["HTML labelled JSON"],
    "empty body": FAULTS["empty body"],
    "JSON array": FAULTS["JSON array"],
    "error object with 200": FAULTS["error object with 200"],
    "data null": lambda answer, request: Reply(200, {"created": 0, "data": None}),
    "data not a list": lambda answer, request: Reply(200, {"created": 0, "data": "oops"}),
    "b64 not base64": lambda answer, request: Reply(200, {"created": 0, "data": [{"b64_json": "%%%not base64"}]}),
    "b64 not an image": lambda answer, request: Reply(
        200, {"created": 0, "data": [{"b64_json": base64.b64encode(HTML_PAGE.encode()).decode()}]}
    ),
    "400 echoing the key": lambda answer, request: Reply(
        400, {"error": {"message": f"Bad image from {request.headers['authorization']}", "code": None}}
    ),
}


def image_behaviour(fault, times: int | None):
    seen = itertools.count()
    return lambda request: fault("", request) if times is None or next(seen) < times else image_reply()


def gpt_image(server: FakeOpenAIServer) -> editors.GPTImageEditor:
    options = editors.EditorOptions(base_url=server.base_url, api_key=SECRET, timeout_s=0.5, max_retries=1)
    return editors.GPTImageEditor(options)


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in IMAGE_FAULTS for m in MODES])
def test_gpt_image_turns_each_fault_into_an_image_or_an_edit_error(name, mode, make_image) -> None:
    TALLY["tried"] += 1
    server = FakeOpenAIServer()
    server.route("POST", "/v1/images/edits", image_behaviour(IMAGE_FAULTS[name], MODES[mode]))
    transport = name in {"503 page", "429 without Retry-After", "connection reset", "half a body", "hung reply"}
    with server:
        try:
            outcome = gpt_image(server).edit(make_image(size=(16, 16)), "make it green")
        except editors.EditError as err:
            outcome = err
    if mode == "once" and transport:
        assert isinstance(outcome, Image.Image) and outcome.getpixel((0, 0)) == (0, 200, 0)
    else:
        assert isinstance(outcome, editors.EditError), outcome
        assert_no_key(outcome, outcome.__context__, outcome.__cause__)
    TALLY["survived"] += 1


def test_gpt_image_rejected_key_is_a_setup_error_without_the_key(make_image) -> None:
    server = FakeOpenAIServer()
    server.route("POST", "/v1/images/edits", lambda request: FATAL_KEY_ECHO("", request))
    with server, pytest.raises(editors.EditorSetupError) as caught:
        gpt_image(server).edit(make_image(size=(16, 16)), "make it green")
    assert "HTTP 401" in str(caught.value) and "[redacted API key]" in str(caught.value)
    assert_no_key(caught.value, caught.value.__context__, caught.value.__cause__)


def test_gpt_image_mixed_batch_in_evaluate_records_every_example(tmp_path, make_image) -> None:
    """evaluate.py's edit stage with GPT-Image: 15 examples meet a fault on every request, 15 are healthy; every
    example gets its record (an edit, or an edit-error with the reason), and no record holds the key."""
    requests = [f"fault {name}" for name in IMAGE_FAULTS] + [f"healthy {i}" for i in range(len(IMAGE_FAULTS))]
    examples = [EditExample(f"ex{i:02d}", make_image(size=(16, 16), seed=i), r, "m") for i, r in enumerate(requests)]

    def behaviour(request: RecordedRequest) -> Reply:
        name = next((n for n in IMAGE_FAULTS if f"fault {n}".encode() in request.body), None)
        return image_reply() if name is None else IMAGE_FAULTS[name]("", request)

    TALLY["batches"], TALLY["batch samples"] = TALLY["batches"] + 1, TALLY["batch samples"] + len(examples)
    server = FakeOpenAIServer()
    server.route("POST", "/v1/images/edits", behaviour)
    args = evaluate.Args(out=str(tmp_path), methods="original", judges="unused", agent_batch_size=8)
    methods = results.parse_methods(args.methods, args.turns)
    with server:
        jobs = editing.pending_edits({"m": examples}, methods, done=set())
        editing.run_edits(jobs, evaluate.edit_settings(args), methods, gpt_image(server), tmp_path / "edits.jsonl")
    text = (tmp_path / "edits.jsonl").read_text()
    records = {r["request"]: r for r in map(json.loads, text.splitlines())}
    assert sorted(records) == sorted(requests)
    assert all(records[r]["status"] == "ok" for r in requests if r.startswith("healthy"))
    assert all(records[r]["status"] in ("ok", "edit-error") for r in requests)
    assert_no_key(text)
    TALLY["batches finished"] += 1
    TALLY["batch results"] += len(records)


# --- the figures -----------------------------------------------------------------------------------------------------


def test_zz_fault_figures(capsys) -> None:
    """Runs last in this file (name order within the file is definition order; this is the last test)."""
    if not TALLY["tried"]:
        pytest.skip("run the whole file to get the figures")
    lost = TALLY["batch samples"] - TALLY["batch results"]
    crashed = TALLY["batches"] - TALLY["batches finished"]
    with capsys.disabled():
        print(
            f"\nfault figures: {TALLY['tried']} faults tried, {TALLY['survived']} survived; {TALLY['batches']} mixed "
            f"batches of {TALLY['batch samples']} samples, {crashed} crashed, {lost} samples lost"
        )
    assert crashed == 0 and lost == 0

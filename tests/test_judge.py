"""Tests for judge.py: the rubric parser, and OpenAIJudge through the real `openai` client against a fake server.

Transport retries are the openai client's own (see judge.py's docstring); these tests keep them short with
max_retries=1 and Retry-After values well under a second, so the file runs in a few seconds.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time

import pytest
import torch
from fake_openai import (
    FakeOpenAIServer,
    RecordedRequest,
    chat_completion,
    error,
    rate_limited,
    server_error,
    slow,
    verdict,
)
from PIL import Image

import judge
from judge import JudgeError, JudgeFailure, MissingAPIKeyError, OpenAIJudge, Verdict, make_judge, parse_verdict

KEY_ENV = "FAKE_JUDGE_KEY_FOR_TESTS"
SECRET = "sk-test-Zq7DISTINCTIVEfakeKEY0x5eed"  # must never show up anywhere but the Authorization header


@pytest.fixture
def images() -> tuple[Image.Image, Image.Image]:
    """A tiny original (red) and edited (blue) image, distinguishable after a PNG round trip."""
    return Image.new("RGB", (8, 6), (200, 10, 10)), Image.new("RGB", (8, 6), (10, 10, 200))


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def make(server: FakeOpenAIServer, **kw) -> OpenAIJudge:
    settings = {"api_key_env": KEY_ENV, "max_retries": 1, "timeout": 5.0, "max_concurrency": 4} | kw
    return OpenAIJudge("fake-judge", base_url=server.base_url, **settings)


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))).convert("RGB")


# --- parse_verdict -------------------------------------------------------------------------------------------------


def test_parse_plain_json() -> None:
    v = parse_verdict('{"fulfilment": 3, "quality": 2, "preservation": 1, "reason": "ok"}')
    assert v == Verdict(3.0, 2.0, 1.0, "ok")
    assert v.total == 6.0


def test_parse_tolerates_json_fence_and_whitespace() -> None:
    text = '\n```json\n{"fulfilment": 4, "quality": 3, "preservation": 3, "reason": "perfect"}\n```\n'
    assert parse_verdict(text) == Verdict(4.0, 3.0, 3.0, "perfect")
    bare_fence = '```\n{"fulfilment": 0, "quality": 0, "preservation": 0, "reason": ""}\n```'
    assert parse_verdict(bare_fence).total == 0.0


def test_parse_reads_a_fenced_block_after_prose_as_a_person_would() -> None:
    text = (
        "Here is my evaluation of the edit.\n\n```json\n"
        '{"fulfilment": 3, "quality": 2, "preservation": 3, "reason": "close"}\n```\nThe sky is nearly purple.'
    )
    assert parse_verdict(text) == Verdict(3.0, 2.0, 3.0, "close")
    assert judge.json_text('Verdict: ```{"a": 1}``` and ```{"a": 2}```') == '{"a": 1}'  # the first block
    with pytest.raises(JudgeError, match="not valid JSON"):
        parse_verdict("I would give it a 7 out of 10.")  # prose without JSON stays a parse failure


def test_parse_clamps_out_of_range_scores_and_says_so() -> None:
    v = parse_verdict('{"fulfilment": 7, "quality": -1, "preservation": 3, "reason": "odd"}')
    assert (v.fulfilment, v.quality, v.preservation) == (4.0, 0.0, 3.0)
    assert v.reason.startswith("odd")
    assert "clamped" in v.reason and "fulfilment 7 -> 4" in v.reason and "quality -1 -> 0" in v.reason
    assert "preservation" not in v.reason.split("clamped")[1]  # only the out-of-range ones are listed


def test_parse_in_range_scores_have_no_clamp_note() -> None:
    assert "clamped" not in parse_verdict('{"fulfilment": 2.5, "quality": 0, "preservation": 3, "reason": "r"}').reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json at all", "not valid JSON"),
        ('{"fulfilment": 4, "quality": 3', "not valid JSON"),
        ("[4, 3, 3]", "not an object"),
        ('{"fulfilment": 4, "quality": 3, "reason": "x"}', "lacks field(s) preservation"),
        ('{"quality": 3, "preservation": 3}', "lacks field(s) fulfilment, reason"),
        ('{"fulfilment": "4", "quality": 3, "preservation": 3, "reason": "x"}', "'fulfilment' must be a number"),
        ('{"fulfilment": true, "quality": 3, "preservation": 3, "reason": "x"}', "'fulfilment' must be a number"),
        ('{"fulfilment": 4, "quality": NaN, "preservation": 3, "reason": "x"}', "'quality' must be a number"),
        ('{"fulfilment": 4, "quality": 3, "preservation": 3, "reason": 5}', "'reason' must be a string"),
    ],
)
def test_parse_rejects_malformed_replies(text: str, message: str) -> None:
    with pytest.raises(JudgeError, match=re.escape(message)) as caught:
        parse_verdict(text)
    assert isinstance(caught.value, ValueError)


def test_rubric_prompt_is_the_papers_text_with_the_request() -> None:
    prompt = judge.rubric_prompt('make the sky "purple"')
    assert prompt.startswith("You are an expert image quality evaluator. You will be shown two images:")
    assert 'Edit Request: "make the sky "purple""' in prompt
    assert "1. Request Fulfillment (0–4 points)" in prompt and "3. Preservation (0–3 points)" in prompt
    assert "A score of 10 means perfect execution in all aspects." in prompt
    assert '"fulfilment"' in prompt and '"reason"' in prompt  # the answer-format instruction follows the rubric


# --- OpenAIJudge against the fake server -----------------------------------------------------------------------------


def test_request_carries_rubric_both_images_in_order_and_strict_schema(key, images) -> None:
    original, edited = images
    with FakeOpenAIServer() as server:
        v = make(server, temperature=0.0).judge(original, edited, "turn the square blue")
    assert v == Verdict(4.0, 3.0, 3.0, "fake verdict")
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    body = request.json()
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["strict"] is True
    assert set(body["response_format"]["json_schema"]["schema"]["required"]) == {
        "fulfilment",
        "quality",
        "preservation",
        "reason",
    }
    assert request.texts() == [judge.rubric_prompt("turn the square blue")]
    first, second = (decode_data_url(url) for url in request.image_urls())
    assert first.getpixel((0, 0)) == original.getpixel((0, 0))  # ORIGINAL first, as the rubric says
    assert second.getpixel((0, 0)) == edited.getpixel((0, 0))


def test_key_is_sent_only_in_the_authorization_header(key, images) -> None:
    with FakeOpenAIServer() as server:
        make(server).judge(*images, "x")
    (request,) = server.requests
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    elsewhere = [value for name, value in request.headers.items() if name != "authorization"]
    assert not any(SECRET in value for value in elsewhere)
    assert SECRET.encode() not in request.body and SECRET not in request.path


def test_rate_limit_honours_retry_after_then_succeeds(key, images) -> None:
    with FakeOpenAIServer() as server:
        server.enqueue(rate_limited(retry_after=1.0))
        start = time.perf_counter()
        v = make(server).judge(*images, "x")
        elapsed = time.perf_counter() - start
    assert v.total == 10.0
    assert len(server.requests) == 2
    # The client's own backoff for a first retry is at most 0.5 s; waiting ~1 s shows Retry-After was used.
    assert elapsed >= 0.95, elapsed


def test_server_error_is_retried_then_succeeds(key, images) -> None:
    with FakeOpenAIServer() as server:
        server.enqueue(server_error(500))
        v = make(server).judge(*images, "x")
    assert v.total == 10.0 and len(server.requests) == 2


def test_server_error_every_time_becomes_a_failure_naming_the_status(key, images) -> None:
    with FakeOpenAIServer(lambda request: server_error(503)) as server:
        (result,) = make(server).judge_many([(*images, "x")])
    assert isinstance(result, JudgeFailure) and "HTTP 503" in result.reason
    assert len(server.requests) == 2  # the first try and max_retries=1 retry


def test_reply_slower_than_timeout_is_retried(key, images) -> None:
    with FakeOpenAIServer() as server:
        server.enqueue(slow(verdict(), 3.0))
        v = make(server, timeout=0.5).judge(*images, "x")
    assert v.total == 10.0 and len(server.requests) == 2


def test_reply_always_slower_than_timeout_becomes_a_failure(key, images) -> None:
    with FakeOpenAIServer(lambda request: slow(verdict(), 3.0)) as server:
        (result,) = make(server, timeout=0.5).judge_many([(*images, "x")])
    # each attempt gave up at the client's timeout (a 3 s reply would have been a verdict): two attempts, no verdict
    assert isinstance(result, JudgeFailure) and "timeout" in result.reason
    assert len(server.requests) == 2


def test_malformed_json_is_asked_again_then_becomes_a_failure(key, images) -> None:
    with FakeOpenAIServer(lambda request: chat_completion("the edit looks {great")) as server:
        (result,) = make(server, parse_retries=2).judge_many([(*images, "x")])
    assert isinstance(result, JudgeFailure)
    assert "no valid verdict in 3 replies" in result.reason and "not valid JSON" in result.reason
    assert len(server.requests) == 3


def test_malformed_json_then_valid_reply_gives_a_verdict(key, images) -> None:
    with FakeOpenAIServer() as server:
        server.enqueue(chat_completion("```json\n{oops\n```"))
        v = make(server).judge(*images, "x")
    assert v.total == 10.0 and len(server.requests) == 2


def test_refusal_becomes_a_failure_with_its_text(key, images) -> None:
    with FakeOpenAIServer(lambda request: chat_completion(None, refusal="I cannot judge this")) as server:
        (result,) = make(server, parse_retries=0).judge_many([(*images, "x")])
    assert isinstance(result, JudgeFailure) and "refused" in result.reason and "I cannot judge this" in result.reason


def test_out_of_range_scores_from_the_server_are_clamped(key, images) -> None:
    with FakeOpenAIServer(lambda request: verdict(9, 3, -2, "generous")) as server:
        v = make(server).judge(*images, "x")
    assert (v.fulfilment, v.quality, v.preservation) == (4.0, 3.0, 0.0)
    assert "clamped" in v.reason


def test_mixed_batch_finishes_with_one_result_per_sample_in_order(key, images) -> None:
    """Each sample's request text picks its fate; results must line up with the samples despite concurrency."""
    fates = ["ok:4", "bad-json", "ok:2", "http-400", "slow-ok:1", "rate-limited-once", "ok:0", "refuse"]
    seen: dict[str, int] = {}

    def behaviour(request: RecordedRequest) -> object:
        fate = next(f for f in fates if f'Edit Request: "{f}"' in request.texts()[0])
        seen[fate] = seen.get(fate, 0) + 1
        if fate.startswith(("ok:", "slow-ok:")):
            reply = verdict(int(fate.split(":")[1]), 1, 1, fate)
            return slow(reply, 0.2) if fate.startswith("slow") else reply
        if fate == "rate-limited-once":
            return rate_limited(0.05) if seen[fate] == 1 else verdict(3, 3, 3, fate)
        if fate == "http-400":
            return error(400, "Invalid image (fake)")
        if fate == "refuse":
            return chat_completion(None, refusal="no")
        return chat_completion("{not json")

    done = []
    with FakeOpenAIServer(behaviour) as server:
        results = make(server, parse_retries=1, max_concurrency=3).judge_many(
            [(*images, fate) for fate in fates], progress=done.append
        )
    assert len(results) == len(fates) and sum(done) == len(fates)
    for fate, result in zip(fates, results):
        if fate.startswith(("ok:", "slow-ok:")):
            assert isinstance(result, Verdict) and result.reason == fate
            assert result.fulfilment == float(fate.split(":")[1])
        elif fate == "rate-limited-once":
            assert isinstance(result, Verdict) and result.reason == fate
        else:
            assert isinstance(result, JudgeFailure), fate
    assert "HTTP 400" in results[fates.index("http-400")].reason
    assert seen["http-400"] == 1  # a 400 is not retried by the client
    assert seen["bad-json"] == 2 and seen["refuse"] == 2  # parse_retries=1: asked twice


def test_api_key_never_appears_in_logs_output_reprs_or_failures(key, images, caplog, capsys) -> None:
    """Even when the server echoes the key back in an error body (OpenAI's 401 does, partly), it stays hidden."""
    calls = {"n": 0}

    def behaviour(request: RecordedRequest) -> object:
        calls["n"] += 1
        if "echo" in request.texts()[0]:
            return error(401, f"Incorrect API key provided: {SECRET}.")
        if calls["n"] == 1:
            return rate_limited(0.01)  # makes the client log a retry
        return verdict()

    caplog.set_level(logging.DEBUG)  # the openai and httpx loggers log every request and retry at DEBUG/INFO
    with FakeOpenAIServer(behaviour) as server:
        j = make(server, max_concurrency=1)
        results = j.judge_many([(*images, "fine"), (*images, "echo the key"), (*images, "fine again")])
        with pytest.raises(JudgeError) as caught:
            j.judge(*images, "echo again")
    failure = results[1]
    assert isinstance(failure, JudgeFailure) and "HTTP 401" in failure.reason and "redacted" in failure.reason
    assert all(isinstance(results[i], Verdict) for i in (0, 2))
    out, err = capsys.readouterr()
    haystacks = {
        "log": caplog.text,
        "stdout": out,
        "stderr": err,
        "results": repr(results),
        "judge": repr(j) + str(vars(j).get("name")),
        "exception": f"{caught.value!s} {caught.value!r} {caught.value.__cause__!r} {caught.value.__context__!r}",
    }
    assert caplog.records, "expected the openai client to log retries, so the check below means something"
    leaks = [where for where, text in haystacks.items() if SECRET in text]
    assert leaks == []


def test_concurrency_is_real_and_bounded(key, images) -> None:
    n, latency, concurrency = 16, 0.3, 8
    with FakeOpenAIServer(latency=latency) as server:
        results = make(server, max_concurrency=concurrency).judge_many([(*images, f"edit {i}") for i in range(n)])
    assert all(isinstance(r, Verdict) for r in results)
    # requests really overlap (the server counts those in flight at once), and never more than the bound
    assert 1 < server.max_in_flight <= concurrency


def test_missing_key_fails_at_construction_naming_the_variable(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
        OpenAIJudge("fake-judge", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
        OpenAIJudge("fake-judge", base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV)


# --- presets ---------------------------------------------------------------------------------------------------------


def test_presets_pick_model_url_and_key_variable(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("GEMINI_API_KEY", SECRET)
    gpt = make_judge("gpt-4o", max_concurrency=2)
    assert (gpt.model, gpt.base_url, gpt.api_key_env, gpt.max_concurrency) == ("gpt-4o", None, "OPENAI_API_KEY", 2)
    gemini = make_judge("gemini-2.5-flash")
    assert gemini.model == "gemini-2.5-flash" and gemini.api_key_env == "GEMINI_API_KEY"
    assert gemini.base_url == "https://generativelanguage.googleapis.com/v1beta/openai/"
    assert SECRET not in repr(gpt) + repr(gemini)
    monkeypatch.delenv("GEMINI_API_KEY")
    with pytest.raises(MissingAPIKeyError, match="GEMINI_API_KEY"):
        make_judge("gemini-2.5-flash")


def test_openai_compatible_spec_sends_a_dummy_key_unless_one_is_set(monkeypatch, images) -> None:
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    with FakeOpenAIServer() as server:
        j = make_judge(f"openai:Qwen/Qwen2.5-VL-7B-Instruct@{server.base_url}", max_retries=0)
        assert j.judge(*images, "x").total == 10.0
        monkeypatch.setenv("JUDGE_API_KEY", SECRET)
        make_judge(f"openai:m@{server.base_url}").judge(*images, "x")
    assert server.requests[0].json()["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"
    assert server.requests[1].headers["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("spec", ["gpt-5-imaginary", "openai:model-without-url", "openai:@http://x/v1", "local:"])
def test_bad_specs_are_refused_with_the_expected_forms(spec) -> None:
    with pytest.raises(ValueError, match="judge spec"):
        make_judge(spec)


# --- LocalJudge (a tiny offline Qwen2.5-VL) --------------------------------------------------------------------------


def test_local_judge_feeds_both_images_and_parses_the_decoded_reply(tiny_qwen25, make_image, monkeypatch) -> None:
    """The real processor and chat template; `generate` is replaced so the reply is a known, valid verdict."""
    j = make_judge(f"local:{tiny_qwen25}", max_new_tokens=32)
    answer = '{"fulfilment": 3, "quality": 2, "preservation": 5, "reason": "sky is purple"}'
    answer_ids = j.processor.tokenizer(answer, return_tensors="pt")["input_ids"]  # (1, T)
    seen = {}

    def fake_generate(**inputs):
        seen.update(inputs)
        return torch.cat([inputs["input_ids"], answer_ids], dim=1)  # (1, P+T), as generate returns

    monkeypatch.setattr(j.model, "generate", fake_generate)
    original, edited = make_image(size=(32, 32), seed=1), make_image(size=(48, 32), seed=2)
    v = j.judge(original, edited, "make the sky purple")
    assert v.fulfilment == 3.0 and v.quality == 2.0 and v.preservation == 3.0 and "clamped" in v.reason
    config = seen["generation_config"]  # explicit: nothing of the checkpoint's generation_config is inherited
    assert config.do_sample is False and config.max_new_tokens == 32 and config.repetition_penalty is None
    assert seen["image_grid_thw"].shape == (2, 3)  # both images reached the model
    # The first image's grid is the ORIGINAL's (32x32 -> fewer patches than the 48x32 EDITED image).
    assert seen["image_grid_thw"][0].prod() < seen["image_grid_thw"][1].prod()
    prompt = j.processor.tokenizer.decode(seen["input_ids"][0])
    assert 'Edit Request: "make the sky purple"' in prompt


def test_local_judge_turns_an_unparsable_generation_into_a_failure(tiny_qwen25, make_image) -> None:
    """A random tiny model greedily decodes junk: the batch still finishes, with a failure that says why."""
    j = make_judge(f"local:{tiny_qwen25}", max_new_tokens=8)
    done = []
    results = j.judge_many([(make_image(seed=3), make_image(seed=4), "x")] * 2, progress=done.append)
    assert sum(done) == 2 and len(results) == 2
    assert all(isinstance(r, JudgeFailure) and r.reason.startswith(f"local:{tiny_qwen25}") for r in results)
    assert "not valid JSON" in results[0].reason

"""VLM judges that score an image edit on the paper's rubric (ImageEdit-R1, Table 2).

A judge looks at the ORIGINAL image, the EDITED image and the edit request, and returns a `Verdict`: request
fulfilment (0-4), image quality (0-3) and preservation of unrelated areas (0-3), which add up to the 0-10 score the
paper reports in Table 1. The prompt is the paper's Table 2 text, word for word (`RUBRIC_PROMPT`), followed by one
sentence of ours that asks for a JSON answer (`ANSWER_FORMAT`); the paper does not say how it parsed the scores.

Two kinds of judge share one small interface (`name`, `judge(original, edited, request) -> Verdict`,
`judge_many(samples) -> list[Verdict | JudgeFailure]`), so `evaluate.py` and the reward code can take either:

- `OpenAIJudge` talks to any OpenAI-compatible chat-completions server through the official `openai` client:
  GPT-4o and Gemini 2.5 Flash (the paper's two judges; Gemini through Google's OpenAI-compatible endpoint) or a local
  vLLM server. Both images travel as PNG data URLs in `image_url` parts, in the order the rubric names them, and the
  reply is constrained by a strict JSON schema. Structured output does not enforce numeric bounds, so
  `parse_verdict` validates and clamps every score in code.
- `LocalJudge` runs a transformers VLM in this process with greedy decoding and parses its text the same way.

Failure handling, from the wire up:

1. Transport. The `openai` client (checked against openai 3.57) retries HTTP 408, 409, 429 and 5xx, timeouts and
   connection errors up to `max_retries` times. It sleeps for the server's `Retry-After` / `retry-after-ms` when that
   is given and at most 120 s, else for an exponential backoff of 0.5 s * 2^n (at most 8 s, minus up to 25 % jitter).
   We rely on that and add no transport retry loop of our own.
2. Content. A 200 reply is read from its raw body by `read_reply`, the one reader of chat-completion replies: it gives
   the text, or a ReplyError whose kind says why there is none (not a chat completion at all, such as an HTML page
   from a proxy or a captive portal; a refusal; no text). A reply with no text, or whose text is not a valid
   verdict (bad JSON, a missing field), is asked again up to `parse_retries` times, then given up on.
3. Batch. `judge_many` keeps at most `max_concurrency` requests in flight (a thread pool sharing one client) and turns
   each sample's `JudgeError` into a `JudgeFailure` carrying the reason, so a batch always finishes with one result
   per sample, in order. Failures are counted by the caller, never scored as zero here.

The API key is read only from the environment variable the caller names, at construction (a missing key fails
before any work starts). It is handed to the client, which sends it only as the `Authorization` header; it is kept
out of every message we build (errors are redacted, since servers sometimes echo the key back) and out of `repr`.
The reply text is redacted too, so a server that echoes the header into an answer cannot put the key into a verdict's
reason or a label. These conventions (key, client, transport errors, reading the reply, redaction) are implemented
once, in `ChatEndpoint.complete`, which `OpenAIJudge`, data.py's teacher and evaluate.py's critic all build on;
`parse_api_spec` reads the specs all three accept ("gpt-4o", "gemini-2.5-flash", "openai:MODEL@URL"), and `json_text`
finds the JSON in a reply (bare, or in a fenced block after some prose) for every caller that parses JSON.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import openai
from PIL import Image

FULFILMENT_MAX, QUALITY_MAX, PRESERVATION_MAX = 4, 3, 3  # the paper's Table 2 rubric


@dataclass(frozen=True)
class Verdict:
    """One judged edit: the three rubric sub-scores, their total (0-10), and the judge's reason."""

    fulfilment: float  # 0-4: did the edit accomplish the request
    quality: float  # 0-3: is the edited image realistic and coherent
    preservation: float  # 0-3: are unrelated parts preserved
    reason: str = ""

    @property
    def total(self) -> float:
        return self.fulfilment + self.quality + self.preservation


@dataclass(frozen=True)
class JudgeFailure:
    """A sample the judge could not score (API error after retries, or no valid verdict); `reason` says why."""

    reason: str


class JudgeError(ValueError):
    """A judge reply or request failed: malformed JSON, a missing or mistyped field, an API error after retries."""


class MissingAPIKeyError(RuntimeError):
    """The environment variable that should hold an API key (a judge's, the teacher's, the critic's) is unset or empty."""


class ChatError(RuntimeError):
    """A chat-completions request that failed after the client's retries: timeout, connection or HTTP status.

    The message names the endpoint and the problem, with the API key already redacted. It is raised outside any
    `except` block, so the openai error (whose text may echo the key) is not attached as its __context__.
    """


REPLY_NOT_A_COMPLETION = "not a chat completion"  # an HTML page, an empty body, JSON of another shape
REPLY_REFUSAL = "refusal"  # the model's `refusal` field (structured output) or a refusal content part
REPLY_NO_TEXT = "no text"  # no choices, or a message whose content is null or blank


class ReplyError(ValueError):
    """A 200 chat-completions reply with no usable text. `kind` is REPLY_NOT_A_COMPLETION, REPLY_REFUSAL or
    REPLY_NO_TEXT; the message says what the server sent (from `ChatEndpoint.complete`, with the key redacted)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ChatReply:
    """The text of a chat completion's first choice, and the tokens the server says it used (0 when it does not)."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0


# ---------------------------------------------------------------------------------------------------------------------
# The rubric (paper, Table 2) and the answer format (ours)

RUBRIC_PROMPT = """You are an expert image quality evaluator. You will be shown two images:
1. The ORIGINAL image (first image)
2. The EDITED image (second image)
Edit Request: "{edit_request}"
Please evaluate how well the edited image fulfills the edit request compared to the original image.
Evaluation Criteria:
1. Request Fulfillment (0–4 points): Did the edit successfully accomplish what was requested?
- 4: Perfectly fulfills the request
- 3: Mostly fulfills the request with minor issues
- 2: Partially fulfills the request
- 1: Barely fulfills the request
- 0: Does not fulfill the request
2. Image Quality (0–3 points): Is the edited image realistic, coherent, and high quality?
- 3: Excellent quality, looks natural and professional
- 2: Good quality with minor artifacts or inconsistencies
- 1: Noticeable quality issues or artifacts
- 0: Poor quality, obviously edited
3. Preservation (0–3 points): Are unrelated parts of the image properly preserved?
- 3: All unrelated areas perfectly preserved
- 2: Minor changes to unrelated areas
- 1: Significant unwanted changes
- 0: Major damage to unrelated areas
Be strict but fair in your evaluation. A score of 10 means perfect execution in all aspects."""

# Ours: the paper does not give its answer format. The key order matches Verdict's fields.
ANSWER_FORMAT = (
    "Answer with a single JSON object and nothing else, in this form: "
    '{"fulfilment": <integer 0-4>, "quality": <integer 0-3>, "preservation": <integer 0-3>, '
    '"reason": "<one or two sentences explaining the scores>"}'
)

SCORE_MAX = {"fulfilment": FULFILMENT_MAX, "quality": QUALITY_MAX, "preservation": PRESERVATION_MAX}

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "fulfilment": {"type": "integer", "description": f"Request fulfillment, 0 to {FULFILMENT_MAX}"},
        "quality": {"type": "integer", "description": f"Image quality, 0 to {QUALITY_MAX}"},
        "preservation": {"type": "integer", "description": f"Preservation, 0 to {PRESERVATION_MAX}"},
        "reason": {"type": "string", "description": "One or two sentences explaining the scores"},
    },
    "required": ["fulfilment", "quality", "preservation", "reason"],
    "additionalProperties": False,  # strict mode requires it
}

# Chat-completions structured output. Strict mode guarantees the keys and types, not the 0-4 / 0-3 bounds.
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "edit_verdict", "strict": True, "schema": VERDICT_SCHEMA},
}


def rubric_prompt(request: str) -> str:
    """The full text a judge reads: the paper's rubric with the edit request filled in, then the answer format."""
    return RUBRIC_PROMPT.format(edit_request=request) + "\n\n" + ANSWER_FORMAT


# ---------------------------------------------------------------------------------------------------------------------
# Parsing a reply

_FENCED_BLOCK = re.compile(r"```[A-Za-z0-9_-]*[ \t]*(.*?)```", re.DOTALL)  # ```json ... ```, any tag or none


def snippet(text: str, limit: int = 200) -> str:
    """A reply quoted in an error message: repr, cut at `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def json_text(text: str) -> str:
    """The JSON in a model's reply, found as a person reading it would: the whole reply when it starts as JSON,
    else the first fenced block (```json ... ```), prose before and after it ignored, else the reply itself."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        return stripped
    fenced = _FENCED_BLOCK.search(stripped)
    return fenced.group(1).strip() if fenced else stripped


def parse_verdict(text: str) -> Verdict:
    """Parse a judge's JSON reply into a Verdict, clamping out-of-range scores and noting that in `reason`.

    Accepts the bare object or one in a fenced block, with prose around it (`json_text`). Raises JudgeError for text
    that is not a JSON object, a missing field, a score that is not a finite number (booleans and numeric strings are
    refused) or a reason that is not a string.
    """
    try:
        data = json.loads(json_text(text))
    except json.JSONDecodeError as err:
        raise JudgeError(
            f"judge reply is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): {snippet(text)}"
        ) from None
    if not isinstance(data, dict):
        raise JudgeError(f"judge reply is JSON but not an object (got {type(data).__name__}): {snippet(text)}")
    missing = [key for key in [*SCORE_MAX, "reason"] if key not in data]
    if missing:
        raise JudgeError(f"judge reply lacks field(s) {', '.join(missing)}: {snippet(text)}")

    scores, clamped = {}, []
    for key, high in SCORE_MAX.items():
        value = data[key]
        # bool is an int subclass in Python; "true" is not a score.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise JudgeError(f"judge reply field {key!r} must be a number, got {value!r}: {snippet(text)}")
        scores[key] = float(min(max(value, 0), high))
        if scores[key] != value:
            clamped.append(f"{key} {value} -> {scores[key]:g}")
    reason = data["reason"]
    if not isinstance(reason, str):
        raise JudgeError(f"judge reply field 'reason' must be a string, got {reason!r}: {snippet(text)}")
    if clamped:
        reason = f"{reason} [clamped out-of-range scores: {', '.join(clamped)}]"
    return Verdict(scores["fulfilment"], scores["quality"], scores["preservation"], reason)


# ---------------------------------------------------------------------------------------------------------------------
# API judges (GPT-4o, Gemini 2.5 Flash, any OpenAI-compatible server)


def png_data_url(image: Image.Image) -> str:
    """Encode an image as a `data:image/png;base64,...` URL (lossless, so the judge sees exactly our pixels)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def rubric_messages(original: Image.Image, edited: Image.Image, request: str) -> list[dict]:
    """One user turn: the rubric text, then the ORIGINAL image, then the EDITED image (the order the rubric names)."""
    content = [
        {"type": "text", "text": rubric_prompt(request)},
        {"type": "image_url", "image_url": {"url": png_data_url(original)}},
        {"type": "image_url", "image_url": {"url": png_data_url(edited)}},
    ]
    return [{"role": "user", "content": content}]


TEXT_PART_TYPES = ("text", "output_text")  # content parts that carry text, in the chat and the responses API shapes


def read_reply(body: str, content_type: str = "application/json") -> ChatReply:
    """The text of a chat completion's first choice, read from the raw body of a 200 reply, whatever it holds.

    This is the only reader of chat-completion replies: the `openai` client hands back a bare string for a body that
    is not JSON and builds objects of any shape without validating them, so nothing downstream may assume the shape.
    `content` may be a string or a list of parts (their text parts are joined). Raises ReplyError with its kind:
    REPLY_NOT_A_COMPLETION for a body that is not JSON, not an object, an error object, or choices and message of the
    wrong shape; REPLY_REFUSAL for a refusal; REPLY_NO_TEXT for no choices or a null or blank content.
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, RecursionError):  # an HTML page, an empty body, "[[[[..." deeper than the decoder
        where = content_type or "no content type"
        raise ReplyError(REPLY_NOT_A_COMPLETION, f"reply body is not JSON ({where}): {snippet(body)}") from None
    if not isinstance(data, dict):
        raise ReplyError(REPLY_NOT_A_COMPLETION, f"reply is JSON {type(data).__name__}, not an object: {snippet(body)}")
    if "error" in data and "choices" not in data:  # some gateways send their error with status 200
        raise ReplyError(REPLY_NOT_A_COMPLETION, f"reply is an error object: {snippet(json.dumps(data['error']))}")
    choices = data.get("choices")
    if choices == []:
        raise ReplyError(REPLY_NO_TEXT, "reply has no choices")
    if not isinstance(choices, list):
        raise ReplyError(REPLY_NOT_A_COMPLETION, f"reply field 'choices' is not a list: {snippet(body)}")
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if not isinstance(message, dict):
        raise ReplyError(REPLY_NOT_A_COMPLETION, f"reply's first choice has no message object: {snippet(body)}")
    content, refusal = message.get("content"), message.get("refusal")
    if isinstance(content, list):
        parts = [part for part in content if isinstance(part, dict)]
        refusal = refusal or next((p["refusal"] for p in parts if isinstance(p.get("refusal"), str)), None)
        content = "".join(
            p["text"] for p in parts if p.get("type") in TEXT_PART_TYPES and isinstance(p.get("text"), str)
        )
    if isinstance(refusal, str) and refusal.strip():
        raise ReplyError(REPLY_REFUSAL, f"the model refused: {snippet(refusal)}")
    if content is not None and not isinstance(content, str):
        raise ReplyError(
            REPLY_NOT_A_COMPLETION, f"reply content is {type(content).__name__}, not text: {snippet(body)}"
        )
    if not content or not content.strip():
        raise ReplyError(REPLY_NO_TEXT, f"reply has no text (finish_reason={choice.get('finish_reason')!r})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return ChatReply(content, _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))


def _token_count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


Sample = tuple[Image.Image, Image.Image, str]  # (original, edited, edit request)
Progress = Callable[[int], None]  # called with 1 as each sample finishes, e.g. a tqdm bar's `update`


class ChatEndpoint:
    """One OpenAI-compatible chat-completions endpoint, with the conventions every API caller of this project keeps.

    `OpenAIJudge`, data.py's teacher and evaluate.py's critic are built on it (as subclasses), so these rules live once:

    - The key is read once, here, from the environment variable `api_key_env`, or is `default_key` when that is unset
      (only for local servers that check no key: vLLM's convention is "EMPTY"). No key at all is a MissingAPIKeyError
      that names the variable, raised at construction, before any work starts. `role` ("judge", "teacher", "critic")
      names the caller in that message.
    - One `openai.OpenAI` client serves all threads (its HTTP connection pool is thread-safe). It retries transport
      errors itself, `max_retries` times with `timeout` seconds per attempt (module docstring, point 1).
    - `complete` sends one request and returns the reply's text (`read_reply`) or raises a ChatError (the request
      failed after the client's retries) or a ReplyError (a 200 reply with no usable text). Nothing else escapes it.
    - The key appears in no `repr`, no message and no reply text: `redact` removes it from any text, since servers
      echo it back ("Incorrect API key provided: ..."), and `complete` redacts its errors and the text it returns.

    base_url: None means the `openai` default (api.openai.com, or $OPENAI_BASE_URL). temperature: 0 for the most
    repeatable replies; None leaves it out (for models that reject it).
    """

    def __init__(
        self,
        model: str,
        *,
        role: str = "endpoint",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        default_key: str | None = None,
        timeout: float = 120,
        max_retries: int = 5,
        temperature: float | None = 0.0,
    ) -> None:
        key = os.environ.get(api_key_env) or default_key
        if not key:
            raise MissingAPIKeyError(
                f"{role} {model!r} needs an API key in the environment variable {api_key_env}, which is unset or empty"
            )
        self.model, self.base_url, self.api_key_env = model, base_url, api_key_env
        self.timeout, self.max_retries, self.temperature = timeout, max_retries, temperature
        self.name = model if base_url is None else f"{model}@{base_url}"
        self._secret = key  # kept only to redact it from error text
        # One client for all threads: its HTTP connection pool is thread-safe.
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=max_retries)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def complete(self, messages: list[dict], response_format: dict | None = None) -> ChatReply:
        """One chat completion's text (redacted). ChatError: the request failed after the client's retries.
        ReplyError: a 200 reply with no usable text (`read_reply`). Both messages are redacted."""
        optional = {} if response_format is None else {"response_format": response_format}
        if self.temperature is not None:
            optional["temperature"] = self.temperature
        try:
            # The raw reply, so that `read_reply` sees the body as the server sent it (see its docstring).
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, **optional
            )
        except openai.APITimeoutError:
            problem = f"no reply within the {self.timeout:g} s timeout ({self.max_retries} retries)"
        except openai.APIConnectionError as err:
            problem = f"connection failed ({self.max_retries} retries): {err}"
        except openai.APIStatusError as err:
            problem = f"HTTP {err.status_code}: {err.message}"
        else:
            try:
                reply = read_reply(raw.text, raw.headers.get("content-type", ""))
            except ReplyError as err:
                kind, problem = err.kind, str(err)
            else:
                return ChatReply(self.redact(reply.text), reply.input_tokens, reply.output_tokens)
            raise ReplyError(kind, self.redact(problem))  # outside the except: the unredacted error is not attached
        # Raised outside the except blocks so the openai error (whose text may echo the key) is not attached as
        # __context__; servers do echo keys back ("Incorrect API key provided: ..."), hence the redaction.
        raise ChatError(self.redact(f"{self.name}: {problem}"))

    def redact(self, text: str) -> str:
        """`text` with the API key replaced by "[redacted API key]"."""
        return text.replace(self._secret, "[redacted API key]")


class OpenAIJudge(ChatEndpoint):
    """A judge behind an OpenAI-compatible chat-completions API: a ChatEndpoint that asks the rubric.

    model: the served model name. endpoint: ChatEndpoint's keyword arguments (base_url, api_key_env, default_key,
    timeout, max_retries, temperature; the key is read once, here). max_concurrency: requests in flight in
    `judge_many`. parse_retries: extra requests after a 200 reply that is not a valid verdict.
    """

    def __init__(self, model: str, *, max_concurrency: int = 8, parse_retries: int = 2, **endpoint: Any) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__(model, role="judge", **endpoint)
        self.max_concurrency, self.parse_retries = max_concurrency, parse_retries

    def judge(self, original: Image.Image, edited: Image.Image, request: str) -> Verdict:
        """Score one edit. Raises JudgeError (with a redacted, specific reason) when no valid verdict came back."""
        messages = rubric_messages(original, edited, request)
        attempts = 1 + self.parse_retries
        for _ in range(attempts):
            try:
                reply = self.complete(messages, RESPONSE_FORMAT)
            except ChatError as err:  # an API failure: the client has already retried it
                raise JudgeError(str(err)) from None
            except ReplyError as err:  # a 200 reply with no text (an HTML page, a refusal): ask again
                last_problem = err
                continue
            try:
                return parse_verdict(reply.text)
            except JudgeError as err:  # a 200 reply that is no verdict: ask again
                last_problem = err
        raise JudgeError(self.redact(f"{self.name}: no valid verdict in {attempts} replies; last: {last_problem}"))

    def judge_many(self, samples: Sequence[Sample], progress: Progress | None = None) -> list[Verdict | JudgeFailure]:
        """Score many edits with at most `max_concurrency` requests in flight; one result per sample, in order."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge") as pool:
            futures = [pool.submit(self._judge_or_fail, *sample) for sample in samples]
            if progress is not None:
                for _ in as_completed(futures):
                    progress(1)
            return [future.result() for future in futures]

    def _judge_or_fail(self, original: Image.Image, edited: Image.Image, request: str) -> Verdict | JudgeFailure:
        try:
            return self.judge(original, edited, request)
        except JudgeError as err:
            return JudgeFailure(str(err))


# ---------------------------------------------------------------------------------------------------------------------
# A judge run in-process (an open VLM through transformers)


class LocalJudge:
    """A transformers VLM loaded with `policy.load_policy` and run in this process with greedy decoding.

    Sees the same rubric text and the same two images as the API judges (one user turn: text, original, edited) and
    parses its answer with `parse_verdict`; a reply that does not parse becomes a JudgeFailure in `judge_many`.
    """

    def __init__(self, path: str, *, max_new_tokens: int = 256, dtype=None, device=None) -> None:
        from policy import load_policy  # imported here: judge.py imports no project module (nor torch) at import time

        self.path, self.max_new_tokens = path, max_new_tokens
        self.name = f"local:{path}"
        self.model, self.processor = load_policy(path, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"LocalJudge(path={self.path!r})"

    def generate_text(self, original: Image.Image, edited: Image.Image, request: str) -> str:
        """The model's raw reply to the rubric for one edit (greedy, at most `max_new_tokens` tokens)."""
        from policy import generate_texts

        # one user turn: the rubric, the ORIGINAL image, the EDITED image; greedy
        [text] = generate_texts(self.model, self.processor, [[original, edited]], [rubric_prompt(request)], None,
                                max_new_tokens=self.max_new_tokens, text_first=True)  # fmt: skip
        return text

    def judge(self, original: Image.Image, edited: Image.Image, request: str) -> Verdict:
        """Score one edit; raises JudgeError when the reply is not a valid verdict."""
        text = self.generate_text(original, edited, request)
        try:
            return parse_verdict(text)
        except JudgeError as err:
            raise JudgeError(f"{self.name}: {err}") from None

    def judge_many(self, samples: Sequence[Sample], progress: Progress | None = None) -> list[Verdict | JudgeFailure]:
        """Score edits one after another (one model in one process); one result per sample, in order."""
        results: list[Verdict | JudgeFailure] = []
        for original, edited, request in samples:
            try:
                results.append(self.judge(original, edited, request))
            except JudgeError as err:
                results.append(JudgeFailure(str(err)))
            if progress is not None:
                progress(1)
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Presets

GEMINI_OPENAI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta/openai/"

# The paper's two judges: (model, base_url, key variable).
PRESETS = {
    "gpt-4o": ("gpt-4o", None, "OPENAI_API_KEY"),
    "gemini-2.5-flash": ("gemini-2.5-flash", GEMINI_OPENAI_BASE_URL, "GEMINI_API_KEY"),
}
LOCAL_SERVER_KEY_ENV = "JUDGE_API_KEY"
LOCAL_SERVER_DUMMY_KEY = "EMPTY"  # vLLM's convention for a server started without --api-key


def parse_api_spec(spec: str, role: str, server_key_env: str) -> dict[str, Any] | None:
    """ChatEndpoint's keyword arguments for a spec that names an API, or None for any other spec.

    "gpt-4o", "gemini-2.5-flash": the paper's judges (PRESETS: model, base URL, key variable). "openai:MODEL@URL": any
    OpenAI-compatible server, e.g. vLLM at http://host:8000/v1, its key in `server_key_env`; when that is unset the
    dummy key "EMPTY" is sent, since such servers usually check none. A malformed "openai:" spec is a ValueError that
    names the role ("judge spec ...").
    """
    if spec in PRESETS:
        model, base_url, key_env = PRESETS[spec]
        return {"model": model, "base_url": base_url, "api_key_env": key_env}
    if spec.startswith("openai:"):
        model, _, url = spec.removeprefix("openai:").partition("@")
        if not model or not url.startswith(("http://", "https://")):
            raise ValueError(f"{role} spec {spec!r} should look like 'openai:MODEL@http://host:port/v1'")
        return {"model": model, "base_url": url, "api_key_env": server_key_env, "default_key": LOCAL_SERVER_DUMMY_KEY}
    return None


def make_judge(spec: str, **kw) -> OpenAIJudge | LocalJudge:
    """Build a judge from a short spec; keyword arguments go to the judge's constructor.

    "gpt-4o", "gemini-2.5-flash": the paper's judges (keys in OPENAI_API_KEY, GEMINI_API_KEY).
    "openai:MODEL@URL": any OpenAI-compatible server (key in JUDGE_API_KEY, else "EMPTY"; see `parse_api_spec`).
    "local:PATH": a VLM run in this process (`LocalJudge`).
    """
    endpoint = parse_api_spec(spec, "judge", LOCAL_SERVER_KEY_ENV)
    if endpoint is not None:
        return OpenAIJudge(**(endpoint | kw))  # kw may replace the dummy default_key
    if spec.startswith("local:"):
        path = spec.removeprefix("local:")
        if not path:
            raise ValueError(f"judge spec {spec!r} should look like 'local:PATH'")
        return LocalJudge(path, **kw)
    choices = ", ".join([*PRESETS, "openai:MODEL@URL", "local:PATH"])
    raise ValueError(f"unknown judge spec {spec!r}; expected one of: {choices}")

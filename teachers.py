"""Teachers: VLMs that answer an (image, edit request) with a gold decomposition, for the labeller (label.py).

A teacher is anything with a `name`, a `max_concurrency` and `label(image, request) -> TeacherReply`, which raises
`LabelError` (its `reason` one of `LABEL_ERROR_REASONS`) when the reply gives no label. Two are here:

    OpenAITeacher  an OpenAI-compatible chat-completions API (a `judge.ChatEndpoint`): "gpt-4o" and
                   "gemini-2.5-flash" (the presets and key variables of judge.py), or "openai:MODEL@URL" for any
                   such server, e.g. vLLM (key in TEACHER_API_KEY, or the dummy "EMPTY"); the reply is constrained
                   by a strict JSON schema, and one that is not a label is asked again `parse_retries` times;
    LocalTeacher   "local:PATH": a Qwen-VL model run greedily in this process through `policy.load_policy`.

Both send `TEACHER_SYSTEM` + the image + `teacher_prompt(request)` and read the reply with `parse_label`, which
normalises every item with `rewards.gold_from_lists`, exactly as a policy's output is normalised. `estimate_cost`
prices a run before any request is sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

import judge
import rewards

# ---------------------------------------------------------------------------------------------------------------------
# The prompt and the answer schema

# The action words match the ones agents.DECOMPOSITION_FORMAT shows the policy, so the policy is rewarded for the
# vocabulary it is asked to use. The paper's example (§2.1) writes the goal as one item, "scarlet or copper red";
# like agents.py we list each alternative, so that a policy naming either one earns goal F1.
TEACHER_SYSTEM = (
    "You write gold labels for training an image-editing assistant. For an image and a user's edit request you "
    "list the edit actions, the edit subjects and the edit goals, as short canonical items."
)

TEACHER_INSTRUCTIONS = """\
Look at the image and decompose this request into three lists of short, canonical items:
- actions: the kinds of edit, one or two words each, written as a noun: Recoloring, Removal, Addition, Replacement, \
Resizing, Moving, Style transfer, Restoration; use one of these words whenever one fits;
- subjects: the objects or regions of this image that the edit changes, one to three words each, without articles \
(coat, hair, background, left car);
- goals: the target state of the subjects, as short as possible (a color, a style, a size, a position, a new object); \
when the request allows alternatives, list each one.
Use one item per distinct thing, no sentences, no explanations, no duplicates. If the text is not a request to edit \
this image, or you cannot tell what should change, answer with three empty lists.
Example: for the request "Change the color of her coat and possibly hair to scarlet or copper red" the answer is
{"actions": ["Recoloring"], "subjects": ["coat", "hair"], "goals": ["scarlet", "copper red"]}
Answer with the JSON object only."""


def teacher_prompt(request: str) -> str:
    """The user text that follows the image: the request, then the instructions (the order agents.py uses)."""
    return f"Edit request: {request.strip()}\n\n{TEACHER_INSTRUCTIONS}"


def teacher_messages(image: Image.Image, request: str) -> list[dict]:
    """System turn, then one user turn: the image as a PNG data URL, then the prompt text."""
    content = [
        {"type": "image_url", "image_url": {"url": judge.png_data_url(image)}},
        {"type": "text", "text": teacher_prompt(request)},
    ]
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": content}]


LABEL_FIELDS = ("actions", "subjects", "goals")
LABEL_SCHEMA = {
    "type": "object",
    "properties": {
        "actions": {"type": "array", "items": {"type": "string"}, "description": "Kinds of edit, e.g. Recoloring"},
        "subjects": {"type": "array", "items": {"type": "string"}, "description": "What changes, e.g. coat, hair"},
        "goals": {"type": "array", "items": {"type": "string"}, "description": "Target states, e.g. scarlet"},
    },
    "required": list(LABEL_FIELDS),
    "additionalProperties": False,  # strict mode requires it
}
LABEL_RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "edit_decomposition", "strict": True, "schema": LABEL_SCHEMA},
}

# ---------------------------------------------------------------------------------------------------------------------
# Validating a reply

# No answer after the client's retries (HTTP error, timeout, connection), or 200 replies that were not chat
# completions (an HTML page from a proxy): not the model's answer, so the next run asks again.
REJECT_API = "api failure"
REJECT_REFUSAL = "refusal"  # the model refused (the `refusal` field of a structured-output reply)
REJECT_EMPTY_REPLY = "empty reply"  # a reply with no text
REJECT_MALFORMED = "malformed json"  # text that is not {"actions": [str], "subjects": [str], "goals": [str]}
REJECT_EMPTY_FIELD = "empty field"  # a list with no item left after normalisation (the teacher's "not an edit")
LABEL_ERROR_REASONS = (REJECT_API, REJECT_REFUSAL, REJECT_EMPTY_REPLY, REJECT_MALFORMED, REJECT_EMPTY_FIELD)

# Worth another request at once; a refusal or "not an edit" is an answer. (A failed request is not asked again here:
# the client has retried it already.)
_ASK_AGAIN = (REJECT_EMPTY_REPLY, REJECT_MALFORMED, REJECT_API)
REPLY_REJECTS = {  # judge.ReplyError's kind -> the reject it is
    judge.REPLY_NOT_A_COMPLETION: REJECT_API,
    judge.REPLY_REFUSAL: REJECT_REFUSAL,
    judge.REPLY_NO_TEXT: REJECT_EMPTY_REPLY,
}


class LabelError(ValueError):
    """A teacher reply that gives no label: `reason` (one of LABEL_ERROR_REASONS) and the message say what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_label(text: str) -> rewards.Decomposition:
    """A teacher's JSON reply -> the normalised gold decomposition, or LabelError with its reason."""
    if not text.strip():
        raise LabelError(REJECT_EMPTY_REPLY, "the reply is empty")
    try:
        data = json.loads(judge.json_text(text))  # bare, or fenced after some prose (local models like fences)
    except json.JSONDecodeError as e:
        raise LabelError(REJECT_MALFORMED, f"not JSON ({e.msg} at column {e.colno}): {judge.snippet(text)}") from None
    except RecursionError:  # "[[[[..." deeper than the decoder allows
        raise LabelError(REJECT_MALFORMED, f"JSON nested too deeply: {judge.snippet(text)}") from None
    if not isinstance(data, dict):
        raise LabelError(REJECT_MALFORMED, f"JSON but not an object: {judge.snippet(text)}")
    for name in LABEL_FIELDS:
        value = data.get(name)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise LabelError(REJECT_MALFORMED, f"field {name!r} is not a list of strings: {judge.snippet(text)}")
    try:
        return rewards.gold_from_lists(data["actions"], data["subjects"], data["goals"])
    except ValueError as e:  # a list with no item left after normalisation
        raise LabelError(REJECT_EMPTY_FIELD, str(e)) from None


# ---------------------------------------------------------------------------------------------------------------------
# Teachers


@dataclass(frozen=True)
class TeacherReply:
    """An accepted label and the tokens its request used (0 when the teacher does not report them)."""

    gold: rewards.Decomposition
    input_tokens: int = 0
    output_tokens: int = 0


class Teacher(Protocol):
    """What the labeller needs of a teacher: a name, how many requests may run at once, and `label`."""

    name: str
    max_concurrency: int

    def label(self, image: Image.Image, request: str) -> TeacherReply: ...  # raises LabelError


class OpenAITeacher(judge.ChatEndpoint):
    """A teacher behind an OpenAI-compatible chat-completions API: a `judge.ChatEndpoint` that asks for a label.

    endpoint: ChatEndpoint's keyword arguments (base_url, api_key_env, default_key, timeout, max_retries,
    temperature). So the key is read once (MissingAPIKeyError before any work if it is unset and there is no
    `default_key`) and redacted from every message, and transport retries are the `openai` client's (`max_retries`).
    A 200 reply that is not a label is asked again `parse_retries` times.
    """

    def __init__(self, model: str, *, max_concurrency: int = 8, parse_retries: int = 1, **endpoint: Any) -> None:
        if max_concurrency < 1 or parse_retries < 0:
            raise ValueError(
                f"need max_concurrency >= 1 and parse_retries >= 0, got {max_concurrency}, {parse_retries}"
            )
        super().__init__(model, role="teacher", **endpoint)
        self.max_concurrency, self.parse_retries = max_concurrency, parse_retries

    def label(self, image: Image.Image, request: str) -> TeacherReply:
        messages = teacher_messages(image, request)
        attempts = 1 + self.parse_retries
        for _ in range(attempts):
            try:
                reply = self.complete(messages, LABEL_RESPONSE_FORMAT)  # its text and errors are already redacted
                return TeacherReply(parse_label(reply.text), reply.input_tokens, reply.output_tokens)
            except judge.ChatError as e:  # the client's retries are spent
                raise LabelError(REJECT_API, str(e)) from None
            except judge.ReplyError as e:  # a 200 reply with no usable text
                last = LabelError(REPLY_REJECTS[e.kind], str(e))
            except LabelError as e:  # text that is no label
                last = e
            if last.reason not in _ASK_AGAIN:
                raise last
        raise LabelError(last.reason, f"{last.detail} ({attempts} replies, none usable)")


class LocalTeacher:
    """A Qwen-VL model loaded with `policy.load_policy` and run greedily in this process, one example at a time."""

    max_concurrency = 1  # one model in one process

    def __init__(self, path: str, *, max_new_tokens: int = 256, dtype=None, device=None) -> None:
        import policy  # imported here: torch and transformers load only when a local teacher is asked for

        self.path, self.max_new_tokens = path, max_new_tokens
        self.name = f"local:{path}"
        self.model, self.processor = policy.load_policy(path, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"LocalTeacher(path={self.path!r})"

    def label(self, image: Image.Image, request: str) -> TeacherReply:
        from policy import generate_texts  # the one generate-and-decode path of the project

        [text] = generate_texts(
            self.model,
            self.processor,
            [image],
            [teacher_prompt(request)],
            TEACHER_SYSTEM,
            max_new_tokens=self.max_new_tokens,
        )
        return TeacherReply(parse_label(text))


TEACHER_KEY_ENV = "TEACHER_API_KEY"  # for "openai:MODEL@URL" teachers


def make_teacher(
    spec: str, *, max_concurrency: int = 8, timeout: float = 120, max_retries: int = 5, parse_retries: int = 1
) -> OpenAITeacher | LocalTeacher:
    """A teacher from a short spec: "gpt-4o", "gemini-2.5-flash" (judge.PRESETS), "openai:MODEL@URL", "local:PATH".

    The keyword arguments are OpenAITeacher's; a local teacher runs one example at a time and needs none of them.
    """
    settings = {
        "max_concurrency": max_concurrency,
        "timeout": timeout,
        "max_retries": max_retries,
        "parse_retries": parse_retries,
    }
    endpoint = judge.parse_api_spec(spec, "teacher", TEACHER_KEY_ENV)
    if endpoint is not None:
        return OpenAITeacher(**endpoint, **settings)
    if spec.startswith("local:") and spec.removeprefix("local:"):
        return LocalTeacher(spec.removeprefix("local:"))
    choices = ", ".join([*judge.PRESETS, "openai:MODEL@URL", "local:PATH"])
    raise ValueError(f"unknown teacher spec {spec!r}; expected one of: {choices}")


# ---------------------------------------------------------------------------------------------------------------------
# The cost estimate

CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text
REPLY_TOKENS = 60  # the example answer in TEACHER_INSTRUCTIONS is ~95 characters (~25 tokens); room for longer lists
TYPICAL_ASPECT = 3 / 4  # height / width of the typical photo, for the image-token estimate


def gpt4o_image_tokens(width: int, height: int) -> int:
    """Input tokens of one image at GPT-4o's "high" detail, by OpenAI's published rule.

    Fit in 2048 x 2048, then scale so the short side is at most 768, then 85 + 170 per 512 x 512 tile.
    """
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


@dataclass(frozen=True)
class CostEstimate:
    requests: int
    input_tokens: int
    output_tokens: int
    dollars: float

    def __str__(self) -> str:
        return (
            f"cost estimate: {self.requests} requests (more if replies are asked again), about "
            f"{self.input_tokens:,} input and {self.output_tokens:,} output tokens, about ${self.dollars:,.2f}"
        )


def estimate_cost(requests: Sequence[str], max_image_side: int, price_input: float, price_output: float):
    """Tokens and dollars for one request per text: the text at CHARS_PER_TOKEN, each image as a 4:3 photo at
    `max_image_side` (2048 when 0) by `gpt4o_image_tokens`, each reply REPLY_TOKENS. Prices: dollars per 1M tokens."""
    side = max_image_side or 2048
    image_tokens = gpt4o_image_tokens(side, round(side * TYPICAL_ASPECT))
    text_chars = sum(len(TEACHER_SYSTEM) + len(teacher_prompt(request)) for request in requests)
    input_tokens = math.ceil(text_chars / CHARS_PER_TOKEN) + image_tokens * len(requests)
    output_tokens = REPLY_TOKENS * len(requests)
    dollars = (input_tokens * price_input + output_tokens * price_output) / 1e6
    return CostEstimate(len(requests), input_tokens, output_tokens, dollars)

"""RL training data: the JSONL format that train.py reads, and a teacher VLM that writes it for real requests.

The format
----------
One example per line, a JSON object:

    {"id": "shapes-0007",                 # unique within the file (string)
     "image": "images/shapes-0007.png",   # path RELATIVE TO THE JSONL FILE (absolute paths also work)
     "request": "make the circle blue",   # the user's edit request
     "actions": ["recolor"],              # gold edit actions    (non-empty list of strings)
     "subjects": ["circle"],              # gold edit subjects   (non-empty list of strings)
     "goals": ["blue"]}                   # gold edit goals      (non-empty list of strings)

Other keys are allowed and ignored. Gold items are normalised exactly as `rewards.py` normalises model output
(`rewards.gold_from_lists`), so a label and a prediction that print the same compare equal.

`load_rl_jsonl` validates EVERY line before training starts and stops at the first bad one with an error that names
the file, the line number and the field: a line that is not UTF-8, bad JSON, a missing or wrongly typed field, an
empty gold list, a duplicate id, an image that does not exist, that does not decode to the last pixel (it is decoded
exactly as training decodes it, so a corrupt pixel stream is found here, not mid-step), or that has more than
`benchmarks.MAX_IMAGE_PIXELS` pixels.

Making gold labels (`python data.py --benchmark realedit --teacher gpt-4o --out data/rl`, from data/benchmarks/realedit)
-------------------------------------------------------------------------------------------------
No public set has gold actions, subjects and goals; the paper trained on up to about 4,000 examples (§4.2, gains
flatten there). This labeller makes them from any (image, request) pairs that `benchmarks.py` can read:

1. List the examples of the training split (RealEdit: train; PSR and UltraEdit have one pool; or a manifest), drop
   every example of evaluate.py's sample (`benchmarks.evaluation_ids`, by default the paper's 1,000 with seed 0), and
   draw `--limit` of the rest with the same seeded draw evaluate.py uses.
2. For each example, in id order: read the image (an unreadable one is a reject), shrink it to `--max-image-side`,
   and drop it as a duplicate if an earlier example had the same pixels and the same request (before paying for it).
3. Ask the teacher (`TEACHER_SYSTEM` + the image + `teacher_prompt(request)`) for a JSON object
   {"actions": [...], "subjects": [...], "goals": [...]}, constrained by a strict JSON schema on OpenAI-compatible
   servers. `parse_label` validates it and normalises every item with `rewards.gold_from_lists`; a reply that is not
   such an object is asked again `--parse-retries` times. Every failure is a counted reject with a reason
   (`REJECT_REASONS`), never a stop.
4. Append each outcome to the journal `OUT/labels.jsonl` the moment it exists (accepted ones after their PNG is in
   `OUT/images/`). A killed run, re-run with the same command, skips every id already in the journal, except API
   failures, which are tried again. At most `--max-concurrency` requests are in flight.
5. At the end, write `train.jsonl` and `heldout.jsonl` (each accepted example goes to held-out when
   sha256(seed, id) falls under `--heldout-fraction`, so the split does not move as more examples are labelled) by
   an atomic rename, check that no id of evaluate.py's sample is in either file, validate both with `load_rl_jsonl`,
   and print a report (also `report.md`): the label vocabulary, items per field, rejects by reason.

A cost estimate (requests, input and output tokens, dollars at `--price-*`) is printed before any request is sent;
`--dry-run` prints it with the first prompts and exits without contacting the teacher (and needs no API key).

Teachers: "gpt-4o" and "gemini-2.5-flash" (the presets and key variables of `judge.py`), "openai:MODEL@URL" for any
OpenAI-compatible server such as vLLM (key in TEACHER_API_KEY, or the dummy "EMPTY"), or "local:PATH" for a
Qwen-VL model run in this process through `policy.load_policy`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm import tqdm

import benchmarks
import judge
import rewards
from cli import arg, parse_dataclass_args

REQUIRED_FIELDS = ("id", "image", "request", "actions", "subjects", "goals")


class DataError(ValueError):
    """A bad line in a data file; the message names the file, the line and the field."""


@dataclass(frozen=True)
class RLExample:
    """One validated training example: the image file, the request, and the normalised gold decomposition."""

    id: str
    image_path: Path
    request: str
    gold: rewards.Decomposition

    def load_image(self) -> Image.Image:
        """The RGB image, decoded exactly as `parse_rl_line` decoded it to validate the line."""
        return benchmarks.FileImage(self.image_path, str(self.image_path)).read()


def parse_rl_line(line: str, where: str, base_dir: Path) -> RLExample:
    """One JSONL line -> RLExample, or DataError naming `where` (file:line) and the field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in obj:
            raise DataError(f"{where}: field {name!r} is missing")
    for name in ("id", "image", "request"):
        if not isinstance(obj[name], str) or not obj[name].strip():
            raise DataError(f"{where}: field {name!r} must be a non-empty string, got {obj[name]!r}")
    for name in ("actions", "subjects", "goals"):
        value = obj[name]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise DataError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
    try:
        gold = rewards.gold_from_lists(obj["actions"], obj["subjects"], obj["goals"])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    image_path = Path(obj["image"])
    if not image_path.is_absolute():
        image_path = base_dir / image_path
    if not image_path.is_file():
        raise DataError(f"{where}: field 'image': file not found: {image_path}")
    example = RLExample(id=obj["id"], image_path=image_path, request=obj["request"].strip(), gold=gold)
    try:  # decode every pixel, as training will: Pillow's verify() checks the chunks and passes a corrupt stream
        example.load_image()
    except benchmarks.ImageReadError as e:
        raise DataError(f"{where}: field 'image': unreadable image {e}") from None
    return example


def decode_line(raw: bytes, where: str) -> str:
    """A line of a UTF-8 file; DataError naming the first byte that is not UTF-8 and the field that holds it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
    field = _field_with_bad_bytes(raw)
    named = f" field {field!r}:" if field else ""
    raise DataError(f"{where}:{named} not UTF-8 (byte 0x{raw[bad]:02x} at column {bad + 1}); save the file as UTF-8")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" turns an undecodable byte into


def _field_with_bad_bytes(raw: bytes) -> str | None:
    """The top-level field of a JSON-object line whose key or value holds bytes that are not UTF-8 (None if the line
    is not such an object). With the bad bytes escaped to lone surrogates, the rest of the line still parses."""
    try:
        obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    return next((k for k, v in obj.items() if _ESCAPED_BYTE.search(k + json.dumps(v, ensure_ascii=False))), None)


def load_rl_jsonl(path: str | Path) -> list[RLExample]:
    """Read and validate a whole RL JSONL file (blank lines are skipped). Raises DataError at the first bad line.

    Every image is decoded, as training will decode it, so a file that loads here cannot fail mid-training.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: data file not found; make it with the labeller (`python data.py --benchmark "
            f"realedit --teacher gpt-4o --out {path.parent}`), or try --train-data data/example/train.jsonl"
        )
    examples: list[RLExample] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            line = decode_line(raw, where)
            if not line.strip():
                continue
            example = parse_rl_line(line, where, path.parent)
            if example.id in seen:
                raise DataError(f"{where}: field 'id': duplicate id {example.id!r} (first on line {seen[example.id]})")
            seen[example.id] = lineno
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples in the file")
    return examples


def rl_record(id: str, image: str, request: str, actions, subjects, goals, **extra) -> dict:
    """The JSON object of one example in the format above (for writers: miniature/dataset.py, the teacher labeller)."""
    return {"id": id, "image": image, "request": request, "actions": list(actions), "subjects": list(subjects),
            "goals": list(goals), **extra}  # fmt: skip


# =====================================================================================================================
# The teacher labeller
# =====================================================================================================================

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
REJECT_EXAMPLE = "unreadable example"  # the benchmark row has no request, or its image does not decode
REJECT_DUPLICATE = "duplicate"  # the same pixels and request as an earlier example: never sent
REJECT_REASONS = (
    REJECT_API,
    REJECT_REFUSAL,
    REJECT_EMPTY_REPLY,
    REJECT_MALFORMED,
    REJECT_EMPTY_FIELD,
    REJECT_EXAMPLE,
    REJECT_DUPLICATE,
)
# Worth another request at once; a refusal or "not an edit" is an answer. (A failed request is not asked again here:
# the client has retried it already.)
_ASK_AGAIN = (REJECT_EMPTY_REPLY, REJECT_MALFORMED, REJECT_API)
REPLY_REJECTS = {  # judge.ReplyError's kind -> the reject it is
    judge.REPLY_NOT_A_COMPLETION: REJECT_API,
    judge.REPLY_REFUSAL: REJECT_REFUSAL,
    judge.REPLY_NO_TEXT: REJECT_EMPTY_REPLY,
}


class LabelError(ValueError):
    """A teacher reply that gives no label; `reason` is one of REJECT_REASONS, the message says what was wrong."""

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
        return self.reason != REJECT_API


def drop_partial_last_line(path: Path) -> bool:
    """A run killed mid-write can leave a last line without its newline: cut it (that example is redone)."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    with path.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


def read_journal(path: Path) -> dict[str, Outcome]:
    """id -> its latest outcome, in the order ids first appear. DataError names the line of a corrupt record."""
    outcomes: dict[str, Outcome] = {}
    if not path.is_file():
        return outcomes
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                outcome = Outcome(**json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: not a journal record ({e}); move the file away to start over"
                ) from None
            outcomes[outcome.id] = outcome
    return outcomes


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
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", example_id).strip("._")[-80:]
    return f"{slug}-{hashlib.sha256(example_id.encode()).hexdigest()[:10]}.png"


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write next to the target, then rename: a reader never sees half a file, a killed run leaves the old one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def label_into_journal(
    examples: Sequence[benchmarks.EditExample],
    teacher: Teacher,
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
        (out / JOURNAL).open("a", encoding="utf-8") as journal,
        ThreadPoolExecutor(teacher.max_concurrency, thread_name_prefix="teacher") as pool,
        tqdm(total=len(examples), desc="labelling", unit="example") as bar,
    ):

        def record(outcome: Outcome) -> None:
            journal.write(json.dumps(asdict(outcome), ensure_ascii=False) + "\n")
            journal.flush()  # on disk as soon as it exists: a kill loses at most the requests in flight
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
        reply: TeacherReply = future.result()  # any exception but LabelError is a bug and propagates
    except LabelError as e:
        return Outcome(example.id, REJECTED, example.request, e.reason, e.detail, key)
    relative = f"{IMAGE_DIR}/{image_filename(example.id)}"
    _save_png(image, out / relative)
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
# The run: plan, estimate, label, write, check, report


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
class Plan:
    """Which examples this output folder labels, and which ones it must never contain."""

    examples: list[benchmarks.EditExample]  # to label, in id order
    eval_ids: set[str]  # evaluate.py's sample
    split: str
    candidates: int  # examples in the split
    excluded: int  # of those, in evaluate.py's sample


def plan(args: Args) -> Plan:
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
    return Plan(chosen, eval_ids, split or "manifest", len(examples), len(examples) - len(pool))


def _run_config(args: Args, split: str) -> dict:
    prompt = hashlib.sha256((TEACHER_SYSTEM + TEACHER_INSTRUCTIONS).encode()).hexdigest()
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
        _write_atomic(path, json.dumps(config, indent=2) + "\n")


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


def write_outputs(out: Path, the_plan: Plan, args: Args) -> Summary:
    """Read the journal back, write train.jsonl and heldout.jsonl atomically, check them, write the report."""
    journal = read_journal(out / JOURNAL)
    outcomes = [journal[example.id] for example in the_plan.examples if example.id in journal]
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
    check_no_eval_examples(list(staged.values()), the_plan.eval_ids)
    for name, path in staged.items():
        os.replace(path, out / name)
    summary = Summary(
        args.benchmark,
        the_plan.split,
        args.teacher,
        the_plan.candidates,
        the_plan.excluded,
        len(the_plan.examples),
        accepted,
        rejected,
        len(the_plan.examples) - len(accepted) - len(rejected),
        len(files[TRAIN_FILE]),
        len(files[HELDOUT_FILE]),
    )
    report = render_report(summary, args)
    _write_atomic(out / REPORT_FILE, report)
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
    for name in LABEL_FIELDS:
        counts = [len(getattr(o, name)) for o in s.accepted] or [0]
        rows.append([name, f"{sum(counts) / len(counts):.2f}", min(counts), max(counts)])
    lines += _table(["field", "mean", "min", "max"], rows)
    lines += ["", f"## Label vocabulary (the {VOCABULARY_SHOWN} most common items)", ""]
    columns = [
        Counter(item for o in s.accepted for item in getattr(o, name)).most_common(VOCABULARY_SHOWN)
        for name in LABEL_FIELDS
    ]
    depth = max(map(len, columns), default=0)
    vocabulary = [[f"{c[i][0]} ({c[i][1]})" if i < len(c) else "" for c in columns] for i in range(depth)]
    lines += _table(list(LABEL_FIELDS), vocabulary) if vocabulary else ["No accepted labels yet."]
    return "\n".join(lines) + "\n"


def show_prompts(examples: Sequence[benchmarks.EditExample], max_image_side: int) -> None:
    """--dry-run: print what the teacher would receive for the first examples."""
    for example in examples[:DRY_RUN_SHOWN]:
        image = example.load_image()
        size = "unreadable: " + (example.error or "") if image is None else prepare_image(image, max_image_side).size
        print(
            f"--- {example.id} (image {size})\n[system] {TEACHER_SYSTEM}\n[user] <image>\n{teacher_prompt(example.request)}"
        )


def run(args: Args, teacher: Teacher | None = None) -> Summary | None:
    """The whole labelling run (see the module docstring); returns None for --dry-run."""
    if not 0 <= args.heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {args.heldout_fraction}")
    if teacher is None and not args.dry_run:  # a missing key or model fails here, before any work
        teacher = make_teacher(
            args.teacher,
            max_concurrency=args.max_concurrency,
            timeout=args.timeout,
            max_retries=args.max_retries,
            parse_retries=args.parse_retries,
        )
    the_plan = plan(args)
    out = Path(args.out)
    if drop_partial_last_line(out / JOURNAL):
        print(f"{out / JOURNAL}: dropped an incomplete last line left by a killed run")
    done = read_journal(out / JOURNAL)
    todo = [e for e in the_plan.examples if e.id not in done or not done[e.id].final]
    if args.max_new:
        todo = todo[: args.max_new]
    print(
        f"{the_plan.candidates} examples in {args.benchmark} ({the_plan.split}), {the_plan.excluded} left out as "
        f"evaluate.py's sample, {len(the_plan.examples)} drawn, {len(the_plan.examples) - len(todo)} already "
        f"done, {len(todo)} to label"
    )
    print(
        estimate_cost([e.request for e in todo], args.max_image_side, args.price_input_per_m, args.price_output_per_m)
    )
    if args.dry_run:
        show_prompts(todo, args.max_image_side)
        return None
    out.mkdir(parents=True, exist_ok=True)
    _check_run_config(out, _run_config(args, the_plan.split))
    label_into_journal(todo, teacher, out, done, args.max_image_side)
    return write_outputs(out, the_plan, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_dataclass_args(Args, argv, description=__doc__.split("\n\n")[0])
    try:
        run(args)
    except (benchmarks.BenchmarkError, DataError, judge.MissingAPIKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # bad input, as train.py and evaluate.py report it


if __name__ == "__main__":
    main()

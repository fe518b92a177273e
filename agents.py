"""The three agents of ImageEdit-R1 and the chain that runs them (paper §2.1 and §2.3).

A user gives an image and a request that may be complex or indirect ("Change the color of her coat and possibly hair
to scarlet or copper red"). ImageEdit-R1 never sends that request to the editor as it stands. Instead:

    1. the DECOMPOSITION agent (a Qwen-VL policy, the one GRPO trains) reads the image and the request and writes
           <think>...</think><action>Recoloring</action><subjects>coat, hair</subjects><goals>scarlet, copper red</goals>
       which `rewards.parse_decomposition` reads into a `rewards.Decomposition` (paper eq. 1);
    2. the SEQUENCING agent (a VLM of the same kind, by default the very same model) reads the image, the request and
       those three lists and writes an ordered list of small sub-requests (paper eq. 2):
           <steps>1. Recolor the coat to scarlet
           2. Recolor the hair to copper red</steps>
    3. the EDITING agent (any `editors.Editor`: FLUX.1-Kontext, Qwen-Image-Edit, Nano Banana, a fake) carries the
       sub-requests out (paper eq. 3), in one of two ways (the paper's "Multi-turn or single turn" ablation, §4.2):
         - single-turn: ONE editor call with every sub-request joined into one instruction (`join_single_turn`);
           the paper finds this better, because the editor sees all changes in one context;
         - multi-turn: one editor call per sub-request, each applied to the previous call's output.

When an agent's output cannot be used, the chain does not fail: it falls back to editing the raw request once, the
same thing the "Original" baseline does, and records why in `ChainResult.fallback` (one of the FALLBACK_* strings).
An editor that refuses (`editors.EditError`: a safety block, an API error with no image) is recorded in
`ChainResult.edit_error`; any other exception is a bug and propagates.

Everything an evaluation needs to compare methods comes back as one typed record, `ChainResult`, for every method:
`run_chain` / `run_chain_batch` (ImageEdit-R1, with or without RL depending on which checkpoint is loaded) and
`edit_original` (the editor alone). Batching: `run_chain_batch` decomposes all examples, then sequences all of them,
then edits each, so each agent model runs a few large `generate` calls instead of hundreds of small ones.

How the chain runs (turns, decoding, batch size, the step cap) is one frozen record, `ChainSettings`, handed down
unchanged. EditThinker's Think-while-Edit loop, which can start from the chain's plan, is in thinker.py.

This module imports only leaf and wrapper modules (`rewards`, `policy`, `grpo`, `editors`); the models and the editor
are passed in, so tests hand in fakes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image

import policy
import rewards
from editors import EditError, Editor

Turns = Literal["single", "multi"]
ChainMethod = Literal["original", "single", "multi"]  # what a ChainResult did: the editor alone, or a chain's turns


class Agent(NamedTuple):
    """A VLM agent: the (model, processor) pair `policy.load_policy` returns (a plain tuple works too: tests' fakes)."""

    model: Any
    processor: Any


DEFAULT_MAX_NEW_TOKENS = 256  # a decomposition or a plan of a few steps fits easily; junk is cut off here
DEFAULT_BATCH_SIZE = 8  # prompts per generate call; bounds activation memory of a 7B agent on long evaluations
DEFAULT_MAX_STEPS = 8  # a plan longer than this is cut: multi-turn runs one (slow) diffusion edit per step

# Why the chain edited the raw request instead of the sub-requests.
FALLBACK_DECOMPOSITION = "decomposition did not parse"
FALLBACK_SEQUENCING = "sequencing did not parse"
FALLBACK_EMPTY_STEPS = "sequencing gave no steps"

# ----------------------------------------------------------------------------------------------------------------------
# Agent 1: decomposition (paper §2.1, eq. 1). The output format is the one rewards.format_reward scores.

DECOMPOSITION_SYSTEM = (
    "You are the decomposition agent of an image-editing system. You look at an image and read a user's edit "
    "request, then extract what must change: the edit actions, the edit subjects and the edit goals."
)

DECOMPOSITION_FORMAT = """\
Decompose this request into three lists of short, canonical items:
- actions: the kinds of edit, one or two words each (for example Recoloring, Removal, Addition, Replacement, \
Resizing, Moving, Style transfer, Restoration);
- subjects: the objects or regions of the image that the edit changes, named briefly (coat, hair, background);
- goals: the target state the edit should reach (a color, a style, a size, a position, a new object).
First reason briefly inside <think></think>. Then write each list inside its tag, items separated by commas:
<think>...</think><action>...</action><subjects>...</subjects><goals>...</goals>
Example: for the request "Change the color of her coat and possibly hair to scarlet or copper red" the answer is
""" + rewards.render_decomposition(  # the same renderer that writes supervised targets, so the formats cannot drift
    think="The coat, and maybe the hair, get a new red color.",
    actions=["Recoloring"],
    subjects=["coat", "hair"],
    goals=["scarlet", "copper red"],
)


@dataclass(frozen=True)
class DecompositionResult:
    """One decomposition agent answer: the raw completion and its lenient parse (None when a list tag is missing)."""

    text: str
    decomposition: rewards.Decomposition | None


# ----------------------------------------------------------------------------------------------------------------------
# Agent 2: sequencing (paper §2.1, eq. 2).
#
# Output format: an ordered list inside <steps></steps>, one sub-request per line, numbered "1.", "2.", ... The tag
# makes the answer easy to find after any preamble; numbered lines are what instruction-tuned models write anyway.

SEQUENCING_SYSTEM = (
    "You are the sequencing agent of an image-editing system. You turn an analysed edit request into an ordered "
    "list of simple sub-requests that an image editor can carry out one at a time."
)

SEQUENCING_FORMAT = """\
Write the sub-requests that carry out this request on the image, in the order they should be applied:
- each sub-request is one short imperative sentence that changes one subject toward its goal;
- when an action changes several subjects, write one sub-request per subject;
- put edits that add, remove or move objects before edits of appearance (color, texture), and edits of the whole \
image (lighting, style) last.
Answer with a numbered list inside <steps></steps>, one sub-request per line. Example:
<steps>
1. Recolor the coat to scarlet
2. Recolor the hair to copper red
</steps>"""


def _list_line(items: list[str]) -> str:
    return ", ".join(items) if items else "(none)"


_FIELD_RE = re.compile(r"\{(request|actions|subjects|goals|instruction)\}")


def fill_template(template: str, **values: str) -> str:
    """The template with each {field} replaced, in one pass: a value that itself holds "{goals}" is left as it is."""
    return _FIELD_RE.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class PromptsError(ValueError):
    """A prompts file that cannot be used: the message names the file and the field."""


@dataclass(frozen=True)
class Prompts:
    """The two agents' prompts: a system turn each (None: no system turn) and a user-text template each; optionally
    EditThinker's critic-refiner's too.

    Templates fill {request}, and the sequencer's also {actions}, {subjects}, {goals} (each list comma-joined); the
    critic's fills {request} and {instruction} (the instruction that made the edit it judges). The paper's full
    prompts (`PAPER_PROMPTS`) are the default for real models. A small model trained on short templates of its own
    (the miniature's base) ships them as a JSON file of these fields, which train.py, evaluate.py and
    miniature/warmup.py take as `--prompts PATH` (`Prompts.load`). critic None (the field left out): the critic keeps
    its paper prompt (critics.PAPER_CRITIC), whatever the other four say.
    """

    decomposition_system: str | None
    decomposition: str
    sequencing_system: str | None
    sequencing: str
    critic_system: str | None = None
    critic: str | None = None

    def decomposition_prompt(self, request: str) -> str:
        """The user text of the decomposition agent (the image comes with it, where the chat template puts it)."""
        return fill_template(self.decomposition, request=request.strip())

    def sequencing_prompt(self, request: str, decomposition: rewards.Decomposition) -> str:
        """The user text of the sequencing agent: the request and the three lists, in its template."""
        d = decomposition
        return fill_template(self.sequencing, request=request.strip(), actions=_list_line(d.actions),
                     subjects=_list_line(d.subjects), goals=_list_line(d.goals))  # fmt: skip

    @classmethod
    def load(cls, path: str) -> Prompts:
        """Prompts from a JSON object with the four agent fields (a system may be null) and, optionally, both critic
        fields (critic_system, critic)."""
        try:
            data = json.loads(open(path, encoding="utf-8").read())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PromptsError(f"{path}: not a readable JSON prompts file ({err})") from None
        names = [f.name for f in fields(cls)]
        required = names[:4]
        allowed = (set(required), set(names))  # the four agent fields alone, or with both critic fields
        if not isinstance(data, dict) or set(data) not in allowed:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise PromptsError(f"{path}: expected the fields {required} (and optionally {names[4:]}), got {got}")
        for name in data:
            ok = isinstance(data[name], str) or (data[name] is None and name.endswith("_system"))
            if not ok:
                raise PromptsError(f"{path}: field {name!r} must be a string{' or null' * name.endswith('_system')}")
        for name, wanted in (("decomposition", ("{request}",)), ("critic", ("{request}", "{instruction}"))):
            missing = [w for w in wanted if name in data and w not in data[name]]
            if missing:
                raise PromptsError(f"{path}: field {name!r} must contain {' and '.join(missing)}")
        return cls(**data)


PAPER_PROMPTS = Prompts(
    decomposition_system=DECOMPOSITION_SYSTEM,
    decomposition="Edit request: {request}\n\n" + DECOMPOSITION_FORMAT,
    sequencing_system=SEQUENCING_SYSTEM,
    sequencing="Edit request: {request}\nActions: {actions}\nSubjects: {subjects}\nGoals: {goals}\n\n"
    + SEQUENCING_FORMAT,
)


_STEPS_OPEN, _STEPS_CLOSE = "<steps>", "</steps>"
_ITEM_PREFIX_RE = re.compile(r"^\s*(?:[-*•+]|\(?\d{1,2}[.):])\s+")  # "- x", "• x", "1. x", "2) x", "(3) x", "4: x"
_INLINE_NUMBER_RE = re.compile(r"(?:^|\s)(\d{1,2})[.)]\s")  # "1. remove the square 2. add a triangle"
_CODE_FENCE_RE = re.compile(r"^```[a-z]*\s*|\s*```$")


def _steps_body(text: str) -> tuple[str, bool]:
    """The body of the last complete <steps> block and True, or the whole stripped text and False."""
    close = text.rfind(_STEPS_CLOSE)
    open_ = text.rfind(_STEPS_OPEN, 0, close) if close >= 0 else -1
    if open_ < 0:
        return text.strip(), False
    return text[open_ + len(_STEPS_OPEN) : close].strip(), True


def _split_inline_numbering(line: str) -> list[str]:
    """Split "1. a 2. b 3. c" into ["1. a", "2. b", "3. c"] if it starts at 1 and counts up by one; else [line]."""
    matches = list(_INLINE_NUMBER_RE.finditer(line))
    numbers = [int(m.group(1)) for m in matches]
    starts_the_line = bool(matches) and not line[: matches[0].start(1)].strip()
    if len(matches) < 2 or not starts_the_line or numbers != list(range(1, len(matches) + 1)):
        return [line]
    starts = [m.start(1) for m in matches] + [len(line)]
    return [line[a:b] for a, b in zip(starts, starts[1:])]


def clean_step(step: str) -> str:
    """Drop the bullet or number, collapse whitespace, strip edge quotes and a trailing "." or ";"."""
    step = " ".join(_ITEM_PREFIX_RE.sub("", step, count=1).split())
    return step.strip("\"'`").rstrip(".;").strip()


def is_usable_step(step: str) -> bool:
    return any(ch.isalnum() for ch in step)  # "..." or "-" alone is not a sub-request


def parse_steps(text: str) -> list[str] | None:
    """Read the sequencing agent's answer into sub-requests, in order; [] for an empty list, None if unusable.

    Accepted, tried in this order:
      - a JSON list of strings, inside <steps></steps> or as the whole answer (a ``` fence around it is fine);
      - inside the LAST complete <steps></steps> block: one sub-request per line, a bullet ("-", "*", "•", "+") or a
        number ("1.", "2)", "(3)", "4:") in front is removed; one line numbered "1. a 2. b" is split at the numbers;
      - without the tags: a preamble ("Here is the plan:") then the same lines, but only if EVERY line after the
        preamble carries a bullet or a number, so prose (or a random model's junk) is not mistaken for a plan.
    Items are cleaned (`clean_step`) and those without a letter or digit dropped. Returns [] when a <steps> block
    holds nothing, so the caller can tell "the agent planned no edit" (FALLBACK_EMPTY_STEPS) from "the agent wrote no
    plan" (None, FALLBACK_SEQUENCING).
    """
    body, tagged = _steps_body(text)
    json_items = rewards.json_string_list(_CODE_FENCE_RE.sub("", body).strip())  # a ``` fence around it is fine
    if json_items is not None:
        return [step for step in map(clean_step, json_items) if is_usable_step(step)]
    lines = [line for line in body.splitlines() if line.strip()]
    if not tagged:
        first_item = next((i for i, line in enumerate(lines) if _ITEM_PREFIX_RE.match(line)), len(lines))
        lines = lines[first_item:]  # drop the preamble
        if not lines or not all(_ITEM_PREFIX_RE.match(line) for line in lines):
            return None
    pieces = [piece for line in lines for piece in _split_inline_numbering(line)]
    return [step for step in map(clean_step, pieces) if is_usable_step(step)]


def render_steps(steps: Sequence[str]) -> str:
    """Sub-requests as the sequencing agent writes them: a numbered list in <steps> (what `parse_steps` reads)."""
    return "<steps>\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1)) + "\n</steps>"


@dataclass(frozen=True)
class SequencingResult:
    """One sequencing agent answer: the raw completion and its sub-requests (None when unusable, see parse_steps)."""

    text: str
    steps: list[str] | None


# ----------------------------------------------------------------------------------------------------------------------
# Running an agent: policy.generate_texts, one left-padded batch and one generate call per chunk of examples.


def batches(n: int, size: int) -> list[range]:
    """range(n) cut into consecutive ranges of at most `size` (the agents' generate calls)."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def decompose(
    model,
    processor,
    images: Sequence[Image.Image],
    requests: Sequence[str],
    *,
    prompts: Prompts = PAPER_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
) -> list[DecompositionResult]:
    """Run the decomposition agent on a batch of (image, request) pairs with one generate call."""
    if len(images) != len(requests):
        raise ValueError(f"decompose: {len(images)} images but {len(requests)} requests")
    texts = policy.generate_texts(
        model,
        processor,
        images,
        [prompts.decomposition_prompt(request) for request in requests],
        prompts.decomposition_system,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
    )
    return [DecompositionResult(text=text, decomposition=rewards.parse_decomposition(text)) for text in texts]


def sequence(
    model,
    processor,
    images: Sequence[Image.Image],
    requests: Sequence[str],
    decompositions: Sequence[rewards.Decomposition],
    *,
    prompts: Prompts = PAPER_PROMPTS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
) -> list[SequencingResult]:
    """Run the sequencing agent on a batch of (image, request, decomposition) triples with one generate call."""
    if not len(images) == len(requests) == len(decompositions):
        raise ValueError(f"sequence: {len(images)} images, {len(requests)} requests, {len(decompositions)} decomps")
    texts = policy.generate_texts(
        model,
        processor,
        images,
        [prompts.sequencing_prompt(request, d) for request, d in zip(requests, decompositions)],
        prompts.sequencing_system,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
    )
    return [SequencingResult(text=text, steps=parse_steps(text)) for text in texts]


# ----------------------------------------------------------------------------------------------------------------------
# Agent 3: editing (paper §2.1, eq. 3), single-turn or multi-turn.
#
# Single-turn joins the sub-requests with "; " into one compound imperative sentence:
#     "Recolor the coat to scarlet; Recolor the hair to copper red"
# Why this joiner: diffusion editors are trained on short natural instructions, and a compound sentence is one (a
# numbered "1) ... 2) ..." list is rarer in their training data); "; " keeps every sub-request intact and in order,
# costs one token (FLUX's CLIP encoder truncates at 77 tokens); and a procedural editor (miniature/procedural.py) recovers the
# sub-requests exactly with `instruction.split(JOINER)` because each step's own trailing ";" or "." is stripped.

JOINER = "; "


def join_single_turn(steps: Sequence[str]) -> str:
    """All sub-requests as one instruction for a single editor call: stripped, trailing ".;" removed, JOINER-joined."""
    parts = [step.strip().rstrip(".;").strip() for step in steps]
    parts = [part for part in parts if part]
    if not parts:
        raise ValueError(f"join_single_turn: no non-blank sub-request in {list(steps)!r}")
    return JOINER.join(parts)


@dataclass
class StageSeconds:
    """Wall-clock seconds per stage. In a batch, an agent's generate time is shared equally among its examples."""

    decompose: float = 0.0
    sequence: float = 0.0
    edit: float = 0.0
    critique: float = 0.0  # the Think-while-Edit critic; 0 in the chain

    @property
    def total(self) -> float:
        return self.decompose + self.sequence + self.edit + self.critique


@dataclass
class ChainResult:
    """Everything one method did on one example, stage by stage.

    method         "original" (the editor alone on the raw request), "single" or "multi" (ImageEdit-R1's turns).
    fallback       None, or why the raw request was edited instead of the plan (a FALLBACK_* string).
    instructions   what the editor was asked, in call order (one entry per call that was attempted).
    step_images    the output of each successful editor call, in order; multi-turn's intermediate images.
    final_image    the last output; None when the editor raised EditError (then `edit_error` holds its message).
    """

    request: str
    method: ChainMethod
    seed: int
    decomposition_text: str | None = None
    decomposition: rewards.Decomposition | None = None
    sequencing_text: str | None = None
    steps: list[str] | None = None  # the parsed sub-requests (after max_steps), None if sequencing did not run/parse
    dropped_steps: int = 0  # sub-requests beyond max_steps that were not sent to the editor
    fallback: str | None = None
    instructions: list[str] = field(default_factory=list)
    step_images: list[Image.Image] = field(default_factory=list)
    final_image: Image.Image | None = None
    edit_error: str | None = None
    seconds: StageSeconds = field(default_factory=StageSeconds)

    def summary(self) -> dict:
        """The JSON-serialisable part (no images), for logs and result files."""
        d = self.decomposition
        return {
            "request": self.request,
            "method": self.method,
            "seed": self.seed,
            "decomposition_text": self.decomposition_text,
            "actions": None if d is None else d.actions,
            "subjects": None if d is None else d.subjects,
            "goals": None if d is None else d.goals,
            "sequencing_text": self.sequencing_text,
            "steps": self.steps,
            "dropped_steps": self.dropped_steps,
            "fallback": self.fallback,
            "instructions": self.instructions,
            "edit_error": self.edit_error,
            "seconds": {
                "decompose": self.seconds.decompose,
                "sequence": self.seconds.sequence,
                "edit": self.seconds.edit,
                "total": self.seconds.total,
            },
        }


def _run_edits(result: ChainResult, image: Image.Image, instructions: list[str], editor: Editor) -> None:
    """Apply the instructions one after another, each to the previous output; stop at the first EditError."""
    start = time.perf_counter()
    current = image
    for instruction in instructions:
        result.instructions.append(instruction)
        try:
            current = editor.edit(current, instruction, seed=result.seed)
        except EditError as err:
            result.edit_error = f"{type(err).__name__} on call {len(result.instructions)} ({instruction!r}): {err}"
            break
        result.step_images.append(current)
    else:
        result.final_image = current
    result.seconds.edit = time.perf_counter() - start


def edit_original(image: Image.Image, request: str, editor: Editor, seed: int = 0) -> ChainResult:
    """The paper's "Original" row: the editor alone, on the raw request, once."""
    result = ChainResult(request=request, method="original", seed=seed)
    _run_edits(result, image, [request], editor)
    return result


def editor_seeds(seed: int | Sequence[int], n: int, caller: str) -> list[int]:
    """One editor seed per example from one int (shared) or a sequence (one each)."""
    seeds = [seed] * n if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{caller}: {len(seeds)} seeds for {n} examples")
    return seeds


@dataclass(frozen=True)
class ChainSettings:
    """How the chain runs: one record, handed down unchanged from evaluate.py to every function of the chain.

    turns           "single": one editor call with every sub-request joined; "multi": one call per sub-request
    max_new_tokens  longest answer of either agent, in tokens
    greedy          True: argmax decoding (evaluation); False: sampling at `temperature` from the full softmax
    batch_size      examples per generate call of an agent
    max_steps       sub-requests beyond this many are dropped (counted in ChainResult.dropped_steps)
    prompts         the two agents' prompts (the paper's by default)
    """

    turns: Turns = "single"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    greedy: bool = True
    temperature: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    max_steps: int = DEFAULT_MAX_STEPS
    prompts: Prompts = PAPER_PROMPTS

    def __post_init__(self) -> None:
        if self.turns not in ("single", "multi"):
            raise ValueError(f"ChainSettings: turns must be 'single' or 'multi', got {self.turns!r}")
        if self.batch_size < 1:
            raise ValueError(f"ChainSettings: batch_size must be >= 1, got {self.batch_size}")


DEFAULT_CHAIN = ChainSettings()  # single-turn, greedy: the paper's best setting


def _editor_instructions(result: ChainResult, settings: ChainSettings) -> list[str]:
    """What the editor is asked, given the agents' answers already stored in `result`; sets `fallback`."""
    if result.decomposition is None:
        result.fallback = FALLBACK_DECOMPOSITION
    elif result.steps is None:
        result.fallback = FALLBACK_SEQUENCING
    elif not result.steps:
        result.fallback = FALLBACK_EMPTY_STEPS
    if result.fallback is not None:
        return [result.request]
    result.dropped_steps = max(0, len(result.steps) - settings.max_steps)
    result.steps = result.steps[: settings.max_steps]
    return [join_single_turn(result.steps)] if settings.turns == "single" else list(result.steps)


def decompose_and_sequence(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    decomposer: Agent,
    sequencer: Agent | None = None,
    settings: ChainSettings = DEFAULT_CHAIN,
    seed: int | Sequence[int] = 0,
) -> list[tuple[ChainResult, list[str]]]:
    """Steps 1 and 2 of `run_chain_batch` without the edits: per example, its ChainResult (agents' answers, fallback,
    no image yet) and the instructions its editor calls would get. The Think-while-Edit loop starts from these."""
    n = len(images)
    if len(requests) != n:
        raise ValueError(f"decompose_and_sequence: {n} images but {len(requests)} requests")
    seeds = editor_seeds(seed, n, "decompose_and_sequence")
    sequencer = decomposer if sequencer is None else sequencer
    generation = {"max_new_tokens": settings.max_new_tokens, "greedy": settings.greedy,
                  "temperature": settings.temperature, "prompts": settings.prompts}  # fmt: skip
    results = [ChainResult(request=r, method=settings.turns, seed=s) for r, s in zip(requests, seeds)]

    # 1. Decomposition agent, all examples.
    for rows in batches(n, settings.batch_size):
        start = time.perf_counter()
        outs = decompose(*decomposer, [images[i] for i in rows], [requests[i] for i in rows], **generation)
        share = (time.perf_counter() - start) / len(rows)
        for i, out in zip(rows, outs):
            results[i].decomposition_text, results[i].decomposition = out.text, out.decomposition
            results[i].seconds.decompose = share

    # 2. Sequencing agent, only the examples whose decomposition parsed.
    parsed = [i for i in range(n) if results[i].decomposition is not None]
    for chunk in batches(len(parsed), settings.batch_size):
        rows = [parsed[j] for j in chunk]
        start = time.perf_counter()
        outs = sequence(
            *sequencer,
            [images[i] for i in rows],
            [requests[i] for i in rows],
            [results[i].decomposition for i in rows],
            **generation,
        )
        share = (time.perf_counter() - start) / len(rows)
        for i, out in zip(rows, outs):
            results[i].sequencing_text, results[i].steps = out.text, out.steps
            results[i].seconds.sequence = share

    return [(result, _editor_instructions(result, settings)) for result in results]


def run_chain_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    decomposer: Agent,
    sequencer: Agent | None = None,
    settings: ChainSettings = DEFAULT_CHAIN,
    seed: int | Sequence[int] = 0,
) -> list[ChainResult]:
    """ImageEdit-R1 on many examples: decompose all, sequence those that parsed, then edit each.

    decomposer, sequencer: Agents; sequencer None reuses the decomposer (the paper uses one backbone for both). seed:
    one int for every example or one per example; every editor call of an example gets its seed, so the first call of
    "original", "single" and "multi" starts from the same noise.
    """
    planned = decompose_and_sequence(images, requests, decomposer, sequencer, settings, seed)
    # 3. Editing agent, example by example (editors take one image at a time).
    for image, (result, instructions) in zip(images, planned):
        _run_edits(result, image, instructions, editor)
    return [result for result, _ in planned]


def run_chain(
    image: Image.Image,
    request: str,
    editor: Editor,
    decomposer: Agent,
    sequencer: Agent | None = None,
    settings: ChainSettings = DEFAULT_CHAIN,
    seed: int = 0,
) -> ChainResult:
    """ImageEdit-R1 on one example (paper Algorithm 1): decompose, sequence, edit. See run_chain_batch."""
    return run_chain_batch([image], [request], editor, decomposer, sequencer, settings, seed)[0]


def load_agents(
    decomposer_path: str, sequencer_path: str | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[Agent, Agent]:
    """Load (decomposer, sequencer) as (model, processor) pairs; one load, shared, when the paths are the same.

    Any policy checkpoint works: the base model (the paper's "w/o RL"), a train.py export ("ImageEdit-R1") or a tiny
    model. sequencer_path None means the same checkpoint as the decomposer.
    """
    decomposer = Agent(*policy.load_policy(decomposer_path, dtype=dtype, device=device))
    if sequencer_path is None or sequencer_path == decomposer_path:
        return decomposer, decomposer
    return decomposer, Agent(*policy.load_policy(sequencer_path, dtype=dtype, device=device))

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

EditThinker's Think-while-Edit loop (the second paper, ../shared/papers/003) sits on top of any of these: a CRITIC-
REFINER agent looks at the source, the edit, the request and the instruction, writes
    <think>...</think><score>6</score><instruction>Recolor the coat to scarlet; recolor the hair red</instruction>
(`rewards.parse_critique`; 0-10 on the judge's scale), and the source is re-edited with the refined instruction until
the critic is satisfied, the instruction stops changing, or `max_turns` is reached; the best-scored edit is returned
(`run_think_batch`, from the raw request; `run_chain_think_batch`, from the chain's plan). Every turn is kept in a
`ThinkTurn`, the whole loop in a `ThinkResult`, which offers what evaluate.py reads from a ChainResult (`final_image`,
`edit_error`, `seconds`, `summary()`). Critics: `LocalCritic` (a transformers VLM, e.g. a trained thinker, shown source
and edit side by side in one image), `JudgeCritic` (a judge's rubric score plus a refiner), and evaluate.py's critic
behind an OpenAI-compatible API. The section comment above `DEFAULT_MAX_TURNS` gives the loop's exact rules.

This module imports only leaf and wrapper modules (`rewards`, `policy`, `grpo`, `editors`); the models, the editor
and the critic are passed in, so tests hand in fakes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from PIL import Image

import policy
import rewards
from editors import EditError, Editor

Turns = Literal["single", "multi"]
Method = Literal["original", "single", "multi"]
Agent = tuple[Any, Any]  # (model, processor) as returned by policy.load_policy, or a test's fake

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


def decomposition_prompt(request: str) -> str:
    """The user text that follows the image in the decomposition agent's prompt: the request and the format."""
    return f"Edit request: {request.strip()}\n\n{DECOMPOSITION_FORMAT}"


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


def sequencing_prompt(request: str, decomposition: rewards.Decomposition) -> str:
    """The user text that follows the image in the sequencing agent's prompt: request, decomposition, format."""
    return (
        f"Edit request: {request.strip()}\n"
        f"Actions: {_list_line(decomposition.actions)}\n"
        f"Subjects: {_list_line(decomposition.subjects)}\n"
        f"Goals: {_list_line(decomposition.goals)}\n\n"
        f"{SEQUENCING_FORMAT}"
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


def _json_steps(body: str) -> list[str] | None:
    """The strings of `body` if it is a JSON list of strings (possibly in a ``` fence), else None."""
    body = _CODE_FENCE_RE.sub("", body).strip()
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder allows
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _split_inline_numbering(line: str) -> list[str]:
    """Split "1. a 2. b 3. c" into ["1. a", "2. b", "3. c"] if it starts at 1 and counts up by one; else [line]."""
    matches = list(_INLINE_NUMBER_RE.finditer(line))
    numbers = [int(m.group(1)) for m in matches]
    starts_the_line = bool(matches) and not line[: matches[0].start(1)].strip()
    if len(matches) < 2 or not starts_the_line or numbers != list(range(1, len(matches) + 1)):
        return [line]
    starts = [m.start(1) for m in matches] + [len(line)]
    return [line[a:b] for a, b in zip(starts, starts[1:])]


def _clean_step(step: str) -> str:
    """Drop the bullet or number, collapse whitespace, strip edge quotes and a trailing "." or ";"."""
    step = " ".join(_ITEM_PREFIX_RE.sub("", step, count=1).split())
    return step.strip("\"'`").rstrip(".;").strip()


def _usable(step: str) -> bool:
    return any(ch.isalnum() for ch in step)  # "..." or "-" alone is not a sub-request


def parse_steps(text: str) -> list[str] | None:
    """Read the sequencing agent's answer into sub-requests, in order; [] for an empty list, None if unusable.

    Accepted, tried in this order:
      - a JSON list of strings, inside <steps></steps> or as the whole answer (a ``` fence around it is fine);
      - inside the LAST complete <steps></steps> block: one sub-request per line, a bullet ("-", "*", "•", "+") or a
        number ("1.", "2)", "(3)", "4:") in front is removed; one line numbered "1. a 2. b" is split at the numbers;
      - without the tags: a preamble ("Here is the plan:") then the same lines, but only if EVERY line after the
        preamble carries a bullet or a number, so prose (or a random model's junk) is not mistaken for a plan.
    Items are cleaned (`_clean_step`) and those without a letter or digit dropped. Returns [] when a <steps> block
    holds nothing, so the caller can tell "the agent planned no edit" (FALLBACK_EMPTY_STEPS) from "the agent wrote no
    plan" (None, FALLBACK_SEQUENCING).
    """
    body, tagged = _steps_body(text)
    json_items = _json_steps(body)
    if json_items is not None:
        return [step for step in map(_clean_step, json_items) if _usable(step)]
    lines = [line for line in body.splitlines() if line.strip()]
    if not tagged:
        first_item = next((i for i, line in enumerate(lines) if _ITEM_PREFIX_RE.match(line)), len(lines))
        lines = lines[first_item:]  # drop the preamble
        if not lines or not all(_ITEM_PREFIX_RE.match(line) for line in lines):
            return None
    pieces = [piece for line in lines for piece in _split_inline_numbering(line)]
    return [step for step in map(_clean_step, pieces) if _usable(step)]


@dataclass(frozen=True)
class SequencingResult:
    """One sequencing agent answer: the raw completion and its sub-requests (None when unusable, see parse_steps)."""

    text: str
    steps: list[str] | None


# ----------------------------------------------------------------------------------------------------------------------
# Running an agent: policy.generate_texts, one left-padded batch and one generate call per chunk of examples.


def _chunks(n: int, size: int) -> list[range]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def decompose(
    model,
    processor,
    images: Sequence[Image.Image],
    requests: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
) -> list[DecompositionResult]:
    """Run the decomposition agent on a batch of (image, request) pairs with one generate call."""
    if len(images) != len(requests):
        raise ValueError(f"decompose: {len(images)} images but {len(requests)} requests")
    prompts = [decomposition_prompt(request) for request in requests]
    texts = policy.generate_texts(
        model,
        processor,
        images,
        prompts,
        DECOMPOSITION_SYSTEM,
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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
) -> list[SequencingResult]:
    """Run the sequencing agent on a batch of (image, request, decomposition) triples with one generate call."""
    if not len(images) == len(requests) == len(decompositions):
        raise ValueError(f"sequence: {len(images)} images, {len(requests)} requests, {len(decompositions)} decomps")
    prompts = [sequencing_prompt(request, d) for request, d in zip(requests, decompositions)]
    texts = policy.generate_texts(
        model,
        processor,
        images,
        prompts,
        SEQUENCING_SYSTEM,
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
# costs one token (FLUX's CLIP encoder truncates at 77 tokens); and a procedural editor (shapes.py) recovers the
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
    method: Method
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


def _seeds(seed: int | Sequence[int], n: int, caller: str) -> list[int]:
    """One editor seed per example from one int (shared) or a sequence (one each)."""
    seeds = [seed] * n if isinstance(seed, int) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"{caller}: {len(seeds)} seeds for {n} examples")
    return seeds


def _plan(result: ChainResult, turns: Turns, max_steps: int) -> list[str]:
    """The instructions to send, given the agents' outputs already stored in `result`; sets `fallback`."""
    if result.decomposition is None:
        result.fallback = FALLBACK_DECOMPOSITION
    elif result.steps is None:
        result.fallback = FALLBACK_SEQUENCING
    elif not result.steps:
        result.fallback = FALLBACK_EMPTY_STEPS
    if result.fallback is not None:
        return [result.request]
    result.dropped_steps = max(0, len(result.steps) - max_steps)
    result.steps = result.steps[:max_steps]
    return [join_single_turn(result.steps)] if turns == "single" else list(result.steps)


def plan_chain_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    *,
    decomposer: Agent,
    sequencer: Agent | None = None,
    turns: Turns = "single",
    seed: int | Sequence[int] = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> list[tuple[ChainResult, list[str]]]:
    """Steps 1 and 2 of `run_chain_batch` without the edits: per example, its ChainResult (agents' answers, fallback,
    no image yet) and the instructions its editor calls would get. The Think-while-Edit loop starts from these."""
    n = len(images)
    if len(requests) != n:
        raise ValueError(f"plan_chain_batch: {n} images but {len(requests)} requests")
    if turns not in ("single", "multi"):
        raise ValueError(f"plan_chain_batch: turns must be 'single' or 'multi', got {turns!r}")
    seeds = _seeds(seed, n, "plan_chain_batch")
    sequencer = decomposer if sequencer is None else sequencer
    generation = {"max_new_tokens": max_new_tokens, "greedy": greedy, "temperature": temperature}
    results = [ChainResult(request=r, method=turns, seed=s) for r, s in zip(requests, seeds)]

    # 1. Decomposition agent, all examples.
    for rows in _chunks(n, batch_size):
        start = time.perf_counter()
        outs = decompose(*decomposer, [images[i] for i in rows], [requests[i] for i in rows], **generation)
        share = (time.perf_counter() - start) / len(rows)
        for i, out in zip(rows, outs):
            results[i].decomposition_text, results[i].decomposition = out.text, out.decomposition
            results[i].seconds.decompose = share

    # 2. Sequencing agent, only the examples whose decomposition parsed.
    parsed = [i for i in range(n) if results[i].decomposition is not None]
    for chunk in _chunks(len(parsed), batch_size):
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

    return [(result, _plan(result, turns, max_steps)) for result in results]


def run_chain_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    *,
    decomposer: Agent,
    sequencer: Agent | None = None,
    turns: Turns = "single",
    seed: int | Sequence[int] = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> list[ChainResult]:
    """ImageEdit-R1 on many examples: decompose all, sequence those that parsed, then edit each.

    decomposer, sequencer: (model, processor) pairs; sequencer None reuses the decomposer (the paper uses one backbone
    for both). seed: one int for every example or one per example; every editor call of an example gets its seed, so
    the first call of "original", "single" and "multi" starts from the same noise.
    """
    planned = plan_chain_batch(
        images,
        requests,
        decomposer=decomposer,
        sequencer=sequencer,
        turns=turns,
        seed=seed,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        batch_size=batch_size,
        max_steps=max_steps,
    )
    # 3. Editing agent, example by example (editors take one image at a time).
    for image, (result, instructions) in zip(images, planned):
        _run_edits(result, image, instructions, editor)
    return [result for result, _ in planned]


def run_chain(
    image: Image.Image,
    request: str,
    editor: Editor,
    *,
    decomposer: Agent,
    sequencer: Agent | None = None,
    turns: Turns = "single",
    seed: int = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    greedy: bool = True,
    temperature: float = 1.0,
    max_steps: int = DEFAULT_MAX_STEPS,
) -> ChainResult:
    """ImageEdit-R1 on one example (paper Algorithm 1): decompose, sequence, edit. See run_chain_batch."""
    return run_chain_batch(
        [image],
        [request],
        editor,
        decomposer=decomposer,
        sequencer=sequencer,
        turns=turns,
        seed=seed,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        max_steps=max_steps,
    )[0]


def load_agents(
    decomposer_path: str, sequencer_path: str | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> tuple[Agent, Agent]:
    """Load (decomposer, sequencer) as (model, processor) pairs; one load, shared, when the paths are the same.

    Any policy checkpoint works: the base model (the paper's "w/o RL"), a train.py export ("ImageEdit-R1") or a tiny
    model. sequencer_path None means the same checkpoint as the decomposer.
    """
    decomposer = policy.load_policy(decomposer_path, dtype=dtype, device=device)
    if sequencer_path is None or sequencer_path == decomposer_path:
        return decomposer, decomposer
    return decomposer, policy.load_policy(sequencer_path, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# EditThinker's Think-while-Edit loop (../shared/papers/003: critique the edit, refine the instruction, re-edit).
#
# The critic-refiner agent sees the SOURCE image, the current EDIT, the user's REQUEST and the INSTRUCTION that made
# the edit, and answers in the format `rewards.parse_critique` reads and `rewards.critique_format_reward` checks:
#     <think>...</think><score>0-10, the judge's scale</score><instruction>the refined instruction</instruction>
# The loop (`run_think_batch`), for each example:
#     turn 1: edit the source with the first instruction (the raw request, or the chain's joined sub-requests);
#     every turn t: the critic critiques edit t, which gives edit t its score and proposes instruction t+1; then
#         stop "satisfied"           if score_t >= threshold,
#         stop "instruction unchanged" if instruction t+1 equals (after `rewards.normalise_item`) the instruction of
#                                    this turn or of an earlier one: re-editing the source with an instruction already
#                                    tried, at the same seed, would only repeat an edit we have,
#         stop "max turns"           if t == max_turns,
#         else turn t+1 edits the SOURCE image (never edit t: each turn is a fresh attempt, so damage does not pile
#         up, as in EditThinker) with instruction t+1, at the example's seed (turns differ only by instruction).
# So EVERY edit is critiqued exactly once, the last one included: max_turns edits cost max_turns critic calls, and
# the critique of the last edit is what lets it compete (its proposed instruction goes unused). The loop returns the
# edit with the highest critic score (the earliest on a tie), not merely the last; if no critique parsed, turn 1.
# It also stops, keeping what it has, when a critique does not parse, the critic fails (an API error after its
# retries) or the editor refuses a later turn (EditError). If turn 1 is refused there is no edit at all: like the
# chain, `edit_error` holds the message and `final_image` is None.

DEFAULT_MAX_TURNS = 3  # ours (the paper's summary gives no number): at most 3 edits and 3 critiques per example
DEFAULT_THINK_THRESHOLD = 9.0  # ours: a perfect shapes edit scores ~9.7 (one call's artefacts); 9 = "satisfied"
SIDE_BY_SIDE_GAP = 28  # px between the two images of a local critic's input: one merged Qwen-VL token (2x2 of 14 px)
SIDE_BY_SIDE_GAP_RGB = (128, 128, 128)

# Why the loop stopped (ThinkResult.stop_reason).
STOP_SATISFIED = "critic satisfied"
STOP_UNCHANGED = "instruction unchanged"
STOP_MAX_TURNS = "max turns"
STOP_UNPARSED = "critique did not parse"
STOP_CRITIC_FAILED = "critic failed"
STOP_EDIT_ERROR = "editor refused"

CRITIC_SYSTEM = (
    "You are the critic of an image-editing system. You compare an edited image with the original, judge how well "
    "the edit carried out the user's request, and rewrite the editor's instruction so that the next edit does better."
)

CRITIC_FORMAT = """\
Score the edit from 0 to 10, the sum of three parts:
- request fulfilment, 0-4: did the edit make every change the user asked for (4: all of them, 0: none);
- image quality, 0-3: is the edited image clean and natural (3: no artefacts at all);
- preservation, 0-3: is everything the request does not mention left as it was (3: nothing else changed).
Then write a better instruction for the image editor. The editor will edit the ORIGINAL image again, from scratch, \
so the instruction must ask for the whole change. Editors follow short, explicit instructions: name each object by \
what it looks like, write one short imperative clause per change and separate the clauses with "; ". If the edit \
is already right, repeat the current instruction.
First reason briefly inside <think></think>, then write the score inside <score></score> and the instruction inside \
<instruction></instruction>:
<think>...</think><score>...</score><instruction>...</instruction>
Example: <think>The coat is scarlet, but the hair kept its colour.</think><score>6</score>\
<instruction>Recolor the coat to scarlet; recolor the hair to copper red</instruction>"""

_LAYOUT_TWO_IMAGES = "The first image is the ORIGINAL image; the second is the EDITED image."
_LAYOUT_SIDE_BY_SIDE = (
    "The image shows the ORIGINAL image on the left and the EDITED image on the right, separated by a gray bar."
)


def critic_prompt(request: str, instruction: str, *, side_by_side: bool) -> str:
    """The critic's user text: how the images are laid out, the request, the instruction that was edited, the format.

    side_by_side=True describes the one composed image of `side_by_side` (local critics); False, two images in the
    order ORIGINAL, EDITED (API critics, like judge.py's rubric messages).
    """
    layout = _LAYOUT_SIDE_BY_SIDE if side_by_side else _LAYOUT_TWO_IMAGES
    return (
        f"{layout}\nThe user's request: {request.strip()}\nThe instruction the editor was given: "
        f"{instruction.strip()}\n\n{CRITIC_FORMAT}"
    )


_CRITIQUE_TAG_RE = re.compile(r"</?(?:think|score|instruction)>")


def _neutralise_critique_tags(text: str) -> str:
    return _CRITIQUE_TAG_RE.sub(lambda m: "&lt;" + m.group(0)[1:], text)


def render_critique(think: str, score: float, instruction: str) -> str:
    """A critique in the canonical format (earns critique_format_reward 1 when think and instruction are not blank).

    The score is rounded to one decimal and written without a trailing ".0"; tag strings inside the reasoning or the
    instruction are neutralised (`<` -> `&lt;`) so no text can forge a block.
    """
    return (
        f"<think>{_neutralise_critique_tags(think.strip())}</think>\n<score>{round(score, 1):g}</score>\n"
        f"<instruction>{_neutralise_critique_tags(instruction.strip())}</instruction>"
    )


def side_by_side(source: Image.Image, edited: Image.Image) -> Image.Image:
    """One RGB image for a one-image-per-prompt VLM: the source on the left, a SIDE_BY_SIDE_GAP-px gray bar, the
    edit on the right (resized to the source's size if it differs). Size: (2 w + gap, h) of the source.

    policy.encode_prompts takes one image per prompt, and so does grpo.py's batch layout; composing keeps a local
    critic (and a thinker trained on these inputs) on that one-image path. With 28-px-aligned sources (the shapes
    world) every cell of both images stays one merged visual token.
    """
    source = source.convert("RGB")
    edited = edited.convert("RGB")
    if edited.size != source.size:
        edited = edited.resize(source.size, Image.Resampling.BICUBIC)
    width, height = source.size
    canvas = Image.new("RGB", (2 * width + SIDE_BY_SIDE_GAP, height), SIDE_BY_SIDE_GAP_RGB)
    canvas.paste(source, (0, 0))
    canvas.paste(edited, (width + SIDE_BY_SIDE_GAP, 0))
    return canvas


@dataclass(frozen=True)
class CritiqueSample:
    """What a critic looks at: the source image, the current edit, the user's request, the instruction edited."""

    source: Image.Image
    edited: Image.Image
    request: str
    instruction: str


@dataclass(frozen=True)
class CriticFailure:
    """A critique that could not be obtained (an API error after retries); `reason` says why, keys redacted."""

    reason: str


class Critic(Protocol):
    """Anything that critiques a batch of edits: one answer text (or CriticFailure) per sample, in order.

    Implementations: `LocalCritic` (a transformers VLM, e.g. a trained thinker), `JudgeCritic` (a judge's rubric
    score plus a refiner), and evaluate.py's OpenAI-compatible critic; tests hand in scripted fakes.
    """

    name: str

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]: ...


def critic_input(sample: CritiqueSample) -> tuple[Image.Image, str]:
    """The local critic's (image, user text) for one sample: the one prompt builder a thinker's trainer shares."""
    return side_by_side(sample.source, sample.edited), critic_prompt(
        sample.request, sample.instruction, side_by_side=True
    )


class LocalCritic:
    """A Qwen-VL policy (policy.load_policy: the base model or a trained thinker) as the critic, in this process.

    Each sample becomes one prompt with ONE image, `side_by_side(source, edited)`, and `critic_prompt(...,
    side_by_side=True)` under CRITIC_SYSTEM; `batch_size` samples share one `generate_texts` call. greedy=True for
    evaluation; greedy=False samples at `temperature` (a trainer's rollouts).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        name: str = "local",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = DEFAULT_BATCH_SIZE,
        greedy: bool = True,
        temperature: float = 1.0,
    ) -> None:
        self.model, self.processor, self.name = model, processor, name
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.greedy, self.temperature = greedy, temperature

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]:
        texts: list[str | CriticFailure] = []
        for rows in _chunks(len(samples), self.batch_size):
            inputs = [critic_input(samples[i]) for i in rows]
            texts += policy.generate_texts(
                self.model,
                self.processor,
                [image for image, _ in inputs],
                [prompt for _, prompt in inputs],
                CRITIC_SYSTEM,
                max_new_tokens=self.max_new_tokens,
                greedy=self.greedy,
                temperature=self.temperature,
            )
        return texts


_CLAUSE_SPLIT_RE = re.compile(r"[;\n]+|[.!?]+(?:\s+|$)")  # ";", newlines, a sentence end (not the "." in "1.5")


def restate_instruction(instruction: str) -> str:
    """JudgeCritic's refinement rule when it has no refiner model: the SAME words, one clause per sentence, line or
    ";"-part, list numbering dropped, JOINER-joined ("Remove the cat. Then add a dog." -> "Remove the cat; Then add
    a dog"). It reads nothing but the instruction, so it cannot use a hidden answer: it only gives the editor a
    cleaner form of what it was already asked, and returns a fixed point on its own output."""
    clauses = [_clean_step(clause) for clause in _CLAUSE_SPLIT_RE.split(instruction)]
    clauses = [clause for clause in clauses if _usable(clause)]
    return join_single_turn(clauses) if clauses else instruction.strip()


class JudgeCritic:
    """A critic whose SCORE is a judge's rubric total and whose INSTRUCTION comes from a refiner.

    judge: anything with `judge(original, edited, request)` returning a judge.Verdict-like record (`fulfilment`,
    `quality`, `preservation`, `total`), e.g. shapes.ShapesJudge: like a VLM critic it sees only the two images and
    the request. refiner: another Critic whose <instruction> is used and whose score is ignored (a local thinker);
    None uses `restate_instruction`, a rule that cannot know the answer. When the refiner's answer does not parse (or
    it fails), the current instruction is kept, so the loop stops with "instruction unchanged" and the turn keeps its
    score. The <think> block is the rubric's sub-scores (plus the refiner's reasoning), never the judge's free-text
    reason: the shapes judge names the missed edits there, which would leak the hidden answer into the critique.

    Caveat for reading results: when the same judge also scores the evaluation, choosing the best turn by its score
    selects with the evaluator's own eyes (best of k draws), a gain that is not evidence that refinement works.
    """

    def __init__(self, judge, refiner: Critic | None = None, name: str | None = None) -> None:
        self.judge, self.refiner = judge, refiner
        refined_by = "restate-rule" if refiner is None else refiner.name
        self.name = name or f"{getattr(judge, 'name', type(judge).__name__)}+{refined_by}"

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]:
        verdicts = [self.judge.judge(s.source, s.edited, s.request) for s in samples]
        refined = self._refine(samples)
        texts: list[str | CriticFailure] = []
        for verdict, (instruction, note) in zip(verdicts, refined):
            think = (
                f"Rubric: fulfilment {verdict.fulfilment:.1f}/4, quality {verdict.quality:.1f}/3, "
                f"preservation {verdict.preservation:.1f}/3. {note}"
            )
            texts.append(render_critique(think, verdict.total, instruction))
        return texts

    def _refine(self, samples: Sequence[CritiqueSample]) -> list[tuple[str, str]]:
        """(next instruction, a note for the reasoning) per sample."""
        if self.refiner is None:
            return [(restate_instruction(s.instruction), "Instruction restated by rule.") for s in samples]
        out = []
        for sample, answer in zip(samples, self.refiner.critique_many(samples)):
            parsed = None if isinstance(answer, CriticFailure) else rewards.parse_critique(answer)
            if parsed is None:
                why = answer.reason if isinstance(answer, CriticFailure) else "its answer did not parse"
                out.append((sample.instruction, f"Refiner {self.refiner.name}: {why}; instruction kept."))
            else:
                out.append((parsed.instruction, f"Refiner {self.refiner.name}: {parsed.think}"))
        return out


@dataclass
class ThinkTurn:
    """One turn of the loop: the instruction, the edit of the SOURCE it gave, and the critique of that edit.

    image None: the editor refused (edit_error says why) and nothing was critiqued. critique_text None with an image:
    the critic failed (critic_error). critique None with a text: the text did not parse (rewards.parse_critique).
    Seconds: the edit's wall clock, and this turn's share of its batched critic call.
    """

    number: int  # 1-based
    instruction: str
    image: Image.Image | None = None
    edit_error: str | None = None
    critique_text: str | None = None
    critique: rewards.Critique | None = None
    critic_error: str | None = None
    edit_seconds: float = 0.0
    critique_seconds: float = 0.0

    @property
    def score(self) -> float | None:
        return None if self.critique is None else self.critique.score

    def summary(self) -> dict:
        return {
            "turn": self.number,
            "instruction": self.instruction,
            "edit_error": self.edit_error,
            "critique_text": self.critique_text,
            "critic_error": self.critic_error,
            "score": self.score,
            "refined_instruction": None if self.critique is None else self.critique.instruction,
            "seconds": {"edit": self.edit_seconds, "critique": self.critique_seconds},
        }


@dataclass
class ThinkResult:
    """Everything the Think-while-Edit loop did on one example. The returned edit is `final_image`, the best turn's.

    plan          the chain that wrote the first instruction ("chain-rl+think"), not edited; None for the raw request.
    turns         every turn, in order (see ThinkTurn).
    best_turn     the number of the turn whose edit is returned: highest critic score, earliest on a tie, turn 1 when
                  no critique parsed; None when turn 1 was refused (then `edit_error` is its message).
    stop_reason   one of the STOP_* strings.
    """

    request: str
    seed: int
    first_instruction: str
    max_turns: int
    threshold: float
    plan: ChainResult | None = None
    turns: list[ThinkTurn] = field(default_factory=list)
    best_turn: int | None = None
    stop_reason: str | None = None
    method: str = "think"

    @property
    def final_image(self) -> Image.Image | None:
        return None if self.best_turn is None else self.turns[self.best_turn - 1].image

    @property
    def edit_error(self) -> str | None:
        return self.turns[0].edit_error if self.turns and self.final_image is None else None

    @property
    def instructions(self) -> list[str]:
        return [turn.instruction for turn in self.turns]

    @property
    def seconds(self) -> StageSeconds:
        plan = self.plan.seconds if self.plan is not None else StageSeconds()
        return StageSeconds(
            decompose=plan.decompose,
            sequence=plan.sequence,
            edit=sum(turn.edit_seconds for turn in self.turns),
            critique=sum(turn.critique_seconds for turn in self.turns),
        )

    def summary(self) -> dict:
        """The JSON-serialisable part (no images), for logs and result files."""
        seconds = self.seconds
        return {
            "request": self.request,
            "method": self.method,
            "seed": self.seed,
            "plan": None if self.plan is None else self.plan.summary(),
            "first_instruction": self.first_instruction,
            "max_turns": self.max_turns,
            "threshold": self.threshold,
            "turns": [turn.summary() for turn in self.turns],
            "best_turn": self.best_turn,
            "stop_reason": self.stop_reason,
            "instructions": self.instructions,
            "edit_error": self.edit_error,
            "seconds": {
                "decompose": seconds.decompose,
                "sequence": seconds.sequence,
                "edit": seconds.edit,
                "critique": seconds.critique,
                "total": seconds.total,
            },
        }


def _edit_turn(source: Image.Image, instruction: str, editor: Editor, seed: int, number: int) -> ThinkTurn:
    """Edit the SOURCE image with `instruction`; an EditError becomes the turn's edit_error."""
    turn = ThinkTurn(number=number, instruction=instruction)
    start = time.perf_counter()
    try:
        turn.image = editor.edit(source, instruction, seed=seed)
    except EditError as err:
        turn.edit_error = f"{type(err).__name__} on turn {number} ({instruction!r}): {err}"
    turn.edit_seconds = time.perf_counter() - start
    return turn


def _next_instruction(result: ThinkResult, turn: ThinkTurn, answer: str | CriticFailure) -> str | None:
    """Record the critique of the newest turn; return the next turn's instruction, or None after setting stop_reason."""
    if isinstance(answer, CriticFailure):
        turn.critic_error = answer.reason
        result.stop_reason = STOP_CRITIC_FAILED
        return None
    turn.critique_text, turn.critique = answer, rewards.parse_critique(answer)
    tried = {rewards.normalise_item(t.instruction) for t in result.turns}
    if turn.critique is None:
        result.stop_reason = STOP_UNPARSED
    elif turn.critique.score >= result.threshold:
        result.stop_reason = STOP_SATISFIED
    elif rewards.normalise_item(turn.critique.instruction) in tried:
        result.stop_reason = STOP_UNCHANGED
    elif len(result.turns) >= result.max_turns:
        result.stop_reason = STOP_MAX_TURNS
    else:
        return turn.critique.instruction
    return None


def _best_turn(turns: Sequence[ThinkTurn]) -> int | None:
    """The number of the highest-scored turn (earliest on a tie); turn 1 if none is scored; None if turn 1 failed."""
    scored = [turn for turn in turns if turn.image is not None and turn.score is not None]
    if scored:
        return max(scored, key=lambda turn: (turn.score, -turn.number)).number
    return 1 if turns and turns[0].image is not None else None


def run_think_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    critic: Critic,
    *,
    first_instructions: Sequence[str] | None = None,
    plans: Sequence[ChainResult] | None = None,
    seed: int | Sequence[int] = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> list[ThinkResult]:
    """The Think-while-Edit loop on many examples, in lock step (see the section comment above).

    Each round edits every example still going, then critiques all their new edits in ONE `critic.critique_many`
    call (a local critic batches its generate calls), so a 7B critic runs max_turns large batches, not one call per
    edit. first_instructions: turn 1's instruction per example (default: the raw request). plans: the chains that
    wrote them, kept for the report. seed: one editor seed for all examples or one each; every turn of an example
    uses its seed, so turn 1 of "think" is the very edit "original" makes.
    """
    n = len(images)
    first = list(requests) if first_instructions is None else list(first_instructions)
    if not len(requests) == len(first) == n or (plans is not None and len(plans) != n):
        raise ValueError(
            f"run_think_batch: {n} images, {len(requests)} requests, {len(first)} first instructions"
            + ("" if plans is None else f", {len(plans)} plans")
        )
    if max_turns < 1:
        raise ValueError(f"run_think_batch: max_turns must be >= 1, got {max_turns}")
    seeds = _seeds(seed, n, "run_think_batch")
    results = [
        ThinkResult(request, s, instruction, max_turns, threshold, plan=None if plans is None else plans[i])
        for i, (request, s, instruction) in enumerate(zip(requests, seeds, first))
    ]
    pending = dict(enumerate(first))  # example -> the instruction of its next turn
    while pending:
        for i, instruction in pending.items():  # always the SOURCE image, never the previous turn's edit
            results[i].turns.append(_edit_turn(images[i], instruction, editor, seeds[i], len(results[i].turns) + 1))
        edited = [i for i in pending if results[i].turns[-1].image is not None]
        for i in pending:
            if results[i].turns[-1].image is None:
                results[i].stop_reason = STOP_EDIT_ERROR
        samples = [CritiqueSample(images[i], results[i].turns[-1].image, requests[i], pending[i]) for i in edited]
        start = time.perf_counter()
        answers = critic.critique_many(samples) if samples else []
        if len(answers) != len(samples):
            raise ValueError(f"critic {critic.name!r} gave {len(answers)} answers for {len(samples)} samples")
        share = (time.perf_counter() - start) / max(1, len(samples))
        pending = {}
        for i, answer in zip(edited, answers):
            turn = results[i].turns[-1]
            turn.critique_seconds = share
            instruction = _next_instruction(results[i], turn, answer)
            if instruction is not None:
                pending[i] = instruction
    for result in results:
        result.best_turn = _best_turn(result.turns)
    return results


def run_think(
    image: Image.Image,
    request: str,
    editor: Editor,
    critic: Critic,
    *,
    first_instruction: str | None = None,
    seed: int = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> ThinkResult:
    """The Think-while-Edit loop on one example; first_instruction None starts from the raw request."""
    return run_think_batch(
        [image],
        [request],
        editor,
        critic,
        first_instructions=None if first_instruction is None else [first_instruction],
        seed=seed,
        max_turns=max_turns,
        threshold=threshold,
    )[0]


def run_chain_think_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    critic: Critic,
    *,
    decomposer: Agent,
    sequencer: Agent | None = None,
    seed: int | Sequence[int] = 0,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> list[ThinkResult]:
    """ImageEdit-R1's plan as the loop's first instruction ("chain-rl+think"): decompose and sequence (greedy), join
    the sub-requests for single-turn (or the raw request when the chain fell back), then think while editing. Turn 1
    is therefore the very edit the single-turn chain makes; the critic sees the user's raw request."""
    planned = plan_chain_batch(
        images,
        requests,
        decomposer=decomposer,
        sequencer=sequencer,
        turns="single",
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_steps=max_steps,
    )
    results = run_think_batch(
        images,
        requests,
        editor,
        critic,
        first_instructions=[instructions[0] for _, instructions in planned],
        plans=[plan for plan, _ in planned],
        seed=seed,
        max_turns=max_turns,
        threshold=threshold,
    )
    for result in results:
        result.method = "chain+think"
    return results

"""Rewards of the decomposition agent (ImageEdit-R1 §2.2): one format reward and three set-F1 rewards.

The decomposition agent reads an image and a request ("Change the color of her coat and possibly hair to scarlet or
copper red") and writes four tagged blocks:

    <think>The coat and the hair change colour; the target is a red.</think>
    <action>Recoloring</action>
    <subjects>coat, hair</subjects>
    <goals>scarlet or copper red</goals>

The paper rewards it with four terms: a format reward for the tag structure and, because actions, subjects and goals
are sets, one F1 score per set against the gold labels. This module is the whole of that reward. It imports only the
standard library and none of our modules, so `train.py` can hand `decomposition_reward` to `grpo.py` as a plain
function and tests can exercise it without a model.

Reading a tag body (`parse_items`)
    The policy is free to write a list in any of these forms, and each gives the same items:
      - comma-, semicolon- or newline-separated text: `coat, hair`, `coat; hair`, `coat\\nhair`;
      - bullet or numbered lines: `- coat`, `* coat`, `• coat`, `+ coat`, `1. coat`, `1) coat`;
      - a JSON list of strings: `["coat", "hair"]` (the only form in which an item may contain `,` `;` or a newline);
      - items wrapped in quotes or brackets: `[coat, hair]`, `'coat'`, `"coat"`, `(coat)`, `` `coat` ``.
    A body that is a JSON list of strings is read as JSON; anything else is split on newlines, a bullet or number
    prefix is removed from each line, and each line is split on `,` and `;`.

Normalising an item (`normalise_item`)
    Unicode NFKC, casefold, strip leading/trailing whitespace, punctuation (any Unicode `P*` category, so quotes,
    brackets, dashes, full stops) and backticks, then collapse inner whitespace runs to one space. Items that become
    empty are dropped and duplicates are removed, keeping the first occurrence. "  “Coat.” " -> "coat".

Comparing actions (`action_key`, used by the action F1 only)
    The paper writes "Recoloring"; a model may write "recolor", "Recolour" or "recolored". On top of normalisation,
    each word gets three small, predictable rewrites: British spellings `colour`->`color`, `grey`->`gray`,
    `centre`->`center` and a word-final `-ise/-ised/-ises/-ising/-isation` -> `-iz...`; then ONE suffix is stripped,
    the first of `ing, ed, es, s, e` that leaves at least 3 letters; then a doubled final letter is collapsed
    ("cropping" -> "cropp" -> "crop"). So "Recoloring", "recolor", "Recolour" all give "recolor", while "remove"
    ("remov") and "move" ("mov") stay apart. There is deliberately no synonym table.

Finding the blocks (`parse_decomposition`, lenient)
    For each tag we take the LAST complete block: the last `</tag>` and the last `<tag>` before it. Text around the
    tags is ignored, and a tag mentioned earlier (say inside the reasoning) does not shadow the final answer. Tags are
    matched exactly (lowercase, no attributes). A missing or unclosed `<action>`, `<subjects>` or `<goals>` gives
    None; a missing `<think>` gives `think=""`, since the reasoning earns no content reward.

The format reward (`format_reward`, strict)
    1.0 only if the text is exactly `<think>T</think> <action>A</action> <subjects>S</subjects> <goals>G</goals>`
    up to whitespace: each of the eight tag strings occurs exactly once and in that order (so nothing is nested or
    swapped), only whitespace lies before the first tag, between blocks and after `</goals>`, the reasoning T is not
    blank, and each list body holds at least one item. Anything else scores 0.0. Text after `</goals>` such as an
    end-of-sequence marker `<|im_end|>` also scores 0: the caller decodes completions with special tokens skipped.

Combining the rewards (`decomposition_reward`)
    total = (w_f * R_format + w_a * F1_action + w_s * F1_subject + w_g * F1_goal) / (w_f + w_a + w_s + w_g),
    a weighted mean, so total lies in [0, 1] whatever the weights. The paper lists the four rewards without weights;
    equal weights (all 1.0) are our choice. The content terms use the lenient parse, so a well-understood answer in a
    slightly wrong format still earns content reward while losing the format term; they are 0 when no decomposition
    can be parsed. `use_goal=False` is the paper's "without goal" ablation (§4): the goal term leaves the mean, and
    the breakdown still reports the goal F1 so it can be logged.

Rendering (`render_decomposition`) is the inverse used for supervised warm-up targets: one block per line, list items
joined with ", " when that text parses back to the same items, otherwise (an item holds `,` `;` `<` a newline, an
edge quote, a bullet-like prefix...) a JSON list with `<` and `>` escaped as `\\u003c`/`\\u003e` so no item can
forge a tag. Tag strings inside the reasoning are neutralised by writing their `<` as `&lt;`.

The critic's answer (EditThinker's Think-while-Edit loop, `agents.run_think_batch`)
    The critic-refiner agent looks at the source image, the current edit, the user's request and the instruction
    that produced the edit, and writes three tagged blocks:

        <think>The coat is scarlet but the hair kept its colour.</think>
        <score>6</score>
        <instruction>Recolor the coat to scarlet; recolor the hair to copper red</instruction>

    The score is on the judge's 0-10 scale (fulfilment 0-4 + quality 0-3 + preservation 0-3, judge.py): an integer
    or a decimal ("7", "7.5"), optionally written "7/10". `parse_critique` (lenient, used by the loop) reads the LAST
    complete <score> and <instruction> blocks, like `parse_decomposition`; it gives None when the score is missing,
    not such a number, or outside 0-10 (a critic off the scale must not end the loop as "satisfied"), or when the
    instruction is missing or holds no letter or digit. A missing <think> gives `think=""`.
    `critique_format_reward` (strict, the format term of a thinker's GRPO reward) is 1.0 only for exactly
    `<think>T</think> <score>S</score> <instruction>I</instruction>` up to whitespace: each of the six tag strings
    once and in that order, nothing but whitespace outside the blocks, T not blank, S a valid score, I usable.

No function here raises on any input string; every regex is linear (no nested quantifiers), so a 100k-character
adversarial completion costs milliseconds.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass

TAGS = ("think", "action", "subjects", "goals")
LIST_TAGS = TAGS[1:]

# The eight tag strings in the only order the format reward accepts.
_TAG_SEQUENCE = tuple(s for tag in TAGS for s in (f"<{tag}>", f"</{tag}>"))
_TAG_RE = re.compile(r"</?(?:think|action|subjects|goals)>")
_BULLET_RE = re.compile(r"^\s*(?:[-*•+]|\d{1,3}[.)])\s+")  # "- a", "• a", "1. a", "12) a"
_SEPARATOR_RE = re.compile(r"[,;]")
_EXTRA_EDGE_CHARS = "`"  # backticks are a symbol (Sk), not punctuation, but models wrap items in them

_SPELLING = (("colour", "color"), ("grey", "gray"), ("centre", "center"))
_ISE_SUFFIXES = (("isation", "ization"), ("ising", "izing"), ("ised", "ized"), ("ises", "izes"), ("ise", "ize"))
_STEM_SUFFIXES = ("ing", "ed", "es", "s", "e")
_MIN_STEM = 3  # a suffix is only stripped if at least this many letters remain ("uses" stays "use", not "us")


@dataclass(frozen=True)
class Decomposition:
    """One decomposition: the reasoning and three lists of normalised, de-duplicated items (first-occurrence order)."""

    think: str
    actions: list[str]
    subjects: list[str]
    goals: list[str]


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward of one completion: the weighted mean `total` and its four components, each in [0, 1]."""

    total: float
    format: float
    action: float
    subject: float
    goal: float  # always the goal F1, even when use_goal=False keeps it out of `total`


# ---------------------------------------------------------------------------------------------------------------------
# Items


def _is_edge_char(ch: str) -> bool:
    return ch.isspace() or ch in _EXTRA_EDGE_CHARS or unicodedata.category(ch).startswith("P")


def normalise_item(s: str) -> str:
    """NFKC, casefold, strip edge whitespace/punctuation/backticks, collapse inner whitespace. May return ""."""
    # NFKC again after casefold: casefolding can produce sequences that NFKC would compose differently.
    s = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", s).casefold())
    start, end = 0, len(s)
    while start < end and _is_edge_char(s[start]):
        start += 1
    while end > start and _is_edge_char(s[end - 1]):
        end -= 1
    return " ".join(s[start:end].split())


def _dedupe(items: Iterable[str], key: Callable[[str], str] = normalise_item) -> list[str]:
    """Apply `key` to each item, drop empty results and duplicates, keep first-occurrence order."""
    return list(dict.fromkeys(k for k in map(key, items) if k))


def _action_word_key(word: str) -> str:
    for british, american in _SPELLING:
        word = word.replace(british, american)
    for ise, ize in _ISE_SUFFIXES:
        if word.endswith(ise):
            word = word[: -len(ise)] + ize
            break
    for suffix in _STEM_SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= _MIN_STEM:
            word = word[: -len(suffix)]
            break
    if len(word) >= 2 and word[-1] == word[-2]:  # "cropp" -> "crop", "emboss" -> "embos" (same for all forms)
        word = word[:-1]
    return word


def action_key(s: str) -> str:
    """How action names compare: normalise, then per word fix a few British spellings and strip one suffix.

    "Recoloring", "recolor", "Recolour", "recolored" -> "recolor"; "remove" -> "remov" and "move" -> "mov" differ.
    """
    return " ".join(_action_word_key(w) for w in normalise_item(s).split())


def json_string_list(body: str) -> list[str] | None:
    """The strings of `body` if it is a JSON list of strings, else None (the lists and the sequencer's steps)."""
    if not (body.startswith("[") and body.endswith("]")):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or "[[[[..." deeper than the decoder allows
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _split_text_list(body: str) -> list[str]:
    """Split on newlines, drop a bullet/number prefix per line, split each line on ',' and ';'."""
    pieces = []
    for line in body.splitlines():
        pieces.extend(_SEPARATOR_RE.split(_BULLET_RE.sub("", line, count=1)))
    return pieces


def parse_items(body: str) -> list[str]:
    """The inside of one list tag -> normalised, de-duplicated items (see the module docstring for the forms)."""
    body = body.strip()
    raw = json_string_list(body)
    return _dedupe(raw if raw is not None else _split_text_list(body))


def _as_items(items: Iterable[str] | str) -> list[str]:
    """A bare string is one tag body (parsed as such), not an iterable of characters."""
    return parse_items(items) if isinstance(items, str) else list(items)


# ---------------------------------------------------------------------------------------------------------------------
# Decompositions


def _last_block(text: str, tag: str) -> str | None:
    """The body of the last complete <tag>...</tag> block, or None. Two rfinds: linear time on any input."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    open_ = text.rfind(f"<{tag}>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len(tag) + 2 : close]


def parse_decomposition(text: str) -> Decomposition | None:
    """Leniently read a completion: None if <action>, <subjects> or <goals> has no complete block; think may be ""."""
    bodies = {tag: _last_block(text, tag) for tag in TAGS}
    if any(bodies[tag] is None for tag in LIST_TAGS):
        return None
    return Decomposition(
        think=(bodies["think"] or "").strip(),
        actions=parse_items(bodies["action"]),
        subjects=parse_items(bodies["subjects"]),
        goals=parse_items(bodies["goals"]),
    )


def _render_items(items: Iterable[str] | str) -> str:
    """Items as ", "-joined text if that round-trips through parse_items, else as a JSON list (see module docstring)."""
    items = _as_items(items)
    plain = ", ".join(items)
    if "<" not in plain and parse_items(plain) == _dedupe(items):
        return plain
    # Escape < and > so no item can open or close a tag; json.loads turns the escapes back into characters.
    return json.dumps(items, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def _neutralise_tags(text: str, tags: re.Pattern = _TAG_RE) -> str:
    """Write the `<` of every tag string in `text` as `&lt;`, so no text can open or close a block."""
    return tags.sub(lambda m: "&lt;" + m.group(0)[1:], text)


def render_decomposition(think: str, actions: Iterable[str], subjects: Iterable[str], goals: Iterable[str]) -> str:
    """The canonical completion, one block per line; parse_decomposition reads it back to the same normalised items.

    It earns format reward 1 when `think` is not blank and every list has an item that survives normalisation.
    """
    return "\n".join(
        [
            f"<think>{_neutralise_tags(think.strip())}</think>",
            f"<action>{_render_items(actions)}</action>",
            f"<subjects>{_render_items(subjects)}</subjects>",
            f"<goals>{_render_items(goals)}</goals>",
        ]
    )


def gold_from_lists(
    actions: Iterable[str] | str, subjects: Iterable[str] | str, goals: Iterable[str] | str, think: str = ""
) -> Decomposition:
    """Normalise raw gold lists into a Decomposition; ValueError naming the field if a list ends up empty.

    Each list element is one item (a gold item may contain commas); a bare string is parsed like a tag body.
    """
    fields = {}
    for name, raw in (("actions", actions), ("subjects", subjects), ("goals", goals)):
        raw_items = _as_items(raw)
        for i, item in enumerate(raw_items):
            if not isinstance(item, str):
                raise ValueError(f"gold field {name!r}: item {i} is {type(item).__name__} {item!r}, expected str")
        fields[name] = _dedupe(raw_items)
        if not fields[name]:
            raise ValueError(f"gold field {name!r} is empty after normalisation (raw value {raw!r})")
    return Decomposition(think=think.strip(), **fields)


# ---------------------------------------------------------------------------------------------------------------------
# Rewards


def _exact_block_bodies(text: str, tag_re: re.Pattern, sequence: tuple[str, ...]) -> list[str] | None:
    """The bodies of the blocks when `text` is exactly those blocks (tags in `sequence` order, each once, only
    whitespace outside them); None otherwise. Shared by both strict format rewards."""
    matches = []
    for m in tag_re.finditer(text):
        matches.append(m)
        if len(matches) > len(sequence):  # bail out early on "<action>" * 20000
            return None
    if tuple(m.group(0) for m in matches) != sequence:
        return None
    # Text outside the blocks: before the first tag, between each close and the next open, after the last.
    outside = [text[: matches[0].start()], text[matches[-1].end() :]]
    outside += [text[matches[i].end() : matches[i + 1].start()] for i in range(1, len(matches) - 1, 2)]
    if any(part.strip() for part in outside):
        return None
    return [text[matches[i].end() : matches[i + 1].start()] for i in range(0, len(matches), 2)]


def format_reward(text: str) -> float:
    """1.0 if `text` is exactly the four blocks in order, whitespace around them, no empty body; else 0.0."""
    bodies = _exact_block_bodies(text, _TAG_RE, _TAG_SEQUENCE)
    if bodies is None or not bodies[0].strip() or not all(parse_items(body) for body in bodies[1:]):
        return 0.0
    return 1.0


def set_f1(
    pred: Iterable[str] | str, gold: Iterable[str] | str, *, key: Callable[[str], str] = normalise_item
) -> float:
    """F1 between two sets of items, compared after `key` (normalise_item by default; action_key for actions).

    F1 = 2 |P ∩ G| / (|P| + |G|); both sets empty -> 1.0, exactly one empty -> 0.0. A bare string is parsed as one tag
    body rather than iterated character by character.
    """
    p = set(_dedupe(_as_items(pred), key))
    g = set(_dedupe(_as_items(gold), key))
    if not p and not g:
        return 1.0
    return 2 * len(p & g) / (len(p) + len(g))


def decomposition_reward(
    text: str,
    gold: Decomposition,
    *,
    w_format: float = 1.0,
    w_action: float = 1.0,
    w_subject: float = 1.0,
    w_goal: float = 1.0,
    use_goal: bool = True,
) -> RewardBreakdown:
    """The reward of one completion: the weighted mean of format, action F1, subject F1 and (if use_goal) goal F1.

    Weights must be finite and >= 0 with a positive sum over the terms in use (ValueError otherwise). The content
    terms are 0 when no decomposition parses. With use_goal=False the goal F1 is still reported but not weighted.
    """
    weights = {"w_format": w_format, "w_action": w_action, "w_subject": w_subject, "w_goal": w_goal}
    for name, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"decomposition_reward: {name}={w!r} must be a finite number >= 0")
    w_goal_used = w_goal if use_goal else 0.0
    weight_sum = w_format + w_action + w_subject + w_goal_used
    if weight_sum <= 0:
        raise ValueError(f"decomposition_reward: the weights in use sum to {weight_sum}, need > 0 ({weights})")

    fmt = format_reward(text)
    pred = parse_decomposition(text)
    if pred is None:
        action = subject = goal = 0.0
    else:
        action = set_f1(pred.actions, gold.actions, key=action_key)
        subject = set_f1(pred.subjects, gold.subjects)
        goal = set_f1(pred.goals, gold.goals)
    total = (w_format * fmt + w_action * action + w_subject * subject + w_goal_used * goal) / weight_sum
    return RewardBreakdown(total=total, format=fmt, action=action, subject=subject, goal=goal)


# ---------------------------------------------------------------------------------------------------------------------
# The critic's answer (EditThinker's critique: reasoning, score, refined instruction; see the module docstring)

CRITIQUE_TAGS = ("think", "score", "instruction")
CRITIQUE_SCORE_MAX = 10.0  # the judge's scale: fulfilment 0-4 + quality 0-3 + preservation 0-3
_CRITIQUE_TAG_SEQUENCE = tuple(s for tag in CRITIQUE_TAGS for s in (f"<{tag}>", f"</{tag}>"))
_CRITIQUE_TAG_RE = re.compile(r"</?(?:think|score|instruction)>")
_SCORE_RE = re.compile(r"(\d{1,3}(?:\.\d{1,3})?)(?:\s*/\s*10)?", re.ASCII)  # "7", "7.5", "8/10", "8 / 10"


@dataclass(frozen=True)
class Critique:
    """One parsed critique: the reasoning ("" if absent), the score in [0, 10], the refined instruction (stripped)."""

    think: str
    score: float
    instruction: str


def _critique_score(body: str) -> float | None:
    """The number in a <score> body if it is on the 0-10 scale, else None."""
    match = _SCORE_RE.fullmatch(body.strip())
    if match is None:
        return None
    score = float(match.group(1))
    return score if score <= CRITIQUE_SCORE_MAX else None


def _usable_instruction(body: str) -> bool:
    return any(ch.isalnum() for ch in body)  # "..." or "-" alone is no instruction for an editor


def parse_critique(text: str) -> Critique | None:
    """Leniently read a critic's answer: None unless the last <score> is a 0-10 number and the last <instruction> is
    usable (module docstring); text around the blocks is ignored, <think> may be missing."""
    score_body = _last_block(text, "score")
    instruction = _last_block(text, "instruction")
    if score_body is None or instruction is None or not _usable_instruction(instruction):
        return None
    score = _critique_score(score_body)
    if score is None:
        return None
    return Critique(think=(_last_block(text, "think") or "").strip(), score=score, instruction=instruction.strip())


def critique_format_reward(text: str) -> float:
    """1.0 if `text` is exactly <think>T</think> <score>S</score> <instruction>I</instruction> up to whitespace, with
    T not blank, S a 0-10 score and I a usable instruction; else 0.0. The format term of a thinker's reward."""
    bodies = _exact_block_bodies(text, _CRITIQUE_TAG_RE, _CRITIQUE_TAG_SEQUENCE)
    if bodies is None:
        return 0.0
    think, score, instruction = bodies
    if not think.strip() or _critique_score(score) is None or not _usable_instruction(instruction):
        return 0.0
    return 1.0


def render_critique(think: str, score: float, instruction: str) -> str:
    """A critique in the canonical format (earns critique_format_reward 1 when think and instruction are not blank).

    The score is rounded to one decimal and written without a trailing ".0"; tag strings inside the reasoning or the
    instruction are neutralised (`<` -> `&lt;`) so no text can forge a block.
    """
    think, instruction = (_neutralise_tags(t.strip(), _CRITIQUE_TAG_RE) for t in (think, instruction))
    return f"<think>{think}</think>\n<score>{round(score, 1):g}</score>\n<instruction>{instruction}</instruction>"

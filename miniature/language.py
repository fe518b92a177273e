"""The shapes world's language: one parser of requests into clauses, references and goals, and the oracle.

The language (one parser for everyone)
    A request is split into clauses at `;` `,` `.` `!`, newlines, "and" and "then"; leading fillers ("please",
    "first", "also", "finally", "next") are dropped; "colour"/"centre" are read as "color"/"center". Each clause is
    one verb template (`_TEMPLATES`): a verb, a subject noun phrase and a goal. Inflected verbs and missing articles
    are fine ("Recoloring red circle to blue", the paper's sub-request style). Subjects are typed `Ref`s:
      attribute    "the red circle", "the triangle", "the blue shape", "the small square"
      position     "the shape in the top left"
      superlative  "the biggest shape", "the smallest shape"
      group        "everything on the left", "everything in the top row", "all the circles", "all the red shapes"
    Goals are literal ("blue", "small", "the top left") or relational ("the colour of the square", "the same size
    as the circle", "above the red circle", "to the left of the triangle"). `interpret(scene, request)` resolves all
    of it against the scene (the oracle); `oracle_apply` applies the result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from miniature.world import (
    CELLS,
    COLOURS,
    GRID,
    KINDS,
    REMOVED,
    SIZES,
    Edit,
    Scene,
    Shape,
    UnparsedClause,
    UnresolvedReference,
    apply_edits,
)

# ---------------------------------------------------------------------------------------------------------------------
# The language: clauses, references, goals


@dataclass(frozen=True)
class Ref:
    """A noun phrase that picks shapes of a scene; only `how == "attribute"` is grounded by the editor."""

    how: str  # "attribute" | "position" | "superlative" | "group"
    colour: str | None = None
    kind: str | None = None
    size: str | None = None
    cells: tuple[str, ...] = ()  # empty: any cell

    def matches(self, s: Shape) -> bool:
        return (
            self.colour in (None, s.colour)
            and self.kind in (None, s.kind)
            and self.size in (None, s.size)
            and (not self.cells or s.cell in self.cells)
        )


@dataclass(frozen=True)
class Goal:
    """A literal goal (`value`), or a relation to an anchor shape ("the colour of the square", "above the circle")."""

    value: str | None = None
    relation: str | None = None  # "color" | "size" | "above" | "below" | "left of" | "right of"
    anchor: Ref | None = None


@dataclass(frozen=True)
class Clause:
    """One parsed clause: an action, its subject (a Ref, or for add the new shape's name) and its goal."""

    action: str
    subject: Ref | None  # None for add
    new: str | None  # add only: "<colour> <kind>"
    goal: Goal

    @property
    def explicit(self) -> bool:
        """Within the editor's grasp: attribute subject (or a new shape) and a literal goal."""
        return (self.subject is None or self.subject.how == "attribute") and self.goal.relation is None


_FILLERS = {"please", "first", "then", "also", "and", "finally", "next"}
_SPLIT_RE = re.compile(r"[;,.!\n]|\b(?:and|then)\b")
_COLOUR = "|".join(COLOURS)
_KIND = "|".join(KINDS)
_SIZE = "|".join(SIZES)
_CELL = "|".join(CELLS)
ROW_CELLS = {"top": CELLS[0:3], "bottom": CELLS[6:9]}
COLUMN_CELLS = {"left": CELLS[0::3], "right": CELLS[2::3]}
NEIGHBOUR_STEPS = {"above": (-1, 0), "below": (1, 0), "left of": (0, -1), "right of": (0, 1)}


def split_clauses(text: str) -> list[str]:
    """Lower-case clauses of bare words, split at punctuation, "and" and "then", leading fillers dropped."""
    text = text.lower().replace("colour", "color").replace("centre", "center")
    clauses = []
    for piece in _SPLIT_RE.split(text):
        words = re.findall(r"[a-z]+", piece)
        while words and words[0] in _FILLERS:
            words.pop(0)
        if words:
            clauses.append(" ".join(words))
    return clauses


def _parse_ref(text: str) -> Ref | None:
    if m := re.fullmatch(rf"(?:the )?(?:({_SIZE}) )?(?:({_COLOUR}) )?({_KIND}|shape|object)", text):
        size, colour, kind = m.group(1), m.group(2), m.group(3)
        kind = None if kind in ("shape", "object") else kind
        return Ref("attribute", colour, kind, size) if (size or colour or kind) else None  # "the shape": no one
    if m := re.fullmatch(rf"the (?:shape|object) (?:in|at) the ({_CELL})(?: corner)?", text):
        return Ref("position", cells=(m.group(1),))
    if m := re.fullmatch(r"the (biggest|largest|smallest) (?:shape|object)", text):
        return Ref("superlative", size="small" if m.group(1) == "smallest" else "large")
    if m := re.fullmatch(r"everything (?:on the (left|right)|in the (top|bottom) row)", text):
        return Ref("group", cells=COLUMN_CELLS[m.group(1)] if m.group(1) else ROW_CELLS[m.group(2)])
    if m := re.fullmatch(rf"all (?:the )?({_COLOUR}) (?:shapes|objects)", text):
        return Ref("group", colour=m.group(1))
    if m := re.fullmatch(rf"all (?:the )?({_KIND})s", text):
        return Ref("group", kind=m.group(1))
    return None


def _single_anchor(text: str) -> Ref | None:
    ref = _parse_ref(text)
    return ref if ref is not None and ref.how != "group" else None


def _colour_goal(text: str) -> Goal | None:
    text = text.removeprefix("to ")
    if re.fullmatch(_COLOUR, text):
        return Goal(value=text)
    if (m := re.fullmatch(r"the (?:same )?color (?:of|as) (.+)", text)) and (anchor := _single_anchor(m.group(1))):
        return Goal(relation="color", anchor=anchor)
    return None


def _size_goal(text: str) -> Goal | None:
    text = text.removeprefix("to ")
    if re.fullmatch(_SIZE, text):
        return Goal(value=text)
    if (m := re.fullmatch(r"the same size as (.+)", text)) and (anchor := _single_anchor(m.group(1))):
        return Goal(relation="size", anchor=anchor)
    return None


def _place_goal(text: str) -> Goal | None:
    if m := re.fullmatch(rf"(?:to|at|in|into) (?:the )?({_CELL})(?: corner)?", text):
        return Goal(value=m.group(1))
    if (m := re.fullmatch(r"(above|below|to the left of|to the right of) (.+)", text)) and (
        anchor := _single_anchor(m.group(2))
    ):
        return Goal(relation=m.group(1).removeprefix("to the "), anchor=anchor)
    return None


# (action, verb, goal): `goal` parses the words after the subject, or is the literal goal that the verb carries.
# Templates are tried in order; the two readings of "make" and of "put" are told apart by what parses after them.
_TEMPLATES: tuple[tuple[str, str, Callable[[str], Goal | None] | str], ...] = (
    ("recolor", "recolor", _colour_goal),
    ("recolor", "change the color of", _colour_goal),
    ("recolor", "make", _colour_goal),
    ("recolor", "paint", _colour_goal),
    ("recolor", "turn", _colour_goal),
    ("remove", "remove", REMOVED),
    ("remove", "delete", REMOVED),
    ("remove", "erase", REMOVED),
    ("remove", "get rid of", REMOVED),
    ("resize", "make", _size_goal),
    ("resize", "resize", _size_goal),
    ("resize", "shrink", "small"),
    ("resize", "enlarge", "large"),
    ("move", "move", _place_goal),
    ("move", "shift", _place_goal),
    ("move", "drag", _place_goal),
    ("move", "put", _place_goal),
    ("add", "add", _place_goal),
    ("add", "draw", _place_goal),
    ("add", "place", _place_goal),
    ("add", "put", _place_goal),
)


def _parse_subject(action: str, text: str) -> tuple[Ref | None, str | None] | None:
    """(ref, None) for an edit of existing shapes, (None, "red circle") for add, None if it does not parse."""
    if action == "add":
        m = re.fullmatch(rf"(?:an? )?({_COLOUR}) ({_KIND})", text)
        return (None, f"{m.group(1)} {m.group(2)}") if m else None
    ref = _parse_ref(text)
    return (ref, None) if ref is not None else None


_VERBS = {verb.split()[0] for _, verb, _ in _TEMPLATES}


def _base_verb(word: str) -> str:
    """A template verb from an inflected one ("recoloring", "removed", "dragging"); other words unchanged."""
    for suffix in ("ing", "ed", "es", "s"):
        stem = word.removesuffix(suffix)
        if stem == word:
            continue
        for candidate in (stem, stem + "e", stem[:-1]):  # recolor(ing), remov(ing)+e, dragg(ing)-g
            if candidate in _VERBS:
                return candidate
    return word


def parse_clause(clause: str) -> Clause:
    """One clause of `split_clauses` -> Clause; UnparsedClause if no template fits.

    Inflected verbs ("Recoloring red circle to blue", the paper's sub-request style), missing articles and a
    missing "to" before a colour or size are accepted.
    """
    words = clause.split()
    if not words:
        raise UnparsedClause("an empty clause")
    words[0] = _base_verb(words[0])
    for action, verb, goal in _TEMPLATES:
        verb_words = verb.split()
        if words[: len(verb_words)] != verb_words:
            continue
        rest = words[len(verb_words) :]
        if isinstance(goal, str):  # the verb carries the goal: everything else is the subject
            if subject := _parse_subject(action, " ".join(rest)):
                return Clause(action, *subject, Goal(value=goal))
            continue
        for split in range(1, len(rest)):  # try every subject/goal boundary
            subject = _parse_subject(action, " ".join(rest[:split]))
            parsed_goal = goal(" ".join(rest[split:]))
            if subject is not None and parsed_goal is not None:
                return Clause(action, *subject, parsed_goal)
    raise UnparsedClause(f"no template fits the clause {clause!r}")


def resolve(ref: Ref, scene: Scene) -> list[Shape]:
    """The shapes `ref` names in `scene`; UnresolvedReference if none, or several for a singular reference."""
    found = [s for s in scene.shapes if ref.matches(s)]
    if not found or (ref.how != "group" and len(found) > 1):
        raise UnresolvedReference(f"{ref} names {len(found)} shapes in [{scene.describe()}]")
    return found


def _goal_value(goal: Goal, scene: Scene) -> str:
    if goal.relation is None:
        return goal.value
    anchor = resolve(goal.anchor, scene)[0]
    if goal.relation == "color":
        return anchor.colour
    if goal.relation == "size":
        return anchor.size
    row, col = divmod(CELLS.index(anchor.cell), GRID)
    d_row, d_col = NEIGHBOUR_STEPS[goal.relation]
    if not (0 <= row + d_row < GRID and 0 <= col + d_col < GRID):
        raise UnresolvedReference(f"nothing is {goal.relation} {anchor.describe()}")
    return CELLS[(row + d_row) * GRID + col + d_col]


def clause_edits(clause: Clause, scene: Scene) -> list[Edit]:
    """Resolve one clause against `scene` into explicit edits (one per shape it names)."""
    goal = _goal_value(clause.goal, scene)
    if clause.action == "add":
        return [Edit("add", clause.new, goal)]
    return [Edit(clause.action, s.name, goal) for s in resolve(clause.subject, scene)]


def interpret(scene: Scene, request: str) -> list[Edit]:
    """The oracle: every clause parsed and resolved against the ORIGINAL scene, indirect ones included."""
    clauses = split_clauses(request)
    if not clauses:
        raise UnparsedClause(f"the request {request!r} holds no clause")
    return [edit for text in clauses for edit in clause_edits(parse_clause(text), scene)]


def is_indirect(request: str) -> bool:
    """Whether some clause needs reasoning beyond attribute words (position, superlative, group, relation)."""
    return any(not parse_clause(text).explicit for text in split_clauses(request))


def oracle_apply(scene: Scene, request: str) -> Scene:
    """The scene a request asks for, with full understanding (resolves indirect references)."""
    return apply_edits(scene, interpret(scene, request))

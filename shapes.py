"""A synthetic "shapes world" in which ImageEdit-R1 runs end to end on a CPU in minutes.

The real system needs a 7B VLM, a diffusion editor and a GPT-4o judge. This module replaces the last two (and the
data) with small, exact stand-ins so that the SAME `train.py`, agents and `evaluate.py` can reproduce the paper's
comparisons on a laptop: editor alone < chain without RL < chain with RL, and single-turn vs multi-turn.

The world
    An 84x84 white image holds 3 to 5 flat shapes on a 3x3 grid of 28-pixel cells, at most one shape per cell.
    A shape has a kind (circle, square, triangle), a colour (red, green, blue, yellow, purple) and a size (small:
    12 px, large: 22 px), and sits centred in its cell. 28 px is one merged Qwen2.5-VL visual token (14-px patches,
    2x2 merge), so each cell is one token of the tiny policy. In a generated scene no two shapes share colour AND
    kind, so "the red circle" always names one shape. `render(scene)` draws a `Scene`; `read_scene(image)` recovers
    it from pixels (nearest palette colour per pixel; per cell, the dominant colour's mask matched against the
    six masks the renderer can draw and against "empty").

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

The canonical gold vocabulary (what the decomposition agent must produce)
    actions   recolor | remove | add | move | resize
    subjects  "<colour> <kind>" of the shape acted on, as it is in the ORIGINAL image ("red circle"); for add, the
              new shape. Indirect references are resolved: "everything on the left" -> the shapes there.
    goals     recolor -> a colour ("blue"); remove -> "removed"; add and move -> a cell ("top left", "top middle",
              "top right", "middle left", "center", "middle right", "bottom left", "bottom middle",
              "bottom right"); resize -> "small" | "large"
    Each list holds distinct items in first-occurrence order; all items are lower case single-spaced words, so
    `rewards.normalise_item` leaves them unchanged. Added shapes are always large (`ADDED_SIZE`).

Requests (`make_example`)
    1 to 3 clauses, at most `MAX_EDITS` = 3 shape edits in all (a group clause is one edit per member). Each shape is
    edited at most once, shapes used as anchors ("the colour of the square") are not edited, add/move go to cells
    that are empty in the original and distinct, and no edit creates a second shape of an existing colour and kind.
    So the edits of a request commute and every intermediate state keeps names unique: the target does not depend
    on the order of execution, and each sub-request stays valid in a multi-turn chain. A quarter of subjects and goals
    are indirect (`P_INDIRECT_SUBJECT`, `P_GROUP`, `P_RELATIONAL_GOAL`), which makes a bit over half of the requests
    indirect: `Example.indirect` (`is_indirect`) flags a request with a clause beyond the editor's grasp.
    `Example.subrequests` are the explicit clauses (`explicit_instruction`), one per edit; joined with "; " they make
    the single-turn instruction.

The editor (`ProceduralEditor`), modelled on what a real instruction editor does with a complex request
    1. It sees only the input image (it re-reads the scene from pixels) and the instruction text.
    2. It splits the instruction into clauses with the same splitter, and understands a clause only if it parses and
       names its subject by visible attributes alone (colour, kind, size) with a literal goal, and the subject is
       exactly one shape of the INPUT image. This is text-to-object grounding, which a text-conditioned editor does
       well; it has no counting, comparison, spatial or relational reasoning, so position / superlative / group
       subjects and relational goals are not understood. A clause that is not understood is ignored (the
       conservative failure: the image is left as it was there, rather than a wrong guess).
    3. It executes at most the first `MAX_CLAUSES` = 3 understood clauses: editors follow a few edits in one prompt
       and drop the rest; three is also the most edits one request of this world asks for, so the cap only binds
       when an instruction holds more clauses than the request had edits.
    4. All clauses are grounded in the input image and applied in one pass (an edit cannot refer to the result of
       an earlier clause of the same call); a clause whose shape is gone by then is skipped; add/move into an
       occupied cell replaces the occupant.
    5. Every call re-generates the whole image, and like a VAE round trip it is not lossless: artefacts already in
       the input are kept, and `ARTEFACT_FRACTION` = 1% of the pixels get a random colour (seeded by the call's
       seed, instruction and input pixels, so it is deterministic but differs from call to call). n calls leave
       about n% artefacts, which the judge's quality score sees: the cost of multi-turn editing.
    These rules were fixed once from the points above; they are not tuned to make any method win.

The judge (`ShapesJudge`), the paper's Table 2 rubric computed from the two images and the request
    The intended edits come from `interpret(read_scene(original), request)`; each edit touches its subject's cell
    and, for add/move, its goal cell (disjoint by construction).
    fulfilment   = 4 x share of edits whose touched cells in the edited image equal the target's
    preservation = 3 x kept / (untouched shapes + shapes that appeared in untouched empty cells), where kept counts
                   untouched shapes that are exactly unchanged; 3 when there is nothing to preserve
    quality      = 3 x max(0, 1 - artefact share / `QUALITY_ZERO_AT`), the artefact share being the pixels that
                   differ visibly from a clean render of what the judge read; 10% artefacts (rubric: "poor
                   quality, obviously edited") scores 0, one editor call (1%) about 2.7, three calls about 2.1.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from judge import FULFILMENT_MAX, PRESERVATION_MAX, QUALITY_MAX, Verdict

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary and geometry

KINDS = ("circle", "square", "triangle")
PALETTE = {  # flat, well separated colours (nearest-colour reading is exact on clean pixels)
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
CELLS = (  # row-major over the 3x3 grid; these names are also the gold goals of add and move
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
ACTIONS = ("recolor", "remove", "add", "move", "resize")
REMOVED = "removed"  # the gold goal of a removal
ADDED_SIZE = "large"  # an added shape is always large: the language has no size word in "add a red circle"

GRID = 3
CELL_PX = 28  # one merged Qwen2.5-VL token (14-px patch, 2x2 merge) per cell
IMAGE_SIZE = GRID * CELL_PX  # 84
EXTENT = {"small": 12, "large": 22}  # side of the shape's bounding box, px

MAX_EDITS = 3  # shape edits per request
MAX_CLAUSES = 3  # the editor's K: understood clauses executed per call (see the module docstring)
ARTEFACT_FRACTION = 0.01  # share of pixels an editor call corrupts
ARTEFACT_TOLERANCE = 32  # a pixel is an artefact if a channel is off by more than this from the clean render
QUALITY_ZERO_AT = 0.10  # artefact share at which quality reaches 0

# Request generator mix (the share of indirect phrasing in the data, not a property of any method).
P_GROUP = 0.15  # a group subject, when the action allows one and a group of 2+ free shapes exists
P_INDIRECT_SUBJECT = 0.25  # a position or superlative subject instead of an attribute one
P_RELATIONAL_GOAL = 0.25  # a relational goal instead of a literal one


class UnparsedClause(ValueError):
    """A clause that fits none of the language's templates."""


class UnresolvedReference(ValueError):
    """A reference that names no shape, or several where one is meant, in the scene it is resolved against."""


# ---------------------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Shape:
    """One flat shape, centred in its cell."""

    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    cell: str  # one of CELLS

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("kind", self.kind, KINDS),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("cell", self.cell, CELLS),
        ):
            if value not in allowed:
                raise ValueError(f"Shape.{field}={value!r}, expected one of {allowed}")

    @property
    def name(self) -> str:
        """How gold subjects name a shape: "red circle"."""
        return f"{self.colour} {self.kind}"

    def describe(self) -> str:
        return f"{self.size} {self.name} at the {self.cell}"


@dataclass(frozen=True)
class Scene:
    """The shapes of one image, in cell order (so equal scenes compare equal); at most one shape per cell."""

    shapes: tuple[Shape, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.shapes, key=lambda s: CELLS.index(s.cell)))
        cells = [s.cell for s in ordered]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene: two shapes in one cell: {[s.describe() for s in ordered]}")
        object.__setattr__(self, "shapes", ordered)

    def at(self, cell: str) -> Shape | None:
        return next((s for s in self.shapes if s.cell == cell), None)

    def named(self, name: str) -> Shape:
        """The one shape called `name` ("red circle"); UnresolvedReference if none or several."""
        found = [s for s in self.shapes if s.name == name]
        if len(found) != 1:
            raise UnresolvedReference(f"{len(found)} shapes named {name!r} in [{self.describe()}]")
        return found[0]

    def describe(self) -> str:
        return ", ".join(s.describe() for s in self.shapes) or "empty"

    def to_json(self) -> list[dict[str, str]]:
        return [{"kind": s.kind, "colour": s.colour, "size": s.size, "cell": s.cell} for s in self.shapes]

    @staticmethod
    def from_json(items: list[dict[str, str]]) -> Scene:
        return Scene(tuple(Shape(**item) for item in items))


@dataclass(frozen=True)
class Edit:
    """One explicit edit of one shape, in the gold vocabulary: Edit("recolor", "red circle", "blue")."""

    action: str  # one of ACTIONS
    subject: str  # "<colour> <kind>" of the shape in the scene the edit applies to (for add: the new shape)
    goal: str  # a colour, REMOVED, a cell or a size, depending on the action

    def __post_init__(self) -> None:
        goals = {"recolor": COLOURS, "remove": (REMOVED,), "add": CELLS, "move": CELLS, "resize": SIZES}
        if self.action not in goals:
            raise ValueError(f"Edit.action={self.action!r}, expected one of {ACTIONS}")
        colour, _, kind = self.subject.partition(" ")
        if colour not in COLOURS or kind not in KINDS:
            raise ValueError(f"Edit.subject={self.subject!r}, expected '<colour> <kind>'")
        if self.goal not in goals[self.action]:
            raise ValueError(f"Edit.goal={self.goal!r} for {self.action}, expected one of {goals[self.action]}")


@dataclass(frozen=True)
class Example:
    """One request on one scene, with its resolved edits (the gold) and the scene they lead to."""

    id: str
    scene: Scene
    request: str
    edits: tuple[Edit, ...]
    target: Scene
    indirect: bool  # some clause needs reasoning the editor lacks (position, superlative, group or relation)

    @property
    def image(self) -> Image.Image:
        return render(self.scene)

    @property
    def actions(self) -> list[str]:
        return list(dict.fromkeys(e.action for e in self.edits))

    @property
    def subjects(self) -> list[str]:
        return list(dict.fromkeys(e.subject for e in self.edits))

    @property
    def goals(self) -> list[str]:
        return list(dict.fromkeys(e.goal for e in self.edits))

    @property
    def subrequests(self) -> list[str]:
        """One explicit clause per edit: what an ideal sequencing agent would write."""
        return [explicit_instruction(e) for e in self.edits]


# ---------------------------------------------------------------------------------------------------------------------
# Pixels


def _cell_origin(cell: str) -> tuple[int, int]:
    row, col = divmod(CELLS.index(cell), GRID)
    return col * CELL_PX, row * CELL_PX


def render(scene: Scene) -> Image.Image:
    """The scene drawn without anti-aliasing, so every pixel is the background or one palette colour."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x, y = _cell_origin(s.cell)
        offset = (CELL_PX - EXTENT[s.size]) // 2
        x0, y0 = x + offset, y + offset
        x1, y1 = x0 + EXTENT[s.size] - 1, y0 + EXTENT[s.size] - 1  # Pillow's boxes include both ends
        fill = PALETTE[s.colour]
        if s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:  # an upright isosceles triangle
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


_LABEL_RGB = np.array([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=np.int32)  # (1 + colours, 3)


def _check_size(image: Image.Image) -> None:
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"shapes: image is {image.size[0]}x{image.size[1]}, the shapes world is {IMAGE_SIZE}x{IMAGE_SIZE}"
        )


def _templates() -> dict[tuple[str, str], np.ndarray]:
    """(kind, size) -> (CELL_PX, CELL_PX) bool mask of that shape as the renderer draws it in a cell."""
    masks = {}
    for kind in KINDS:
        for size in SIZES:
            pixels = np.asarray(render(Scene((Shape(kind, "red", size, CELLS[0]),))))  # (H, W, 3)
            masks[kind, size] = (pixels[:CELL_PX, :CELL_PX] != BACKGROUND).any(-1)  # (CELL_PX, CELL_PX)
    return masks


_SHAPE_MASKS = _templates()


def _labels(image: Image.Image) -> np.ndarray:
    """(H, W) uint8: each pixel's nearest palette entry, 0 for the background and 1 + COLOURS.index(colour)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)  # (H, W, 3)
    dist = ((rgb[:, :, None, :] - _LABEL_RGB[None, None]) ** 2).sum(-1)  # (H, W, 1 + colours)
    return dist.argmin(-1).astype(np.uint8)


def read_scene(image: Image.Image) -> Scene:
    """Recover the scene from pixels by template matching: exact on renders, robust to speckles and mild blur.

    Per cell: the most frequent non-background colour gives a mask, and the cell holds whichever of "nothing" and
    the six (kind, size) masks the renderer can draw agrees with it on the most pixels. The candidates differ by 32
    pixels or more, while an artefact flips one pixel, so a few percent of random pixels cannot change the answer.
    """
    _check_size(image)
    labels = _labels(image)  # (H, W)
    shapes = []
    for cell in CELLS:
        x, y = _cell_origin(cell)
        block = labels[y : y + CELL_PX, x : x + CELL_PX]  # (CELL_PX, CELL_PX)
        counts = np.bincount(block.ravel(), minlength=len(_LABEL_RGB))  # (1 + colours,)
        label = 1 + int(counts[1:].argmax())
        mask = block == label  # (CELL_PX, CELL_PX)
        best, best_agreement = None, np.count_nonzero(~mask)  # "nothing here" agrees where the mask is empty
        for (kind, size), template in _SHAPE_MASKS.items():
            agreement = np.count_nonzero(mask == template)
            if agreement > best_agreement:
                best, best_agreement = (kind, size), agreement
        if best is not None:
            shapes.append(Shape(best[0], COLOURS[label - 1], best[1], cell))
    return Scene(tuple(shapes))


def _artefact_mask(image: Image.Image, scene: Scene) -> np.ndarray:
    """(H, W) bool: pixels that differ visibly from the clean render of `scene`."""
    diff = np.abs(np.asarray(image.convert("RGB"), np.int32) - np.asarray(render(scene), np.int32))  # (H, W, 3)
    return diff.max(-1) > ARTEFACT_TOLERANCE


def artefact_share(image: Image.Image) -> float:
    """Share of pixels that are artefacts: they differ visibly from a clean render of what read_scene sees."""
    return float(_artefact_mask(image, read_scene(image)).mean())


# ---------------------------------------------------------------------------------------------------------------------
# Explicit edits


def _edited(shape: Shape, action: str, goal: str) -> Shape | None:
    """The shape after one edit (None once removed)."""
    if action == "remove":
        return None
    field = {"recolor": "colour", "resize": "size", "move": "cell"}[action]
    return replace(shape, **{field: goal})


def _place(scene: Scene, old: Shape | None, new: Shape | None) -> Scene:
    """Take `old` out and put `new` in, replacing whatever occupies new's cell (editors paint over)."""
    kept = [s for s in scene.shapes if s != old and (new is None or s.cell != new.cell)]
    return Scene(tuple(kept + ([new] if new is not None else [])))


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """One explicit edit; UnresolvedReference if the subject is not exactly one shape (add: any scene)."""
    if edit.action == "add":
        colour, kind = edit.subject.split(" ")
        return _place(scene, None, Shape(kind, colour, ADDED_SIZE, edit.goal))
    old = scene.named(edit.subject)
    return _place(scene, old, _edited(old, edit.action, edit.goal))


def apply_edits(scene: Scene, edits: Iterable[Edit]) -> Scene:
    for edit in edits:
        scene = apply_edit(scene, edit)
    return scene


def explicit_instruction(edit: Edit) -> str:
    """The canonical clause the editor understands for one edit ("recolor the red circle to blue")."""
    return {
        "recolor": f"recolor the {edit.subject} to {edit.goal}",
        "remove": f"remove the {edit.subject}",
        "add": f"add a {edit.subject} at the {edit.goal}",
        "move": f"move the {edit.subject} to the {edit.goal}",
        "resize": f"make the {edit.subject} {edit.goal}",
    }[edit.action]


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
_ROW_CELLS = {"top": CELLS[0:3], "bottom": CELLS[6:9]}
_COLUMN_CELLS = {"left": CELLS[0::3], "right": CELLS[2::3]}
_STEPS = {"above": (-1, 0), "below": (1, 0), "left of": (0, -1), "right of": (0, 1)}


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
        return Ref("group", cells=_COLUMN_CELLS[m.group(1)] if m.group(1) else _ROW_CELLS[m.group(2)])
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
    d_row, d_col = _STEPS[goal.relation]
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


# ---------------------------------------------------------------------------------------------------------------------
# Generating requests


@dataclass
class _Part:
    """One generated clause: its text, the edits it means, and the shapes it uses as anchors."""

    text: str
    edits: list[Edit]
    anchors: list[Shape]


@dataclass
class _Plan:
    """What the clauses chosen so far use up, so that the next one keeps the edits independent (docstring)."""

    scene: Scene
    touched: set[Shape]
    anchors: set[Shape]
    claimed: set[str]  # cells that an add/move goes to
    created: set[str]  # names that a recolor/add creates
    n_edits: int = 0

    def free(self) -> list[Shape]:
        return [s for s in self.scene.shapes if s not in self.touched and s not in self.anchors]

    def cell_free(self, cell: str) -> bool:
        return self.scene.at(cell) is None and cell not in self.claimed

    def name_free(self, name: str) -> bool:
        return name not in self.created and all(s.name != name for s in self.scene.shapes)

    def admits(self, part: _Part) -> bool:
        if self.n_edits + len(part.edits) > MAX_EDITS:
            return False
        subjects = [self.scene.named(e.subject) for e in part.edits if e.action != "add"]
        if any(s in self.touched or s in self.anchors or s in part.anchors for s in subjects):
            return False
        if any(a in self.touched for a in part.anchors):
            return False
        cells = [e.goal for e in part.edits if e.action in ("add", "move")]
        names = [e.subject for e in part.edits if e.action == "add"]
        names += [f"{e.goal} {e.subject.split(' ')[1]}" for e in part.edits if e.action == "recolor"]
        return (
            all(self.cell_free(c) for c in cells)
            and len(set(cells)) == len(cells)
            and all(self.name_free(n) for n in names)
            and len(set(names)) == len(names)
        )

    def commit(self, part: _Part) -> None:
        self.touched |= {self.scene.named(e.subject) for e in part.edits if e.action != "add"}
        self.anchors |= set(part.anchors)
        self.claimed |= {e.goal for e in part.edits if e.action in ("add", "move")}
        self.created |= {e.subject for e in part.edits if e.action == "add"}
        self.created |= {f"{e.goal} {e.subject.split(' ')[1]}" for e in part.edits if e.action == "recolor"}
        self.n_edits += len(part.edits)


def _attribute_phrases(scene: Scene, s: Shape) -> list[str]:
    """Attribute noun phrases that name `s` alone: the full name first, then shorter ones when unique."""
    phrases = [f"the {s.colour} {s.kind}"]
    if sum(t.kind == s.kind for t in scene.shapes) == 1:
        phrases.append(f"the {s.kind}")
    if sum(t.colour == s.colour for t in scene.shapes) == 1:
        phrases.append(f"the {s.colour} shape")
    return phrases


def _indirect_phrases(scene: Scene, s: Shape) -> list[str]:
    """Position and superlative noun phrases that name `s` alone."""
    phrases = [f"the shape in the {s.cell}", f"the shape at the {s.cell}", f"the object in the {s.cell}"]
    if sum(t.size == s.size for t in scene.shapes) == 1:
        phrases += ["the biggest shape", "the largest shape"] if s.size == "large" else ["the smallest shape"]
    return phrases


def _subject_phrase(rng: random.Random, scene: Scene, s: Shape) -> str:
    """A noun phrase for one shape: mostly by attributes (the full name 60% of the time), else by position."""
    if rng.random() < P_INDIRECT_SUBJECT:
        return rng.choice(_indirect_phrases(scene, s))
    phrases = _attribute_phrases(scene, s)
    return phrases[0] if len(phrases) == 1 or rng.random() < 0.6 else rng.choice(phrases[1:])


def _anchor_phrase(rng: random.Random, scene: Scene, s: Shape, hide_colour: bool) -> str:
    """A phrase for an anchor shape; `hide_colour` keeps its colour out of the text ("the colour of the square")."""
    phrases = _attribute_phrases(scene, s)
    if hide_colour:
        phrases = [p for p in phrases if s.colour not in p] or [f"the shape in the {s.cell}"]
    return rng.choice(phrases)


def _groups(plan: _Plan) -> list[tuple[str, list[Shape]]]:
    """Group phrases whose members (2 or more) are all still free to edit."""
    shapes, free = plan.scene.shapes, set(plan.free())
    groups = [
        (f"everything on the {side}", [s for s in shapes if s.cell in cells]) for side, cells in _COLUMN_CELLS.items()
    ]
    groups += [
        (f"everything in the {row} row", [s for s in shapes if s.cell in cells]) for row, cells in _ROW_CELLS.items()
    ]
    groups += [(f"all the {c} shapes", [s for s in shapes if s.colour == c]) for c in COLOURS]
    groups += [(f"all the {k}s", [s for s in shapes if s.kind == k]) for k in KINDS]
    return [(text, members) for text, members in groups if len(members) >= 2 and set(members) <= free]


def _pick_subjects(rng: random.Random, plan: _Plan, allow_group: bool) -> tuple[str, list[Shape]] | None:
    """(noun phrase, shapes) for the subject of a new clause, or None if no shape is free."""
    groups = _groups(plan) if allow_group else []
    if groups and rng.random() < P_GROUP:
        return rng.choice(groups)
    free = plan.free()
    if not free:
        return None
    s = rng.choice(free)
    return _subject_phrase(rng, plan.scene, s), [s]


def _other_free(plan: _Plan, exclude: list[Shape]) -> list[Shape]:
    """Shapes that can serve as anchors: not edited by any clause and not a subject of this one."""
    return [s for s in plan.scene.shapes if s not in plan.touched and s not in exclude]


def _recolor_part(rng: random.Random, plan: _Plan) -> _Part | None:
    picked = _pick_subjects(rng, plan, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked

    def valid(colour: str) -> bool:
        return all(s.colour != colour and plan.name_free(f"{colour} {s.kind}") for s in subjects)

    verb = rng.choice(["recolor {np} to {goal}", "make {np} {goal}", "paint {np} {goal}", "turn {np} {goal}"])
    verb = rng.choice([verb, "change the colour of {np} to {goal}", "change the color of {np} to {goal}"])
    anchors = [a for a in _other_free(plan, subjects) if valid(a.colour)]
    if len(subjects) == 1 and anchors and rng.random() < P_RELATIONAL_GOAL:
        anchor = rng.choice(anchors)
        relation = rng.choice(["the colour of {a}", "the same colour as {a}", "the color of {a}"])
        goal_text = relation.format(a=_anchor_phrase(rng, plan.scene, anchor, hide_colour=True))
        edits = [Edit("recolor", subjects[0].name, anchor.colour)]
        return _Part(verb.format(np=np_text, goal=goal_text), edits, [anchor])
    colours = [c for c in COLOURS if valid(c)]
    if not colours:
        return None
    colour = rng.choice(colours)
    edits = [Edit("recolor", s.name, colour) for s in subjects]
    return _Part(verb.format(np=np_text, goal=colour), edits, [])


def _remove_part(rng: random.Random, plan: _Plan) -> _Part | None:
    picked = _pick_subjects(rng, plan, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked
    verb = rng.choice(["remove {np}", "delete {np}", "erase {np}", "get rid of {np}"])
    return _Part(verb.format(np=np_text), [Edit("remove", s.name, REMOVED) for s in subjects], [])


def _resize_part(rng: random.Random, plan: _Plan) -> _Part | None:
    picked = _pick_subjects(rng, plan, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked
    if len({s.size for s in subjects}) != 1:  # "make everything on the left small" must change every member
        return None
    size = "small" if subjects[0].size == "large" else "large"
    anchors = [a for a in _other_free(plan, subjects) if a.size == size]
    if len(subjects) == 1 and anchors and rng.random() < P_RELATIONAL_GOAL:
        anchor = rng.choice(anchors)
        text = f"make {np_text} the same size as {_anchor_phrase(rng, plan.scene, anchor, hide_colour=False)}"
        return _Part(text, [Edit("resize", subjects[0].name, size)], [anchor])
    verbs = ["make {np} {goal}", "resize {np} to {goal}", "shrink {np}" if size == "small" else "enlarge {np}"]
    text = rng.choice(verbs).format(np=np_text, goal=size)
    return _Part(text, [Edit("resize", s.name, size) for s in subjects], [])


def _place_phrase(
    rng: random.Random, plan: _Plan, exclude: list[Shape], literal: list[str]
) -> tuple[str, str, list[Shape]] | None:
    """(goal text, cell, anchors) for where an add/move goes: a free cell, named or relative to an anchor."""
    relative = []
    for anchor in _other_free(plan, exclude):
        row, col = divmod(CELLS.index(anchor.cell), GRID)
        for relation, (d_row, d_col) in _STEPS.items():
            r, c = row + d_row, col + d_col
            if 0 <= r < GRID and 0 <= c < GRID and plan.cell_free(CELLS[r * GRID + c]):
                relative.append((relation, anchor, CELLS[r * GRID + c]))
    if relative and rng.random() < P_RELATIONAL_GOAL:
        relation, anchor, cell = rng.choice(relative)
        words = relation if relation in ("above", "below") else f"to the {relation}"
        return f"{words} {_anchor_phrase(rng, plan.scene, anchor, hide_colour=False)}", cell, [anchor]
    cells = [c for c in CELLS if plan.cell_free(c)]
    if not cells:
        return None
    cell = rng.choice(cells)
    return rng.choice(literal).format(cell=cell), cell, []


def _move_part(rng: random.Random, plan: _Plan) -> _Part | None:
    picked = _pick_subjects(rng, plan, allow_group=False)
    if picked is None:
        return None
    np_text, subjects = picked
    place = _place_phrase(rng, plan, subjects, ["to the {cell}", "into the {cell}"])
    if place is None:
        return None
    goal_text, cell, anchors = place
    verb = rng.choice(["move", "shift", "drag", "put"])
    if verb == "put" and not anchors:  # "put the red circle in the top left"
        goal_text = "in the " + goal_text.split(" the ", 1)[1]
    edits = [Edit("move", subjects[0].name, cell)]
    return _Part(f"{verb} {np_text} {goal_text}", edits, anchors)


def _add_part(rng: random.Random, plan: _Plan) -> _Part | None:
    names = [f"{c} {k}" for c in COLOURS for k in KINDS if plan.name_free(f"{c} {k}")]
    place = _place_phrase(rng, plan, [], ["at the {cell}", "in the {cell}"])
    if not names or place is None:
        return None
    name = rng.choice(names)
    goal_text, cell, anchors = place
    verb = rng.choice(["add", "draw", "place", "put"])
    return _Part(f"{verb} a {name} {goal_text}", [Edit("add", name, cell)], anchors)


_PART_MAKERS = {
    "recolor": _recolor_part,
    "remove": _remove_part,
    "add": _add_part,
    "move": _move_part,
    "resize": _resize_part,
}
_JOINS = {
    1: ["{0}"],
    2: ["{0} and {1}", "{0}, then {1}", "{0}; {1}", "{0}. Also {1}", "first {0}, then {1}"],
    3: ["{0}, {1} and {2}", "{0}; {1}; {2}", "{0}, then {1}, then {2}", "first {0}, then {1}, and finally {2}"],
}


def _random_scene(rng: random.Random) -> Scene:
    """3 to 5 shapes in distinct cells, no two of the same colour and kind."""
    names = rng.sample([(c, k) for c in COLOURS for k in KINDS], rng.randint(3, 5))
    cells = rng.sample(CELLS, len(names))
    return Scene(tuple(Shape(k, c, rng.choice(SIZES), cell) for (c, k), cell in zip(names, cells)))


def make_example(rng: random.Random, example_id: str = "shapes") -> Example:
    """A random scene and a request of 1-3 clauses (at most MAX_EDITS edits), with its gold edits and target."""
    scene = _random_scene(rng)
    plan = _Plan(scene, set(), set(), set(), set())
    parts: list[_Part] = []
    n_parts = rng.randint(1, 3)
    for _ in range(20 * n_parts):  # a few draws fail a constraint (a full grid, a used shape): draw again
        if len(parts) == n_parts:
            break
        part = _PART_MAKERS[rng.choice(ACTIONS)](rng, plan)
        if part is not None and plan.admits(part):
            plan.commit(part)
            parts.append(part)
    if not parts:
        raise RuntimeError(f"make_example: no admissible clause for the scene [{scene.describe()}]")
    request = rng.choice(_JOINS[len(parts)]).format(*(p.text for p in parts))
    if rng.random() < 0.2:
        request = "please " + request
    request = request[0].upper() + request[1:] + "."
    edits = tuple(e for p in parts for e in p.edits)
    return Example(example_id, scene, request, edits, apply_edits(scene, edits), is_indirect(request))


def make_dataset(n: int, seed: int) -> list[Example]:
    """n examples; example i depends only on (seed, i), so a longer dataset extends a shorter one."""
    return [make_example(random.Random(f"shapes-{seed}-{i}"), example_id=f"shapes-{seed}-{i:05d}") for i in range(n)]


def write_jsonl(examples: Iterable[Example], out_dir: str | Path, name: str = "data") -> Path:
    """Write `<out_dir>/<name>.jsonl` in the RL format of data.py, PNGs in `<out_dir>/images/`; return the path.

    Beyond the required fields each line has "edits" (the gold, paired), "subrequests" (one explicit clause per
    edit), "scene" and "target_scene" (for inspection and judges), and "indirect".
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.jsonl"
    with path.open("w") as f:
        for ex in examples:
            image_rel = f"images/{ex.id}.png"
            ex.image.save(out_dir / image_rel)
            record = {
                "id": ex.id,
                "image": image_rel,
                "request": ex.request,
                "actions": ex.actions,
                "subjects": ex.subjects,
                "goals": ex.goals,
                "edits": [[e.action, e.subject, e.goal] for e in ex.edits],
                "subrequests": ex.subrequests,
                "scene": ex.scene.to_json(),
                "target_scene": ex.target.to_json(),
                "indirect": ex.indirect,
            }
            f.write(json.dumps(record) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples back from a JSONL file: the scene read from the image, the edits from "edits" or else the oracle."""
    path = Path(path)
    examples = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            record = json.loads(line)
            missing = [k for k in ("id", "image", "request") if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) {missing}")
            with Image.open(path.parent / record["image"]) as im:
                scene = read_scene(im)
            if "edits" in record:
                edits = tuple(Edit(*e) for e in record["edits"])
            else:
                edits = tuple(interpret(scene, record["request"]))
            target = apply_edits(scene, edits)
            if "target_scene" in record and Scene.from_json(record["target_scene"]) != target:
                raise ValueError(
                    f"{path}:{line_no}: field 'target_scene' disagrees with the edits applied to the image"
                )
            examples.append(
                Example(record["id"], scene, record["request"], edits, target, is_indirect(record["request"]))
            )
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# The editor


def _call_seed(image: Image.Image, instruction: str, seed: int) -> int:
    """A seed that differs between calls (input pixels, instruction) but is fixed for identical calls."""
    digest = hashlib.sha256(f"{seed}\n{instruction}\n".encode() + image.convert("RGB").tobytes()).digest()
    return int.from_bytes(digest[:8], "little")


class ProceduralEditor:
    """A rule-based editor with a real editor's limits (see the module docstring): explicit clauses only, at most
    `max_clauses` per call, all grounded in the input image, and a little new damage on every call."""

    name = "shapes"

    def __init__(self, max_clauses: int = MAX_CLAUSES, artefact_fraction: float = ARTEFACT_FRACTION) -> None:
        self.max_clauses = max_clauses
        self.artefact_fraction = artefact_fraction

    def understood_edits(self, scene: Scene, instruction: str) -> list[Edit]:
        """The edits this editor will attempt: explicit clauses grounded in `scene`, the first `max_clauses`."""
        edits = []
        for text in split_clauses(instruction):
            if len(edits) == self.max_clauses:
                break
            try:
                clause = parse_clause(text)
                if clause.explicit:
                    edits += clause_edits(clause, scene)  # an explicit clause names one shape: one edit
            except (UnparsedClause, UnresolvedReference):
                continue  # not understood: this clause is ignored
        return edits

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        before = read_scene(image)
        after = before
        for edit in self.understood_edits(before, instruction):
            try:
                after = apply_edit(after, edit)
            except UnresolvedReference:  # its shape was changed by an earlier clause of this call
                continue
        pixels = np.array(render(after))  # (H, W, 3)
        carried = _artefact_mask(image, before)  # (H, W): artefacts already in the input survive re-generation
        pixels[carried] = np.asarray(image.convert("RGB"))[carried]
        rng = np.random.default_rng(_call_seed(image, instruction, seed))
        n_new = round(self.artefact_fraction * IMAGE_SIZE * IMAGE_SIZE)
        spots = rng.choice(IMAGE_SIZE * IMAGE_SIZE, size=n_new, replace=False)  # (n_new,) flat pixel indices
        pixels.reshape(-1, 3)[spots] = rng.integers(0, 256, size=(n_new, 3), dtype=np.uint8)
        return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------------------------------
# The judge


def _touched_cells(edit: Edit, before: Scene) -> set[str]:
    cells = set() if edit.action == "add" else {before.named(edit.subject).cell}
    return cells | ({edit.goal} if edit.action in ("add", "move") else set())


class ShapesJudge:
    """The rubric of the paper's Table 2, computed exactly from the two images and the request (module docstring)."""

    name = "shapes-judge"

    def judge(self, original: Image.Image, edited: Image.Image, request: str) -> Verdict:
        before, after = read_scene(original), read_scene(edited)
        edits = interpret(before, request)
        target = apply_edits(before, edits)
        touched: set[str] = set()
        missed = []
        for edit in edits:
            cells = _touched_cells(edit, before)
            touched |= cells
            if any(after.at(c) != target.at(c) for c in cells):
                missed.append(explicit_instruction(edit))
        made = len(edits) - len(missed)

        untouched = [c for c in CELLS if c not in touched]
        to_keep = [c for c in untouched if before.at(c) is not None]
        kept = sum(after.at(c) == before.at(c) for c in to_keep)
        appeared = sum(before.at(c) is None and after.at(c) is not None for c in untouched)
        at_risk = len(to_keep) + appeared
        preservation = PRESERVATION_MAX * (kept / at_risk if at_risk else 1.0)

        artefacts = float(_artefact_mask(edited, after).mean())
        quality = QUALITY_MAX * max(0.0, 1.0 - artefacts / QUALITY_ZERO_AT)

        reason = f"made {made}/{len(edits)} requested changes"
        reason += f" (missed: {'; '.join(missed)})" if missed else ""
        reason += f"; kept {kept}/{len(to_keep)} untouched shapes"
        reason += f", {appeared} unwanted new shape(s)" if appeared else ""
        reason += f"; artefacts on {artefacts:.1%} of pixels"
        return Verdict(FULFILMENT_MAX * made / len(edits), quality, preservation, reason)

    def judge_many(
        self, samples: Sequence[tuple[Image.Image, Image.Image, str]], progress: Callable[[int], None] | None = None
    ) -> list[Verdict]:
        """judge.py's batch interface: (original, edited, request) triples -> one Verdict each, in order."""
        verdicts = []
        for original, edited, request in samples:
            verdicts.append(self.judge(original, edited, request))
            if progress is not None:
                progress(1)
        return verdicts

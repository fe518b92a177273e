"""The shapes world: its vocabulary, scenes and edits, and the pixels (render and read back).

Part of the miniature (miniature/__init__.py): a synthetic world in which ImageEdit-R1 runs end to end on a CPU.

The world
    An 84x84 white image holds 3 to 5 flat shapes on a 3x3 grid of 28-pixel cells, at most one shape per cell.
    A shape has a kind (circle, square, triangle), a colour (red, green, blue, yellow, purple) and a size (small:
    12 px, large: 22 px), and sits centred in its cell. 28 px is one merged Qwen2.5-VL visual token (14-px patches,
    2x2 merge), so each cell is one token of the tiny policy. In a generated scene no two shapes share colour AND
    kind, so "the red circle" always names one shape. `render(scene)` draws a `Scene`; `read_scene(image)` recovers
    it from pixels (nearest palette colour per pixel; per cell, the dominant colour's mask matched against the
    six masks the renderer can draw and against "empty").

The canonical gold vocabulary (what the decomposition agent must produce)
    actions   recolor | remove | add | move | resize
    subjects  "<colour> <kind>" of the shape acted on, as it is in the ORIGINAL image ("red circle"); for add, the
              new shape. Indirect references are resolved: "everything on the left" -> the shapes there.
    goals     recolor -> a colour ("blue"); remove -> "removed"; add and move -> a cell ("top left", "top middle",
              "top right", "middle left", "center", "middle right", "bottom left", "bottom middle",
              "bottom right"); resize -> "small" | "large"
    Each list holds distinct items in first-occurrence order; all items are lower case single-spaced words, so
    `rewards.normalise_item` leaves them unchanged. Added shapes are always large (`ADDED_SIZE`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

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


def artefact_mask(image: Image.Image, scene: Scene) -> np.ndarray:
    """(H, W) bool: pixels that differ visibly from the clean render of `scene`."""
    diff = np.abs(np.asarray(image.convert("RGB"), np.int32) - np.asarray(render(scene), np.int32))  # (H, W, 3)
    return diff.max(-1) > ARTEFACT_TOLERANCE


def artefact_share(image: Image.Image) -> float:
    """Share of pixels that are artefacts: they differ visibly from a clean render of what read_scene sees."""
    return float(artefact_mask(image, read_scene(image)).mean())


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

"""Requests of the shapes world, generated with their gold decompositions, and the JSONL files that hold them.

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
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from miniature.language import COLUMN_CELLS, NEIGHBOUR_STEPS, ROW_CELLS, interpret, is_indirect
from miniature.world import (
    ACTIONS,
    CELLS,
    COLOURS,
    GRID,
    KINDS,
    MAX_EDITS,
    P_GROUP,
    P_INDIRECT_SUBJECT,
    P_RELATIONAL_GOAL,
    REMOVED,
    SIZES,
    Edit,
    Example,
    Scene,
    Shape,
    apply_edits,
    read_scene,
)

# ---------------------------------------------------------------------------------------------------------------------
# Generating requests


@dataclass
class _Part:
    """One generated clause: its text, the edits it means, and the shapes it uses as anchors."""

    text: str
    edits: list[Edit]
    anchors: list[Shape]


@dataclass
class _Draft:
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


def _groups(draft: _Draft) -> list[tuple[str, list[Shape]]]:
    """Group phrases whose members (2 or more) are all still free to edit."""
    shapes, free = draft.scene.shapes, set(draft.free())
    groups = [
        (f"everything on the {side}", [s for s in shapes if s.cell in cells]) for side, cells in COLUMN_CELLS.items()
    ]
    groups += [
        (f"everything in the {row} row", [s for s in shapes if s.cell in cells]) for row, cells in ROW_CELLS.items()
    ]
    groups += [(f"all the {c} shapes", [s for s in shapes if s.colour == c]) for c in COLOURS]
    groups += [(f"all the {k}s", [s for s in shapes if s.kind == k]) for k in KINDS]
    return [(text, members) for text, members in groups if len(members) >= 2 and set(members) <= free]


def _pick_subjects(rng: random.Random, draft: _Draft, allow_group: bool) -> tuple[str, list[Shape]] | None:
    """(noun phrase, shapes) for the subject of a new clause, or None if no shape is free."""
    groups = _groups(draft) if allow_group else []
    if groups and rng.random() < P_GROUP:
        return rng.choice(groups)
    free = draft.free()
    if not free:
        return None
    s = rng.choice(free)
    return _subject_phrase(rng, draft.scene, s), [s]


def _other_free(draft: _Draft, exclude: list[Shape]) -> list[Shape]:
    """Shapes that can serve as anchors: not edited by any clause and not a subject of this one."""
    return [s for s in draft.scene.shapes if s not in draft.touched and s not in exclude]


def _recolor_part(rng: random.Random, draft: _Draft) -> _Part | None:
    picked = _pick_subjects(rng, draft, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked

    def valid(colour: str) -> bool:
        return all(s.colour != colour and draft.name_free(f"{colour} {s.kind}") for s in subjects)

    verb = rng.choice(["recolor {np} to {goal}", "make {np} {goal}", "paint {np} {goal}", "turn {np} {goal}"])
    verb = rng.choice([verb, "change the colour of {np} to {goal}", "change the color of {np} to {goal}"])
    anchors = [a for a in _other_free(draft, subjects) if valid(a.colour)]
    if len(subjects) == 1 and anchors and rng.random() < P_RELATIONAL_GOAL:
        anchor = rng.choice(anchors)
        relation = rng.choice(["the colour of {a}", "the same colour as {a}", "the color of {a}"])
        goal_text = relation.format(a=_anchor_phrase(rng, draft.scene, anchor, hide_colour=True))
        edits = [Edit("recolor", subjects[0].name, anchor.colour)]
        return _Part(verb.format(np=np_text, goal=goal_text), edits, [anchor])
    colours = [c for c in COLOURS if valid(c)]
    if not colours:
        return None
    colour = rng.choice(colours)
    edits = [Edit("recolor", s.name, colour) for s in subjects]
    return _Part(verb.format(np=np_text, goal=colour), edits, [])


def _remove_part(rng: random.Random, draft: _Draft) -> _Part | None:
    picked = _pick_subjects(rng, draft, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked
    verb = rng.choice(["remove {np}", "delete {np}", "erase {np}", "get rid of {np}"])
    return _Part(verb.format(np=np_text), [Edit("remove", s.name, REMOVED) for s in subjects], [])


def _resize_part(rng: random.Random, draft: _Draft) -> _Part | None:
    picked = _pick_subjects(rng, draft, allow_group=True)
    if picked is None:
        return None
    np_text, subjects = picked
    if len({s.size for s in subjects}) != 1:  # "make everything on the left small" must change every member
        return None
    size = "small" if subjects[0].size == "large" else "large"
    anchors = [a for a in _other_free(draft, subjects) if a.size == size]
    if len(subjects) == 1 and anchors and rng.random() < P_RELATIONAL_GOAL:
        anchor = rng.choice(anchors)
        text = f"make {np_text} the same size as {_anchor_phrase(rng, draft.scene, anchor, hide_colour=False)}"
        return _Part(text, [Edit("resize", subjects[0].name, size)], [anchor])
    verbs = ["make {np} {goal}", "resize {np} to {goal}", "shrink {np}" if size == "small" else "enlarge {np}"]
    text = rng.choice(verbs).format(np=np_text, goal=size)
    return _Part(text, [Edit("resize", s.name, size) for s in subjects], [])


def _place_phrase(
    rng: random.Random, draft: _Draft, exclude: list[Shape], literal: list[str]
) -> tuple[str, str, list[Shape]] | None:
    """(goal text, cell, anchors) for where an add/move goes: a free cell, named or relative to an anchor."""
    relative = []
    for anchor in _other_free(draft, exclude):
        row, col = divmod(CELLS.index(anchor.cell), GRID)
        for relation, (d_row, d_col) in NEIGHBOUR_STEPS.items():
            r, c = row + d_row, col + d_col
            if 0 <= r < GRID and 0 <= c < GRID and draft.cell_free(CELLS[r * GRID + c]):
                relative.append((relation, anchor, CELLS[r * GRID + c]))
    if relative and rng.random() < P_RELATIONAL_GOAL:
        relation, anchor, cell = rng.choice(relative)
        words = relation if relation in ("above", "below") else f"to the {relation}"
        return f"{words} {_anchor_phrase(rng, draft.scene, anchor, hide_colour=False)}", cell, [anchor]
    cells = [c for c in CELLS if draft.cell_free(c)]
    if not cells:
        return None
    cell = rng.choice(cells)
    return rng.choice(literal).format(cell=cell), cell, []


def _move_part(rng: random.Random, draft: _Draft) -> _Part | None:
    picked = _pick_subjects(rng, draft, allow_group=False)
    if picked is None:
        return None
    np_text, subjects = picked
    place = _place_phrase(rng, draft, subjects, ["to the {cell}", "into the {cell}"])
    if place is None:
        return None
    goal_text, cell, anchors = place
    verb = rng.choice(["move", "shift", "drag", "put"])
    if verb == "put" and not anchors:  # "put the red circle in the top left"
        goal_text = "in the " + goal_text.split(" the ", 1)[1]
    edits = [Edit("move", subjects[0].name, cell)]
    return _Part(f"{verb} {np_text} {goal_text}", edits, anchors)


def _add_part(rng: random.Random, draft: _Draft) -> _Part | None:
    names = [f"{c} {k}" for c in COLOURS for k in KINDS if draft.name_free(f"{c} {k}")]
    place = _place_phrase(rng, draft, [], ["at the {cell}", "in the {cell}"])
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


def random_scene(rng: random.Random) -> Scene:
    """3 to 5 shapes in distinct cells, no two of the same colour and kind."""
    names = rng.sample([(c, k) for c in COLOURS for k in KINDS], rng.randint(3, 5))
    cells = rng.sample(CELLS, len(names))
    return Scene(tuple(Shape(k, c, rng.choice(SIZES), cell) for (c, k), cell in zip(names, cells)))


def make_example(rng: random.Random, example_id: str = "shapes") -> Example:
    """A random scene and a request of 1-3 clauses (at most MAX_EDITS edits), with its gold edits and target."""
    scene = random_scene(rng)
    draft = _Draft(scene, set(), set(), set(), set())
    parts: list[_Part] = []
    n_parts = rng.randint(1, 3)
    for _ in range(20 * n_parts):  # a few draws fail a constraint (a full grid, a used shape): draw again
        if len(parts) == n_parts:
            break
        part = _PART_MAKERS[rng.choice(ACTIONS)](rng, draft)
        if part is not None and draft.admits(part):
            draft.commit(part)
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

"""The miniature's stand-ins for FLUX and GPT-4o: a procedural editor and a programmatic judge of the shapes world.

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
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from judge import FULFILMENT_MAX, PRESERVATION_MAX, QUALITY_MAX, Verdict
from miniature.language import clause_edits, interpret, parse_clause, split_clauses
from miniature.world import (
    ARTEFACT_FRACTION,
    CELLS,
    IMAGE_SIZE,
    MAX_CLAUSES,
    QUALITY_ZERO_AT,
    Edit,
    Scene,
    UnparsedClause,
    UnresolvedReference,
    apply_edit,
    apply_edits,
    artefact_mask,
    explicit_instruction,
    read_scene,
    render,
)

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
        carried = artefact_mask(image, before)  # (H, W): artefacts already in the input survive re-generation
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

        artefacts = float(artefact_mask(edited, after).mean())
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

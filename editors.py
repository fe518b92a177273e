"""Editing agents behind one interface. SKELETON: the editors helper owns and completes this file."""

from __future__ import annotations

from typing import Protocol

from PIL import Image


class EditError(RuntimeError):
    """An edit that produced no image (an API refusal, a safety block): recorded by callers, not a crash."""


class Editor(Protocol):
    """Anything with `edit(image, instruction, seed) -> image` is an editor."""

    name: str

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image: ...

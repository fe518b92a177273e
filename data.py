"""The RL data format and its validation: the JSONL examples train.py reads.

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

`label.py` writes such files for real (image, request) pairs with a teacher VLM.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import benchmarks
import rewards

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
            f"{path}: data file not found; make it with the labeller (`python label.py --benchmark "
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
    """The JSON object of one example in the format above (for writers: miniature/dataset.py, label.py)."""
    return {"id": id, "image": image, "request": request, "actions": list(actions), "subjects": list(subjects),
            "goals": list(goals), **extra}  # fmt: skip

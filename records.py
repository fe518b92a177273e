"""Crash-safe files: append-only JSONL record logs, and whole files written atomically (evaluation and the labeller).

A long run (an evaluation of thousands of edits, a labelling job of thousands of API calls) writes one JSONL line per
finished piece of work, and on restart reads the lines back to skip what is done. Two rules make that safe:

    RecordLog.append   one write per record, flushed and fsynced before it returns: a kill leaves at most a partial
                       LAST line, never a half-written middle one;
    read_records       a last line without its newline is that partial write: it is ignored (with repair=True cut off
                       the file, so the next append starts on a fresh line, and its work is redone); any other line
                       that does not parse is corruption: RecordFileError names the file and the line.

Every other file a resumed run reads (PNGs, configs, tables) is written with `write_atomic`: a temporary name, fsync,
rename, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from PIL import Image


class RecordFileError(ValueError):
    """A results or journal file holds a line that is not a record of the expected kind (file and line named)."""


def read_records(path: Path, cls: type, repair: bool = False, hint: str = "") -> list:
    """The records of one JSONL file (`cls(**line)` each), in file order; [] when the file does not exist."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if complete < len(data) and repair:
        with path.open("r+b") as f:
            f.truncate(complete)
        print(f"{path.name}: dropped a partial last line left by a killed run; that work is redone", file=sys.stderr)
    records = []
    # split on b"\n" only: str.splitlines would also split inside a record at U+2028, U+2029 or U+0085
    for lineno, line in enumerate(data[:complete].decode("utf-8").split("\n")[:-1], start=1):
        try:
            records.append(cls(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise RecordFileError(f"{path}:{lineno}: not a {cls.__name__} line ({err}): {line[:120]!r}{hint}") from None
    return records


class RecordLog:
    """An append-only JSONL file of dataclass records: `append` returns only after the line is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")

    def append(self, record) -> None:
        self._file.write(json.dumps(asdict(record)) + "\n")  # one write: a kill leaves at most a partial last line
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file atomically: a temporary name, fsync, rename. A reader (a resumed run) never sees half a file, and
    a kill leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def safe_name(text: str) -> str:
    """`text` with every run of characters outside [A-Za-z0-9._-] replaced by "_" (never empty)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def file_stem(example_id: str, keep: int = 60) -> str:
    """A file name for an id: its readable tail (`keep` characters) and a hash, so distinct ids never share a file."""
    return f"{safe_name(example_id)[-keep:]}-{hashlib.sha256(example_id.encode()).hexdigest()[:10]}"

"""Bad input stops a run before any work, with exit code 2 and an error that names the file, the line and the field.

The cases: training data that is not UTF-8; a PNG whose chunks (and their CRCs) are valid but whose compressed image
stream is corrupt, which Pillow's `verify()` passes because it decodes no pixel; a PNG whose header claims more pixels
than the limit (a decompression bomb); and an evaluation folder whose `run.json` a kill left empty. train.py and
evaluate.py run in subprocesses, as a user runs them.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

import benchmarks
import data
import evaluate
import label
from miniature import dataset

REPO = Path(__file__).resolve().parents[1]
GOOD = {"id": "a", "image": "ok.png", "request": "make it blue", "actions": ["recolor"], "subjects": ["circle"],
        "goals": ["blue"]}  # fmt: skip


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8  # after the signature
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        chunks.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file from (type, data) chunks, each with its correct length and CRC."""
    body = b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d)) for t, d in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def noise_png(size: int = 32) -> bytes:
    rng = random.Random(0)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_stream_png() -> bytes:
    """Valid chunks and CRCs, but 40 bytes in the middle of the compressed pixels inverted."""
    chunks = []
    for kind, body in png_chunks(noise_png()):
        if kind == b"IDAT":
            middle = len(body) // 2
            body = body[:middle] + bytes(b ^ 0xFF for b in body[middle : middle + 40]) + body[middle + 40 :]
        chunks.append((kind, body))
    return png_from_chunks(chunks)


def claimed_size_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_from_chunks([(b"IHDR", header), (b"IDAT", zlib.compress(b"\0" * 16)), (b"IEND", b"")])


def test_the_fixtures_are_what_they_claim() -> None:
    with Image.open(io.BytesIO(corrupt_stream_png())) as im:
        im.verify()  # passes: this is the file that slipped through validation
    with pytest.raises(OSError), Image.open(io.BytesIO(corrupt_stream_png())) as im:
        im.load()
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(claimed_size_png(40_000, 40_000)))


# (second line, or the bytes of the bad image it names) -> the field and the words the error must hold
CASES = {
    "not UTF-8": ("request", ["not UTF-8", "byte 0xe9"]),
    "corrupt image stream": ("image", ["unreadable image", "does not decode"]),
    "40000 x 40000 header": ("image", [f"{benchmarks.MAX_IMAGE_PIXELS:,}", "benchmarks.MAX_IMAGE_PIXELS"]),
    "10000 x 10000 header": ("image", ["10000 x 10000", "benchmarks.MAX_IMAGE_PIXELS"]),
}


def write_case(folder: Path, case: str) -> Path:
    """A two-line data file whose second line is bad in the way `case` says; the first line is good."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ok.png").write_bytes(noise_png())
    second = {**GOOD, "id": "b", "image": "bad.png"}
    if case == "not UTF-8":
        second = {**GOOD, "id": "b", "request": "make the café blue"}
    (folder / "bad.png").write_bytes(
        {
            "corrupt image stream": corrupt_stream_png,
            "40000 x 40000 header": lambda: claimed_size_png(40_000, 40_000),
            "10000 x 10000 header": lambda: claimed_size_png(10_000, 10_000),
        }.get(case, noise_png)()
    )
    path = folder / "rl.jsonl"
    encoding = "latin-1" if case == "not UTF-8" else "utf-8"
    path.write_bytes((json.dumps(GOOD) + "\n" + json.dumps(second, ensure_ascii=False) + "\n").encode(encoding))
    return path


@pytest.mark.parametrize("case", CASES)
def test_loading_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    path = write_case(tmp_path, case)
    field, words = CASES[case]
    with pytest.raises(data.DataError) as caught:
        data.load_rl_jsonl(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:2: field {field!r}"), message
    assert all(word in message for word in words), message
    assert " at 0x" not in message  # no object repr: the same file gives the same message


@pytest.mark.parametrize("case", CASES)
def test_train_exits_2_naming_the_problem_and_trains_nothing(tmp_path: Path, case: str, tiny_qwen25: Path) -> None:
    path = write_case(tmp_path / "data", case)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--gpus", "0", "--model", str(tiny_qwen25), "--train-data", str(path),
         "--eval-data", str(path), "--output-dir", str(out), "--prompts-per-step", "1", "--group-size", "2",
         "--max-new-tokens", "4", "--max-steps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29517"},
    )  # fmt: skip
    field, words = CASES[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{path}:2: field {field!r}" in proc.stderr and all(word in proc.stderr for word in words), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing trained, nothing written


# --- a torn run.json -------------------------------------------------------------------------------------------------


def evaluate_argv(out: Path, manifest: Path) -> list[str]:
    return ["--editor", "shapes", "--benchmark", f"shapes={manifest}", "--limit", "0", "--methods", "original",
            "--judges", "shapes", "--no-progress", "--out", str(out)]  # fmt: skip


@pytest.mark.parametrize("torn", ["", '{"editor": "shap'])
def test_a_torn_run_json_is_reported_with_what_to_do(tmp_path: Path, torn: str) -> None:
    manifest = dataset.write_jsonl(dataset.make_dataset(2, seed=5), tmp_path / "data", "test")
    out = tmp_path / "eval"
    evaluate.main(evaluate_argv(out, manifest))
    edits = (out / "edits.jsonl").read_bytes()
    (out / "run.json").write_text(torn)  # what a kill in the middle of the old in-place rewrite left
    proc = subprocess.run(
        [sys.executable, "evaluate.py", *evaluate_argv(out, manifest)], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{out / 'run.json'}" in proc.stderr and "Traceback" not in proc.stderr
    assert "delete it" in proc.stderr and "--out" in proc.stderr  # what to do
    assert (out / "edits.jsonl").read_bytes() == edits and (out / "run.json").read_text() == torn  # nothing touched


def test_run_json_is_replaced_by_a_rename_never_rewritten_in_place(tmp_path: Path, monkeypatch) -> None:
    """A kill can then leave the old run.json or the new one, never half of one."""
    manifest = dataset.write_jsonl(dataset.make_dataset(2, seed=5), tmp_path / "data", "test")
    out = tmp_path / "eval"
    renamed, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(dst)), real_replace(src, dst))[-1])
    evaluate.main(evaluate_argv(out, manifest))
    evaluate.main(evaluate_argv(out, manifest))  # a resume writes it again
    assert renamed.count(out / "run.json") == 2
    assert json.loads((out / "run.json").read_text())["editor"] == "shapes"


def test_a_torn_run_json_of_the_labeller_is_reported_with_what_to_do(tmp_path: Path, capsys) -> None:
    manifest = dataset.write_jsonl(dataset.make_dataset(2, seed=5), tmp_path / "data", "test")
    out = tmp_path / "rl"
    out.mkdir()
    (out / "run.json").write_text("")
    argv = ["--benchmark", str(manifest), "--exclude-eval-limit", "-1", "--teacher", "openai:m@http://127.0.0.1:9/v1",
            "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        label.main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"{out / 'run.json'}" in err and "delete it" in err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]  # nothing labelled, nothing written

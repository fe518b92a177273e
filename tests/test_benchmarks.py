"""Tests for benchmarks.py: the three benchmark loaders on synthetic parquet files with the real column names, the
JSONL manifest, the error contract (a corrupt or missing field comes back as `error`, never an exception), and the
seeded draw that evaluate.py and data.py share.

Fixture images are tiny solid colours, one colour per row, so a test can tell that the lazily read image is the
right row's image after a PNG round trip.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import benchmarks
from benchmarks import BenchmarkError, EditExample, load_benchmark, sample

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image feature


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 7 * i % 256, 3 * i % 256)


def png(i: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour(i)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, columns: dict[str, list], image_columns: tuple[str, ...], row_group_size: int = 3):
    """A parquet file like the hub's: image columns as {"bytes", "path"} structs, the rest inferred."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        name: pa.array(values, type=HF_IMAGE if name in image_columns else None) for name, values in columns.items()
    }
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


def image_cell(i: int) -> dict:
    return {"bytes": png(i), "path": f"{i}.png"}


@pytest.fixture
def psr_root(tmp_path: Path) -> Path:
    """taesiri/PhotoshopRequests' columns; row 2 has corrupt image bytes, row 4 no description, row 5 a null image."""
    n = 8
    originals = [image_cell(i) for i in range(n)]
    originals[2] = {"bytes": b"\x89PNG not really an image", "path": "broken.png"}
    originals[5] = None
    descriptions = [f"request {i}" for i in range(n)]
    descriptions[4] = None
    columns = {
        "original_image": originals,
        "edit_image": [image_cell(100 + i) for i in range(n)],
        "description": descriptions,
        "post_id": [f"p{i}" for i in range(n)],
        "score": list(range(n)),
    }
    write_parquet(tmp_path / "psr" / "data" / "train-00000-of-00001.parquet", columns, ("original_image", "edit_image"))
    return tmp_path / "psr"


@pytest.fixture
def realedit_root(tmp_path: Path) -> Path:
    """RealEdit-like layout: two test shards and one train shard (plus hf download's hidden .cache folder)."""
    root = tmp_path / "realedit"
    start = 0
    for name, n in [("test-00000-of-00002", 4), ("test-00001-of-00002", 3), ("train-00000-of-00001", 5)]:
        columns = {
            "input_image": [image_cell(start + i) for i in range(n)],
            "output_image": [image_cell(200 + start + i) for i in range(n)],
            "instruction": [f"{name} edit {i}" for i in range(n)],
            "input_image_name": [f"{name}-{i}.jpg" for i in range(n)],
        }
        write_parquet(root / "data" / f"{name}.parquet", columns, ("input_image", "output_image"))
        start += n
    (root / ".cache" / "huggingface").mkdir(parents=True)
    write_parquet(root / ".cache" / "huggingface" / "test-stray.parquet", {"x": [1]}, ())
    return root


@pytest.fixture
def ultraedit_root(tmp_path: Path) -> Path:
    root = tmp_path / "ultraedit"
    columns = {
        "clip_sim_source": [0.3, 0.4, 0.5],
        "source_image": [image_cell(i) for i in range(3)],
        "edited_image": [image_cell(50 + i) for i in range(3)],
        "edit_prompt": ["add a hat", "make it winter", "turn the car red"],
    }
    write_parquet(root / "data" / "train-00000-of-00002.parquet", columns, ("source_image", "edited_image"))
    return root


def by_row(examples: list[EditExample]) -> dict[int, EditExample]:
    return {example.meta["row"]: example for example in examples}


# --- parquet benchmarks ---------------------------------------------------------------------------------------------


def test_psr_rows_give_ids_requests_meta_and_the_right_lazy_image(psr_root: Path) -> None:
    examples = load_benchmark("psr", psr_root)
    assert [e.id for e in examples] == [f"psr/data/train-00000-of-00001/{i:06d}" for i in range(8)]
    first = examples[0]
    assert first.image is None and first.error is None  # nothing decoded at listing
    assert first.request == "request 0" and first.source == "psr"
    assert first.meta == {"post_id": "p0", "score": 0, "file": "data/train-00000-of-00001.parquet", "row": 0}
    for row in (0, 3, 7):  # rows in different row groups (3 rows a group)
        image = examples[row].load_image()
        assert image is not None and image.mode == "RGB" and image.size == (6, 4)
        assert image.getpixel((0, 0)) == colour(row)  # the source image, not the edit_image column


def test_corrupt_image_bytes_and_null_image_come_back_with_an_error(psr_root: Path) -> None:
    rows = by_row(load_benchmark("psr", psr_root))
    assert rows[2].error is None  # found only when the image is read
    assert rows[2].load_image() is None
    assert "row 2" in rows[2].error and "original_image" in rows[2].error and "does not decode" in rows[2].error
    assert rows[5].load_image() is None
    assert "row 5" in rows[5].error and "missing (null)" in rows[5].error
    assert rows[6].load_image() is not None and rows[6].error is None  # the neighbours are unaffected


def test_an_unreadable_image_gives_the_same_reason_every_time(psr_root: Path) -> None:
    """Two runs' failure records must be equal: a reason holds stable words, never an object repr (`<... at 0x...>`)."""
    reasons = []
    for _ in range(2):  # two listings stand in for two runs: each reads the bytes into a new buffer
        row = by_row(load_benchmark("psr", psr_root))[2]
        assert row.load_image() is None
        reasons.append(row.error)
    assert reasons[0] == reasons[1] and "does not decode" in reasons[0]
    assert " at 0x" not in reasons[0] and "object" not in reasons[0]


def test_missing_request_field_is_an_error_at_listing(psr_root: Path) -> None:
    rows = by_row(load_benchmark("psr", psr_root))
    assert rows[4].error is not None and "description" in rows[4].error and "row 4" in rows[4].error
    assert rows[4].load_image() is None  # an example with an error yields no image
    assert sum(e.error is not None for e in rows.values()) == 1


def test_realedit_defaults_to_the_test_split_and_skips_hidden_folders(realedit_root: Path) -> None:
    test = load_benchmark("realedit", realedit_root)
    assert len(test) == 7
    assert test[0].id == "realedit/data/test-00000-of-00002/000000"
    assert test[-1].id == "realedit/data/test-00001-of-00002/000002"
    assert test[-1].load_image().getpixel((0, 0)) == colour(6)  # rows of the second shard continue the colours
    assert test[0].meta["input_image_name"] == "test-00000-of-00002-0.jpg"
    train = load_benchmark("realedit", realedit_root, split="train")
    assert [e.request for e in train] == [f"train-00000-of-00001 edit {i}" for i in range(5)]
    assert len(load_benchmark("realedit", realedit_root, split="all")) == 12
    assert not {e.id for e in test} & {e.id for e in train}


def test_ultraedit_columns(ultraedit_root: Path) -> None:
    examples = load_benchmark("ultraedit", ultraedit_root)
    assert [e.request for e in examples] == ["add a hat", "make it winter", "turn the car red"]
    assert examples[1].meta["clip_sim_source"] == pytest.approx(0.4)
    assert examples[2].load_image().getpixel((0, 0)) == colour(2)


def test_missing_columns_fail_listing_the_columns_found(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "test-0.parquet", {"picture": [image_cell(0)], "text": ["x"]}, ("picture",))
    with pytest.raises(BenchmarkError) as info:
        load_benchmark("realedit", tmp_path)
    message = str(info.value)
    assert "no image column" in message and "input_image" in message and "picture, text" in message


def test_benchmark_level_problems_raise_before_any_work(tmp_path: Path, realedit_root: Path) -> None:
    with pytest.raises(BenchmarkError, match="hf download --repo-type dataset peter-sushko/RealEdit"):
        load_benchmark("realedit", None)
    with pytest.raises(BenchmarkError, match="root folder not found"):
        load_benchmark("psr", tmp_path / "nowhere")
    with pytest.raises(BenchmarkError, match="no parquet files of split 'validation'"):
        load_benchmark("realedit", realedit_root, split="validation")
    with pytest.raises(BenchmarkError, match="unknown benchmark"):
        load_benchmark("magicbrush", tmp_path)


def test_image_stored_by_path_next_to_the_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "photo.png").write_bytes(png(9))
    cells = [{"bytes": None, "path": "photo.png"}, {"bytes": None, "path": "gone.png"}]
    write_parquet(
        tmp_path / "data" / "train-0.parquet", {"source_image": cells, "edit_prompt": ["a", "b"]}, ("source_image",)
    )
    examples = load_benchmark("ultraedit", tmp_path)
    assert examples[0].load_image().getpixel((0, 0)) == colour(9)
    assert examples[1].load_image() is None and "not found" in examples[1].error


def test_lazy_examples_pickle_and_still_load(realedit_root: Path) -> None:
    example = load_benchmark("realedit", realedit_root)[5]
    copy = pickle.loads(pickle.dumps(example))
    assert copy.id == example.id
    assert copy.load_image().tobytes() == example.load_image().tobytes()


# --- manifests ------------------------------------------------------------------------------------------------------


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_examples_meta_and_errors(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png(1))
    (tmp_path / "images" / "bad.png").write_bytes(b"not an image")
    absolute = tmp_path / "abs.png"
    absolute.write_bytes(png(2))
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            json.dumps({"id": "a", "image": "images/a.png", "request": " make it blue ", "note": 7}),
            json.dumps({"id": "abs", "image": str(absolute), "request": "crop"}),
            "",
            '{"id": "broken", "image": ',
            json.dumps({"id": "noreq", "image": "images/a.png"}),
            json.dumps({"id": "noimg", "request": "x"}),
            json.dumps({"id": "bad", "image": "images/bad.png", "request": "x"}),
            json.dumps({"id": "gone", "image": "images/gone.png", "request": "x"}),
            json.dumps({"image": "images/a.png", "request": "x"}),
        ],
    )
    examples = {e.id: e for e in load_benchmark(str(manifest))}
    assert set(examples) == {"a", "abs", "m.jsonl:4", "noreq", "noimg", "bad", "gone", "m.jsonl:9"}
    a = examples["a"]
    assert a.request == "make it blue" and a.source == "manifest" and a.error is None
    assert a.meta == {"note": 7, "file": str(manifest), "line": 1}
    assert a.load_image().getpixel((0, 0)) == colour(1)
    assert examples["abs"].load_image().getpixel((0, 0)) == colour(2)
    assert "m.jsonl:4: bad JSON" in examples["m.jsonl:4"].error
    assert "field 'request'" in examples["noreq"].error
    assert "field 'image'" in examples["noimg"].error
    assert "field 'id'" in examples["m.jsonl:9"].error
    for name, reason in [("bad", "does not decode"), ("gone", "image file not found")]:
        assert examples[name].error is None and examples[name].load_image() is None
        assert reason in examples[name].error and f"m.jsonl:{7 if name == 'bad' else 8}" in examples[name].error


def test_manifest_duplicate_id_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [json.dumps({"id": "x", "image": "a", "request": "r"})] * 2)
    with pytest.raises(BenchmarkError, match=r"m.jsonl:2: field 'id': duplicate id 'x' \(first on line 1\)"):
        load_benchmark(str(manifest))


# --- sampling -------------------------------------------------------------------------------------------------------


def fake_examples(n: int) -> list[EditExample]:
    return [EditExample(id=f"set/{i:04d}", image=None, request=f"r{i}", source="test") for i in range(n)]


def test_sample_is_deterministic_sorted_and_nested() -> None:
    examples = fake_examples(50)
    first = sample(examples, 10, seed=0)
    assert [e.id for e in first] == [e.id for e in sample(examples, 10, seed=0)]
    assert [e.id for e in first] == sorted(e.id for e in first) and len(first) == 10
    assert {e.id for e in sample(examples, 4, seed=0)} < {e.id for e in first}  # a smaller draw is a subset
    assert {e.id for e in sample(examples, 10, seed=1)} != {e.id for e in first}
    assert len(sample(examples, 0, seed=0)) == 50 and len(sample(examples, None, 0)) == 50
    assert len(sample(examples, 500, seed=0)) == 50


def test_sample_matches_an_independent_sha256_ranking() -> None:
    import hashlib

    examples = fake_examples(30)
    expected = sorted(sorted(e.id for e in examples), key=lambda i: hashlib.sha256(f"3\0{i}".encode()).digest())[:7]
    assert [e.id for e in sample(examples, 7, seed=3)] == sorted(expected)


@settings(max_examples=50, deadline=None)
@given(st.permutations(list(range(40))), st.integers(0, 40), st.integers(0, 2**31))
def test_sample_does_not_depend_on_listing_order(order: list[int], limit: int, seed: int) -> None:
    examples = fake_examples(40)
    shuffled = [examples[i] for i in order]
    assert [e.id for e in sample(shuffled, limit, seed)] == [e.id for e in sample(examples, limit, seed)]


def test_adding_examples_keeps_drawn_ones_unless_outranked() -> None:
    small, large = fake_examples(30), fake_examples(60)
    drawn_small = {e.id for e in sample(small, 5, seed=0)}
    drawn_large = {e.id for e in sample(large, 5, seed=0)}
    new_ids = {e.id for e in large[30:]}
    assert drawn_large - new_ids <= drawn_small  # old examples in the large draw were drawn before too


def test_sample_refuses_duplicate_ids_and_negative_limits() -> None:
    with pytest.raises(BenchmarkError, match="duplicate example ids"):
        sample(fake_examples(3) + fake_examples(1), 2, 0)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        sample(fake_examples(3), -1, 0)


def test_evaluation_ids_are_the_ids_of_the_evaluation_sample(realedit_root: Path, psr_root: Path) -> None:
    ids = benchmarks.evaluation_ids("realedit", realedit_root, limit=3, seed=0)
    drawn = benchmarks.evaluation_sample("realedit", realedit_root, limit=3, seed=0)
    assert ids == {e.id for e in drawn} and len(ids) == 3
    assert all("/test-" in i for i in ids)  # drawn from the evaluation split only
    everything = load_benchmark("psr", psr_root)
    random.Random(0).shuffle(everything)
    assert benchmarks.evaluation_ids("psr", psr_root, limit=4) == {e.id for e in sample(everything, 4, 0)}


def test_describe_prints_schema_mapping_and_sample(realedit_root: Path, capsys: pytest.CaptureFixture) -> None:
    benchmarks.main(["realedit", "--root", str(realedit_root), "--limit", "2"])
    out = capsys.readouterr().out
    assert "input_image: struct<bytes: binary, path: string>" in out and "instruction: string" in out
    assert "7 examples, 0 with an error" in out and "sample of 2" in out

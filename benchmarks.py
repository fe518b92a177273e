"""The editing benchmarks of the paper (PSR, RealEdit, UltraEdit) and user manifests, read from LOCAL copies.

`evaluate.py` measures the chain on a fixed sample of a benchmark, and `data.py` labels training examples from the
same benchmarks while leaving that sample out. Both read examples only through this module, so there is one answer
to "which examples does a 1,000-sample evaluation use": `evaluation_sample(spec, root, limit, seed)`.

Getting the data (nothing is downloaded at run time; the images are third-party photos: never commit them):

    hf download --repo-type dataset taesiri/PhotoshopRequests --local-dir data/benchmarks/psr
    hf download --repo-type dataset peter-sushko/RealEdit     --local-dir data/benchmarks/realedit
    hf download --repo-type dataset BleachNick/UltraEdit      --local-dir data/benchmarks/ultraedit --include "data/train-0000*"

UltraEdit is millions of rows in many shards; download a few shards (`--include`), and keep the same shards for
evaluation and labelling, since ids name the shard. `python benchmarks.py SPEC --root DIR` prints what a copy holds:
the parquet files, their schemas, the columns chosen and the first examples of the evaluation sample.

Column mapping (`BENCHMARKS`; the first name in each list that a file has is used):

    | spec      | hub dataset               | image column                   | request column                  | eval split |
    |-----------|---------------------------|--------------------------------|---------------------------------|------------|
    | psr       | taesiri/PhotoshopRequests | original_image                 | description                     | all files  |
    | realedit  | peter-sushko/RealEdit     | input_image, original_image,   | instruction, edit_instruction,  | test       |
    |           |                           | source_image, image            | edit_prompt, prompt             |            |
    | ultraedit | BleachNick/UltraEdit      | source_image                   | edit_prompt                     | all files  |

PSR's and UltraEdit's columns are the ones their dataset cards document. RealEdit's card was not readable from this
machine, so its row lists the likely names; a copy whose files match none of them fails at once with an error that
lists the columns it found (fix the row, it is one line). Every other scalar column (strings, numbers) is kept in
`EditExample.meta`; the reference edits (`edit_image`, `output_image`, `edited_image`) are not read.

Parquet layout. Hugging Face stores an `Image` feature as a struct {"bytes": binary, "path": string}; we also accept
a plain binary column and a path string (resolved next to the parquet file). A loader globs `ROOT/**/*.parquet`
(skipping hidden folders such as `.cache`), keeps the files of one split (`data/test-00000-of-00003.parquet`,
`test/0000.parquet` and `test.parquet` all belong to split "test"), and gives each row the stable id
`NAME/FILE/ROW`, for example `realedit/data/test-00000-of-00003/000123` (FILE is the path under ROOT without
".parquet", ROW the row within that file).

A manifest (a user's own data) is a JSONL file, one example per line, in data.py's field names:

    {"id": "cat-01", "image": "images/cat.jpg", "request": "make the cat ginger", "note": "any extra key"}

`image` is relative to the manifest file (or absolute); extra keys go to `meta`. A duplicate id is an error.

The `EditExample` contract (images are loaded lazily, so a 1,000-sample run over a 9,337-row split holds one image
at a time, not all of them):

- `load_benchmark` lists examples without decoding any image. A row or line whose request is missing or empty, or
  whose JSON is bad, comes back with `error` set (and no image) instead of stopping the listing.
- `example.load_image()` returns an RGB `PIL.Image`, or None after setting `example.error` to the reason (an image
  that is null, missing, or does not decode). It does not keep the image: call it once per use.
- So a caller checks `error` after listing and again after `load_image()`, records an example with an error as a
  failure with that reason, and goes on. Problems with the whole benchmark (no files, missing columns, duplicate
  ids) raise `BenchmarkError` before any work starts.
- Examples pickle (evaluate.py hands them to worker processes): an image is found again by (file, row group, row).

Sampling (`sample`): each example's rank is sha256(seed, id), and the N lowest ranks are drawn, returned in id
order. The draw depends only on the ids and the seed, never on file or listing order; a smaller sample is a subset of
a larger one with the same seed; and adding rows to a benchmark does not reshuffle the examples already drawn.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

DEFAULT_EVAL_LIMIT = 1000  # the paper evaluates on 1,000 sampled examples of RealEdit and UltraEdit (§3.1)
DEFAULT_EVAL_SEED = 0
ALL_SPLITS = "all"  # the split name that means "every parquet file under the root"
ROW_DIGITS = 6  # rows in ids are zero-padded so that ids sort in row order within a file
# The most pixels an image may have: Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, about 9,459 x
# 9,459), above which Pillow only warns (it refuses twice as many). `decode_image` refuses a larger image from its
# header, before decoding a pixel. To read larger trusted images, raise this and PIL.Image.MAX_IMAGE_PIXELS together.
MAX_IMAGE_PIXELS = 89_478_485


class BenchmarkError(ValueError):
    """A benchmark that cannot be read at all: no files, missing columns, duplicate ids, an unknown spec."""


class ImageReadError(ValueError):
    """One example's image is null, missing or does not decode; the message names the file, row and column."""


# ---------------------------------------------------------------------------------------------------------------------
# The benchmarks


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark comes from and which columns hold the source image and the request."""

    name: str
    hub_id: str
    image_columns: tuple[str, ...]  # candidates, first match wins
    request_columns: tuple[str, ...]
    eval_split: str  # the split evaluate.py samples from (ALL_SPLITS when the dataset has no test split)
    train_split: str  # the split data.py labels by default

    @property
    def download_command(self) -> str:
        return f"hf download --repo-type dataset {self.hub_id} --local-dir {DEFAULT_ROOT}/{self.name}"


DEFAULT_ROOT = "data/benchmarks"  # where the README's download commands put each benchmark, one folder each

BENCHMARKS = {
    "psr": BenchmarkSpec(
        name="psr",
        hub_id="taesiri/PhotoshopRequests",
        image_columns=("original_image",),
        request_columns=("description",),
        eval_split=ALL_SPLITS,  # one pool: evaluation draws its sample, data.py labels the rest
        train_split=ALL_SPLITS,
    ),
    "realedit": BenchmarkSpec(
        name="realedit",
        hub_id="peter-sushko/RealEdit",
        image_columns=("input_image", "original_image", "source_image", "image"),
        request_columns=("instruction", "edit_instruction", "edit_prompt", "prompt"),
        eval_split="test",  # 9,337 rows
        train_split="train",  # 48,002 rows
    ),
    "ultraedit": BenchmarkSpec(
        name="ultraedit",
        hub_id="BleachNick/UltraEdit",
        image_columns=("source_image",),
        request_columns=("edit_prompt",),
        eval_split=ALL_SPLITS,  # no test split: the paper samples 1,000 with a fixed seed
        train_split=ALL_SPLITS,
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Examples and their lazily read images


def decode_image(data: bytes, where: str) -> Image.Image:
    """Encoded image bytes -> RGB image, every pixel decoded; ImageReadError naming `where` if Pillow cannot decode
    them fully or the image has more than MAX_IMAGE_PIXELS pixels. The messages are stable text (no object reprs)."""
    limit = f"the limit is {MAX_IMAGE_PIXELS:,} pixels (benchmarks.MAX_IMAGE_PIXELS)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height <= MAX_IMAGE_PIXELS:
                im.load()  # decode now: a truncated file, or a corrupt pixel stream, opens fine and fails only here
                return im.convert("RGB")
    except Image.DecompressionBombError as e:  # Pillow refuses twice its threshold while reading the header
        claimed = re.search(r"\((\d+) pixels\)", str(e))  # "Image size (1600000000 pixels) exceeds limit of ..."
        size = f"{int(claimed.group(1)):,} pixels" if claimed else f"too many pixels for Pillow ({e})"
        raise ImageReadError(f"{where}: the image is {size}, too large; {limit}") from None
    except UnidentifiedImageError:  # its message holds the repr of our BytesIO: say it in stable words
        raise ImageReadError(f"{where}: the image does not decode (not an image format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{where}: the image does not decode ({type(e).__name__}: {e})") from None
    raise ImageReadError(f"{where}: the image is {width} x {height} = {width * height:,} pixels, too large; {limit}")


def _read_file(path: Path, where: str) -> bytes:
    if not path.is_file():
        raise ImageReadError(f"{where}: image file not found: {path}")
    return path.read_bytes()


@dataclass(frozen=True)
class FileImage:
    """An image stored as a file (manifest examples)."""

    path: Path
    where: str  # "manifest.jsonl:12: field 'image'"

    def read(self) -> Image.Image:
        return decode_image(_read_file(self.path, self.where), self.where)


@functools.lru_cache(maxsize=2)
def _row_group_column(path: Path, row_group: int, column: str) -> pa.ChunkedArray:
    """One column of one row group. Cached because a sorted sample often reads neighbouring rows of one group."""
    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)


@dataclass(frozen=True)
class ParquetImage:
    """An image in a parquet cell, found by row group and row so that reading it touches one row group only."""

    path: Path
    row_group: int
    row_in_group: int
    column: str
    where: str  # "data/test-00000-of-00001.parquet row 12: field 'input_image'"

    def read(self) -> Image.Image:
        value = _row_group_column(self.path, self.row_group, self.column)[self.row_in_group].as_py()
        if value is None:
            raise ImageReadError(f"{self.where}: the image is missing (null)")
        data, path = value, None  # a plain binary column
        if isinstance(value, dict):  # the Hugging Face Image struct
            data, path = value.get("bytes"), value.get("path")
        elif isinstance(value, str):  # a path column
            data, path = None, value
        if data:
            return decode_image(data, self.where)
        if path:  # an image that was not embedded: it lives next to the parquet file
            return decode_image(_read_file(self.path.parent / path, self.where), self.where)
        raise ImageReadError(f"{self.where}: the image has neither bytes nor a path")


ImageRef = FileImage | ParquetImage


@dataclass
class EditExample:
    """One (image, request) pair of a benchmark or manifest. See the module docstring for the error contract.

    id: stable across runs and machines ("realedit/data/test-00000-of-00001/000123", or a manifest's own id).
    image: an image held in memory (examples built in code); None for lazily read ones: use `load_image()`.
    source: "psr", "realedit", "ultraedit" or "manifest". meta: the row's other scalar columns, or the manifest
    line's extra keys, plus where the example came from ("file", "row" or "line").
    """

    id: str
    image: Image.Image | None
    request: str
    source: str
    error: str | None = None
    meta: dict = field(default_factory=dict)
    image_ref: ImageRef | None = field(default=None, repr=False)

    def load_image(self) -> Image.Image | None:
        """The RGB image, or None with `self.error` set to why it could not be read."""
        if self.error is not None:
            return None
        if self.image is not None:
            return self.image
        if self.image_ref is None:
            self.error = f"{self.id}: the example has no image"
            return None
        try:
            return self.image_ref.read()
        except ImageReadError as e:
            self.error = str(e)
            return None


# ---------------------------------------------------------------------------------------------------------------------
# Parquet benchmarks


def _in_split(relative: Path, split: str) -> bool:
    """Hugging Face names a split by folder (`test/0000.parquet`) or by file (`data/test-00000-of-00002.parquet`)."""
    if split == ALL_SPLITS:
        return True
    stem = relative.name.removesuffix(".parquet")
    return split in relative.parts[:-1] or stem == split or stem.startswith((f"{split}-", f"{split}_"))


def parquet_files(root: str | Path, split: str = ALL_SPLITS) -> list[Path]:
    """The parquet files of `split` under `root`, sorted, skipping hidden folders (hf download's `.cache`)."""
    root = Path(root)
    found = []
    for path in sorted(root.glob("**/*.parquet")):
        relative = path.relative_to(root)
        if not any(part.startswith(".") for part in relative.parts) and _in_split(relative, split):
            found.append(path)
    return found


def _pick_column(candidates: Sequence[str], names: Sequence[str], what: str, path: Path, spec: BenchmarkSpec) -> str:
    for name in candidates:
        if name in names:
            return name
    raise BenchmarkError(
        f"{path}: no {what} column for benchmark {spec.name!r}; expected one of {', '.join(candidates)}; "
        f"the file has columns: {', '.join(names)} (update BENCHMARKS[{spec.name!r}] in benchmarks.py)"
    )


def _is_scalar(tp: pa.DataType) -> bool:
    return (
        pa.types.is_string(tp)
        or pa.types.is_large_string(tp)
        or pa.types.is_integer(tp)
        or (pa.types.is_floating(tp) or pa.types.is_boolean(tp))
    )


def _request_error(value: object, column: str, where: str) -> str | None:
    if value is None:
        return f"{where}: field {column!r} is missing (null)"
    if not isinstance(value, str) or not value.strip():
        return f"{where}: field {column!r} is empty or not text: {value!r}"
    return None


def load_parquet_benchmark(spec: BenchmarkSpec, root: str | Path, split: str | None = None) -> list[EditExample]:
    """Every row of `split` (None: the benchmark's evaluation split) under `root`, images not yet decoded."""
    root, split = Path(root), split or spec.eval_split
    if not root.is_dir():
        raise BenchmarkError(f"{spec.name}: root folder not found: {root}; get the data with: {spec.download_command}")
    files = parquet_files(root, split)
    if not files:
        everything = parquet_files(root)
        raise BenchmarkError(
            f"{spec.name}: no parquet files of split {split!r} under {root} ({len(everything)} parquet files in "
            f"all: {', '.join(str(p.relative_to(root)) for p in everything[:5])}); get the data with: "
            f"{spec.download_command}"
        )
    examples = []
    for path in files:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        image_column = _pick_column(spec.image_columns, schema.names, "image", path, spec)
        request_column = _pick_column(spec.request_columns, schema.names, "request", path, spec)
        meta_columns = [f.name for f in schema if _is_scalar(f.type) and f.name != request_column]
        table = parquet.read(columns=[request_column, *meta_columns])  # no image bytes are read here
        requests = table.column(request_column).to_pylist()
        metas = table.select(meta_columns).to_pylist()
        relative = path.relative_to(root).as_posix()
        row = 0
        for group in range(parquet.metadata.num_row_groups):
            for row_in_group in range(parquet.metadata.row_group(group).num_rows):
                where = f"{relative} row {row}"
                example_id = f"{spec.name}/{relative.removesuffix('.parquet')}/{row:0{ROW_DIGITS}d}"
                image_ref = ParquetImage(path, group, row_in_group, image_column, f"{where}: field {image_column!r}")
                request = requests[row]
                examples.append(
                    EditExample(
                        id=example_id,
                        image=None,
                        request=request.strip() if isinstance(request, str) else "",
                        source=spec.name,
                        error=_request_error(request, request_column, where),
                        meta={**metas[row], "file": relative, "row": row},
                        image_ref=image_ref,
                    )
                )
                row += 1
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# Manifests


def _manifest_example(line: str, lineno: int, path: Path) -> EditExample:
    """One manifest line -> EditExample; every problem becomes `error` (named by file:line and field)."""
    where = f"{path}:{lineno}"
    fallback_id = f"{path.name}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return EditExample(fallback_id, None, "", "manifest", f"{where}: bad JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return EditExample(fallback_id, None, "", "manifest", f"{where}: expected a JSON object")
    example_id = obj.get("id")
    request = obj.get("request")
    image = obj.get("image")
    meta = {k: v for k, v in obj.items() if k not in ("id", "image", "request")} | {"file": str(path), "line": lineno}
    example = EditExample(
        id=example_id if isinstance(example_id, str) and example_id.strip() else fallback_id,
        image=None,
        request=request.strip() if isinstance(request, str) else "",
        source="manifest",
        meta=meta,
    )
    if not isinstance(example_id, str) or not example_id.strip():
        example.error = f"{where}: field 'id' must be a non-empty string, got {example_id!r}"
    elif not isinstance(image, str) or not image.strip():
        example.error = f"{where}: field 'image' must be a non-empty string (a path), got {image!r}"
    else:
        example.error = _request_error(request, "request", where)
    if isinstance(image, str) and image.strip():
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        example.image_ref = FileImage(image_path, f"{where}: field 'image'")
    return example


def load_manifest(path: str | Path) -> list[EditExample]:
    """A JSONL manifest -> examples (blank lines skipped). BenchmarkError for a missing file or a duplicate id."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: manifest file not found")
    examples, first_line = [], {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            example = _manifest_example(line, lineno, path)
            if example.id in first_line:
                raise BenchmarkError(
                    f"{path}:{lineno}: field 'id': duplicate id {example.id!r} (first on line {first_line[example.id]})"
                )
            first_line[example.id] = lineno
            examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# One entry point, the seeded draw, and the evaluation sample


def load_benchmark(spec: str, root: str | Path | None = None, split: str | None = None) -> list[EditExample]:
    """spec: "psr" | "realedit" | "ultraedit" (a local copy under `root`) or the path of a .jsonl manifest.

    split: None means the benchmark's evaluation split (`BENCHMARKS[spec].eval_split`), "all" every file, or a split
    name ("train", "test"). A manifest has no splits.
    """
    if spec in BENCHMARKS:
        benchmark = BENCHMARKS[spec]
        if root is None:
            raise BenchmarkError(
                f"benchmark {spec!r} needs the folder of a local copy (--root DIR); get it with: "
                f"{benchmark.download_command}"
            )
        return load_parquet_benchmark(benchmark, root, split)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        if split not in (None, ALL_SPLITS):
            raise BenchmarkError(f"{spec}: a manifest has no splits (got split {split!r})")
        return load_manifest(spec)
    raise BenchmarkError(f"unknown benchmark {spec!r}; expected one of {', '.join(BENCHMARKS)} or a .jsonl manifest")


def _rank(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()


def sample(examples: Sequence[EditExample], limit: int | None, seed: int) -> list[EditExample]:
    """The same `limit` examples every time for a given seed (all of them when limit is None or 0), in id order.

    Each example is ranked by sha256(seed, id) and the lowest ranks are kept (see the module docstring).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"sample: limit must be >= 0 (0 = all), got {limit}")
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise BenchmarkError(f"sample: duplicate example ids {duplicates}; ids must be unique")
    chosen = list(examples)
    if limit:
        chosen = sorted(chosen, key=lambda example: _rank(seed, example.id))[:limit]
    return sorted(chosen, key=lambda example: example.id)


def evaluation_sample(
    spec: str,
    root: str | Path | None = None,
    limit: int | None = DEFAULT_EVAL_LIMIT,
    seed: int = DEFAULT_EVAL_SEED,
    split: str | None = None,
) -> list[EditExample]:
    """The examples `evaluate.py --benchmark spec --limit N --seed S` uses: the seeded draw from the eval split."""
    return sample(load_benchmark(spec, root, split), limit, seed)


def evaluation_ids(
    spec: str,
    root: str | Path | None = None,
    limit: int | None = DEFAULT_EVAL_LIMIT,
    seed: int = DEFAULT_EVAL_SEED,
    split: str | None = None,
) -> set[str]:
    """The ids of `evaluation_sample(...)`: what data.py must never put in a training file."""
    return {example.id for example in evaluation_sample(spec, root, limit, seed, split)}


# ---------------------------------------------------------------------------------------------------------------------
# `python benchmarks.py SPEC --root DIR`: look at a local copy before mapping its columns


def describe(spec: str, root: str | None, split: str | None, limit: int, seed: int, show: int = 5) -> str:
    """A readable summary of a local copy: files and schemas (parquet), counts, listing errors, sample head."""
    lines = []
    if spec in BENCHMARKS and root is not None:
        benchmark = BENCHMARKS[spec]
        lines.append(f"{spec}: {benchmark.hub_id}, split {split or benchmark.eval_split!r}")
        for path in parquet_files(root, split or benchmark.eval_split):
            parquet = pq.ParquetFile(path)
            lines.append(f"  {path.relative_to(root)}: {parquet.metadata.num_rows} rows")
            lines.extend(f"    {f.name}: {f.type}" for f in parquet.schema_arrow)
    examples = load_benchmark(spec, root, split)
    broken = [example for example in examples if example.error]
    drawn = sample(examples, limit, seed)
    lines.append(f"{len(examples)} examples, {len(broken)} with an error at listing; sample of {len(drawn)}:")
    lines.extend(f"  {e.id}: {e.request[:80]!r}" + (f"  ERROR {e.error}" if e.error else "") for e in drawn[:show])
    lines.extend(f"  error: {example.error}" for example in broken[:show])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print what a local copy of a benchmark holds and how it is read.")
    parser.add_argument("spec", help="psr | realedit | ultraedit | PATH to a .jsonl manifest")
    parser.add_argument("--root", default=None, help="folder of the local copy (see this module's docstring)")
    parser.add_argument("--split", default=None, help="split name, 'all', or default: the evaluation split")
    parser.add_argument("--limit", type=int, default=DEFAULT_EVAL_LIMIT, help="evaluation sample size (0 = all)")
    parser.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED, help="seed of the evaluation sample")
    args = parser.parse_args(argv)
    try:
        print(describe(args.spec, args.root, args.split, args.limit, args.seed))
    except BenchmarkError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

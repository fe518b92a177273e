"""Shared test fixtures: tiny offline policies, small synthetic images, and an offline, single-thread environment.

The environment is fixed at import, before torch or transformers load: no hub access (an accidental hub id fails
fast instead of hanging), no tokenizer thread pool, and one OpenMP thread (the box has 2 cores shared by several
processes, and tiny models only lose time to threading). Subprocesses started by tests inherit these variables.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by transformers) would warn about no GPU

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the project is flat scripts, not a package: make `import tiny` work anywhere

from miniature import tiny  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"qwen2_5_vl": folder, "qwen3_vl": folder}: tiny policies saved once per test session (seed 0)."""
    return tiny.save_all(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen25(tiny_models: dict[str, Path]) -> Path:
    """Folder of the tiny Qwen2.5-VL policy; load it with policy.load_policy."""
    return tiny_models["qwen2_5_vl"]


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models: dict[str, Path]) -> Path:
    """Folder of the tiny Qwen3-VL policy; load it with policy.load_policy."""
    return tiny_models["qwen3_vl"]


def _draw_image(size: tuple[int, int] = (64, 64), seed: int = 0, colour: str | tuple[int, int, int] | None = None):
    """A small RGB picture: a plain background with a circle and a rectangle, all placed and coloured by `seed`."""
    rng = random.Random(seed)
    width, height = size

    def random_colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    image = Image.new("RGB", size, colour if colour is not None else random_colour())
    draw = ImageDraw.Draw(image)
    for shape in (draw.ellipse, draw.rectangle):
        x0, y0 = rng.randrange(width // 2), rng.randrange(height // 2)
        x1, y1 = x0 + rng.randrange(4, width // 2), y0 + rng.randrange(4, height // 2)
        shape((x0, y0, x1, y1), fill=random_colour())
    return image


@pytest.fixture
def make_image() -> Callable[..., Image.Image]:
    """Factory: make_image(size=(w, h), seed=0, colour=None) -> PIL RGB image (colour sets the background)."""
    return _draw_image

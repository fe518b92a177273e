"""Tiny Qwen2.5-VL and Qwen3-VL policies, built offline from a seed, for tests and the CPU demo.

No model hub is reachable here and a 7B model does not run on 2 CPU cores, yet every test should exercise the real
loading path (`policy.load_policy(folder)`). So this module builds the smallest models that keep the real
architecture, saves them to a folder, and lets the rest of the code load them exactly like a downloaded checkpoint:

- a byte-level BPE tokenizer trained in milliseconds on `tiny_corpus.txt` with Qwen2's pre-tokenizer, wrapped in the
  stock `Qwen2Tokenizer`, with Qwen's special tokens and one token per agent tag (`<think>`, `</think>`, ...);
- a chat template that renders conversations like Qwen2.5-VL's (system/user/assistant turns, and
  `<|vision_start|><|image_pad|><|vision_end|>` where an image goes);
- an image processor with 8-pixel patches, so a 64x64 image becomes 8x8 = 64 patches and 16 image tokens;
- Qwen2.5-VL / Qwen3-VL with hidden size 64, 2 text layers and a 2-block vision tower (~0.3M parameters, ~1 MB).

Every special-token id comes from the tokenizer (never Qwen's 151xxx defaults, which would be out of range), and
`mrope_section` sums to head_dim / 2 = 8 (the default assumes head_dim 128). The same seed gives byte-identical
weights. Usage: `python -m miniature.tiny OUT_DIR [--seed S]` writes OUT_DIR/qwen2_5_vl and OUT_DIR/qwen3_vl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import policy

CORPUS_PATH = Path(__file__).with_name("tiny_corpus.txt")
ARCHS = ("qwen2_5_vl", "qwen3_vl")

# Qwen's special tokens, in Qwen's order; <|endoftext|> comes first because Qwen2Tokenizer adds it itself.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# The agents' output tags. Plain (not special) added tokens: each is one token, and decode(skip_special_tokens=True)
# keeps them, so the parsers see them.
TAG_TOKENS = [
    f"<{slash}{name}>"
    for name in ("think", "action", "subjects", "goals", "score", "instruction", "steps")
    for slash in ("", "/")
]

# Qwen2.5-VL's chat template, rewritten: a default system turn when none is given, one placeholder per image,
# and "<|im_start|>assistant\n" when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Vision geometry shared by the image processor and the vision tower (they must agree).
PATCH_SIZE = 8  # pixels per patch side (Qwen2.5-VL uses 14, Qwen3-VL 16)
MERGE_SIZE = 2  # 2x2 patches merge into one language-model token
TEMPORAL_PATCH_SIZE = 2  # a still image is repeated over 2 frames, as in the real models
MIN_PIXELS = 32 * 32  # smaller images are upscaled to about this area
MAX_PIXELS = 128 * 128  # larger ones are downscaled: keeps CPU tests fast

# Text tower: 4 heads of 16 dims; the 3 rotary sections (time, height, width) cover 16 / 2 = 8 frequencies.
HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MROPE_SECTION = [2, 3, 3]
assert sum(MROPE_SECTION) == HEAD_DIM // 2


def build_tokenizer(vocab_size: int = 1024) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2Tokenizer trained on tiny_corpus.txt; at most `vocab_size` tokens in all.

    The corpus is small, so BPE may run out of pairs to merge before reaching the budget: len(tokenizer) can be
    less than vocab_size (949 with the shipped corpus).
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text can be encoded
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]

    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],  # Qwen2Tokenizer wants (left, right) tuples
        unk_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer, arch: str):
    """The image-only Qwen processor for `arch` with a small image processor (8-pixel patches)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )
    return policy.IMAGE_ONLY_PROCESSORS[arch](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def _token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    ids = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in ids.items()}


def _text_config(tokenizer: Qwen2Tokenizer) -> dict:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 2 * HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": 4096,
        "bos_token_id": None,
        "eos_token_id": im_end,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_config() -> dict:
    return {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": HIDDEN_SIZE,
    }


def build_config(arch: str, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """The tiny config of `arch`: the real architecture with small sizes and the tokenizer's token ids."""
    if arch == "qwen2_5_vl":
        text = _text_config(tokenizer) | {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION}
        }
        # Window attention in block 0 (windows of 32 px = 2x2 merged tokens), full attention in block 1, as in the
        # real tower where most blocks are windowed.
        vision = _vision_config() | {"window_size": 32, "fullatt_block_indexes": [1]}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_token_ids(tokenizer))
    if arch == "qwen3_vl":
        text = _text_config(tokenizer) | {
            "head_dim": HEAD_DIM,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5e5,
                "mrope_section": MROPE_SECTION,
                "mrope_interleaved": True,
            },
        }
        # Learned position embeddings for an 8x8 patch grid (interpolated for other sizes); block 0's features are
        # also injected into the language model ("deepstack"), as in the real model.
        vision = _vision_config() | {"num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        return Qwen3VLConfig(text_config=text, vision_config=vision, **_token_ids(tokenizer))
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def build_model(arch: str, tokenizer: Qwen2Tokenizer, seed: int = 0):
    """A randomly initialised tiny `arch` model; the same seed gives the same weights."""
    config = build_config(arch, tokenizer)
    model_class = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # seed locally: callers' random streams are left alone
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = sampling_generation_config(tokenizer)
    return model.eval()


def sampling_generation_config(tokenizer) -> GenerationConfig:
    """Sampling at temperature 1 with no top-k/top-p, so generate's scores equal the model's log-probs; real
    checkpoints ship other defaults, so callers still pass their sampling parameters explicitly (grpo.generate)."""
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    return GenerationConfig(eos_token_id=[im_end, end_of_text], pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                            do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip


def save_tiny_policy(out_dir: str | Path, arch: str, seed: int = 0) -> Path:
    """Build the tiny `arch` policy and save it with policy.save_policy; returns the folder."""
    tokenizer = build_tokenizer()
    model = build_model(arch, tokenizer, seed=seed)
    return policy.save_policy(model, build_processor(tokenizer, arch), out_dir)


def save_all(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write out_dir/qwen2_5_vl and out_dir/qwen3_vl; returns {arch: folder}."""
    return {arch: save_tiny_policy(Path(out_dir) / arch, arch, seed=seed) for arch in ARCHS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write qwen2_5_vl/ and qwen3_vl/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (same seed, same bytes)")
    args = parser.parse_args(argv)
    for arch, folder in save_all(args.out_dir, seed=args.seed).items():
        print(f"{arch}: {folder}")


if __name__ == "__main__":
    main()

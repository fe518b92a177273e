"""Tests of tiny.py (offline tiny policies) and policy.py (loading and input layout), on both architectures.

Each test loads the saved folders through policy.load_policy, the same path a real checkpoint takes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policy
from miniature import tiny

ARCHS = ["qwen2_5_vl", "qwen3_vl"]


def _same_state(model_a, model_b) -> bool:
    a, b = model_a.state_dict(), model_b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_other_seed_other_weights(arch):
    tokenizer = tiny.build_tokenizer()
    first, again, other = (tiny.build_model(arch, tokenizer, seed=s) for s in (0, 0, 1))
    assert _same_state(first, again)
    assert not _same_state(first, other)


def test_saved_folders_are_byte_identical_for_the_same_seed(tiny_models, tmp_path):
    again = tiny.save_all(tmp_path / "again", seed=0)
    other = tiny.save_tiny_policy(tmp_path / "other", "qwen2_5_vl", seed=1)
    for arch, folder in tiny_models.items():
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(p.name for p in again[arch].iterdir())
        for name in names:
            assert (folder / name).read_bytes() == (again[arch] / name).read_bytes(), f"{arch}/{name} differs"
    weights = "model.safetensors"
    assert (tiny_models["qwen2_5_vl"] / weights).read_bytes() != (other / weights).read_bytes()


def test_tags_and_special_tokens_are_single_tokens_after_save_and_load(tiny_qwen25):
    tokenizer = policy.load_processor(str(tiny_qwen25)).tokenizer
    ids = {}
    for token in tiny.TAG_TOKENS + tiny.SPECIAL_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        assert len(encoded) == 1, f"{token} -> {tokenizer.convert_ids_to_tokens(encoded)}"
        ids[token] = encoded[0]
    assert len(set(ids.values())) == len(ids)  # all distinct
    # Tags are plain tokens: skipping special tokens removes <|im_end|> but keeps the tags the parsers look for.
    text = "<think>move it</think><action>move</action>"
    assert tokenizer.decode(tokenizer.encode(text + "<|im_end|>"), skip_special_tokens=True) == text
    # Ordinary words still tokenise into real pieces (the corpus was learnt), and bytes cover anything else.
    assert len(tokenizer.encode(" recolor the red circle")) < len(" recolor the red circle")
    assert tokenizer.decode(tokenizer.encode("Ünïcode ✓ 42")) == "Ünïcode ✓ 42"


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_folder_loads_with_stock_processor_class_and_consistent_ids(tiny_models, arch):
    folder = tiny_models[arch]
    model, processor = policy.load_policy(str(folder))
    stock = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[arch]
    # AutoProcessor returns a bare tokenizer for an unknown class name: the folder must name the stock class.
    for name in ("processor_config.json", "tokenizer_config.json"):
        assert json.loads((folder / name).read_text())["processor_class"] == stock
    assert isinstance(processor, policy.IMAGE_ONLY_PROCESSORS[arch])
    assert processor.tokenizer.padding_side == "left"
    assert not model.training

    tokenizer = processor.tokenizer
    config = model.config
    assert config.model_type == arch
    assert config.get_text_config().vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert policy.eos_token_ids(processor) == [im_end, end_of_text]
    assert policy.pad_token_id(processor) == end_of_text
    assert list(model.generation_config.eos_token_id) == [im_end, end_of_text]
    assert config.vision_config.patch_size == processor.image_processor.patch_size == tiny.PATCH_SIZE


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_prompts_layout(tiny_models, make_image, arch):
    _, processor = policy.load_policy(str(tiny_models[arch]))
    images = [make_image((64, 64), seed=1), make_image((96, 64), seed=2)]
    batch = policy.encode_prompts(processor, images, ["Recolor the circle red.", "Remove the square."], system="Plan.")

    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= batch.keys()
    # 8-pixel patches: 64x64 -> an 8x8 grid, 96 wide x 64 high -> 8 rows x 12 columns; one frame each.
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 12]]
    assert batch["pixel_values"].shape[0] == 64 + 96  # flat: every patch of every image
    image_tokens = batch["input_ids"] == processor.image_token_id  # (B, L)
    assert image_tokens.sum(dim=1).tolist() == [64 // 4, 96 // 4]  # 2x2 patches merge into one token
    assert torch.equal(batch["mm_token_type_ids"], image_tokens.long())
    # Left padding: every row ends on a real token, and the shorter prompt (smaller image) is padded in front.
    mask = batch["attention_mask"]
    assert mask[:, -1].tolist() == [1, 1]
    assert mask[0, 0] == 0 and mask[1].all()
    assert (batch["input_ids"][0][mask[0] == 0] == policy.pad_token_id(processor)).all()
    prompt = processor.tokenizer.decode(batch["input_ids"][1])
    assert prompt.startswith("<|im_start|>system\nPlan.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert prompt.endswith("<|vision_end|>Remove the square.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_forward_matches_single_prompts_and_generates(tiny_models, make_image, arch):
    model, processor = policy.load_policy(str(tiny_models[arch]))
    images = [make_image((64, 64), seed=3), make_image((96, 64), seed=4)]
    texts = ["Make the circle bigger.", "Move the blue square to the top left corner."]
    batch = policy.encode_prompts(processor, images, texts)
    with torch.no_grad():
        last_logits = model(**batch).logits[:, -1]  # (2, V)
        for i in range(2):  # padding and batching must not change what the model sees
            alone = policy.encode_prompts(processor, images[i : i + 1], texts[i : i + 1])
            torch.testing.assert_close(model(**alone).logits[0, -1], last_logits[i], atol=1e-5, rtol=1e-5)
        torch.manual_seed(0)
        out = model.generate(**batch, max_new_tokens=5, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    prompt_length = batch["input_ids"].shape[1]
    assert last_logits.shape == (2, len(processor.tokenizer))
    assert 1 <= out.shape[1] - prompt_length <= 5
    assert torch.equal(out[:, :prompt_length], batch["input_ids"])
    assert (out < len(processor.tokenizer)).all()


def test_qwen25_needs_mm_token_type_ids(tiny_qwen25, make_image):
    """Why encode_prompts guarantees the key: without it Qwen2.5-VL silently uses 1-D positions."""
    model, processor = policy.load_policy(str(tiny_qwen25))
    batch = policy.encode_prompts(processor, [make_image((64, 64), seed=5)], ["Add a red circle."])
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        difference = (model(**batch).logits - model(**without).logits).abs().max()
    assert difference > 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_supervised_labels_only_the_target_and_end_of_turn(tiny_models, make_image, arch):
    model, processor = policy.load_policy(str(tiny_models[arch]))
    tokenizer = processor.tokenizer
    images = [make_image((64, 64), seed=6), make_image((96, 64), seed=7)]
    prompts = ["Recolor the square.", "Remove the small triangle at the bottom."]
    targets = ["<think>one step</think><action>recolor</action>", "<action>remove</action><goals>gone</goals>"]
    batch = policy.encode_supervised(processor, images, prompts, targets)
    prompt_batch = policy.encode_prompts(processor, images, prompts)

    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape
    assert (labels[mask == 0] == policy.IGNORE_INDEX).all()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, target in enumerate(targets):
        kept = labels[i][labels[i] != policy.IGNORE_INDEX].tolist()
        assert kept == tokenizer.encode(target, add_special_tokens=False) + [im_end]
        # Everything before the target is exactly the generation prompt, and it is masked.
        real = batch["input_ids"][i][mask[i] == 1].tolist()
        prompt_ids = prompt_batch["input_ids"][i][prompt_batch["attention_mask"][i] == 1].tolist()
        assert real == prompt_ids + kept
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == processor.image_token_id).long())
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()  # the supervised warm-up trains through this batch
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_load_policy_missing_path_and_unknown_hub_id_say_how_to_get_the_model(tmp_path):
    for name in (str(tmp_path / "no_such_checkpoint"), "nobody-here/no-such-vlm"):
        with pytest.raises(FileNotFoundError) as caught:
            policy.load_policy(name)
        message = str(caught.value)
        assert name in message and "hf download Qwen/Qwen2.5-VL-7B-Instruct" in message and "miniature.tiny" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(policy.PolicyNotFoundError, match="empty"):
        policy.load_policy(str(tmp_path / "empty"))


def test_load_policy_dtype(tiny_qwen3):
    model, _ = policy.load_policy(str(tiny_qwen3), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cli_writes_both_folders(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "miniature.tiny", str(tmp_path / "out"), "--seed", "3"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for arch in ARCHS:
        folder = tmp_path / "out" / arch
        assert (folder / "model.safetensors").is_file() and (folder / "processor_config.json").is_file()
        assert json.loads((folder / "config.json").read_text())["model_type"] == arch


def test_cli_help_lists_the_seed(capsys):
    with pytest.raises(SystemExit) as exited:
        tiny.main(["--help"])
    assert exited.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown arch 'llama'"):
        tiny.build_config("llama", tiny.build_tokenizer())

"""A checkpoint's generation defaults never reach a rollout or a greedy decode (issue 13, item 1).

transformers fills every generation field the caller leaves unset from the checkpoint's `generation_config`.
Qwen2.5-VL-7B-Instruct ships a repetition penalty (and near-greedy top_k / top_p / temperature). A penalty applied in
sampling but not in scoring makes the sampled distribution differ from the one `per_token_logps` scores, so the
importance ratio is wrong from the first token. The tiny models are saved with a clean generation_config, which hides
this; here the real checkpoint's defaults are written into one and it is loaded through the real loading path.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import grpo
import grpo_fast
import policy

# Qwen/Qwen2.5-VL-7B-Instruct's generation_config.json, sampling fields as published (token ids are the tiny model's)
QWEN25_VL_7B_INSTRUCT_SAMPLING = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1,
                                  "top_p": 0.001}  # fmt: skip
# fields other checkpoints ship that would also reshape the distribution if inherited
OTHER_SHAPING_FIELDS = {"no_repeat_ngram_size": 2, "min_new_tokens": 4, "typical_p": 0.5, "min_p": 0.3}
SHARPEN = 40.0  # a random tiny head is near-uniform; x40 gives ~1 nat/token of entropy, as a trained model has


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def checkpoint_with_defaults(request, tiny_models, tmp_path):
    """A tiny policy saved with a real instruct checkpoint's generation defaults and a sharpened output head."""
    folder = tmp_path / request.param
    shutil.copytree(tiny_models[request.param], folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.update(QWEN25_VL_7B_INSTRUCT_SAMPLING)
    path.write_text(json.dumps(config))
    model, processor = policy.load_policy(str(folder))
    assert model.generation_config.repetition_penalty == 1.05  # the defaults really are in the loaded model
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    return model, processor


def _prompts(processor, make_image):
    images = [make_image((64, 64), seed=1), make_image((96, 64), seed=2)]
    texts = ["make the circle blue", "remove the red square on the left and then move the triangle to the top"]
    return policy.encode_prompts(processor, images, texts, system="You decompose image edit requests.")


@pytest.mark.parametrize("share_prompt", [False, True])
def test_sampling_ignores_the_checkpoints_defaults(checkpoint_with_defaults, make_image, share_prompt):
    model, processor = checkpoint_with_defaults
    prompts = _prompts(processor, make_image)
    torch.manual_seed(0)
    batch = grpo.sample_group(
        model, processor, prompts, 4, max_new_tokens=24, eos_token_ids=policy.eos_token_ids(processor),
        suppress_token_ids=policy.vision_token_ids(processor), return_sampling_logps=True,
        prefill=grpo_fast.shared_prompt_inputs if share_prompt else None,
    )  # fmt: skip
    mask = batch.completion_mask.bool()
    forward = grpo_fast.shared_prompt_logits if share_prompt else None
    scored = grpo.per_token_logps(model, batch, 1.0, forward=forward)  # (B, T)
    err = float((scored.detach() - batch.old_per_token_logps)[mask].abs().max())
    assert err < 1e-5, f"sampled and scored log-probs differ by {err:.3g} nats: checkpoint defaults leaked"
    # with temperature 0.1 and top_k 1 inherited, the G samples of a prompt would all be the same
    assert len(set(batch.texts[:4])) > 1, "the group collapsed to one completion: top_k / temperature leaked"
    assert model.generation_config.repetition_penalty == 1.05  # the model's own config is left as it was


def test_explicit_generation_config_holds_only_what_is_asked(checkpoint_with_defaults):
    model, _ = checkpoint_with_defaults
    for key, value in OTHER_SHAPING_FIELDS.items():
        setattr(model.generation_config, key, value)
    config = grpo.explicit_generation_config(model, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 0, 1.0)
    for key in [*QWEN25_VL_7B_INSTRUCT_SAMPLING, *OTHER_SHAPING_FIELDS]:
        if key not in ("do_sample", "temperature", "top_k", "top_p"):
            assert getattr(config, key) in (None, 1.0, 0), f"{key} = {getattr(config, key)} came from the checkpoint"


def _greedy_by_hand(model, prompt: dict, steps: int, eos: list[int]) -> list[int]:
    """Argmax decoding with plain forward passes: what greedy decoding means, with nothing else applied."""
    out: list[int] = []
    for _ in range(steps):
        batch = grpo.Batch(prompt=prompt, completion_ids=torch.tensor([out], dtype=torch.long).view(1, -1),
                           completion_mask=torch.ones(1, len(out), dtype=torch.long))  # fmt: skip
        logits = grpo.full_sequence_logits(model, batch)[:, -1]  # (1, V) the logits that predict the next token
        out.append(int(logits.argmax(-1)))
        if out[-1] in eos:
            break
    return out


def test_greedy_decoding_is_the_argmax_of_the_scored_distribution(checkpoint_with_defaults, make_image):
    model, processor = checkpoint_with_defaults
    prompts = _prompts(processor, make_image)
    eos = policy.eos_token_ids(processor)
    texts = policy.generate(model, processor, prompts, max_new_tokens=16)
    for row, text in enumerate(texts):
        one = grpo.select_rows(prompts, torch.tensor([row]))
        # left padding does not change the unmasked positions' logits: strip it for the hand-made loop
        keep = one["attention_mask"][0].bool()
        one = {k: (v[:, keep] if k in grpo.SEQUENCE_KEYS else v) for k, v in one.items()}
        want = _greedy_by_hand(model, one, 16, eos)
        want_text = processor.tokenizer.decode(want, skip_special_tokens=True)
        assert text == want_text, f"row {row}: generate gave {text!r}, argmax gives {want_text!r}"

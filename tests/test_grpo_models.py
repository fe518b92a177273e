"""grpo.py on the tiny Qwen2.5-VL and Qwen3-VL: sampling, masks and the one log-prob function."""

from __future__ import annotations

import pytest
import torch

import grpo
import policy


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def tiny_policy(request, tiny_models):
    return policy.load_policy(str(tiny_models[request.param]))


def _two_prompts(processor, make_image):
    # different image sizes and different request lengths: a left-padded batch with two image-token counts
    images = [make_image((64, 64), seed=1), make_image((96, 64), seed=2)]
    texts = ["make the circle blue", "remove the red square on the left and then move the triangle to the top"]
    return policy.encode_prompts(processor, images, texts, system="You decompose image edit requests.")


def test_per_token_logps_match_the_sampling_distribution(tiny_policy, make_image):
    model, processor = tiny_policy
    prompts = _two_prompts(processor, make_image)
    assert prompts["attention_mask"][0].min() == 0 or prompts["attention_mask"][1].min() == 0  # really padded
    torch.manual_seed(0)
    batch = grpo.sample_group(
        model, processor, prompts, 3, max_new_tokens=12, eos_token_ids=policy.eos_token_ids(processor),
        return_sampling_logps=True,
    )  # fmt: skip
    assert len(batch) == 6 and len(batch.texts) == 6
    logps = grpo.per_token_logps(model, batch, temperature=1.0)  # (B, T)
    mask = batch.completion_mask.bool()
    err = (logps - batch.old_per_token_logps)[mask].abs().max()
    assert err < 1e-5, f"scoring pass differs from generation by {err:.2e}"


def test_per_token_logps_need_mm_token_type_ids_on_qwen25(tiny_qwen25, make_image):
    # the trap in ENVIRONMENT.md: without mm_token_type_ids Qwen2.5-VL falls back to 1-D positions, silently
    model, processor = policy.load_policy(str(tiny_qwen25))
    prompts = _two_prompts(processor, make_image)
    torch.manual_seed(1)
    batch = grpo.sample_group(model, processor, prompts, 2, max_new_tokens=8, return_sampling_logps=True)
    good = grpo.per_token_logps(model, batch)
    stripped = grpo.Batch(
        prompt={k: v for k, v in batch.prompt.items() if k != "mm_token_type_ids"},
        completion_ids=batch.completion_ids,
        completion_mask=batch.completion_mask,
    )
    bad = grpo.per_token_logps(model, stripped)
    mask = batch.completion_mask.bool()
    assert (good - batch.old_per_token_logps)[mask].abs().max() < 1e-5
    assert (bad - batch.old_per_token_logps)[mask].abs().max() > 1e-5


def test_temperature_is_applied_in_scoring(tiny_qwen25, make_image):
    model, processor = policy.load_policy(str(tiny_qwen25))
    prompts = _two_prompts(processor, make_image)
    torch.manual_seed(2)
    batch = grpo.sample_group(
        model, processor, prompts, 2, max_new_tokens=8, temperature=0.7, return_sampling_logps=True
    )
    mask = batch.completion_mask.bool()
    assert (grpo.per_token_logps(model, batch, 0.7) - batch.old_per_token_logps)[mask].abs().max() < 1e-5
    assert (grpo.per_token_logps(model, batch, 1.0) - batch.old_per_token_logps)[mask].abs().max() > 1e-4


def test_eos_is_inside_the_mask_and_later_tokens_are_not(tiny_qwen25, make_image):
    model, processor = policy.load_policy(str(tiny_qwen25))
    eos = policy.eos_token_ids(processor)
    # make EOS likely so that some rows stop early: bias the output layer toward <|im_end|>
    with torch.no_grad():
        model.lm_head.weight[eos[0]] *= 0  # start from a neutral row ...
        model.lm_head.bias = None
        model.lm_head.weight[eos[0]] += model.lm_head.weight.mean(0) + 0.02 * torch.randn_like(model.lm_head.weight[0])
    prompts = _two_prompts(processor, make_image)
    stopped = 0
    for seed in range(6):
        torch.manual_seed(seed)
        batch = grpo.sample_group(model, processor, prompts, 4, max_new_tokens=20, eos_token_ids=eos)
        for ids, mask in zip(batch.completion_ids, batch.completion_mask):
            hits = [i for i, t in enumerate(ids.tolist()) if t in eos]
            if hits:
                first = hits[0]
                assert mask[first] == 1 and mask[: first + 1].all() and not mask[first + 1 :].any()
                stopped += 1
            else:
                assert mask.all()
    assert stopped > 0, "no row produced EOS; the test would prove nothing"


def test_concat_of_two_rollouts_scores_each_row_as_alone(tiny_policy, make_image):
    # dynamic sampling joins rollouts of different prompt and completion lengths: the extra left padding of the
    # prompts and right padding of the completions must change no row's log-probs, texts or mask
    model, processor = tiny_policy
    eos = policy.eos_token_ids(processor)
    torch.manual_seed(3)
    long = grpo.sample_group(model, processor, _two_prompts(processor, make_image), 2, max_new_tokens=12,
                             eos_token_ids=eos, return_sampling_logps=True)  # fmt: skip
    short_prompt = policy.encode_prompts(processor, [make_image((64, 64), seed=3)], ["paint it"], system="Edit.")
    short = grpo.sample_group(model, processor, short_prompt, 2, max_new_tokens=5, eos_token_ids=eos,
                              return_sampling_logps=True)  # fmt: skip
    parts = [grpo.select(b, torch.arange(len(b))) for b in (long, short)]
    for b in parts:
        b.old_per_token_logps = None
    pad = processor.tokenizer.pad_token_id
    joined = grpo.concat(parts, pad)
    assert len(joined) == 6 and joined.texts == long.texts + short.texts
    assert joined.prompt["input_ids"].shape[1] == long.prompt["input_ids"].shape[1]  # the longer prompt
    assert joined.completion_ids.shape[1] == long.completion_ids.shape[1]  # the longer completion
    assert int(joined.completion_mask.sum()) == int(long.completion_mask.sum() + short.completion_mask.sum())
    logps = grpo.per_token_logps(model, joined)  # (6, T)
    for rows, alone in ((slice(0, 4), long), (slice(4, 6), short)):
        t = alone.completion_ids.shape[1]
        mask = alone.completion_mask.bool()
        err = (logps[rows, :t] - alone.old_per_token_logps)[mask].abs().max()
        assert err < 1e-5, f"a joined row scores {err:.2e} away from its own rollout"
    with pytest.raises(ValueError, match="fresh rollouts"):
        grpo.concat([long, short], pad)  # log-probs attached: joining would silently drop them

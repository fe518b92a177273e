"""The rollout fast paths equal the plain ones, and speed.py measures them.

grpo.py's optimisations (issue 8) must change the cost and nothing else: the shared prompt prefill draws the same
samples under a fixed seed, shared-prompt scoring gives the same log-probs, entropies and gradients, and trimming and
reordering rows leave every unmasked log-prob where it was. Checked on the tiny Qwen2.5-VL and Qwen3-VL with a
left-padded batch of prompts whose images differ in size. The benchmark's pieces are checked too: the full-size configs
have the published parameter counts, the FLOP counter sees each prompt run once, and a tiny --compare run completes.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import grpo
import grpo_fast
import policy
import speed
from miniature import tiny

TOL = 1e-5  # the bar for "the same log-probs" on the tiny models


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def tiny_policy(request, tiny_models):
    return policy.load_policy(str(tiny_models[request.param]))


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def arch(request):
    return request.param


def _prompts(processor, make_image):
    """Three prompts with different image sizes and request lengths: a left-padded batch, two image-token counts."""
    images = [make_image((64, 64), seed=1), make_image((96, 64), seed=2), make_image((64, 64), seed=3)]
    texts = ["make the circle blue", "remove the red square on the left and then move the triangle to the top", "crop"]
    prompts = policy.encode_prompts(processor, images, texts, system="You decompose image edit requests.")
    assert (prompts["attention_mask"] == 0).any(), "the batch must really be padded"
    return prompts


def _sample(model, processor, prompts, group_size, share_prompt, seed=0, max_new_tokens=10):
    torch.manual_seed(seed)
    return grpo.sample_group(
        model, processor, prompts, group_size, max_new_tokens=max_new_tokens,
        eos_token_ids=policy.eos_token_ids(processor), suppress_token_ids=policy.vision_token_ids(processor),
        return_sampling_logps=True, prefill=grpo_fast.shared_prompt_inputs if share_prompt else None,
    )  # fmt: skip


def forward(share: bool):
    """grpo.per_token_logps's forward: the shared-prompt path or the plain one."""
    return grpo_fast.shared_prompt_logits if share else grpo.full_sequence_logits


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).detach()[mask.bool()].abs().max())


# ---------------------------------------------------------------------------------------------- shared prompt prefill


def test_shared_prefill_draws_the_same_samples(tiny_policy, make_image):
    model, processor = tiny_policy
    prompts = _prompts(processor, make_image)
    plain = _sample(model, processor, prompts, 3, share_prompt=False)
    shared = _sample(model, processor, prompts, 3, share_prompt=True)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.completion_mask, shared.completion_mask) and plain.texts == shared.texts
    assert _masked_max_diff(plain.old_per_token_logps, shared.old_per_token_logps, plain.completion_mask) < TOL
    # the Batch still carries the full repeated prompt, so every scoring path can read it
    assert torch.equal(shared.prompt["input_ids"], plain.prompt["input_ids"])
    assert torch.equal(shared.prompt["pixel_values"], plain.prompt["pixel_values"])
    # and another seed gives other samples: the equality above is not a constant output
    other = _sample(model, processor, prompts, 3, share_prompt=True, seed=1)
    assert not torch.equal(other.completion_ids, shared.completion_ids)


def test_shared_prompt_logps_equal_the_plain_path(tiny_policy, make_image):
    model, processor = tiny_policy
    batch = _sample(model, processor, _prompts(processor, make_image), 3, share_prompt=False)
    # the whole batch, and a micro-batch that cuts the first two groups (rows 1-2 of prompt 0, 3-5 of prompt 1)
    for rows in (torch.arange(len(batch)), torch.arange(1, 6)):
        mb = grpo.select(batch, rows)
        plain, plain_entropy = grpo.per_token_logps(model, mb, return_entropy=True)
        shared, shared_entropy = grpo.per_token_logps(
            model, mb, return_entropy=True, forward=grpo_fast.shared_prompt_logits
        )
        assert _masked_max_diff(plain, shared, mb.completion_mask) < TOL
        assert plain_entropy.isfinite().all()  # suppressed tokens (p = 0, logp = -inf) add 0, not nan
        assert _masked_max_diff(plain_entropy, shared_entropy, mb.completion_mask) < TOL
        assert _masked_max_diff(shared, mb.old_per_token_logps, mb.completion_mask) < TOL  # generation's own scores


def test_shared_prompt_gradients_equal_the_plain_path(tiny_qwen25, make_image):
    model, processor = policy.load_policy(str(tiny_qwen25))
    batch = grpo.select(_sample(model, processor, _prompts(processor, make_image), 3, False), torch.arange(1, 6))
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))  # (B, T)
    model.train()
    grads = []
    for share in (False, True):
        model.zero_grad()
        logps = grpo.per_token_logps(model, batch, forward=forward(share))  # (B, T)
        (logps * weights * batch.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("visual" in n for n in grads[0])  # the image tower learns too
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_shared_prompt_refuses_gradient_checkpointing(tiny_qwen25, make_image):
    # transformers' checkpointed layers drop the KV cache: the completion would be scored without its prompt
    model, processor = policy.load_policy(str(tiny_qwen25))
    batch = _sample(model, processor, _prompts(processor, make_image), 2, False)
    model.activation_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        grpo.per_token_logps(model, batch, forward=grpo_fast.shared_prompt_logits)
    with torch.no_grad():  # without gradients nothing is checkpointed, and the cache is kept
        shared = grpo.per_token_logps(model, batch, forward=grpo_fast.shared_prompt_logits)
    assert _masked_max_diff(shared, batch.old_per_token_logps, batch.completion_mask) < TOL


def test_shared_prompt_runs_each_prompt_once(tiny_qwen25, make_image):
    model, processor = policy.load_policy(str(tiny_qwen25))
    batch = _sample(model, processor, _prompts(processor, make_image), 3, False)
    counter = speed.FlopCounter(model)
    B, P = batch.prompt["input_ids"].shape
    T = batch.completion_ids.shape[1]
    patches = batch.prompt["image_grid_thw"].prod(-1)  # (B,) patches of each row's image
    with torch.no_grad():
        counter.phase = "plain"
        grpo.per_token_logps(model, batch)
        counter.phase = "shared"
        grpo.per_token_logps(model, batch, forward=grpo_fast.shared_prompt_logits)
    assert counter.counts["plain"]["lm_tokens"] == B * (P + T)
    assert counter.counts["plain"]["patches"] == int(patches.sum())
    n = 3  # prompts: P - 1 tokens and one image each, then every row's last prompt token and completion
    assert counter.counts["shared"]["lm_tokens"] == n * (P - 1) + B * (1 + T)
    assert counter.counts["shared"]["patches"] == int(patches[::3].sum())
    assert counter.counts["plain"]["logit_rows"] == B * (T + 1)
    assert counter.counts["shared"]["logit_rows"] == B * (T + 1) + n  # the prefill keeps one position's logits


# ------------------------------------------------------------------------------ static KV cache, chunked log-probs


@pytest.mark.parametrize("share_prompt", [False, True])
def test_static_cache_draws_the_same_samples(tiny_policy, make_image, share_prompt):
    model, processor = tiny_policy
    prompts = _prompts(processor, make_image)
    dynamic = _sample(model, processor, prompts, 3, share_prompt)
    torch.manual_seed(0)
    static = grpo.sample_group(
        model, processor, prompts, 3, max_new_tokens=10, eos_token_ids=policy.eos_token_ids(processor),
        suppress_token_ids=policy.vision_token_ids(processor), return_sampling_logps=True,
        prefill=grpo_fast.shared_prompt_inputs if share_prompt else None, static_cache=True,
    )  # fmt: skip
    assert torch.equal(dynamic.completion_ids, static.completion_ids) and dynamic.texts == static.texts
    assert _masked_max_diff(dynamic.old_per_token_logps, static.old_per_token_logps, dynamic.completion_mask) < TOL


def test_shared_prefill_fills_a_static_cache_of_a_bucketed_length(tiny_qwen25, make_image):
    from transformers import StaticCache

    model, processor = policy.load_policy(str(tiny_qwen25))
    prompts = _prompts(processor, make_image)
    repeated = grpo.repeat_prompts(prompts, 2)
    P = prompts["input_ids"].shape[1]
    dynamic = grpo_fast.shared_prompt_inputs(model, prompts, 2, repeated)["cache"]
    static = grpo_fast.shared_prompt_inputs(model, prompts, 2, repeated, static_len=256)["cache"]
    assert isinstance(static, StaticCache) and int(static.get_seq_length()) == P - 1
    for d, s in zip(dynamic.layers, static.layers, strict=True):
        assert s.keys.shape[2] == 256  # (B, kv_heads, 256, head_dim): every decode step has this shape
        assert torch.equal(s.keys[:, :, : P - 1], d.keys) and torch.equal(s.values[:, :, : P - 1], d.values)
        assert not s.keys[:, :, P - 1 :].any()  # the slots generate fills
    assert P + 10 <= 256 == -(-(P + 10) // grpo.STATIC_CACHE_BUCKET) * grpo.STATIC_CACHE_BUCKET


@pytest.mark.parametrize("share", [False, True])
def test_chunked_logps_equal_the_plain_path_with_one_chunk_of_logits_at_a_time(tiny_policy, make_image, share):
    model, processor = tiny_policy
    batch = _sample(model, processor, _prompts(processor, make_image), 3, share_prompt=False)
    B, T = batch.completion_ids.shape
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(0))  # (B, T)
    head_rows = []  # rows of every call of the output layer, forward and backward recomputation alike
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: head_rows.append(a[0].numel() // a[0].shape[-1])
    )
    model.train()
    results = []
    for chunk in (0, 7):
        model.zero_grad()
        head_rows.clear()
        logps, entropy = grpo.per_token_logps(
            model, batch, return_entropy=True, forward=forward(share), chunk_tokens=chunk
        )
        (logps * weights * batch.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), entropy, grads, list(head_rows)))
    hook.remove()
    (plain, plain_entropy, plain_grads, plain_rows), (chunked, chunked_entropy, chunked_grads, chunked_rows) = results
    assert _masked_max_diff(plain, chunked, batch.completion_mask) < TOL
    assert _masked_max_diff(plain_entropy, chunked_entropy, batch.completion_mask) < TOL
    assert plain_grads.keys() == chunked_grads.keys() and any("lm_head" in n or "embed" in n for n in plain_grads)
    for name, g in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    assert max(plain_rows) >= B * (T + 1) - B  # the plain path's head sees every row's T + 1 positions at once
    # the chunked head: one position per row in the forward, then 7 positions at a time, twice (forward, backward)
    assert max(chunked_rows) <= max(7, B) and sum(r for r in chunked_rows if r <= 7) >= 2 * B * T


@pytest.mark.parametrize("attn", [None, "eager"])
def test_packed_rows_give_the_plain_paths_logps_and_gradients_in_one_unpadded_sequence(
    tiny_models, make_image, arch, attn
):
    # train.py --attn-implementation reaches the model; the packed mask is right under SDPA's and eager's kernels
    model, processor = policy.load_policy(str(tiny_models[arch]), attn_implementation=attn)
    assert model.config._attn_implementation == (attn or "sdpa")
    batch = _sample(model, processor, _prompts(processor, make_image), 3, share_prompt=False)
    B, T = batch.completion_ids.shape
    lengths = torch.arange(B) % T + 1  # (B,) completions that end at different places (EOS at length - 1)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
    batch = dataclasses.replace(batch, completion_mask=mask)
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(0))  # (B, T)
    shapes = []  # (rows, length) of every language-model forward
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple(kw["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    model.train()
    results = []
    for fwd in (grpo.full_sequence_logits, grpo_fast.packed_logits):
        model.zero_grad()
        logps, entropy = grpo.per_token_logps(model, batch, return_entropy=True, forward=fwd)
        (logps * weights * mask).sum().backward()
        results.append((logps.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}))  # fmt: skip
    hook.remove()
    (plain, plain_entropy, plain_grads), (packed, packed_entropy, packed_grads) = results
    assert _masked_max_diff(plain, packed, mask) < TOL
    assert _masked_max_diff(plain_entropy, packed_entropy, mask) < TOL
    assert plain_grads.keys() == packed_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    real = int(batch.prompt["attention_mask"].sum() + mask.sum())
    assert shapes == [(B, batch.prompt["input_ids"].shape[1] + T), (1, real)]  # one row, no padding, no post-EOS


def test_prompt_groups_compare_tokens_and_pixels():
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4], [3, 4]])  # (5, 2) two texts
    grid = torch.tensor([[1, 2, 2]] * 5)  # (5, 3) one 4-patch image per row
    pixels = torch.zeros(20, 3)  # (20, 3)
    pixels[16:] = 1.0  # the last row has the same text as rows 2-3 but another image
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": grid, "pixel_values": pixels}
    first, run = grpo_fast.prompt_groups(prompt)
    assert first.tolist() == [0, 2, 4] and run.tolist() == [0, 0, 1, 1, 2]


# --------------------------------------------------------------------------------------------- padding and row order


def test_trim_padding_keeps_every_unmasked_logp(tiny_policy, make_image):
    model, processor = tiny_policy
    batch = _sample(model, processor, _prompts(processor, make_image), 2, False, max_new_tokens=12)
    lengths = torch.tensor([3, 7, 12, 5, 2, 6])  # (B,) as if rows had stopped at EOS after these many tokens
    batch.completion_mask = (torch.arange(12).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
    mb = grpo.select(batch, torch.tensor([4, 5]))  # the shortest prompt's group: left padding in both rows
    trimmed = grpo_fast.trim_padding(mb)
    assert (
        trimmed.prompt["input_ids"].shape[1]
        == int(mb.prompt["attention_mask"][0].sum())
        < mb.prompt["input_ids"].shape[1]
    )
    assert trimmed.completion_ids.shape[1] == trimmed.old_per_token_logps.shape[1] == 6
    assert trimmed.prompt["pixel_values"] is mb.prompt["pixel_values"]  # images are not columns
    full = grpo.per_token_logps(model, mb)[:, :6]  # (2, 6)
    for share in (False, True):
        short = grpo.per_token_logps(model, trimmed, forward=forward(share))  # (2, 6)
        assert _masked_max_diff(short, full, trimmed.completion_mask) < TOL


def test_rows_by_length_sorts_within_groups_only():
    lengths = torch.tensor([5, 1, 3, 3, 8, 2, 2, 7, 6])  # (9,) three groups of three
    mask = (torch.arange(8).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (9, 8)
    rows = grpo_fast.rows_by_length(mask, 3)
    assert rows.tolist() == [1, 2, 0, 5, 3, 4, 6, 8, 7]
    sorted_lengths = lengths[rows].view(3, 3)
    assert (sorted_lengths.diff(dim=1) >= 0).all()  # shortest first within each group, groups kept whole


# ----------------------------------------------------------------------------------------------------------- speed


@pytest.mark.parametrize(("name", "billions"), [("qwen2_5_vl_7b", 8.29), ("qwen2_5_vl_3b", 3.75)])
def test_full_size_configs_have_the_published_parameter_counts(name, billions):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = speed.full_size_config(name, tiny.build_tokenizer())
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = Qwen2_5_VLForConditionalGeneration._from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_full_size_processor_gives_1369_image_tokens_for_1024_pixels(make_image):
    processor = speed.full_size_processor(tiny.build_tokenizer())
    prompts = policy.encode_prompts(processor, [make_image((1024, 1024))], ["make the sky red"])
    assert int(prompts["mm_token_type_ids"].sum()) == 37 * 37  # 1036 px / 14 px patches / 2x2 merge
    assert prompts["image_grid_thw"].tolist() == [[1, 74, 74]]


def test_speed_compare_runs_every_variant_on_the_tiny_policy(tmp_path, capsys):
    out = tmp_path / "speed.json"
    speed.main(["--model", "tiny", "--compare", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "6",
                "--steps", "1", "--warmup-steps", "1", "--json", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == list(speed.VARIANTS)
    assert len({r["samples_checksum"] for r in results.values()}) == 1  # every variant drew the same samples
    plain, fast = results["plain"]["phases"], results["sorted_trim"]["phases"]
    assert set(plain) == {"rollout", "reward", "ref_logps", "update"}
    for phase in ("rollout", "ref_logps", "update"):  # sharing the prompt runs fewer FLOPs in every model phase
        assert 0 < fast[phase]["tflops"] < plain[phase]["tflops"]
        assert plain[phase]["seconds"] > 0 and plain[phase]["mfu"] > 0
    assert results["shared_rollout"]["phases"]["ref_logps"]["tflops"] == plain["ref_logps"]["tflops"]
    printed = capsys.readouterr().out
    assert "same samples in every variant: yes" in printed and "sorted_trim: step" in printed


def test_speed_full_size_path_runs_with_shrunken_sizes(monkeypatch, tmp_path):
    # the GPU path (config built here, 14-pixel patches, random weights, SGD, no warm-up) at toy sizes on the CPU
    # head_dim stays 128, which the full-size M-RoPE sections [16, 24, 24] need; everything else shrinks
    small_text = dict(hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=False)  # fmt: skip
    monkeypatch.setitem(speed.FULL_SIZE, "qwen2_5_vl_toy", {"text": small_text, "vision_out": 256})
    monkeypatch.setattr(speed, "FULL_SIZE_VISION", speed.FULL_SIZE_VISION | dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]))  # fmt: skip
    out = tmp_path / "speed.json"
    speed.main(["--model", "qwen2_5_vl_toy", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "4",
                "--image-size", "112", "--steps", "1", "--json", str(out)])  # fmt: skip
    record = json.loads(out.read_text())
    assert record["model"] == "qwen2_5_vl_toy (random weights)" and record["args"]["micro_batch_size"] == 2
    (result,) = record["results"]
    assert result["variant"] == "sorted_trim" and result["mean_completion_length"] > 0
    assert result["phases"]["rollout"]["vision_flops_share"] > 0

"""Speed-ups of grpo.py's plain path that change what a GRPO step costs and nothing else.

The G rows of a group repeat one prompt, and the prompt is long (Qwen2.5-VL: ~1,300 image tokens for a 1024x1024
image, plus ~250 of text) while a completion is short. `shared_prompt_inputs` (sampling, as `grpo.sample_group`'s
`prefill`) and `shared_prompt_logits` (scoring, as `grpo.per_token_logps`'s `forward`) run each distinct prompt once
and let its rows continue from copies of its KV cache: the same attention inputs at every completion token, for a
fraction of the compute. `rows_by_length` and `trim_padding` keep micro-batches from paying for padding, and
`packed_logits` (scoring) runs a micro-batch's rows as one sequence with no padding at all.
Each gives the same samples, log-probs and gradients as the plain path (tests/test_rollout_fast.py); speed.py
measures what they save. Shapes as in grpo.py.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers import StaticCache

from grpo import SEQUENCE_KEYS, Batch, full_sequence_inputs, output_layer, patch_offsets, select_rows

# ----------------------------------------------------------------------------------------------------------------------
# Shared prompts. The G rows of a group repeat one prompt, and the prompt is long (Qwen2.5-VL: ~1,300 image tokens for
# a 1024x1024 image, plus ~250 of text) while a completion is short. Running each distinct prompt once and letting its
# rows continue from copies of its KV cache gives the same attention inputs at every completion token, for a fraction
# of the compute.


def prompt_groups(prompt: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of consecutive rows that hold the same prompt (same tokens, same image), as `repeat_prompts` lays them out.

    Returns (the first row of each run (n,), the run of every row (B,)). Rows are compared by value, so any slice of a
    batch works, including a micro-batch that cuts a group in two.
    """
    B, device = prompt["input_ids"].shape[0], prompt["input_ids"].device
    pixels = prompt.get("pixel_values")
    offsets = patch_offsets(prompt["image_grid_thw"]).tolist() if pixels is not None else None  # n_images + 1

    def same_as_previous(r: int) -> bool:
        if not all(torch.equal(prompt[k][r], prompt[k][r - 1]) for k in SEQUENCE_KEYS if k in prompt):
            return False
        return pixels is None or torch.equal(pixels[offsets[r] : offsets[r + 1]], pixels[offsets[r - 1] : offsets[r]])

    starts = torch.tensor([True] + [not same_as_previous(r) for r in range(1, B)], device=device)  # (B,) run starts
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1  # (n,), (B,)


def _rope_deltas_owner(model):
    """The module where Qwen-VL keeps `rope_deltas` between a prefill and the steps that continue it (or None)."""
    return next((m for m in model.modules() if hasattr(m, "rope_deltas")), None)


def shared_prompt_cache(model, prompts: dict[str, torch.Tensor], rows: torch.Tensor):
    """Run n distinct prompts once, all but their last token, and copy each one's KV cache to the rows that use it.

    `prompts` holds the n distinct prompts, `rows` (B,) the prompt each output row continues. The last prompt token is
    left out, so the caller's next forward (or generate's first step) runs it for every row and gets the logits that
    predict the first completion token. Qwen-VL's M-RoPE gives the text after an image positions shifted by a per-row
    offset (`rope_deltas` (n, 1)) that the model computes in the prefill and stores for the steps that continue it; it
    is copied to the B rows too. Returns (the cache with B rows, rope_deltas (B, 1)).
    """
    owner = _rope_deltas_owner(model)
    if owner is not None:
        owner.rope_deltas = None  # offsets of an earlier batch must not leak into this prefill
    head = {k: v[:, :-1] if k in SEQUENCE_KEYS else v for k, v in prompts.items()}  # input_ids (n, P - 1)
    out = model(**head, use_cache=True, logits_to_keep=1)
    if "cache" not in out:  # transformers <= 5.23 names it past_key_values, in the output and in forward's arguments
        raise RuntimeError("share_prompt=True needs transformers >= 5.24, whose models take the KV cache as `cache`")
    cache = out.cache
    cache.batch_select_indices(rows)  # every layer's keys and values: (B, kv_heads, P - 1, head_dim)
    deltas = getattr(owner, "rope_deltas", None)  # (n, 1); None when the prompts have no image
    deltas = torch.zeros(len(rows), 1, dtype=torch.long, device=rows.device) if deltas is None else deltas[rows]
    if owner is not None:
        owner.rope_deltas = deltas  # (B, 1) read by generate's next steps
    return cache, deltas


def shared_prompt_inputs(
    model, prompts: dict[str, torch.Tensor], group_size: int, repeated: dict, static_len: int = 0
) -> dict:
    """`grpo.sample_group`'s prefill: each of the N prompts run once, its KV cache copied to its G rows.

    generate then feeds only the tokens the cache lacks (each row's last prompt token), so no image inputs are needed.
    With `static_len` > 0 the copies go into a StaticCache of that many slots (`grpo.sample_group(static_cache=True)`).
    """
    rows = torch.arange(prompts["input_ids"].shape[0]).repeat_interleave(group_size)  # (B,) prompt of each row
    cache, _ = shared_prompt_cache(model, prompts, rows.to(prompts["input_ids"].device))
    if static_len:
        cache = static_copy(model, cache, static_len)
    return {k: repeated[k] for k in SEQUENCE_KEYS if k in repeated} | {"cache": cache}


def static_copy(model, cache, max_cache_len: int) -> StaticCache:
    """A StaticCache of `max_cache_len` slots per layer holding `cache`'s keys and values (B, kv_heads, P - 1, d)
    in its first P - 1 slots: generate continues from it as from the dynamic cache, with fixed shapes."""
    static = StaticCache(
        config=getattr(model, "module", model).config.get_text_config(decoder=True), max_cache_len=max_cache_len
    )
    for target, source in zip(static.layers, cache.layers, strict=True):
        target.update(source.keys, source.values)  # (B, kv_heads, max_cache_len, d), the first P - 1 filled
    return static


def shared_prompt_logits(model, batch: Batch, *, hidden: bool = False) -> torch.Tensor:
    """`grpo.per_token_logps`'s forward: logits (B, T + 1, V) as `grpo.full_sequence_logits`, with each distinct
    prompt's first P - 1 tokens run once. With `hidden`, the final hidden states (B, T + 1, H) instead."""
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if checkpointing and model.training and torch.is_grad_enabled():
        # transformers' checkpointed layers set cache=None, which would silently score the completion without its prompt
        raise ValueError(
            "per_token_logps(forward=shared_prompt_logits) cannot run with gradient checkpointing on: "
            "checkpointed layers drop the prompt's KV cache; use the plain forward for this pass"
        )
    prompt = batch.prompt
    T = batch.completion_ids.shape[1]
    first_rows, rows = prompt_groups(prompt)  # (n,), (B,)
    cache, rope_deltas = shared_prompt_cache(model, select_rows(prompt, first_rows), rows)  # rope_deltas (B, 1)
    input_ids = torch.cat([prompt["input_ids"][:, -1:], batch.completion_ids], dim=1)  # (B, 1 + T)
    attention_mask = torch.cat([prompt["attention_mask"], torch.ones_like(batch.completion_ids)], dim=1)  # (B, P+T)
    # text after the prompt sits at the same position on all three M-RoPE axes: its 1-D position plus the row's offset
    position_ids = (attention_mask.cumsum(-1) - 1)[:, -(T + 1) :] + rope_deltas  # (B, 1 + T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1 if hidden else T + 1, output_hidden_states=hidden)  # fmt: skip
    return out.hidden_states[-1] if hidden else out.logits  # (B, 1 + T, H) or (B, 1 + T, V)


# ----------------------------------------------------------------------------------------------------------------------
# Packing: the rows of a micro-batch laid end to end in ONE sequence, without their padding, each attending only to
# itself (a block-diagonal causal mask). transformers builds that mask itself when a forward gets no attention mask,
# no cache, and position ids that restart at 0 where a row begins (Qwen-VL: a 4-row position tensor, the 1-D text
# positions first, then M-RoPE's temporal, height and width positions). With flash-attention 2 or flex attention the
# mask becomes a varlen / block-sparse kernel; with SDPA (the CPU) it is a dense (N, N) mask, so on the CPU packing
# only removes the padding's work in the linear layers.


def packed_logits(model, batch: Batch, *, hidden: bool = False) -> torch.Tensor:
    """`grpo.per_token_logps`'s forward: logits (B, T + 1, V) as `grpo.full_sequence_logits`, from one packed
    sequence of every row's real tokens: its prompt without left padding and its completion up to its EOS
    (positions after the EOS are masked by the caller and not run; they get the last real token's numbers). With
    `hidden`, the final hidden states (B, T + 1, H) instead."""
    prompt, completion = batch.prompt, batch.completion_ids
    B, T = completion.shape
    input_ids, attention_mask, extra = full_sequence_inputs(batch)  # (B, L), (B, L), L = P + T
    scored = torch.ones_like(completion) if batch.completion_mask is None else batch.completion_mask  # (B, T)
    keep = torch.cat([prompt["attention_mask"], scored], dim=1).bool()  # (B, L) the tokens that are run
    text_positions = attention_mask.cumsum(-1) - 1  # (B, L) each row's own 1-D positions, from 0
    mm_types = extra.get("mm_token_type_ids", torch.zeros_like(input_ids))  # (B, L)
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = mm_types[keep].unsqueeze(0)  # (1, N)
    rope = next(m for m in model.modules() if hasattr(m, "get_rope_index"))
    mrope, _ = rope.get_rope_index(input_ids, mm_token_type_ids=mm_types, attention_mask=attention_mask,
                                   image_grid_thw=prompt.get("image_grid_thw"))  # (3, B, L) as the plain path's  # fmt: skip
    positions = torch.cat([text_positions.unsqueeze(0), mrope], dim=0)[:, keep].unsqueeze(1)  # (4, 1, N)
    # use_cache=False: with a cache transformers would not look for packed rows and let them attend to each other
    out = model(input_ids=input_ids[keep].unsqueeze(0), attention_mask=None, position_ids=positions, use_cache=False,
                logits_to_keep=1, output_hidden_states=True, **extra)  # fmt: skip
    packed = out.hidden_states[-1][0]  # (N, H) after the final norm
    index = (keep.view(-1).cumsum(0) - 1).view(B, -1)[:, -(T + 1) :]  # (B, T + 1) packed position of each column
    states = packed[index]  # (B, T + 1, H)
    return states if hidden else output_layer(model)(states)  # (B, T + 1, V)


# ----------------------------------------------------------------------------------------------------------------------
# Padding: rows sorted by length within their groups, and every slice cut to its own longest prompt and completion.


def trim_padding(batch: Batch) -> Batch:
    """The same rows without the columns that are padding in every row, so a micro-batch costs what its tokens cost.

    Prompt columns left of the longest prompt (all rows left-padded) and completion columns right of the longest
    unmasked completion go; every (B, T) field is cut to the same T'. The log-probs of unmasked tokens do not change:
    positions come from the attention mask, and padded columns were masked out of attention anyway. Results come back
    as (B, T'); pad them to T with zeros to put them beside the untrimmed batch.
    """
    first = int(batch.prompt["attention_mask"].any(0).nonzero()[0])  # first column that is real in some row
    keep = int(batch.completion_mask.any(0).nonzero()[-1]) + 1  # one past the last column unmasked in some row
    prompt = {k: v[:, first:] if k in SEQUENCE_KEYS else v for k, v in batch.prompt.items()}  # (B, P')

    def cut(t):
        return None if t is None else t[:, :keep]  # (B, T')

    return replace(
        batch,
        prompt=prompt,
        completion_ids=cut(batch.completion_ids),
        completion_mask=cut(batch.completion_mask),
        old_per_token_logps=cut(batch.old_per_token_logps),
        ref_per_token_logps=cut(batch.ref_per_token_logps),
    )


def rows_by_length(completion_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """A row order that keeps each group's G rows together and sorts them by completion length, shortest first.

    Consecutive micro-batches then hold completions of similar lengths, and `trim_padding` removes more. Samples of a
    group are exchangeable, so the order changes nothing but the padding (with one mini-batch per step the gradient
    is the same sum). Returns (B,) row indices for `select`.
    """
    lengths = completion_mask.sum(1).view(-1, group_size)  # (N, G)
    within = lengths.argsort(dim=1, stable=True)  # (N, G)
    starts = torch.arange(lengths.shape[0], device=lengths.device).unsqueeze(1) * group_size  # (N, 1)
    return (starts + within).view(-1)  # (B,)

"""GRPO for a vision-language policy: the whole objective, as pure functions with the model passed in.

The variant (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300, section 4.1, with the choices named below):

    For each prompt q (an image and a request) sample a group of G completions o_1..o_G from the old policy.
    Score each with a scalar reward r_i and give every token of o_i the same advantage

        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                      (group-normalised, outcome reward)

    and maximise the clipped surrogate minus a KL penalty to a frozen reference policy:

        J(theta) = E[ agg_{i,t} ( min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta * KL_it ) ]
        rho_it   = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
        KL_it    = exp(ref_it - logp_it) - (ref_it - logp_it) - 1                 (k3 estimator, Schulman 2020)

    where agg is one of three aggregations over sequences i and their tokens t (see `loss_denominator`).

Departures from DeepSeekMath's GRPO, all switchable or documented:
    1. Asymmetric clipping is allowed (eps_low, eps_high; DAPO, arXiv 2503.14476). Default eps_low = eps_high = 0.2.
    2. Three aggregations: "sequence" (DeepSeekMath: mean over a sequence's tokens, then over sequences), "token"
       (DAPO: mean over all tokens of the batch) and "constant" (Dr. GRPO, arXiv 2503.20783: token sum divided by a
       fixed length). The denominator always comes from the whole global batch, so splitting the batch into micro-
       batches or ranks never changes the gradient.
    3. `scale="none"` drops the std division (Dr. GRPO); the default "group" keeps it.
    4. A group whose rewards are all equal gets advantage exactly 0 (decided in float64 with a tolerance), so it adds
       nothing to the surrogate: its only gradient is the KL term.
    5. Log-probs use logits divided by the sampling temperature, so the ratio is taken between the same distributions
       that generated the samples.
    6. `importance="sequence"` replaces rho_it by GSPO's sequence ratio (arXiv 2507.18071), the geometric mean of a
       sequence's token ratios, clipped per sequence. The default "token" is GRPO's.

Shapes: N prompts, G rollouts per prompt, B = N * G sequences, P prompt tokens, T completion tokens, V vocabulary.
This module imports torch only; the model, processor and rewards are handed in by the caller.

Order of this file: the objective (advantages, k3, the loss and its aggregation), then the one log-prob function,
then sampling, then the batch layout they share. This is the plain path. What only changes the cost (each prompt run
once for its G rows from a copied KV cache; rows sorted by length and padding trimmed) is in grpo_fast.py, passed in
as `forward=` / `prefill=`, and tested to give the same samples, log-probs and gradients (tests/test_rollout_fast.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.utils.checkpoint

Aggregation = Literal["sequence", "token", "constant"]
AdvantageScale = Literal["group", "none"]
ImportanceLevel = Literal["token", "sequence"]

ADV_EPS = 1e-4  # added to the group std; small against F1 reward spreads (>= 1/G) and keeps 1-outlier groups finite
EQUAL_TOL = 1e-6  # rewards closer than this (in float64) count as equal: 1/3 in float32 is not exact
KL_LOG_RATIO_CLAMP = 20.0  # |ref - logp| beyond 20 nats is numerical junk, not a divergence to learn from (verl)
KL_CLAMP = 10.0  # bound of the per-token k3 estimate (verl's low_var_kl), so one token cannot dominate the loss
STATIC_CACHE_BUCKET = 256  # sample_group(static_cache=True) sizes the KV cache to a multiple of this many tokens


# ----------------------------------------------------------------------------------------------------------------------
# The objective: advantages, the k3 KL, the aggregation's denominator and the loss.


def group_advantages(rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group") -> torch.Tensor:
    """A_i = (r_i - mean_group) / (std_group + eps), or r_i - mean_group for scale="none" (Dr. GRPO). (B,) -> (B,).

    The std is the sample std (ddof = 1, torch's default, as in DeepSeekMath's reference code); eps = ADV_EPS.
    Computed in float64, and a group whose rewards all lie within EQUAL_TOL gets exactly 0: in float32, three rewards
    of 1/3 can differ in the last bit and would otherwise be blown up into +-1 advantages by the std division.
    """
    r = rewards.double().view(-1, group_size)  # (N, G)
    centred = r - r.mean(dim=1, keepdim=True)  # (N, G)
    if scale == "group":
        adv = centred / (r.std(dim=1, keepdim=True) + ADV_EPS)  # (N, G)
    elif scale == "none":
        adv = centred  # (N, G)
    else:
        raise ValueError(f"scale must be 'group' or 'none', got {scale!r}")
    equal = (r.max(dim=1, keepdim=True).values - r.min(dim=1, keepdim=True).values) <= EQUAL_TOL  # (N, 1)
    adv = torch.where(equal, torch.zeros_like(adv), adv)  # (N, G)
    return adv.view(-1).to(torch.float32)  # (B,)


def kl_k3(
    per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor, completion_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """k3 estimate of KL(pi_theta || pi_ref) per token (Schulman 2020): exp(d) - d - 1 with d = ref - logp. (B, T).

    Unbiased for samples from pi_theta, always >= 0, and 0 exactly where the two log-probs agree. Masked positions
    (after EOS) get 0 before any exp: their log-probs can be junk (-100 in bf16), and exp(100) * 0 is NaN, not 0.
    d is clamped to +-KL_LOG_RATIO_CLAMP and the estimate to KL_CLAMP, as verl's low-variance KL does.
    """
    delta = ref_per_token_logps - per_token_logps  # (B, T)
    if completion_mask is not None:
        delta = torch.where(completion_mask.bool(), delta, torch.zeros_like(delta))  # (B, T) masked: d = 0, KL = 0
    delta = delta.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)  # (B, T)
    return (torch.exp(delta) - delta - 1).clamp(max=KL_CLAMP)  # (B, T)


def loss_denominator(completion_mask: torch.Tensor, aggregation: Aggregation, max_completion_length: int) -> float:
    """The batch-level normaliser of the loss sum, taken from the WHOLE (global) batch's mask.

    "sequence": number of sequences (each sequence's token sum is first divided by its own length),
    "token":    number of unmasked tokens,
    "constant": number of sequences times the fixed max completion length.
    Callers that split a batch over micro-batches or ranks compute this once on the whole batch (summing across ranks)
    and hand it to every `grpo_loss` call; then the summed micro-batch gradients equal the full-batch gradient.
    """
    if aggregation == "sequence":
        return float(completion_mask.shape[0])
    if aggregation == "token":
        return float(completion_mask.sum().clamp(min=1))
    if aggregation == "constant":
        return float(completion_mask.shape[0] * max_completion_length)
    raise ValueError(f"aggregation must be 'sequence', 'token' or 'constant', got {aggregation!r}")


def aggregate(per_token_loss: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, denominator: float):
    """agg_{i,t}: the masked per-token loss (B, T) -> a scalar, over the denominator of the WHOLE batch:

    "sequence"  (1/B) sum_i (1/|o_i|) sum_t l_it        each sequence's mean over its own tokens
    "token"     sum_{i,t} l_it / sum_i |o_i|            every token of the batch weighs the same
    "constant"  sum_{i,t} l_it / (B * T_max)            a fixed length: no length bias at all
    """
    if aggregation == "sequence":
        per_seq = (per_token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        return per_seq.sum() / denominator
    return (per_token_loss * mask).sum() / denominator  # "token" and "constant" differ only in the denominator


def importance_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: ImportanceLevel = "token") -> torch.Tensor:
    """The importance ratio of every token, (B, T) -> (B, T), from its log-ratio log(pi_theta / pi_old).

    "token" (GRPO): rho_it = exp(log_ratio_it), each token clipped on its own.
    "sequence" (GSPO, Zheng et al. 2025, eq. 7): s_i = (pi_theta(o_i | q) / pi_old(o_i | q)) ** (1 / |o_i|)
    = exp(mean_t log_ratio_it), the same for every token of o_i, so a whole sequence is clipped or not.
    """
    if level == "token":
        return torch.exp(log_ratio)  # (B, T)
    if level == "sequence":
        mean = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        return torch.exp(mean).expand_as(log_ratio)  # (B, T)
    raise ValueError(f"importance must be 'token' or 'sequence', got {level!r}")


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    ref_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    beta: float = 0.01,
    aggregation: Aggregation = "sequence",
    max_completion_length: int | None = None,
    denominator: float | None = None,
    importance: ImportanceLevel = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (to minimise) of a batch or micro-batch, and metrics of this slice.

    `denominator` defaults to this batch's own `loss_denominator`; pass the whole batch's when this is a slice.
    `ref_per_token_logps` may be None when beta == 0 (no reference model is needed then); the "kl" metric is then
    absent. With reference log-probs and beta == 0 the KL is measured and logged but not optimised.
    `importance` picks the ratio (`importance_ratio`): GRPO's per token, or GSPO's per sequence.
    """
    mask = completion_mask.to(per_token_logps.dtype)  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1) one advantage for every token of a sequence
    # rho_it = pi_theta / pi_old, in log space for stability (DeepSeekMath eq. 3); masked positions get log-ratio 0
    # before the exp, since exp of junk log-probs there can overflow and inf * 0 is NaN
    log_ratio = torch.where(mask.bool(), per_token_logps - old_per_token_logps, torch.zeros_like(per_token_logps))
    ratio = importance_ratio(log_ratio, mask, importance)  # (B, T)
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)  # (B, T)
    # min(rho A, clip(rho) A): the pessimistic bound of PPO (Schulman et al. 2017, eq. 7), per token
    surrogate = torch.min(ratio * adv, clipped_ratio * adv)  # (B, T)
    per_token_loss = -surrogate  # (B, T)
    kl = None
    if ref_per_token_logps is not None:
        kl = kl_k3(per_token_logps, ref_per_token_logps, completion_mask)  # (B, T)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * kl  # (B, T) DeepSeekMath eq. 3: ... - beta * D_KL

    max_len = max_completion_length or completion_mask.shape[1]
    if denominator is None:
        denominator = loss_denominator(completion_mask, aggregation, max_len)
    loss = aggregate(per_token_loss, mask, aggregation, denominator)  # () agg_{i,t} of the module docstring

    with torch.no_grad():
        n_tok = mask.sum().clamp(min=1)
        low = ((ratio < 1 - clip_eps_low) & (adv < 0)).to(mask.dtype)  # (B, T) clipped below: no gradient
        high = ((ratio > 1 + clip_eps_high) & (adv > 0)).to(mask.dtype)  # (B, T) clipped above: no gradient
        metrics = {
            "ratio_mean": float((ratio * mask).sum() / n_tok),
            "ratio_max": float(ratio.masked_fill(mask == 0, 0).max()),
            "clip_frac_low": float((low * mask).sum() / n_tok),
            "clip_frac_high": float((high * mask).sum() / n_tok),
            "tokens": float(mask.sum()),
        }
        if kl is not None:  # no reference, no KL: absent from the metrics, never a measured-looking 0
            metrics["kl"] = float((kl * mask).sum() / n_tok)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# The one log-prob function: current, old and reference policy all go through here.


def per_token_logps(
    model, batch: Batch, temperature: float = 1.0, *, return_entropy: bool = False, forward=None, chunk_tokens: int = 0
):
    """log pi(o_t | q, o_<t) for every completion token: (B, T), or ((B, T), entropy (B, T)).

    The prompt and completion are run as one sequence. Logits at position t predict token t + 1, hence the one-token
    shift; only the last T + 1 positions' logits are materialised (`logits_to_keep`). Logits are divided by the
    sampling temperature and the log-softmax is taken in fp32 (bf16 log-probs are too coarse for ratios near 1).
    `mm_token_type_ids` is extended with zeros over the completion: without it Qwen2.5-VL silently falls back to
    1-D positions. Positions after a sequence's EOS are scored but masked by the caller. Tokens that sampling
    suppressed (`batch.suppress_token_ids`) get logit -inf here too, so both sides use the same distribution.
    `forward(model, batch)` computes those logits (B, T + 1, V): `full_sequence_logits` by default, or
    `grpo_fast.shared_prompt_logits`, which gives the same numbers with each distinct prompt run once.

    `chunk_tokens` > 0 never materialises the (B, T, V) logits: the forward returns the final hidden states
    (B, T + 1, H) instead, and the output layer and log-softmax run on `chunk_tokens` positions at a time. Under
    autograd each chunk is checkpointed, so its (chunk, V) logits are freed after the forward and recomputed in the
    backward: peak memory is one chunk's logits, not B x T x V in fp32 (5 GB per copy for 32 rows of 256 tokens at
    Qwen's 152k vocabulary). Same numbers as the plain path, to fp32 rounding (tests/test_rollout_fast.py).
    """
    forward = forward or full_sequence_logits
    if not chunk_tokens:
        logits = forward(model, batch)[:, :-1, :]  # (B, T, V) position P-1+t predicts completion token t
        return _logps_and_entropy(logits, batch.completion_ids, temperature, batch.suppress_token_ids, return_entropy)
    hidden = forward(model, batch, hidden=True)[:, :-1, :]  # (B, T, H)
    B, T, H = hidden.shape
    flat_hidden, flat_ids = hidden.reshape(B * T, H), batch.completion_ids.reshape(B * T)  # (B*T, H), (B*T,)
    head = output_layer(model)
    pieces = []
    for start in range(0, B * T, chunk_tokens):
        h, ids = flat_hidden[start : start + chunk_tokens], flat_ids[start : start + chunk_tokens]  # (c, H), (c,)

        def chunk(h, ids=ids):
            return _logps_and_entropy(head(h), ids, temperature, batch.suppress_token_ids, True)  # (c,), (c,)

        grad = torch.is_grad_enabled() and h.requires_grad
        pieces.append(torch.utils.checkpoint.checkpoint(chunk, h, use_reentrant=False) if grad else chunk(h))
    token_logps = torch.cat([lp for lp, _ in pieces]).view(B, T)  # (B, T)
    entropy = torch.cat([e for _, e in pieces]).view(B, T)  # (B, T)
    return (token_logps, entropy) if return_entropy else token_logps


def _logps_and_entropy(logits, ids, temperature: float, suppress_token_ids, return_entropy: bool):
    """log p(ids) under softmax(logits / temperature) in fp32, and optionally the entropy: logits (..., V), ids (...)."""
    logits = logits.float() / temperature  # (..., V)
    if suppress_token_ids:
        logits[..., suppress_token_ids] = float("-inf")  # (..., V) as generate's SuppressTokensLogitsProcessor
    logps = logits.log_softmax(-1)  # (..., V)
    token_logps = logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
    if not return_entropy:
        return token_logps
    with torch.no_grad():
        # suppressed tokens have logp -inf and p 0: clamping keeps their 0 * logp at 0 instead of nan
        entropy = -(logps.exp() * logps.clamp(min=torch.finfo(logps.dtype).min)).sum(-1)  # (...)
    return token_logps, entropy


def output_layer(model):
    """The model's output projection (hidden -> vocabulary logits), through a DeepSpeed engine's wrapper if any."""
    return getattr(model, "module", model).get_output_embeddings()


def full_sequence_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prompt + completion as one sequence: input_ids (B, P + T), attention_mask (B, P + T), and the other model
    inputs (pixel_values, image_grid_thw, and mm_token_type_ids (B, P + T) extended with zeros over the completion)."""
    prompt, completion = batch.prompt, batch.completion_ids
    input_ids = torch.cat([prompt["input_ids"], completion], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)  # (B, P + T)
    extra = {k: v for k, v in prompt.items() if k not in SEQUENCE_KEYS}
    if "mm_token_type_ids" in prompt:
        zeros = torch.zeros_like(completion)  # (B, T) completion tokens are text
        extra["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], zeros], dim=1)  # (B, P + T)
    return input_ids, attention_mask, extra


def full_sequence_logits(model, batch: Batch, *, hidden: bool = False) -> torch.Tensor:
    """Logits (B, T + 1, V) at the last prompt token and the completion, from one pass over prompt + completion.

    With `hidden`, the final (normed) hidden states (B, T + 1, H) at those positions instead: the output layer then
    runs on one position only, and the caller applies it in chunks (`per_token_logps(chunk_tokens=...)`).
    """
    T = batch.completion_ids.shape[1]
    input_ids, attention_mask, extra = full_sequence_inputs(batch)
    if hidden:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, output_hidden_states=True,
                    **extra)  # fmt: skip
        return out.hidden_states[-1][:, -(T + 1) :]  # (B, T + 1, H) the last layer's output after the final norm
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1, **extra).logits


# ----------------------------------------------------------------------------------------------------------------------
# Rollout: G samples per prompt in one batched generate call.

# Nucleus sampling renormalises over the tokens whose probabilities sum to top_p, while `per_token_logps` scores the
# full softmax: the ratio would compare different distributions (at top_p 0.9 on the tiny model: mean -0.07, max 0.1
# nats per token). Scoring under the same truncation would make the truncation part of the policy, and the sampled
# tokens' support move with theta, so we refuse it instead.
TOP_P_ERROR = ("top_p={top_p}: GRPO here samples from the full softmax (top_p=1), the distribution per_token_logps "
               "scores; a nucleus would make the sampled and scored distributions differ (see grpo.py)")  # fmt: skip


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 at every position up to and including the first EOS, 0 after it; all 1 when no EOS was produced.

    Decided by position, never by token value: a pad token that equals EOS, or an EOS-like token inside the text,
    must not change which tokens the loss sees.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # (B, T)
    T = completion_ids.shape[1]
    positions = torch.arange(T, device=completion_ids.device).expand_as(completion_ids)  # (B, T)
    first_eos = torch.where(is_eos, positions, T).min(dim=1).values  # (B,) T when there is no EOS
    return (positions <= first_eos.unsqueeze(1)).long()  # (B, T)


# A checkpoint's generation_config.json holds chat defaults (Qwen2.5-VL-7B-Instruct ships repetition_penalty 1.05,
# top_k 1, top_p 0.001, temperature 0.1), and `generate` fills every field its caller leaves unset from it. None may
# be inherited: penalties, n-gram bans, top-k / top-p / typical / min-p / epsilon / eta cutoffs, minimum lengths,
# forced, suppressed or biased tokens, guidance and watermarks all reshape the next-token distribution, so samples
# would come from a distribution other than the softmax that `per_token_logps` scores (and greedy decoding would not
# be the argmax). Every generate call of the project goes through `generate`, under a config of exactly its fields.


def explicit_generation_config(model, **fields):
    """A fresh generation config of the model's own class holding `fields` and nothing from the checkpoint."""
    return type(model.generation_config)(**fields)


@torch.no_grad()
def generate(model, inputs: dict, fields: dict, **generate_kwargs):
    """`model.generate(**inputs)` under `explicit_generation_config(model, **fields)`.

    generate merges unset fields from `model.generation_config`, so the model's own config is swapped for the explicit
    one for the duration of the call (and restored after). `generate_kwargs` are generate's own arguments
    (`synced_gpus`), never generation fields.
    """
    config = explicit_generation_config(model, **fields)
    saved, model.generation_config = model.generation_config, config
    try:
        return model.generate(**inputs, generation_config=config, **generate_kwargs)
    finally:
        model.generation_config = saved


@torch.no_grad()
def sample_group(
    model,
    processor,
    prompts: dict[str, torch.Tensor],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_ids: list[int] | None = None,
    suppress_token_ids: list[int] | None = None,
    return_sampling_logps: bool = False,
    prefill=None,
    static_cache: bool = False,
    **generate_kwargs,
) -> Batch:
    """Sample G completions for each of N left-padded prompts with one `generate` call.

    Every sampling field is explicit and nothing is inherited from the checkpoint (`generate`): transformers' default
    top_k=50, or a checkpoint's repetition penalty, would make the sampled distribution differ from the one
    `per_token_logps` scores. Returns a Batch of B = N * G rows, rows of one prompt adjacent.
    With `return_sampling_logps`, the log-probs that generation itself used are attached as `old_per_token_logps`
    (tests compare them with `per_token_logps`; training recomputes them in the training precision).
    `suppress_token_ids` can never be sampled (their logits are -inf); pass the same ids to `per_token_logps`.
    `prefill(model, prompts, group_size, repeated, static_len)`, if given, returns the inputs generate starts from
    instead of the B repeated prompts: `grpo_fast.shared_prompt_inputs` runs each prompt once and lets its G rows continue from
    copies of its KV cache (the same samples under a fixed seed, about G times less prompt compute).
    `static_cache` decodes into a KV cache preallocated to its final length (transformers' StaticCache; the prefill
    gets `static_len` and returns one). Every decode step then has the same shapes and addresses, so on a GPU
    transformers compiles the step and replays it as a CUDA graph instead of launching each small kernel from
    Python; on a CPU it runs eagerly. The same samples as the dynamic cache (tests/test_rollout_fast.py).
    """
    if top_p != 1.0:
        raise ValueError(TOP_P_ERROR.format(top_p=top_p))
    if eos_token_ids is None:
        eos = model.generation_config.eos_token_id
        eos_token_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    tokenizer = getattr(processor, "tokenizer", processor)
    repeated = repeat_prompts(prompts, group_size)  # input_ids (B, P)
    # P + T cache slots, rounded up so that steps with other prompt lengths reuse the compiled decode step
    slots = repeated["input_ids"].shape[1] + max_new_tokens
    static_len = -(-slots // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET if static_cache else 0
    inputs = prefill(model, prompts, group_size, repeated, static_len=static_len) if prefill else repeated
    fields = dict(do_sample=True, temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                  eos_token_id=eos_token_ids, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                  output_scores=return_sampling_logps, suppress_tokens=suppress_token_ids or None)  # fmt: skip
    if static_cache and "cache" not in inputs:  # generate allocates it; a prefill's cache is already static
        fields.update(cache_implementation="static", max_cache_len=static_len)
    out = generate(model, inputs, fields, **generate_kwargs)
    prompt_len = repeated["input_ids"].shape[1]
    completion_ids = out.sequences[:, prompt_len:]  # (B, T)
    completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)  # (B, T)
    # decode each row's unmasked tokens only: multiplying by the mask would turn padding into token 0 ("!")
    texts = [
        tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, completion_mask)
    ]
    batch = Batch(repeated, completion_ids, completion_mask, texts=texts, suppress_token_ids=suppress_token_ids or [])
    if return_sampling_logps:
        scores = torch.stack(out.scores, dim=1).float()  # (B, T, V) logits after temperature, as sampled
        logps = scores.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
        batch.old_per_token_logps = logps * completion_mask
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Batches. One place knows Qwen-VL's image layout: `pixel_values` is flat (all patches of all images concatenated),
# one image per prompt row here, and image i owns image_grid_thw[i].prod() consecutive patch rows.

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # the prompt tensors laid out as (rows, P)


@dataclass
class Batch:
    """The tensors of B sequences that every GRPO pass reads: prompt inputs, completion tokens and their mask.

    `prompt` holds the processor's tensors for the prompt rows: input_ids (B, P), attention_mask (B, P),
    mm_token_type_ids (B, P), image_grid_thw (B, 3) and pixel_values (sum of patches, D). The optional tensors are
    filled in by the training loop before the update.
    """

    prompt: dict[str, torch.Tensor]
    completion_ids: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    advantages: torch.Tensor | None = None  # (B,)
    old_per_token_logps: torch.Tensor | None = None  # (B, T)
    ref_per_token_logps: torch.Tensor | None = None  # (B, T)
    texts: list[str] = field(default_factory=list)  # decoded completions, for rewards and logs
    suppress_token_ids: list[int] = field(default_factory=list)  # never sampled; scored as impossible too

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def patch_offsets(image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Start offset of each image's block of rows in the flat pixel_values, plus the end: (n_images + 1,)."""
    sizes = image_grid_thw.prod(-1)  # (n_images,) patches per image
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])  # (n_images + 1,)


def select_rows(prompt: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prompt inputs of the given rows (any order, repeats allowed), moving each row's image block with it."""
    out = {}
    for key, value in prompt.items():
        if key == "pixel_values":
            offsets = patch_offsets(prompt["image_grid_thw"])  # (n_images + 1,)
            blocks = [value[offsets[r] : offsets[r + 1]] for r in rows.tolist()]
            out[key] = torch.cat(blocks)  # (sum of selected patches, D)
        else:
            out[key] = value[rows]  # (len(rows), ...)
    return out


def repeat_prompts(prompt: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Each prompt row G times in a row (rows 0,0,..,0,1,1,..): image blocks repeated per image, not per patch row."""
    n = prompt["input_ids"].shape[0]
    if "image_grid_thw" in prompt and prompt["image_grid_thw"].shape[0] != n:
        raise ValueError(f"expected one image per prompt, got {prompt['image_grid_thw'].shape[0]} images for {n} rows")
    rows = torch.arange(n).repeat_interleave(group_size)  # (N * G,)
    return select_rows(prompt, rows)


def select(batch: Batch, rows: torch.Tensor) -> Batch:
    """The sub-batch of the given rows, every tensor field sliced consistently."""

    def take(t):
        return None if t is None else t[rows]

    return replace(
        batch,
        prompt=select_rows(batch.prompt, rows),
        completion_ids=batch.completion_ids[rows],
        completion_mask=batch.completion_mask[rows],
        advantages=take(batch.advantages),
        old_per_token_logps=take(batch.old_per_token_logps),
        ref_per_token_logps=take(batch.ref_per_token_logps),
        texts=[batch.texts[i] for i in rows.tolist()] if batch.texts else [],
    )


def concat(batches: list[Batch], pad_token_id: int) -> Batch:
    """The rows of several fresh rollouts in one batch, in order: prompts left-padded to the longest P (as the
    processor pads them), completions right-padded to the longest T with the padding masked out. Only the sampling
    fields are joined; advantages and log-probs are filled in afterwards (dynamic sampling, train.py)."""
    if any(b.advantages is not None or b.old_per_token_logps is not None or b.ref_per_token_logps is not None
           for b in batches):  # fmt: skip
        raise ValueError("concat joins fresh rollouts: fill advantages and log-probs after joining")
    p_len = max(b.prompt["input_ids"].shape[1] for b in batches)
    t_len = max(b.completion_ids.shape[1] for b in batches)

    def left(t, fill):  # (rows, p) -> (rows, p_len)
        return torch.nn.functional.pad(t, (p_len - t.shape[1], 0), value=fill)

    def right(t, fill):  # (rows, t) -> (rows, t_len)
        return torch.nn.functional.pad(t, (0, t_len - t.shape[1]), value=fill)

    prompt = {}
    for key in batches[0].prompt:
        parts = [b.prompt[key] for b in batches]
        if key in SEQUENCE_KEYS:
            parts = [left(t, pad_token_id if key == "input_ids" else 0) for t in parts]
        prompt[key] = torch.cat(parts)  # (sum of rows, P) or, for pixel_values, (sum of patches, D)
    return Batch(
        prompt,
        torch.cat([right(b.completion_ids, pad_token_id) for b in batches]),  # (B, T)
        torch.cat([right(b.completion_mask, 0) for b in batches]),  # (B, T)
        texts=[text for b in batches for text in b.texts],
        suppress_token_ids=batches[0].suppress_token_ids,
    )


def split_micro_batches(batch: Batch, num_micro: int) -> list[Batch]:
    """Consecutive slices of (nearly) equal size. With `loss_denominator` taken from the whole batch, the summed
    gradients of the slices equal the full batch's gradient for every aggregation."""
    return [select(batch, rows) for rows in torch.arange(len(batch)).tensor_split(num_micro) if len(rows) > 0]

"""GRPO math against independent references and properties; see test_grpo_models.py for the tiny Qwen-VL checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo

AGGREGATIONS = ["sequence", "token", "constant"]


# ---------------------------------------------------------------------------------------------------------- advantages


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sampled_from([2, 4, 8]).flatmap(
                lambda g: st.tuples(st.just(g), st.lists(st.floats(0, 1), min_size=n * g, max_size=n * g))
            ),
        )
    )
)
def test_advantages_zero_mean_unit_std_no_nan(case):
    n, (g, values) = case
    rewards = torch.tensor(values, dtype=torch.float32)  # (B,)
    adv = grpo.group_advantages(rewards, g).view(n, g).double()  # (N, G)
    assert torch.isfinite(adv).all()
    assert adv.mean(dim=1).abs().max() < 1e-5
    r = rewards.double().view(n, g)
    spread = r.max(1).values - r.min(1).values
    for i in range(n):
        if spread[i] > grpo.EQUAL_TOL:  # the sample std is std / (std + eps): 1 up to eps / std
            std = float(r[i].std())
            assert float(adv[i].std()) == pytest.approx(std / (std + grpo.ADV_EPS), rel=1e-6)
        elif spread[i] <= grpo.EQUAL_TOL:
            assert (adv[i] == 0).all()


def test_equal_rewards_give_exactly_zero_even_when_not_exact_in_float32():
    third = torch.tensor(1.0, dtype=torch.float32) / 3
    other_third = torch.nextafter(third, torch.tensor(1.0))  # one float32 ulp away, as sums of F1 terms can land
    two_thirds = [torch.tensor(2.0) / 3, 1 - third, third * 2]  # three float32 roundings of 2/3
    assert len({float(third), float(other_third)}) == 2, "the test needs two float32 values of 1/3 that differ"
    for group in ([third, other_third, third, other_third], two_thirds + [two_thirds[0]]):
        rewards = torch.stack(group).float()  # (G,)
        adv = grpo.group_advantages(rewards, len(group))
        assert (adv == 0).all(), adv
    # a real difference of one reward unit in a group of 8 is not swallowed by the tolerance
    adv = grpo.group_advantages(torch.tensor([1 / 3] * 7 + [2 / 3]), 8)
    assert adv[-1] > 2 and (adv[:-1] < 0).all()


def test_dr_grpo_scale_none_is_centred_reward():
    rewards = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.2, 0.2, 0.2, 0.2])
    adv = grpo.group_advantages(rewards, 4, scale="none")
    expected = torch.tensor([-0.625, -0.125, 0.375, 0.375, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-6)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(rewards, 4, scale="batch")


# ------------------------------------------------------------------------------------------------------------------ KL


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=32))
def test_k3_is_nonnegative_and_zero_at_equality(pairs):
    logp = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
    ref = torch.tensor([q for _, q in pairs], dtype=torch.float64)
    assert (grpo.kl_k3(logp, ref) >= -1e-12).all()
    assert (grpo.kl_k3(logp, logp) == 0).all()


def test_k3_gradient_pulls_toward_reference():
    ref = torch.tensor([-1.0, -2.0, -0.5])
    logp = torch.tensor([-0.2, -3.0, -0.5], requires_grad=True)
    grpo.kl_k3(logp, ref).sum().backward()
    stepped = logp.detach() - 0.1 * logp.grad
    assert ((stepped - ref).abs() <= (logp.detach() - ref).abs() + 1e-7).all()
    assert ((stepped - ref).abs()[:2] < (logp.detach() - ref).abs()[:2]).all()
    assert logp.grad[2] == 0


def test_k3_estimates_the_kl_of_sampling_distributions():
    # E_{x~p}[k3] = KL(p || q) for categorical p, q: the estimator is unbiased
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    k3 = grpo.kl_k3(p.log(), q.log())  # (3,) per outcome
    assert float((p * k3).sum()) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-9)


# --------------------------------------------------------------------------------------------------------------- loss


def _toy_policy(seed=0, B=6, T=5, V=7):
    """A linear policy over a random context, with the log-probs of fixed tokens: enough for real gradients."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, 4, generator=g, dtype=torch.float64, requires_grad=True)  # (V, 4)
    ctx = torch.randn(B, T, 4, generator=g, dtype=torch.float64)  # (B, T, 4)
    tokens = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).expand(B, T) < lengths.unsqueeze(1)).long()  # (B, T) varied lengths

    def logps():
        logits = ctx @ W.T  # (B, T, V)
        return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)

    return W, logps, mask


def _weights(mask, aggregation, max_len):
    m = mask.double()
    if aggregation == "sequence":
        return m / m.sum(1, keepdim=True) / mask.shape[0]
    if aggregation == "token":
        return m / m.sum()
    return m / (mask.shape[0] * max_len)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_first_step_gradient_is_reinforce(aggregation):
    W, logps, mask = _toy_policy()
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0, 0.7, -0.7], dtype=torch.float64)
    lp = logps()
    loss, metrics = grpo.grpo_loss(lp, lp.detach(), None, adv, mask, beta=0.0, aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, W)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_frac_low"] == metrics["clip_frac_high"] == 0.0
    # REINFORCE: -sum_it w_it A_i grad log pi(o_it), with w the aggregation's weights
    reinforce = -(_weights(mask, aggregation, mask.shape[1]) * adv.unsqueeze(1) * logps()).sum()
    (expected,) = torch.autograd.grad(reinforce, W)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_clipped_tokens_get_no_surrogate_gradient():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)).repeat(2, 1).requires_grad_(True)
    # ratios 1.5 (above 1 + eps), 1.1 (inside), 0.5 (below 1 - eps), 0.9 (inside)
    ratios = torch.tensor([[1.5, 1.1, 0.5, 0.9]], dtype=torch.float64).repeat(2, 1)
    old = lp.detach() - ratios.log()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 4)
    loss, metrics = grpo.grpo_loss(lp, old, None, adv, mask, beta=0.0, aggregation="token")
    (grad,) = torch.autograd.grad(loss, lp)
    # A > 0: clipped above 1 + eps -> no gradient; A < 0: clipped below 1 - eps -> no gradient
    assert grad[0, 0] == 0 and grad[1, 2] == 0
    # the pessimistic min keeps the gradient on the other side of the clip range, and inside it
    assert (grad[0, 1:] != 0).all() and grad[1, 0] != 0 and grad[1, 1] != 0 and grad[1, 3] != 0
    assert metrics["clip_frac_high"] == pytest.approx(1 / 8) and metrics["clip_frac_low"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_tokens_get_no_gradient(aggregation):
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(4, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = lp.detach() + 0.05 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    ref = lp.detach() - 0.3
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5, 0.3], dtype=torch.float64)
    loss, _ = grpo.grpo_loss(lp, old, ref, adv, mask, beta=0.1, aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, lp)
    assert (grad[mask == 0] == 0).all()
    assert (grad[mask == 1] != 0).all()


def test_kl_term_pulls_the_loss_gradient_toward_the_reference():
    lp = torch.tensor([[-0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -0.2]], dtype=torch.float64)
    loss, metrics = grpo.grpo_loss(lp, lp.detach(), ref, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2), beta=1)
    (grad,) = torch.autograd.grad(loss, lp)
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent lowers logp above ref and raises logp below ref
    assert metrics["kl"] > 0


def test_masked_extreme_logps_cannot_turn_the_loss_into_nan():
    # a post-EOS position scored at -100 (bf16 junk): exp(ref - logp) = exp(100) overflows float32 to inf and
    # inf * 0 (the mask) is NaN, which would poison the loss, the gradient and every weight
    lp = torch.tensor([[-0.5, -100.0], [-0.7, -0.3]], requires_grad=True)  # (B, T)
    ref = torch.tensor([[-0.6, -0.1], [-0.9, -0.2]])  # (B, T)
    old = torch.tensor([[-0.5, -200.0], [-0.7, -0.3]])  # the ratio's exp(logp - old) overflows there too
    mask = torch.tensor([[1, 0], [1, 1]])  # (B, T)
    for aggregation in AGGREGATIONS:
        loss, metrics = grpo.grpo_loss(lp, old, ref, torch.tensor([1.0, -1.0]), mask, beta=0.1, aggregation=aggregation)
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), aggregation
        assert grad[0, 1] == 0 and math.isfinite(metrics["kl"]) and math.isfinite(metrics["ratio_mean"])


def test_k3_is_bounded_like_verls_low_variance_kl():
    # unmasked but extreme: the log-ratio is clamped to +-KL_LOG_RATIO_CLAMP and the estimate to KL_CLAMP
    lp = torch.tensor([[-60.0, -0.5]])
    ref = torch.tensor([[-0.1, -0.5]])
    kl = grpo.kl_k3(lp, ref, torch.ones(1, 2))
    assert torch.isfinite(kl).all() and float(kl[0, 0]) == grpo.KL_CLAMP and float(kl[0, 1]) == 0.0
    small = grpo.kl_k3(torch.tensor([[-0.5]]), torch.tensor([[-0.7]]), torch.ones(1, 1))
    d = -0.2
    assert float(small) == pytest.approx(math.exp(d) - d - 1, rel=1e-6)  # unchanged where nothing is extreme


def _gspo_reference(lp, old, adv, mask, eps_low, eps_high):
    """GSPO's objective written from the paper (arXiv 2507.18071, eq. 5 and 7), one sequence at a time in float64:
    J = (1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), s_i = prod_t (pi/pi_old)^(1/|o_i|)."""
    total = 0.0
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        log_s = sum(lp[i, t] - old[i, t] for t in range(n)) / n  # mask is a prefix: the first n tokens
        s = torch.exp(log_s)
        total = total + torch.min(s * adv[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * adv[i])
    return -total / lp.shape[0]


def test_gspo_sequence_ratio_matches_the_paper_in_value_and_gradient():
    g = torch.Generator().manual_seed(7)
    B, T = 6, 5
    lengths = torch.tensor([1, 5, 3, 2, 4, 5])
    mask = (torch.arange(T).expand(B, T) < lengths.unsqueeze(1)).long()  # (B, T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2  # (B, T)
    lp = (old + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)  # some clipped
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    loss, metrics = grpo.grpo_loss(lp, old, None, adv, mask, beta=0.0, aggregation="sequence", importance="sequence",
                                   clip_eps_low=0.1, clip_eps_high=0.15)  # fmt: skip
    want = _gspo_reference(lp, old, adv, mask, 0.1, 0.15)
    (grad,) = torch.autograd.grad(loss, lp)
    (want_grad,) = torch.autograd.grad(want, lp)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), abs=1e-12)
    assert torch.allclose(grad, want_grad, atol=1e-12) and grad.abs().sum() > 0
    assert (grad[mask == 0] == 0).all()
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1  # the draw clips some sequences, not all
    # a clipped sequence is clipped as a whole: all of its tokens get no gradient
    s = torch.exp(((lp - old) * mask).sum(1) / lengths).detach()
    for i in range(B):
        clipped = (s[i] > 1.15 and adv[i] > 0) or (s[i] < 0.9 and adv[i] < 0)
        assert bool((grad[i, : lengths[i]] == 0).all()) == bool(clipped), i


def test_gspo_equals_grpo_for_one_token_sequences():
    g = torch.Generator().manual_seed(8)
    old = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    lp = old + 0.2 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0]] * 4)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    token, _ = grpo.grpo_loss(lp, old, None, adv, mask, beta=0.0, importance="token")
    sequence, _ = grpo.grpo_loss(lp, old, None, adv, mask, beta=0.0, importance="sequence")
    assert float(token) == pytest.approx(float(sequence), abs=1e-15)
    with pytest.raises(ValueError, match="importance"):
        grpo.grpo_loss(lp, old, None, adv, mask, beta=0.0, importance="word")


def test_loss_rejects_unknown_aggregation():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="aggregation"):
        grpo.grpo_loss(x, x, x, torch.zeros(1), torch.ones(1, 2), aggregation="mean")


# ------------------------------------------------------------------------------------- batches, images, micro-batches


def _fake_vl_batch(B=8, P=3, T=5, D=2, seed=0):
    """A Batch with the Qwen-VL layout: flat pixel_values whose per-image blocks have different sizes."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 1 + i % 3, 2] for i in range(B)])  # (B, 3) 2, 4 or 6 patches per image
    patches = int(grids.prod(-1).sum())
    prompt = {
        "input_ids": torch.randint(0, 9, (B, P), generator=g),
        "attention_mask": torch.ones(B, P, dtype=torch.long),
        "image_grid_thw": grids,
        "pixel_values": torch.randn(patches, D, generator=g, dtype=torch.float64),
    }
    completion_ids = torch.randint(0, 9, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).expand(B, T) < lengths.unsqueeze(1)).long()
    return grpo.Batch(
        prompt=prompt,
        completion_ids=completion_ids,
        completion_mask=mask,
        advantages=torch.randn(B, generator=g, dtype=torch.float64),
        old_per_token_logps=-torch.rand(B, T, generator=g, dtype=torch.float64),
        ref_per_token_logps=-torch.rand(B, T, generator=g, dtype=torch.float64),
    )


class _FakeVLModel(torch.nn.Module):
    """Log-probs that depend on the row's own image block (its mean) and tokens, so a misplaced block changes them."""

    def __init__(self, V=9, D=2):
        super().__init__()
        self.emb = torch.nn.Parameter(
            torch.randn(V, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        )
        self.out = torch.nn.Parameter(
            torch.randn(D, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        )

    def logps(self, batch: grpo.Batch):
        offsets = grpo.patch_offsets(batch.prompt["image_grid_thw"])
        img = torch.stack([batch.prompt["pixel_values"][a:b].mean(0) for a, b in zip(offsets[:-1], offsets[1:])])
        h = self.emb[batch.completion_ids] + img.unsqueeze(1)  # (B, T, D)
        return (h @ self.out).log_softmax(-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_gradients_sum_to_the_full_batch_gradient(aggregation):
    batch = _fake_vl_batch()
    model = _FakeVLModel()
    max_len = 7  # the "constant" aggregation divides by a fixed length, not the batch's longest

    def grads(num_micro):
        model.zero_grad()
        denom = grpo.loss_denominator(batch.completion_mask, aggregation, max_len)
        for mb in grpo.split_micro_batches(batch, num_micro):
            loss, _ = grpo.grpo_loss(
                model.logps(mb),
                mb.old_per_token_logps,
                mb.ref_per_token_logps,
                mb.advantages,
                mb.completion_mask,
                beta=0.05,
                aggregation=aggregation,
                max_completion_length=max_len,
                denominator=denom,
            )
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    full = grads(1)
    for n in (2, 4):
        for a, b in zip(full, grads(n)):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), (aggregation, n, (a - b).abs().max())
    # and the per-slice denominator would NOT match for token-level aggregation: the global normaliser matters
    if aggregation == "token":
        model.zero_grad()
        for mb in grpo.split_micro_batches(batch, 4):
            loss, _ = grpo.grpo_loss(
                model.logps(mb), mb.old_per_token_logps, mb.ref_per_token_logps, mb.advantages, mb.completion_mask,
                beta=0.05, aggregation=aggregation,
            )  # fmt: skip
            (loss / 4).backward()
        assert not all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(full, model.parameters()))


def test_select_rows_moves_each_image_block_with_its_row():
    batch = _fake_vl_batch()
    offsets = grpo.patch_offsets(batch.prompt["image_grid_thw"])
    rows = torch.tensor([5, 0, 5, 2])
    sub = grpo.select_rows(batch.prompt, rows)
    sub_offsets = grpo.patch_offsets(sub["image_grid_thw"])
    for j, r in enumerate(rows.tolist()):
        mine = sub["pixel_values"][sub_offsets[j] : sub_offsets[j + 1]]
        assert torch.equal(mine, batch.prompt["pixel_values"][offsets[r] : offsets[r + 1]])
        assert torch.equal(sub["input_ids"][j], batch.prompt["input_ids"][r])


def test_repeat_prompts_repeats_blocks_group_wise():
    batch = _fake_vl_batch(B=3)
    rep = grpo.repeat_prompts(batch.prompt, 4)
    assert rep["input_ids"].shape[0] == 12
    assert torch.equal(rep["image_grid_thw"], batch.prompt["image_grid_thw"].repeat_interleave(4, dim=0))
    assert rep["pixel_values"].shape[0] == 4 * batch.prompt["pixel_values"].shape[0]
    again = grpo.select_rows(rep, torch.tensor([4, 5, 6, 7]))  # the second prompt's group
    one = grpo.select_rows(batch.prompt, torch.tensor([1, 1, 1, 1]))
    assert all(torch.equal(again[k], one[k]) for k in one)
    bad = dict(batch.prompt, image_grid_thw=batch.prompt["image_grid_thw"][:2])
    with pytest.raises(ValueError, match="one image per prompt"):
        grpo.repeat_prompts(bad, 2)


def test_completion_mask_is_by_position_up_to_and_including_first_eos():
    eos, pad = 2, 2  # pad equal to EOS: masking by value would keep the padding
    ids = torch.tensor([[5, 6, eos, pad, pad], [eos, 7, eos, 3, 1], [4, 4, 4, 4, 4], [8, 9, 9, 9, eos]])
    mask = grpo.completion_mask_from_eos(ids, [eos, 11])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(mask, expected)
    assert torch.equal(grpo.completion_mask_from_eos(torch.tensor([[3, 11, 2]]), [eos, 11]), torch.tensor([[1, 1, 0]]))


def test_loss_denominator_values():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert grpo.loss_denominator(mask, "sequence", 10) == 2
    assert grpo.loss_denominator(mask, "token", 10) == 3
    assert grpo.loss_denominator(mask, "constant", 10) == 20
    assert math.isfinite(grpo.loss_denominator(torch.zeros(2, 3), "token", 3))

"""LoRA (lora.py, train.py --lora-rank): starts as the base, trains only the adapters, its reference is the base with
the adapters off, exports load as plain from_pretrained folders with the adapted model's log-probs, and a killed run
resumes exactly under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import EXAMPLE, run

import grpo
import lora
import policy

CONFIG = lora.LoRAConfig(rank=4, alpha=8.0)


def _batch(model, processor, make_image) -> grpo.Batch:
    prompts = policy.encode_prompts(processor, [make_image((64, 64), seed=5)], ["make the circle blue"], system="Edit.")
    torch.manual_seed(0)
    return grpo.sample_group(
        model, processor, prompts, 2, max_new_tokens=8, eos_token_ids=policy.eos_token_ids(processor)
    )


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
def test_adapters_start_as_the_base_switch_off_to_it_and_merge_into_a_plain_folder(
    name, tiny_models, make_image, tmp_path
):
    model, processor = policy.load_policy(str(tiny_models[name]))
    batch = _batch(model, processor, make_image)
    base_logps = grpo.per_token_logps(model, batch)  # (B, T)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}

    wrapped = lora.add_lora(model, CONFIG)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable), (
        "something besides the adapters trains"
    )
    assert not any(n.startswith(lora.VISION_PREFIXES) for n in wrapped), "the vision tower is adapted by default"
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == set(lora.DEFAULT_TARGETS)
    expected = sum(CONFIG.rank * (m.base.in_features + m.base.out_features) for m in lora.layers(model).values())
    assert sum(p.numel() for p in trainable.values()) == expected
    # B = 0: the adapted model is the base, to the last bit
    assert torch.equal(grpo.per_token_logps(model, batch), base_logps)

    with torch.no_grad():  # an adapter that has learnt something
        for m in lora.layers(model).values():
            m.lora_B.normal_(0, 0.5)
    adapted = grpo.per_token_logps(model, batch)
    mask = batch.completion_mask.bool()
    assert (adapted - base_logps)[mask].abs().max() > 1e-3
    with lora.disabled(model):  # the reference: the base, exactly
        assert torch.equal(grpo.per_token_logps(model, batch), base_logps)
    assert torch.equal(grpo.per_token_logps(model, batch), adapted)  # switched back on

    with lora.merged_for_save(model):
        policy.save_policy(model, processor, tmp_path / "merged")
    lora.save_adapter(model, CONFIG, tmp_path / "merged" / "adapter")
    assert lora.layers(model).keys() == set(wrapped)  # the LoRALinear modules are back
    for key, value in model.state_dict().items():  # and W was never touched (no merge-then-subtract rounding)
        if ".base." in key:
            assert torch.equal(value, base_weights[key.replace(".base.", ".")]), key

    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k or ".base." in k for k in saved), "the export is not a plain checkpoint"
    reloaded, _ = policy.load_policy(str(tmp_path / "merged"))
    err = (grpo.per_token_logps(reloaded, batch) - adapted)[mask].abs().max()
    assert err < 1e-5, f"the merged export scores {err:.2e} away from the adapted model"
    adapter = load_file(tmp_path / "merged" / "adapter" / "adapter.safetensors")
    assert len(adapter) == 2 * len(wrapped)
    meta = json.loads((tmp_path / "merged" / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and sorted(meta["layers"]) == sorted(wrapped)


def test_a_target_that_matches_nothing_is_refused(tiny_qwen25):
    model, _ = policy.load_policy(str(tiny_qwen25))
    with pytest.raises(ValueError, match="no nn.Linear named qproj"):
        lora.add_lora(model, lora.LoRAConfig(rank=4, alpha=8.0, targets=("qproj",)))


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_run_trains_only_the_adapters_and_a_killed_run_resumes_exactly(stage, tiny_qwen25, tmp_path):
    def train_run(out, *extra):
        args = ["tests/probe_train.py", "--gpus", "0", "--model", str(tiny_qwen25), "--train-data", str(EXAMPLE),
                "--eval-size", "8", "--output-dir", str(out), "--prompts-per-step", "2", "--group-size", "4",
                "--micro-batch-size", "4", "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "2",
                "--weight-decay", "0", "--lr", "1e-2", "--beta", "0.05", "--letter-task", "--lora-rank", "4",
                "--zero-stage", str(stage), *extra]  # fmt: skip
        proc = run(args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    full = train_run(tmp_path / "full", "--max-steps", "3")
    # the reference is the base: no drift at step 1 (B = 0), drift once the adapters have moved
    assert full[0]["kl"] < 1e-7 and full[-1]["kl"] > 1e-5
    # compared as loaded (ZeRO-3 exports write the live modules' names, the hub layout loads to the same ones)
    base = policy.load_policy(str(tiny_qwen25))[0].state_dict()
    trained = policy.load_policy(str(tmp_path / "full" / "policy"))[0].state_dict()
    assert trained.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    targets = tuple(f"{t}.weight" for t in lora.DEFAULT_TARGETS)
    assert changed and all(k.endswith(targets) and "visual" not in k for k in changed), sorted(changed)[:5]
    assert (tmp_path / "full" / "policy" / "adapter" / "adapter.safetensors").is_file()

    part = tmp_path / "part"  # killed after step 3 was logged but before its checkpoint was complete
    train_run(part, "--max-steps", "3")
    (part / "checkpoints" / "latest").write_text("step_2")
    shutil.rmtree(part / "checkpoints" / "step_3")
    resumed = train_run(part, "--max-steps", "3", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for name in ("reward_mean", "kl", "grad_norm"):
        assert [r[name] for r in resumed] == pytest.approx([r[name] for r in full], rel=1e-5), name
    again = policy.load_policy(str(part / "policy"))[0].state_dict()
    assert max(float((again[k] - trained[k]).abs().max()) for k in changed) < 1e-6

"""Every advertised train.py flag does what it says inside a real step (issues 13 and 19).

Runs go through tests/probe_train.py: the real `train.main` with a recorder on grpo's calls. Most use the LetterTask
(reward = share of "a" in the answer), which gives a random tiny policy rewards that differ within a group, so each
update has non-zero advantages and a real policy gradient; weight decay is 0 wherever "the weights moved" is claimed,
so decay cannot fake it. Each test asserts the thing its flag is for.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import grpo
import rewards
import train
from miniature import tiny

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example" / "train.jsonl"
BASE_PROMPTS = REPO / "miniature" / "base_model" / "prompts.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
G = 4
# a step of 2 prompts x G=4, 16 new tokens, no decay, a large lr so that one update visibly moves the ratio
COMMON = ["--train-data", str(EXAMPLE), "--eval-size", "8", "--prompts-per-step", "2", "--group-size", str(G),
          "--max-new-tokens", "16", "--micro-batch-size", "4", "--eval-every", "0", "--save-every", "0",
          "--weight-decay", "0", "--lr", "1e-2"]  # fmt: skip
MOVED = 1e-4  # an update by lr 1e-2 moves many weights by ~1e-2; float32 noise of an unchanged weight is 0


def probe(model: Path, out: Path, *extra: str, gpus: int = 0, letter: bool = True, timeout: int = 300):
    """Run train.py under the recorder; returns (metrics records, probe events of rank 0)."""
    args = ["tests/probe_train.py", "--gpus", str(gpus), "--model", str(model), "--output-dir", str(out), *COMMON,
            *extra, *(["--letter-task"] if letter else [])]  # fmt: skip
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, events(out, 0)


def events(out: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (out / f"probe_rank{rank}.jsonl").read_text().splitlines()]


def of(evts: list[dict], call: str) -> list[dict]:
    return [e for e in evts if e["call"] == call]


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a TensorBoard log folder, read back with TensorBoard's own reader: name -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    out: dict[str, dict[int, float]] = {}
    for name in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(name)]
        assert len(steps) == len(set(steps)), f"{name}: a step logged twice {steps}"
        out[name] = {e.step: e.value for e in events.Scalars(name)}
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def moved(a: dict, b: dict, keys=None) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in (keys or a))


@pytest.fixture(scope="module")
def plain_run(tiny_qwen25, tmp_path_factory):
    """One on-policy step (mu 1, one mini-batch): the reference point of several comparisons below."""
    out = tmp_path_factory.mktemp("plain")
    metrics, evts = probe(tiny_qwen25, out, "--max-steps", "1", "--samples-every", "1")
    return out, metrics, evts


# ---------------------------------------------------------------------------------------- the on-policy step itself


def test_on_policy_step_has_a_real_gradient_and_exact_metrics(plain_run, tiny_qwen25):
    out, [record], evts = plain_run
    [update] = of(evts, "update")
    assert update["grad_norm"] > 1e-3, "no policy gradient: the surrogate's gradient vanished"
    assert moved(weights(out / "policy"), weights(tiny_qwen25)) > MOVED
    # on-policy: old = current exactly, so every ratio is 1 and nothing is clipped
    for loss in of(evts, "loss"):
        assert loss["metrics"]["ratio_mean"] == 1.0 and loss["metrics"]["ratio_max"] == 1.0
        assert loss["metrics"]["clip_frac_low"] == 0.0 and loss["metrics"]["clip_frac_high"] == 0.0
    assert record["ratio_mean"] == 1.0 and record["clip_frac_low"] == record["clip_frac_high"] == 0.0
    # the same policy as the reference at step 1: the k3 KL is 0 up to float32 rounding
    assert 0.0 <= record["kl"] < 1e-6
    # zero_spread_frac and the reward moments, recomputed from what the task returned
    [adv] = of(evts, "advantages")
    groups = torch.tensor(adv["rewards"]).view(-1, G)  # (N, G)
    equal = (groups.max(1).values - groups.min(1).values <= grpo.EQUAL_TOL).float().mean()
    assert record["zero_spread_frac"] == pytest.approx(float(equal), abs=1e-12)
    assert record["reward_mean"] == pytest.approx(float(groups.mean()), abs=1e-6)
    # completion length: the tokens the loss saw, per sequence; entropy within (0, log V]
    tokens = sum(e["metrics"]["tokens"] for e in of(evts, "loss"))
    assert record["completion_len"] == pytest.approx(tokens / groups.numel())
    assert 1 <= record["completion_len"] <= 16
    vocab = len(tiny.build_tokenizer())
    assert 0.0 < record["entropy"] <= math.log(vocab) + 1e-4
    # throughput: the completion tokens of the step over the step's measured time
    seconds = sum(v for k, v in record.items() if k.startswith("time/"))
    assert record["tokens_per_s"] == pytest.approx(tokens / seconds, rel=1e-6)
    assert record["gen_tokens_per_s"] == pytest.approx(tokens / record["time/generate"], rel=1e-6)


def test_samples_jsonl_holds_what_was_sampled_and_rewarded(plain_run):
    out, _, evts = plain_run
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["step"] == 1 for s in samples)
    [adv] = of(evts, "advantages")
    # the first row of each of the first two groups (rows are sorted by length within a group)
    assert [s["reward"] for s in samples] == [adv["rewards"][0], adv["rewards"][G]]
    for s in samples:
        head = s["completion"][:16]
        assert s["reward"] == pytest.approx(head.count("a") / max(len(head), 1))


# --------------------------------------------------------------------------------------------- off-policy passes


def test_mu_two_recomputes_old_logps_and_the_ratio_leaves_one(tiny_qwen25, tmp_path):
    metrics, evts = probe(tiny_qwen25, tmp_path / "mu2", "--max-steps", "1", "--mu", "2", "--beta", "0.01")
    logps = of(evts, "logps")
    assert [e["grad"] for e in logps[:2]] == [False, False]  # old and reference, before any update
    losses = [e["metrics"] for e in of(evts, "loss")]  # 2 micro-batches per pass
    first, second = losses[:2], losses[2:]  # pass 1 (before the update), pass 2 (after it)
    assert all(m["ratio_max"] == 1.0 and m["ratio_mean"] == 1.0 for m in first)
    assert max(m["ratio_max"] for m in second) > 1.0 + 1e-3, "the ratio never left 1: old log-probs follow the policy"
    clipped = sum(m["clip_frac_low"] + m["clip_frac_high"] for m in second)
    assert clipped > 0, "lr 1e-2 moves ratios past 1 +- 0.2; clipping must engage"
    assert len(of(evts, "update")) == 2 and metrics[0]["clip_frac_low"] + metrics[0]["clip_frac_high"] > 0
    # the first update moved the policy toward the better completions of each group: in pass 2, a row's log-ratio
    # log(pi_new / pi_old) correlates with its reward relative to its group's mean
    [adv] = of(evts, "advantages")
    r = torch.tensor(adv["rewards"]).view(-1, G)  # (N, G)
    centred = (r - r.mean(1, keepdim=True)).view(-1)  # (B,) in the batch's row order, as the loss sees it
    moved_by = torch.tensor([x for e in of(evts, "loss")[2:] for x in e["row_log_ratio"]])  # (B,)
    assert float((centred * moved_by).sum()) > 0, "the update made worse-than-average completions likelier"


def test_importance_sequence_clips_gspo_ratios(tiny_qwen25, tmp_path):
    _, evts = probe(tiny_qwen25, tmp_path / "gspo", "--max-steps", "1", "--mu", "2", "--importance", "sequence",
                    "--aggregation", "sequence")  # fmt: skip
    second_pass = of(evts, "loss")[2:]
    for e in second_pass:  # one ratio per sequence: the largest is exp of the largest mean log-ratio of a row
        assert e["metrics"]["ratio_max"] == pytest.approx(math.exp(max(e["row_log_ratio"])), rel=1e-5)
    assert max(e["metrics"]["ratio_max"] for e in second_pass) > 1.0 + 1e-3


def test_dynamic_sampling_replaces_flat_groups_and_a_killed_run_resumes_exactly(tiny_qwen25, tmp_path):
    # --half-flat: half the examples score a constant, so their groups have no reward spread and teach nothing
    flat = ["--max-steps", "3", "--half-flat", "--lr", "1e-3"]
    dynamic = [*flat, "--dynamic-sampling", "4", "--save-every", "2"]
    full, evts = probe(tiny_qwen25, tmp_path / "full", *dynamic)
    for record, adv in zip(full, of(evts, "advantages")):
        groups = torch.tensor(adv["rewards"]).view(-1, G)  # (N, G): the groups the update used
        informative = int((groups.max(1).values - groups.min(1).values > grpo.EQUAL_TOL).sum())
        drawn, rollouts = record["dynamic/prompts_drawn"], record["dynamic/rollouts"]
        found = round(record["dynamic/informative_frac"] * drawn)
        assert drawn == 2 * rollouts and 1 <= rollouts <= 4  # --prompts-per-step 2 per rollout, at most 4
        assert informative == min(2, found), "informative groups were dropped or flat ones kept over them"
        assert rollouts == 4 or found >= 2, "stopped drawing before the step had its informative groups"
        assert record["zero_spread_frac"] == pytest.approx(1 - informative / 2)
    assert any(r["dynamic/informative_frac"] < 1 for r in full), "no flat group was met: the test tests nothing"
    assert any(r["dynamic/rollouts"] > 1 for r in full), "no step drew extra prompts"
    # killed after step 3 was logged but before its checkpoint: resume from step 2 and redo step 3 exactly
    part = tmp_path / "part"
    probe(tiny_qwen25, part, *dynamic)
    (part / "checkpoints" / "latest").write_text("step_2")
    shutil.rmtree(part / "checkpoints" / "step_3")
    resumed, _ = probe(tiny_qwen25, part, *dynamic, "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for name in ("reward_mean", "grad_norm", "dynamic/prompts_drawn", "dynamic/informative_frac"):
        assert [r[name] for r in resumed] == pytest.approx([r[name] for r in full], rel=1e-5), name


def test_mini_batches_bf16_and_beta_zero(tiny_qwen25, tmp_path):
    # 2 x G = 8 rollouts, 2 mini-batches of 4: two optimizer updates; the first is on-policy, the second is not.
    # In bf16, both mini-batches' old and current log-probs come from one path, so the first ratio is exactly 1.
    # beta 0: no reference pass at all, and no "kl" in the metrics rather than a measured-looking 0.
    metrics, evts = probe(tiny_qwen25, tmp_path / "mb2", "--max-steps", "1", "--mini-batches", "2", "--beta", "0",
                          "--bf16", "true", "--micro-batch-size", "2")  # fmt: skip
    updates, losses = of(evts, "update"), [e["metrics"] for e in of(evts, "loss")]
    assert len(updates) == 2 and all(u["grad_norm"] > 1e-3 for u in updates)
    assert all(u["grad_accum_dtype"] == "torch.float32" for u in updates)  # bf16 gradients summed in fp32
    logps = of(evts, "logps")
    assert [e["grad"] for e in logps[:4]] == [False] * 4  # the step's old log-probs (4 micro-batches), first
    assert all(e["grad"] for e in logps[4:]) and len(logps) == 8  # then the updates: no reference pass
    assert all(m["ratio_max"] == 1.0 for m in losses[:2])  # first mini-batch: the policy that sampled
    assert max(m["ratio_max"] for m in losses[2:]) != 1.0  # second: the policy after the first update
    assert "kl" not in metrics[0] and all("kl" not in m for m in losses)


def test_gradient_checkpointing_scores_every_pass_on_one_path_with_the_same_gradient(plain_run, tiny_qwen25, tmp_path):
    _, _, plain_evts = plain_run
    _, evts = probe(tiny_qwen25, tmp_path / "gc", "--max-steps", "1", "--mu", "2", "--gradient-checkpointing")
    paths = {e["forward"] for e in of(evts, "logps")}
    assert paths == {"full_sequence_logits"}, "old, reference and current log-probs must come from the same path"
    first = of(evts, "loss")[0]["metrics"]
    assert first["ratio_max"] == 1.0 and first["ratio_mean"] == 1.0  # identical computations at identical weights
    # checkpointing recomputes activations; the gradient is the one the plain run computes
    assert of(evts, "update")[0]["grad_norm"] == pytest.approx(of(plain_evts, "update")[0]["grad_norm"], rel=1e-5)


# --------------------------------------------------------------------------------------------- memory and precision


def test_static_cache_packing_and_chunked_logps_take_the_plain_step(plain_run, tiny_qwen25, tmp_path):
    plain_out, [plain_record], plain_evts = plain_run
    out = tmp_path / "fast"
    [record], evts = probe(tiny_qwen25, out, "--max-steps", "1", "--samples-every", "1", "--static-cache",
                           "--logps-chunk", "5", "--pack")  # fmt: skip
    # every scoring pass is packed and chunked
    assert {(e["forward"], e["chunk_tokens"]) for e in of(evts, "logps")} == {("packed_logits", 5)}
    # the same samples and rewards (static cache), the same log-probs, loss and gradient (packed, chunked scoring)
    assert (out / "samples.jsonl").read_text() == (plain_out / "samples.jsonl").read_text()
    assert of(evts, "advantages")[0]["rewards"] == of(plain_evts, "advantages")[0]["rewards"]
    assert record["entropy"] == pytest.approx(plain_record["entropy"], rel=1e-5)
    assert of(evts, "update")[0]["grad_norm"] == pytest.approx(of(plain_evts, "update")[0]["grad_norm"], rel=1e-5)
    assert moved(weights(out / "policy"), weights(tiny_qwen25)) > MOVED
    # AdamW's first step is lr * g / (|g| + eps), near lr * sign(g): where |g| is near eps the fp32 rounding of the
    # chunked sums moves a weight by up to ~3e-5 (measured); a wrong gradient would move many by ~lr = 1e-2
    assert moved(weights(out / "policy"), weights(plain_out / "policy")) < 1e-3


def test_offload_optimizer_runs_and_gives_the_same_update(plain_run, tiny_qwen25, tmp_path):
    plain_out, _, _ = plain_run
    out = tmp_path / "offload"
    probe(tiny_qwen25, out, "--max-steps", "1", "--samples-every", "1", "--offload-optimizer")
    start, plain, offloaded = weights(tiny_qwen25), weights(plain_out / "policy"), weights(out / "policy")
    assert moved(offloaded, start) > MOVED
    assert moved(offloaded, plain) < 1e-6  # where AdamW's state lives changes nothing in the update


def test_freeze_vision_and_adv_scale_none(tiny_qwen25, tmp_path):
    out = tmp_path / "frozen"
    _, evts = probe(tiny_qwen25, out, "--max-steps", "1", "--freeze-vision", "--adv-scale", "none")
    start, after = weights(tiny_qwen25), weights(out / "policy")
    vision = [k for k in start if ".visual." in k or k.startswith("visual.")]
    language = [k for k in start if k not in vision]
    assert vision and moved(after, start, vision) == 0.0  # the vision tower and its merger stay as they were
    assert moved(after, start, language) > MOVED
    # Dr. GRPO's advantage: the centred reward, not divided by the group std
    [adv] = of(evts, "advantages")
    r = torch.tensor(adv["rewards"], dtype=torch.float64).view(-1, G)  # (N, G)
    want = (r - r.mean(1, keepdim=True)).view(-1)
    assert adv["scale"] == "none" and r.std(1).max() > 0.01  # some group really has a spread to divide by
    assert torch.allclose(torch.tensor(adv["advantages"], dtype=torch.float64), want, atol=1e-6)


def test_ref_model_and_keep_checkpoints(plain_run, tiny_qwen25, tmp_path):
    other = tiny.save_tiny_policy(tmp_path / "other_ref", "qwen2_5_vl", seed=1)
    out = tmp_path / "ref"
    metrics, _ = probe(tiny_qwen25, out, "--max-steps", "3", "--ref-model", str(other), "--save-every", "1",
                       "--keep-checkpoints", "1", "--max-new-tokens", "8", "--report-to", "tensorboard")  # fmt: skip
    _, [plain], _ = plain_run
    # the KL is measured against --ref-model: at step 1 the policy is --model, exactly 0 from itself, not from this
    assert plain["kl"] < 1e-6 and metrics[0]["kl"] > 1e-3
    tags = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert tags == ["step_3"]  # --keep-checkpoints 1: older resumable checkpoints are deleted
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step_1", "step_2", "step_3"]  # exports stay
    # --report-to tensorboard: every metric of metrics.jsonl, under the same name, at the same step
    logged = tensorboard_scalars(out / "tensorboard")
    for record in metrics:
        for name, value in record.items():
            if name != "step":
                assert logged[name][record["step"]] == pytest.approx(value, rel=1e-6), name
    assert set(logged) == {k for r in metrics for k in r} - {"step"}


def test_no_use_goal_reaches_the_reward():
    text = "<think>t</think><action>recolor</action><subjects>circle</subjects><goals>red</goals>"
    gold = rewards.Decomposition(think="", actions=["recolor"], subjects=["circle"], goals=["blue"])
    example = train.data.RLExample(id="x", image_path=Path("unused.png"), request="make the circle blue", gold=gold)
    with_goal = train.build_task(train.Args())
    without = train.build_task(train.Args(use_goal=False))
    r_with, r_without = with_goal.rewards([example], [text])[0], without.rewards([example], [text])[0]
    assert r_with["goal"] == r_without["goal"] == 0.0  # still logged
    assert r_with["reward"] == pytest.approx(3 / 4) and r_without["reward"] == pytest.approx(1.0)


def test_top_p_below_one_is_refused_before_anything_loads(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--top-p", "0.9", "--model", str(tmp_path / "nothing")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "--top-p=0.9" in proc.stderr and "full softmax" in proc.stderr
    with pytest.raises(ValueError, match="top_p=0.9"):
        grpo.sample_group(None, None, {}, 2, max_new_tokens=1, top_p=0.9)


def test_chunked_logps_under_zero3_and_negative_sizes_are_refused():
    with pytest.raises(train.ArgsError, match="--logps-chunk needs --zero-stage 2"):
        train.check_args(train.Args(logps_chunk=1024, zero_stage=3))
    with pytest.raises(train.ArgsError, match=r"--logps-chunk \(-1\) must be >= 0"):
        train.check_args(train.Args(logps_chunk=-1))
    train.check_args(train.Args(logps_chunk=1024, zero_stage=2))


def test_prompts_file_reaches_the_task_and_a_bad_one_is_refused_before_anything_loads(tmp_path):
    good = tmp_path / "prompts.json"
    good.write_text(json.dumps({"decomposition_system": None, "decomposition": "Request: {request}",
                                "sequencing_system": None, "sequencing": "{actions}|{subjects}|{goals}"}))  # fmt: skip
    task = train.build_task(train.parse_dataclass_args(train.Args, ["--prompts", str(good)]))
    example = data.load_rl_jsonl(EXAMPLE)[0]
    assert task.system is None and task.prompts([example])[1] == [f"Request: {example.request.strip()}"]
    # with --agent think, the file's critic template (the miniature base's prompts.json has one) is the thinker's
    think = ["--agent", "think", "--editor", "shapes", "--judge", "shapes", "--prompts", str(BASE_PROMPTS)]
    task = train.build_task(train.parse_dataclass_args(train.Args, think))
    assert task.system is None and task.prompt.template == "Request: {request}\nInstruction: {instruction}"
    bad = tmp_path / "bad.json"
    bad.write_text('{"decomposition": "x"}')
    proc = subprocess.run([sys.executable, "train.py", "--prompts", str(bad), "--model", str(tmp_path / "nothing")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and str(bad) in proc.stderr and "expected the fields" in proc.stderr


# ------------------------------------------------------------------------------------------------- two processes


def test_uneven_held_out_split_under_synced_generation_does_not_hang_in_bf16(tiny_qwen25, tmp_path):
    # 3 held-out examples on 2 ranks, one per generate call: rank 0 makes 2 calls, rank 1 only 1 of its own; with
    # synced_gpus every rank must keep calling, or the others wait in the all-reduce forever
    out = tmp_path / "synced"
    metrics, evts = probe(tiny_qwen25, out, "--max-steps", "1", "--eval-every", "1", "--eval-size", "3",
                          "--zero-stage", "3", "--no-gather-for-generation", "--zero3-live-parameters", "100",
                          "--micro-batch-size", "1", "--max-new-tokens", "8", "--bf16", "true", gpus=2,
                          timeout=150)  # fmt: skip
    assert of(evts, "update")[0]["grad_accum_dtype"] == "torch.float32"  # ZeRO-3 sums bf16 gradients in fp32
    batches = [json.loads(x) for x in (out / "task_rewards.jsonl").read_text().splitlines()]
    held_out = batches[2:]  # after the two ranks' rollout batches: only real held-out rows, never the padding
    assert sum(len(b) for b in held_out) == 3
    assert metrics[0]["eval/reward"] == pytest.approx(sum(sum(b) for b in held_out) / 3, abs=1e-9)

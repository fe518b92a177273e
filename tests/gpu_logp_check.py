"""Generation's per-token log-probs vs grpo.per_token_logps at full size (random weights): the GPU form of the check
tests/test_grpo_models.py makes on the tiny models. A script, not collected by pytest (it needs a GPU for 7B).

    python tests/gpu_logp_check.py [qwen2_5_vl_7b|tiny] [OUT.json] [--fp32] [--instruct-defaults]

Two left-padded prompts with images of two sizes, G = 4 samples of 32 tokens each; it prints max/mean |diff| of
scoring vs generation, shared-prompt scoring, and scoring without mm_token_type_ids (the Qwen2.5-VL trap), in the
model's dtype (bf16 on a GPU) and, with --fp32, again in float32. The README's full-size figures come from it.
--instruct-defaults writes Qwen2.5-VL-7B-Instruct's published sampling defaults (repetition_penalty 1.05, top_k 1,
top_p 0.001, temperature 0.1) into the model's generation_config first: grpo.generate must keep every one of them out
of the samples, so the differences must stay what they are without them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import agents  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import grpo_fast  # noqa: E402
import policy  # noqa: E402
import speed  # noqa: E402


def stats(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> dict:
    d = (a - b)[mask].abs().float()
    return {"max": float(d.max()), "mean": float(d.mean()), "frac_gt_0.01": float((d > 0.01).float().mean()),
            "frac_gt_0.1": float((d > 0.1).float().mean())}  # fmt: skip


# Qwen/Qwen2.5-VL-7B-Instruct's generation_config.json, its sampling fields
INSTRUCT_DEFAULTS = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_k": 1, "top_p": 0.001}


def check(model, processor, prompts, label: str, G: int, T: int) -> dict:
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t = time.perf_counter()
    batch = grpo.sample_group(
        model, processor, prompts, G, max_new_tokens=T, eos_token_ids=policy.eos_token_ids(processor),
        suppress_token_ids=policy.vision_token_ids(processor), return_sampling_logps=True,
    )  # fmt: skip
    sync()
    gen_s = time.perf_counter() - t
    mask = batch.completion_mask.bool()
    old = batch.old_per_token_logps
    with torch.no_grad():
        good = grpo.per_token_logps(model, batch)
        shared = grpo.per_token_logps(model, batch, forward=grpo_fast.shared_prompt_logits)
        stripped = grpo.Batch(
            prompt={k: v for k, v in batch.prompt.items() if k != "mm_token_type_ids"},
            completion_ids=batch.completion_ids, completion_mask=batch.completion_mask,
            suppress_token_ids=batch.suppress_token_ids,
        )  # fmt: skip
        bad = grpo.per_token_logps(model, stripped)
    out = {
        "label": label,
        "rows": len(batch),
        "completion_tokens": int(mask.sum()),
        "mean_sampled_logp": float(old[mask].mean()),
        "generate_seconds": gen_s,
        "scoring_vs_generation": stats(good, old, mask),
        "shared_prompt_scoring_vs_generation": stats(shared, old, mask),
        "shared_vs_full_scoring": stats(shared, good, mask),
        "no_mm_token_type_ids_vs_generation": stats(bad, old, mask),
        "no_mm_token_type_ids_vs_full_scoring": stats(bad, good, mask),
    }
    print(f"\n== {label}: {out['rows']} rows, {out['completion_tokens']} completion tokens, mean sampled logp "
          f"{out['mean_sampled_logp']:.3f}, generate {gen_s:.1f} s")  # fmt: skip
    for key, s in out.items():
        if isinstance(s, dict):
            print(f"  {key:<40} max |diff| {s['max']:.3e}  mean {s['mean']:.3e}  >0.01: {s['frac_gt_0.01']:.1%}  "
                  f">0.1: {s['frac_gt_0.1']:.1%}")  # fmt: skip
    return out


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = argv[0] if argv else "qwen2_5_vl_7b"
    out_path = argv[1] if len(argv) > 1 else None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t = time.perf_counter()
    model, processor, label = speed.load_model(speed.Args(model=name, seed=0), device, dtype)
    print(f"{label} built in {time.perf_counter() - t:.1f} s on {device} ({dtype}); attention "
          f"{model.config._attn_implementation}; transformers {__import__('transformers').__version__}")  # fmt: skip
    sizes = [(1024, 1024), (896, 672)] if name != "tiny" else [(64, 64), (96, 64)]
    examples = data.load_rl_jsonl(speed.EXAMPLE_DATA)[:2]
    images = [e.load_image().resize(s, Image.Resampling.BICUBIC) for e, s in zip(examples, sizes)]
    texts = [agents.PAPER_PROMPTS.decomposition_prompt(e.request) for e in examples]
    prompts = policy.encode_prompts(processor, images, texts, system=agents.DECOMPOSITION_SYSTEM)
    prompts = {k: v.to(device) for k, v in prompts.items()}
    am = prompts["attention_mask"]
    print(f"prompts {tuple(prompts['input_ids'].shape)}, lengths {am.sum(1).tolist()}, image tokens "
          f"{prompts['mm_token_type_ids'].sum(1).tolist()}, grid {prompts['image_grid_thw'].tolist()}")  # fmt: skip
    assert am.min() == 0, "the batch is not padded"
    if "--instruct-defaults" in sys.argv:
        for key, value in INSTRUCT_DEFAULTS.items():
            setattr(model.generation_config, key, value)
        print(f"generation_config carries {INSTRUCT_DEFAULTS}")
    results = [check(model, processor, prompts, f"{label} {dtype}", G=4, T=32)]
    if "--fp32" in sys.argv:
        model.float()
        results.append(check(model, processor, prompts, f"{label} torch.float32", G=4, T=32))
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if out_path:
        Path(out_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""`make demo` in reduced form (issue 6): demo.py end to end in a subprocess, as a user runs it, with few scenes and
steps. It checks that every artefact is written and that the tables agree with evaluate.py's judgement records,
recomputed here independently. The aggregation over seeds (mean ± std, paired gaps) is checked on hand-made numbers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from miniature import demo, summary

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
GRPO_STEPS = 2
REDUCED = [
    "--train-scenes", "24", "--val-scenes", "4", "--test-scenes", "6", "--warmup-steps", "4",
    "--warmup-batch-size", "4", "--warmup-examples", "16", "--grpo-steps", str(GRPO_STEPS), "--prompts-per-step", "2",
    "--group-size", "4", "--max-new-tokens", "16", "--micro-batch-size", "8", "--eval-every", "2",
    "--agent-max-new-tokens", "16", "--thinker-warmup-steps", "4", "--thinker-grpo-steps", str(GRPO_STEPS),
    "--thinker-max-new-tokens", "16", "--max-turns", "2", "--clip-eps-high", "0.28",
]  # fmt: skip
METHODS = ["original", "chain", "chain/multi", "chain-rl", "chain-rl/multi"]
THINK_FOLDERS = {"eval_think": "", "eval_think_untrained": "/untrained"}  # folder -> suffix of its rows in results


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("demo") / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "miniature.demo", "--out", str(out), "--seeds", "3", *REDUCED],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def recomputed_means(eval_dir: Path) -> dict[str, dict[str, float]]:
    """method -> mean of each criterion over its judgement records (the last record of a key wins)."""
    latest = {}
    for line in (eval_dir / "judgements.jsonl").read_text().splitlines():
        record = json.loads(line)
        latest[(record["example_id"], record["method"])] = record
    means: dict[str, dict[str, float]] = {}
    for method in {m for _, m in latest}:
        records = [r for (_, m), r in latest.items() if m == method and r["status"] == "ok"]
        means[method] = {c: sum(r[c] for r in records) / len(records) for c in summary.CRITERIA}
        means[method]["judged"] = len(records)
    return means


@pytest.mark.slow
def test_reduced_demo_writes_every_artefact(reduced_demo):
    out, _ = reduced_demo
    seed_dir = out / "seed3"
    for rel in ["results.md", "results.csv", "args.json", "seed3/reward_curves.png", "seed3/timings.json",
                "seed3/eval/table1.md", "seed3/eval/table1.csv", "seed3/eval/subscores.md",
                "seed3/eval/subscores.csv", "seed3/eval/report.html", "seed3/grpo/policy/model.safetensors",
                "seed3/data/test.jsonl", "seed3/thinker_reward_curves.png",
                "seed3/think_warm/model.safetensors", "seed3/think_grpo/policy/model.safetensors",
                "seed3/eval_think/report.html", "seed3/eval_think_untrained/report.html"]:  # fmt: skip
        assert (out / rel).is_file() and (out / rel).stat().st_size > 0, rel
    assert (seed_dir / "reward_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (seed_dir / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, GRPO_STEPS + 1))
    think_metrics = [json.loads(line) for line in (seed_dir / "think_grpo/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in think_metrics] == list(range(1, GRPO_STEPS + 1))
    assert {"score_mean", "gain_mean", "eval/gain"} <= think_metrics[-1].keys()  # the thinker's reward was trained
    assert json.loads((seed_dir / "think_grpo/args.json").read_text())["task"] == "think"
    # the decomposition agent starts from the shipped base with its prompts, and no warm-up ran for it
    grpo_args = json.loads((seed_dir / "grpo/args.json").read_text())
    assert Path(grpo_args["model"]).resolve() == (REPO / "miniature/base_model").resolve()
    assert Path(grpo_args["prompts"]).name == "prompts.json"
    assert grpo_args["clip_eps_high"] == 0.28 and grpo_args["temperature"] == 1.0  # the demo's GRPO knobs reach it
    assert not (seed_dir / "warm").exists()
    # the thinker is warmed up from the same base, on the base's critic template, and GRPO-trained with it
    think_args = json.loads((seed_dir / "think_grpo/args.json").read_text())
    assert Path(think_args["prompts"]).name == "prompts.json" and not (seed_dir / "tiny").exists()
    base_tokenizer = (REPO / "miniature/base_model/tokenizer.json").read_text()
    assert (seed_dir / "think_warm/tokenizer.json").read_text() == base_tokenizer  # the tiny policy has its own
    # the held-out test scenes are not training scenes: the splits come from different generator seeds
    ids = {split: {json.loads(x)["id"] for x in (seed_dir / f"data/{split}.jsonl").read_text().splitlines()}
           for split in ("train", "val", "test")}  # fmt: skip
    assert not ids["test"] & (ids["train"] | ids["val"])
    report = (seed_dir / "eval/report.html").read_text()
    assert all(f"<code>{m}</code>" in report for m in METHODS)


@pytest.mark.slow
def test_tables_agree_with_the_judgement_records(reduced_demo):
    out, proc = reduced_demo
    means = recomputed_means(out / "seed3" / "eval")
    assert sorted(means) == sorted(METHODS)
    for folder, suffix in THINK_FOLDERS.items():
        think_means = recomputed_means(out / "seed3" / folder)
        assert sorted(think_means) == sorted(demo.THINK_METHODS)
        means |= {m + suffix: v for m, v in think_means.items()}
    with (out / "results.csv").open(newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(means)
    edits = [json.loads(line) for line in (out / "seed3/eval/edits.jsonl").read_text().splitlines()]
    for method, row in rows.items():
        assert row["seed"] == "3" and int(row["judged"]) == means[method]["judged"] == 6
        if method not in METHODS:
            continue  # think rows: compared below with their own folder's records
        fallbacks = sum(1 for e in edits if e["method"] == method and (e["chain"] or {}).get("fallback"))
        assert int(row["fallbacks"]) == fallbacks, method
        for c in summary.CRITERIA:
            assert float(row[c]) == pytest.approx(means[method][c], abs=1e-9), (method, c)
    table1 = {}
    with (out / "seed3/eval/table1.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            table1[r["method"]] = float(r["Average"])
    results_md = (out / "results.md").read_text()
    for method, label in summary.TABLE1_ROWS.items():
        assert table1[method] == pytest.approx(means[method]["total"], abs=1e-9)
        assert f"| {label} | {means[method]['total']:.2f} |" in results_md
        assert f"| {label} | {means[method]['total']:.2f} |" in proc.stdout  # the table is printed at the end
    for method, label in summary.THINK_ROWS.items():
        assert f"| {label} | {means[method]['total']:.2f} |" in results_md
        if method not in METHODS:
            assert float(rows[method]["total"]) == pytest.approx(means[method]["total"], abs=1e-9)


@pytest.mark.slow
def test_second_run_skips_finished_stages(reduced_demo):
    out, _ = reduced_demo
    before = (out / "seed3/grpo/policy/model.safetensors").stat().st_mtime_ns
    proc = subprocess.run(
        [sys.executable, "-m", "miniature.demo", "--out", str(out), "--seeds", "3", *REDUCED],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "$ " + Path(sys.executable).name + " -m miniature.warmup" not in proc.stdout
    assert " train.py " not in proc.stdout
    assert " evaluate.py " not in proc.stdout  # finished evaluations are not re-entered either
    assert (out / "seed3/grpo/policy/model.safetensors").stat().st_mtime_ns == before


def test_aggregate_over_seeds_reports_mean_std_and_paired_gaps(tmp_path):
    def scores(total: float, fallbacks: int = 0) -> dict[str, float]:
        return {"fulfilment": total / 2, "quality": 2.0, "preservation": 3.0, "total": total, "judged": 10,
                "fallbacks": fallbacks}  # fmt: skip

    per_seed = {
        0: {"original": scores(8.0), "chain": scores(6.0, 2), "chain-rl": scores(9.0)},
        1: {"original": scores(8.2), "chain": scores(6.4, 3), "chain-rl": scores(9.4)},
        2: {"original": scores(8.4), "chain": scores(6.2, 4), "chain-rl": scores(9.8)},
    }
    metrics = [{"step": k, "reward_mean": k / 10} for k in range(1, 11)]  # sampled 0.3 -> 0.8 (first/last 5)
    metrics[4] |= {"eval/reward": 0.25, "eval/subject": 0.1}
    metrics[9] |= {"eval/reward": 0.5, "eval/subject": 0.2}
    training = {s: summary.training_summary(metrics) for s in per_seed}
    text = summary.write_results(tmp_path, per_seed, training)
    assert "| Original | 8.20 ± 0.20 | 4.10 ± 0.10 | 2.00 ± 0.00 | 3.00 ± 0.00 | 0.0 ± 0.0 | 8.00, 8.20, 8.40 |" in text
    assert "| chain w/o RL | 6.20 ± 0.20 |" in text and "| 3.0 ± 1.0 | 6.00, 6.40, 6.20 |" in text
    assert "| chain with RL | 9.40 ± 0.40 |" in text
    assert "| chain w/o RL | 3.20 ± 0.35 | +3.00, +3.00, +3.60 | 0.40 | 0.20 | yes |" in text
    assert "| Original | 1.20 ± 0.20 | +1.00, +1.20, +1.40 | 0.40 | 0.20 | yes |" in text
    assert "| 0 | 0.300 | 0.800 | 0.250 (step 5) -> 0.500 (step 10) | 0.100 -> 0.200 |" in text
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 9 and {r["seed"] for r in rows} == {"0", "1", "2"}
    per_seed[2]["chain-rl"] = scores(8.2)  # RL's totals 9.0, 9.4, 8.2 (std 0.61); mean gap over Original 0.67
    text = summary.write_results(tmp_path, per_seed, training)
    assert "| Original | 0.67 ± 0.76 | +1.00, +1.20, -0.20 | 0.61 | 0.20 | yes |" in text
    per_seed[1]["chain-rl"] = scores(8.4)  # totals 9.0, 8.4, 8.2: the gap 0.33 is inside the RL row's std 0.42
    text = summary.write_results(tmp_path, per_seed, training)
    assert "| Original | 0.33 ± 0.61 | +1.00, +0.20, -0.20 | 0.42 | 0.20 | no |" in text


def test_thinker_section_pairs_rows_by_seed_and_counts_turns(tmp_path):
    def scores(total: float, turns: float | None = None, later: int = 0) -> dict[str, float]:
        out = {"fulfilment": 2.0, "quality": 2.0, "preservation": 3.0, "total": total, "judged": 10, "fallbacks": 0}
        return out | ({"turns": turns, "later_best": later} if turns is not None else {})

    per_seed = {
        s: {"original": scores(8.0), "chain": scores(6.0), "chain-rl": scores(7.0 + s / 10),
            "chain-rl+think": scores(7.5 + s / 5, 2.0 + s, s), "chain-rl+think/untrained": scores(6.0, 3.0, 5),
            "think": scores(8.1, 1.5), "think/untrained": scores(7.9, 2.5)}
        for s in (0, 1)
    }  # fmt: skip
    metrics = [{"step": k, "reward_mean": 0.1, "gain_mean": -0.2 + k / 100} for k in range(1, 11)]
    metrics[9] |= {"eval/reward": 0.5, "eval/gain": -0.05}
    training = {s: summary.training_summary(metrics) | {"thinker": summary.thinker_summary(metrics)} for s in per_seed}
    text = summary.write_results(tmp_path, per_seed, training)
    assert "## EditThinker" in text
    # chain-rl+think totals 7.5, 7.7 against chain-rl's 7.0, 7.1: gaps +0.5, +0.6
    assert (
        "| chain with RL + think, trained thinker minus chain with RL (no thinking) | 0.55 ± 0.07 | +0.50, +0.60 |"
        in text
    )
    assert (
        "| chain with RL + think, trained thinker | 7.60 ± 0.14 | 2.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 | 2.50 ± 0.71 | 0.5 ± 0.7 | 7.50, 7.70 |"
        in text
    )
    assert (
        "| Original (no thinking) | 8.00 ± 0.00 | 2.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 | – | – | 8.00, 8.00 |"
        in text
    )
    assert "| 0 | 0.100 -> 0.100 | -0.170 -> -0.120 | -0.050 (step 10) -> -0.050 (step 10) |" in text


def test_base_agent_is_the_shipped_base_with_its_prompts_or_the_warm_up_with_none(tmp_path):
    base, prompts = demo.base_agent(demo.Args(), tmp_path)
    assert base == REPO / "miniature/base_model" and prompts == ["--prompts", str(base / "prompts.json")]
    assert (
        demo.use_base(demo.Args())["weights_sha256"]
        == json.loads((base / "manifest.json").read_text())["weights_sha256"]
    )
    assert demo.base_agent(demo.Args(base="none"), tmp_path) == (tmp_path / "warm", [])
    assert demo.thinker_start(demo.Args(), tmp_path) == (base, prompts)  # the thinker starts from the base too
    assert demo.thinker_start(demo.Args(base="none"), tmp_path) == (tmp_path / "tiny", [])
    with pytest.raises(SystemExit, match="model.safetensors not found"):
        demo.use_base(demo.Args(base=str(tmp_path)))


def test_lanes_run_side_by_side_and_a_failure_stops_the_other_lanes(tmp_path):
    args = demo.Args(jobs=2)
    marker = tmp_path / "started"
    sleeper = ["-c", f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"]

    def long_lane() -> str:
        demo.run_script(args, sleeper, tmp_path / "long.log")
        return "long"

    def failing_lane() -> str:
        while not marker.exists():  # fail only once the other lane's script is running
            time.sleep(0.05)
        demo.run_script(args, ["-c", "raise SystemExit(3)"], tmp_path / "fail.log")
        return "never"

    assert demo.run_lanes(args, [lambda: "a", lambda: "b"]) == ["a", "b"]  # results in lane order
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="failed with exit code 3; its output is in .*fail.log"):
        demo.run_lanes(args, [long_lane, failing_lane])
    assert time.perf_counter() - start < 30  # the 60-s script of the other lane was stopped, not waited for
    assert not demo._LIVE

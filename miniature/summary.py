"""The demo's summary of its runs: the reward curves (the paper's Figure 3) and results.md/.csv (Table 1 over seeds).

`miniature.demo` runs the stages and calls these on their outputs: `read_metrics` on train.py's metrics.jsonl,
`plot_rewards` for the figure, `read_scores` on evaluate.py's subscores.csv and edits*.jsonl, the two summaries of
what GRPO did, and `write_results` for the tables gathered over seeds (mean ± sample std, paired gaps by seed).
Pure functions of files and dicts: no model, no script run here.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

BENCHMARK_LABEL = "shapes"  # evaluate.py's column label for the test scenes
JUDGE_LABEL = "shapes"  # and for the programmatic judge
# The rows of the miniature Table 1 (evaluate.py method ids) and how results.md names them.
TABLE1_ROWS = {"original": "Original", "chain": "chain w/o RL", "chain-rl": "chain with RL"}
ABLATION_ROWS = {
    "chain": "chain w/o RL, single-turn",
    "chain/multi": "chain w/o RL, multi-turn",
    "chain-rl": "chain with RL, single-turn",
    "chain-rl/multi": "chain with RL, multi-turn",
}
CRITERIA = ("fulfilment", "quality", "preservation", "total")
REWARD_COMPONENTS = ("reward", "format", "action", "subject", "goal")  # train.py's metrics: <name>_mean, eval/<name>
THINKER_COMPONENTS = ("reward", "format", "score", "gain")  # the thinker's (thinker.ThinkerTask)
# The thinker rows: evaluate.py method ids (with /untrained: the warm-up-only thinker) and how results.md names them.
THINK_ROWS = {
    "chain-rl": "chain with RL (no thinking)",
    "chain-rl+think": "chain with RL + think, trained thinker",
    "chain-rl+think/untrained": "chain with RL + think, warm-up-only thinker",
    "original": "Original (no thinking)",
    "think": "think on the raw request, trained thinker",
    "think/untrained": "think on the raw request, warm-up-only thinker",
}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): GRPO's per-step reward is noisy."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def plot_rewards(metrics: list[dict], png: Path, title: str, components: tuple[str, ...] = REWARD_COMPONENTS) -> None:
    """Each reward component's batch mean per GRPO step (faint: raw, solid: smoothed) and the held-out greedy reward
    at each evaluation (markers), like the paper's Figure 3."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write a file
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    window = max(1, len(steps) // 10)
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, colour in zip(components, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red")):
        values = [m[f"{name}_mean"] for m in metrics]
        ax_train.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
        ax_train.plot(steps, moving_average(values, window), color=colour, linewidth=2, label=name)
        evals = [(m["step"], m[f"eval/{name}"]) for m in metrics if f"eval/{name}" in m]
        if evals:
            ax_eval.plot(*zip(*evals), color=colour, marker="o", linewidth=2, label=name)
    ax_train.set(title=f"sampled rollouts (moving mean over {window} steps)", xlabel="GRPO step", ylabel="reward (0-1)")
    ax_eval.set(title="held-out scenes, greedy", xlabel="GRPO step")
    ax_train.set_ylim(min(0.0, *(m[f"{c}_mean"] for m in metrics for c in components)) - 0.02, 1.02)
    fig.legend(*ax_train.get_legend_handles_labels(), loc="lower center", ncol=len(components))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # leave the bottom strip to the shared legend
    fig.savefig(png, dpi=100)
    plt.close(fig)


def read_scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    """method id -> {fulfilment, quality, preservation, total, judged, fallbacks}: the scores from evaluate.py's
    subscores.csv, and from edits.jsonl the number of test scenes where the chain fell back to editing the raw
    request (its decomposition or plan did not parse), which is what "Original" does on every scene. Think rows also
    get {turns: mean edits per scene, later_best: scenes whose kept edit is not turn 1}."""
    rows = {}
    with (eval_dir / "subscores.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            if row["benchmark"] != BENCHMARK_LABEL or row["judge"] != JUDGE_LABEL:
                continue
            scores = {name: float(row[f"{name} ({hi})"]) for name, hi in zip(CRITERIA, ("0-4", "0-3", "0-3", "0-10"))}
            rows[row["method"]] = {**scores, "judged": int(row["judged"]), "fallbacks": 0}
    think: dict[str, tuple[int, int, int]] = {}  # method -> (scenes, edits, scenes that kept a later turn)
    for path in sorted(eval_dir.glob("edits*.jsonl")):
        for line in path.read_text().splitlines():
            edit = json.loads(line)
            method, chain = edit["method"], edit["chain"] or {}
            if method not in rows:
                continue
            if chain.get("fallback"):
                rows[method]["fallbacks"] += 1
            if "turns" in chain and "best_turn" in chain:  # a think row: thinker.ThinkResult.summary()
                n, edits, later = think.get(method, (0, 0, 0))
                think[method] = (n + 1, edits + len(chain["turns"]), later + int((chain["best_turn"] or 1) > 1))
    for method, (n, edits, later) in think.items():
        rows[method] |= {"turns": edits / n, "later_best": later}
    return rows


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n-1); the std is None for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(mean: float, std: float | None, digits: int = 2) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def training_summary(metrics: list[dict]) -> dict[str, float]:
    """What GRPO did: the sampled reward over the first and last 5 steps; the held-out greedy reward and subject F1
    at the first and last evaluation (train.py evaluates every --eval-every steps, not before step 1)."""
    rewards = [m["reward_mean"] for m in metrics]
    evals = [m for m in metrics if "eval/reward" in m] or [{}]
    return {
        "reward_first5": sum(rewards[:5]) / len(rewards[:5]),
        "reward_last5": sum(rewards[-5:]) / len(rewards[-5:]),
        "eval_step_first": evals[0].get("step", math.nan),
        "eval_reward_first": evals[0].get("eval/reward", math.nan),
        "eval_subject_first": evals[0].get("eval/subject", math.nan),
        "eval_step_last": evals[-1].get("step", math.nan),
        "eval_reward_last": evals[-1].get("eval/reward", math.nan),
        "eval_subject_last": evals[-1].get("eval/subject", math.nan),
    }


def thinker_summary(metrics: list[dict]) -> dict[str, float]:
    """The thinker's GRPO: sampled reward and judged gain over the first and last 5 steps, held-out greedy gain."""
    first, last = metrics[:5], metrics[-5:]
    evals = [m for m in metrics if "eval/gain" in m] or [{}]
    return {
        "reward_first5": sum(m["reward_mean"] for m in first) / len(first),
        "reward_last5": sum(m["reward_mean"] for m in last) / len(last),
        "gain_first5": sum(m["gain_mean"] for m in first) / len(first),
        "gain_last5": sum(m["gain_mean"] for m in last) / len(last),
        "eval_gain_first": evals[0].get("eval/gain", math.nan),
        "eval_gain_last": evals[-1].get("eval/gain", math.nan),
        "eval_step_first": evals[0].get("step", math.nan),
        "eval_step_last": evals[-1].get("step", math.nan),
    }


TABLE_HEADER = [
    "| method | total (0-10) | fulfilment (0-4) | quality (0-3) | preservation (0-3) | raw-request fallbacks | per seed |",
    "|---|---|---|---|---|---|---|",
]


def results_markdown(per_seed: dict[int, dict[str, dict[str, float]]], training: dict[int, dict]) -> str:
    """results.md: Table 1 in miniature, the turns ablation, the paired gaps and the GRPO summary over seeds."""
    seeds = sorted(per_seed)
    spread = "mean ± sample standard deviation over seeds (n-1)" if len(seeds) > 1 else "one seed, so no spread"
    n_test = per_seed[seeds[0]]["original"]["judged"]

    def row(method: str, label: str) -> str:
        cells = [fmt(*mean_std([per_seed[s][method][c] for s in seeds])) for c in CRITERIA]
        cells.append(fmt(*mean_std([per_seed[s][method]["fallbacks"] for s in seeds]), digits=1))
        per = ", ".join(f"{per_seed[s][method]['total']:.2f}" for s in seeds)
        return f"| {label} | {cells[3]} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[4]} | {per} |"

    lines = [
        f"# ImageEdit-R1 in miniature: seed(s) {', '.join(map(str, seeds))}",
        "",
        f"{n_test} held-out shapes scenes per seed, procedural editor, programmatic judge (0-10); cells: {spread}.",
        "'raw-request fallbacks': test scenes where the chain's decomposition or plan did not parse, so the chain",
        "edited the raw request once, as Original does.",
        "",
        "## Table 1 (single-turn)",
        "",
        *TABLE_HEADER,
        *(row(m, label) for m, label in TABLE1_ROWS.items()),
        "",
        "## Single- vs multi-turn (paper §4.2)",
        "",
        *TABLE_HEADER,
        *(row(m, label) for m, label in ABLATION_ROWS.items() if all(m in per_seed[s] for s in seeds)),
        "",
        "## Does RL help? Chain with RL minus each baseline, paired by seed",
        "",
        "'beyond spread': the mean gap is larger than the seed-to-seed std of both rows it compares.",
        "",
        "| baseline | gap (mean ± std) | per seed | std of chain with RL | std of baseline | beyond spread |",
        "|---|---|---|---|---|---|",
    ]
    for base in ("chain", "original"):
        gaps = [per_seed[s]["chain-rl"]["total"] - per_seed[s][base]["total"] for s in seeds]
        _, rl_std = mean_std([per_seed[s]["chain-rl"]["total"] for s in seeds])
        _, base_std = mean_std([per_seed[s][base]["total"] for s in seeds])
        mean_gap, gap_std = mean_std(gaps)
        if rl_std is None:
            verdict, stds = "n/a (one seed)", ["–", "–"]
        else:
            verdict, stds = ("yes" if mean_gap > max(rl_std, base_std) else "no"), [f"{rl_std:.2f}", f"{base_std:.2f}"]
        per = ", ".join(f"{g:+.2f}" for g in gaps)
        lines.append(f"| {TABLE1_ROWS[base]} | {fmt(mean_gap, gap_std)} | {per} | {stds[0]} | {stds[1]} | {verdict} |")
    lines += [
        "",
        "## GRPO (train.py's metrics): the decomposition reward (0-1), sampled and on held-out scenes (greedy)",
        "",
        "| seed | sampled, first 5 steps | sampled, last 5 steps | held-out reward | held-out subject F1 |",
        "|---|---|---|---|---|",
    ]
    for s in seeds:
        t = training[s]
        lines.append(
            f"| {s} | {t['reward_first5']:.3f} | {t['reward_last5']:.3f} "
            f"| {t['eval_reward_first']:.3f} (step {t['eval_step_first']}) -> {t['eval_reward_last']:.3f} "
            f"(step {t['eval_step_last']}) | {t['eval_subject_first']:.3f} -> {t['eval_subject_last']:.3f} |"
        )
    if all("thinker" in training[s] for s in seeds):
        lines += thinker_markdown(per_seed, training, seeds)
    return "\n".join(lines) + "\n"


def thinker_markdown(per_seed: dict, training: dict, seeds: list[int]) -> list[str]:
    """The EditThinker section: the think rows next to what they start from, the paired gaps, the thinker's GRPO."""

    def row(method: str, label: str) -> str:
        cells = [fmt(*mean_std([per_seed[s][method][c] for s in seeds])) for c in CRITERIA]
        turns = [per_seed[s][method].get("turns") for s in seeds]
        later = [per_seed[s][method].get("later_best") for s in seeds]
        extra = ["–", "–"]
        if None not in turns:
            extra = [fmt(*mean_std(turns)), fmt(*mean_std(later), digits=1)]
        per = ", ".join(f"{per_seed[s][method]['total']:.2f}" for s in seeds)
        return f"| {label} | {cells[3]} | {cells[0]} | {cells[1]} | {cells[2]} | {extra[0]} | {extra[1]} | {per} |"

    def gap(a: str, b: str) -> str:
        gaps = [per_seed[s][a]["total"] - per_seed[s][b]["total"] for s in seeds]
        return (
            f"| {THINK_ROWS[a]} minus {THINK_ROWS[b]} | {fmt(*mean_std(gaps))} | "
            + ", ".join(f"{g:+.2f}" for g in gaps)
            + " |"
        )

    lines = [
        "",
        "## EditThinker: Think-while-Edit, with the thinker trained by the same GRPO",
        "",
        "Turn 1 of `chain-rl+think` is the chain-with-RL edit and turn 1 of `think` is the Original edit; later turns",
        "re-edit the source with the thinker's refined instruction, and the loop keeps the turn the thinker scored",
        "best. 'edits': mean editor calls per scene; 'kept a later turn': scenes whose result is not turn 1.",
        "",
        "| method | total (0-10) | fulfilment (0-4) | quality (0-3) | preservation (0-3) | edits | kept a later turn "
        "| per seed |",
        "|---|---|---|---|---|---|---|---|",
        *(row(m, label) for m, label in THINK_ROWS.items()),
        "",
        "| paired by seed | gap (mean ± std) | per seed |",
        "|---|---|---|",
        gap("chain-rl+think", "chain-rl"),
        gap("chain-rl+think", "chain-rl+think/untrained"),
        gap("think", "original"),
        gap("think", "think/untrained"),
        "",
        "Thinker GRPO (train.py --agent think): reward (format + score accuracy + 2 x gain) / 4 and the judged gain",
        "(s1 - s0) / 10 of re-editing the source with the refined instruction.",
        "",
        "| seed | sampled reward, first 5 -> last 5 steps | sampled gain, first 5 -> last 5 | held-out greedy gain |",
        "|---|---|---|---|",
    ]
    for s in seeds:
        t = training[s]["thinker"]
        lines.append(
            f"| {s} | {t['reward_first5']:.3f} -> {t['reward_last5']:.3f} | {t['gain_first5']:+.3f} -> "
            f"{t['gain_last5']:+.3f} | {t['eval_gain_first']:+.3f} (step {t['eval_step_first']}) -> "
            f"{t['eval_gain_last']:+.3f} (step {t['eval_step_last']}) |"
        )
    return lines


def write_results(out: Path, per_seed: dict[int, dict[str, dict[str, float]]], training: dict[int, dict]) -> str:
    """results.md (the tables) and results.csv (one row per seed and method, full precision)."""
    text = results_markdown(per_seed, training)
    (out / "results.md").write_text(text)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "method", "judged", "fallbacks", *CRITERIA])
        for s in sorted(per_seed):
            for method, scores in per_seed[s].items():
                writer.writerow(
                    [s, method, scores["judged"], scores["fallbacks"], *(repr(scores[c]) for c in CRITERIA)]
                )
    return text

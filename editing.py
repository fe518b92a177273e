"""Stage 1 of an evaluation: every row's edit of every example, one crash-safe record each, in one or N processes.

evaluate.py decides what is left to do (`pending_edits`) and hands this stage one picklable record of everything it
needs (`EditSettings`). `run_edits` then takes the examples a batch at a time: each source image is saved once, each
row runs on the batch (`RowRunner`: the editor alone, the chain, or the Think-while-Edit loop), and every (example,
row) edit is saved as a PNG and appended to the record log the moment it exists. With `gpus` > 1 the examples are
dealt round-robin to worker processes (`run_edits_in_workers`), each with its own editor and agents on one GPU, each
appending to its own `edits.rank{r}.jsonl`.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

import agents
import benchmarks
import critics
import editors
import policy
import records
import results
import specs
import thinker

POLL_SECONDS = 0.5  # how often the main process counts the workers' records for the progress bar


@dataclass(frozen=True)
class EditSettings:
    """What the edit stage needs, as one picklable record (evaluate.edit_settings builds it from the command line)."""

    out: Path
    seed: int  # the draw's seed; each example's editor seed is example_seed(seed, example id)
    batch_size: int  # examples per batch (and per agent generate call)
    gpus: int  # worker processes; 1 = this process
    editor: str  # an editor spec (specs.make_editor)
    editor_options: editors.EditorOptions
    agent_model: str  # the base VLM: the "chain" decomposer and every chain's sequencer
    decomposer: str | None  # the trained decomposer of "chain-rl"
    sequencer: str | None  # a different sequencing agent for both chains
    chain: agents.ChainSettings  # decoding and step cap; `turns` is set per row
    critic: str | None  # a critic spec (specs.make_critic) for the think rows
    max_turns: int
    think_threshold: float
    critic_concurrency: int  # API critic requests in flight


def example_seed(seed: int, example_id: str) -> int:
    """Each example's editor seed: independent across examples, the same for every method (paired comparisons)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{example_id}".encode()).digest()[:4], "little")


def make_editor(settings: EditSettings) -> editors.Editor:
    """The editing agent; nothing is loaded until its first edit."""
    return specs.make_editor(settings.editor, settings.editor_options)


def make_critic(settings: EditSettings, load_agent: Callable[[str], agents.Agent]) -> critics.Critic:
    """The think rows' critic (specs.make_critic). load_agent loads (or reuses) a local checkpoint."""
    return specs.make_critic(settings.critic, load_agent, max_new_tokens=settings.chain.max_new_tokens,
                             batch_size=settings.chain.batch_size, concurrency=settings.critic_concurrency,
                             prompt=critics.CriticPrompt.from_prompts(settings.chain.prompts))  # fmt: skip


@dataclass
class EditJob:
    """The edits one example still needs (method ids in row order)."""

    benchmark: str
    example: benchmarks.EditExample
    methods: list[str]


def pending_edits(
    samples: dict[str, list[benchmarks.EditExample]], methods: Sequence[results.Method], done: set[results.EditKey]
) -> list[EditJob]:
    jobs = []
    for label, examples in samples.items():
        for example in examples:
            todo = [m.id for m in methods if (label, example.id, m.id) not in done]
            if todo:
                jobs.append(EditJob(label, example, todo))
    return jobs


def agent_placement() -> dict:
    """Agents in bf16 on the GPU when there is one, else as stored, on the CPU."""
    return {"device": "cuda", "dtype": torch.bfloat16} if torch.cuda.is_available() else {}


class RowRunner:
    """Runs one row on a batch of examples with one editor; each agent checkpoint (a local critic's too) is loaded
    once, on first use, and the critic is built on first use."""

    def __init__(self, settings: EditSettings, editor: editors.Editor) -> None:
        self.settings, self.editor = settings, editor
        self._agents: dict[str, agents.Agent] = {}
        self._critic: critics.Critic | None = None

    def agent(self, path: str) -> agents.Agent:
        if path not in self._agents:
            self._agents[path] = agents.Agent(*policy.load_policy(path, **agent_placement()))
        return self._agents[path]

    def critic(self) -> critics.Critic:
        if self._critic is None:
            self._critic = make_critic(self.settings, self.agent)
        return self._critic

    def run(
        self, method: results.Method, images: list[Image.Image], requests: list[str], seeds: list[int]
    ) -> list[agents.ChainResult | thinker.ThinkResult]:
        s = self.settings
        if method.spec.decomposer == "none" and not method.spec.think:
            return [agents.edit_original(i, r, self.editor, seed=seed) for i, r, seed in zip(images, requests, seeds)]
        if method.spec.decomposer == "none":  # the Think-while-Edit loop from the raw request
            return thinker.run_think_batch(images, requests, self.editor, self.critic(), seed=seeds,
                                           max_turns=s.max_turns, threshold=s.think_threshold)  # fmt: skip
        decomposer = self.agent(s.decomposer if method.spec.decomposer == "trained" else s.agent_model)
        sequencer = self.agent(s.sequencer or s.agent_model)
        chain = replace(s.chain, turns=method.turns)
        if method.spec.think:  # the loop from the chain's single-turn plan
            return thinker.run_chain_think_batch(images, requests, self.editor, self.critic(), decomposer, sequencer,
                                                 chain, seeds, s.max_turns, s.think_threshold)  # fmt: skip
        return agents.run_chain_batch(images, requests, self.editor, decomposer, sequencer, chain, seeds)


def run_edits(
    jobs: Sequence[EditJob],
    settings: EditSettings,
    methods: Sequence[results.Method],
    editor: editors.Editor,
    log_path: Path,
    bar=None,
) -> None:
    """Edit every job, a batch of examples at a time, appending one EditRecord per (example, method)."""
    out = settings.out
    runner = RowRunner(settings, editor)
    with records.RecordLog(log_path) as log:
        for rows in agents.batches(len(jobs), max(1, settings.batch_size)):
            batch = [jobs[i] for i in rows]
            ready = []  # (job, image, source image path)
            for job in batch:
                image = job.example.load_image()  # None with example.error set: a corrupt image, a missing field
                if image is None:
                    for method_id in job.methods:
                        log.append(bad_example_record(job, method_id))
                        if bar is not None:
                            bar.update(1)
                    continue
                source = results.image_path(job.benchmark, "source", job.example.id)
                if not (out / source).is_file():
                    records.save_png(image, out / source)
                ready.append((job, image, source))
            for method in methods:
                rows = [row for row in ready if method.id in row[0].methods]
                if not rows:
                    continue
                outcomes = runner.run(
                    method,
                    [image for _, image, _ in rows],
                    [job.example.request for job, _, _ in rows],
                    [example_seed(settings.seed, job.example.id) for job, _, _ in rows],
                )
                for (job, _, source), result in zip(rows, outcomes):
                    log.append(edit_record(out, job, method, source, result))
                    if bar is not None:
                        bar.update(1)


def bad_example_record(job: EditJob, method_id: str) -> results.EditRecord:
    """An example that cannot be edited at all: its reason is the one benchmarks.py gives (file, row, field)."""
    example = job.example
    return results.EditRecord(
        benchmark=job.benchmark,
        example_id=example.id,
        method=method_id,
        status=results.BAD_EXAMPLE,
        reason=example.error,
        request=example.request,
        source_image=None,
        image=None,
        chain=None,
        seconds=0.0,
    )


def turn_image_path(benchmark: str, method_id: str, example_id: str, turn: int) -> str:
    """Where a think row's turn image lives, relative to --out: images/<benchmark>/<method>/turns/<stem>.turn<k>.png."""
    return f"images/{records.safe_name(benchmark)}/{records.safe_name(method_id)}/turns/{records.file_stem(example_id)}.turn{turn}.png"


def edit_record(
    out: Path, job: EditJob, method: results.Method, source: str, result: agents.ChainResult | thinker.ThinkResult
) -> results.EditRecord:
    """Save the edited image (when there is one) and, for a think row, every turn's image; describe the edit."""
    edited = None
    if result.final_image is not None:
        edited = results.image_path(job.benchmark, method.id, job.example.id)
        records.save_png(result.final_image, out / edited)
    summary = result.summary()
    if isinstance(result, thinker.ThinkResult):
        for turn, turn_summary in zip(result.turns, summary["turns"]):
            turn_summary["image"] = None
            if turn.image is not None:
                turn_summary["image"] = turn_image_path(job.benchmark, method.id, job.example.id, turn.number)
                records.save_png(turn.image, out / turn_summary["image"])
    status = results.OK if result.edit_error is None else results.EDIT_ERROR
    return results.EditRecord(
        benchmark=job.benchmark,
        example_id=job.example.id,
        method=method.id,
        status=status,
        reason=result.edit_error,
        request=job.example.request,
        source_image=source,
        image=edited,
        chain=summary,
        seconds=result.seconds.total,
    )


def shard_path(out: Path, rank: int) -> Path:
    return out / f"edits.rank{rank}.jsonl"


def edit_worker(
    settings: EditSettings, methods: list[results.Method], jobs: list[EditJob], rank: int, device: str
) -> None:
    """One --gpus worker: its own editor and agents on one GPU, appending to its own shard file."""
    # Set before this process's first CUDA call (torch reads it then): this worker sees one GPU, as cuda:0.
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.gpus))  # share the cores, do not oversubscribe
    run_edits(jobs, settings, methods, make_editor(settings), shard_path(settings.out, rank))


def run_edits_in_workers(
    jobs: Sequence[EditJob], settings: EditSettings, methods: Sequence[results.Method], bar
) -> None:
    """Deal the examples round-robin to `gpus` worker processes, count their records for the bar, join them."""
    out = settings.out
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible or [str(rank) for rank in range(settings.gpus)]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state inherited from this one
    workers, offsets = [], {}
    for rank in range(settings.gpus):
        share = list(jobs[rank :: settings.gpus])
        if not share:
            continue
        path = shard_path(out, rank)
        offsets[path] = path.stat().st_size if path.exists() else 0
        worker = context.Process(
            target=edit_worker,
            args=(settings, list(methods), share, rank, devices[rank % len(devices)]),
            name=f"edit-worker-{rank}",
        )
        worker.start()
        workers.append(worker)
    while any(worker.is_alive() for worker in workers):
        time.sleep(POLL_SECONDS)
        for path, offset in offsets.items():  # one record = one line: count the new newlines
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    new = f.read()
                offsets[path] = offset + len(new)
                bar.update(new.count(b"\n"))
    failed = [f"{w.name} (exit code {w.exitcode})" for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"edit workers failed: {', '.join(failed)}; their records are kept, re-run to resume")

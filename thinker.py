"""EditThinker's Think-while-Edit loop (the second paper): critique the edit, refine the instruction, re-edit.

`run_think_batch` runs the loop from any first instruction (the raw request: row "think"); `run_chain_think_batch`
starts it from ImageEdit-R1's single-turn plan (row "chain-rl+think"). Every turn is kept in a `ThinkTurn`, the whole
loop in a `ThinkResult`, which offers what evaluate.py reads from an agents.ChainResult (`final_image`, `edit_error`,
`seconds`, `summary()`). The critics are in critics.py; the loop's exact rules are in the section comment below.
`ThinkerTask` is the critic-refiner's RL task for train.py (`--agent think`): its prompts and its reward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

import agents
import critics
import data
import editors
import rewards
from critics import Critic, CriticFailure, CritiqueSample
from editors import EditError, Editor

# ----------------------------------------------------------------------------------------------------------------------
# EditThinker's Think-while-Edit loop (../shared/papers/003: critique the edit, refine the instruction, re-edit).
#
# The critic-refiner agent sees the SOURCE image, the current EDIT, the user's REQUEST and the INSTRUCTION that made
# the edit, and answers in the format `rewards.parse_critique` reads and `rewards.critique_format_reward` checks:
#     <think>...</think><score>0-10, the judge's scale</score><instruction>the refined instruction</instruction>
# The loop (`run_think_batch`), for each example:
#     turn 1: edit the source with the first instruction (the raw request, or the chain's joined sub-requests);
#     every turn t: the critic critiques edit t, which gives edit t its score and proposes instruction t+1; then
#         stop "satisfied"           if score_t >= threshold,
#         stop "instruction unchanged" if instruction t+1 equals (after `rewards.normalise_item`) the instruction of
#                                    this turn or of an earlier one: re-editing the source with an instruction already
#                                    tried, at the same seed, would only repeat an edit we have,
#         stop "max turns"           if t == max_turns,
#         else turn t+1 edits the SOURCE image (never edit t: each turn is a fresh attempt, so damage does not pile
#         up, as in EditThinker) with instruction t+1, at the example's seed (turns differ only by instruction).
# So EVERY edit is critiqued exactly once, the last one included: max_turns edits cost max_turns critic calls, and
# the critique of the last edit is what lets it compete (its proposed instruction goes unused). The loop returns the
# edit with the highest critic score (the earliest on a tie), not merely the last; if no critique parsed, turn 1.
# It also stops, keeping what it has, when a critique does not parse, the critic fails (an API error after its
# retries) or the editor refuses a later turn (EditError). If turn 1 is refused there is no edit at all: like the
# chain, `edit_error` holds the message and `final_image` is None.

DEFAULT_MAX_TURNS = 3  # ours (the paper's summary gives no number): at most 3 edits and 3 critiques per example
DEFAULT_THINK_THRESHOLD = 9.0  # ours: a perfect shapes edit scores ~9.7 (one call's artefacts); 9 = "satisfied"

# EditThinker as released (appletea233/EditThinker), where its code differs from our reading of its paper: the RL
# reward is 0.5 x format + 0.5 x the judged gain (a score-accuracy term is computed there but not used), the loop
# stops after at most 5 turns or when the critic's scores reach 8, and Qwen3-VL-8B trains with the KL disabled.
# Its critic gives two scores (semantic, quality) and stops when both reach 8; ours gives one, the judge's 0-10
# rubric total, so the preset stops at 8 on that one. Both presets judge a re-edit against the user's original
# request, never against the refined instruction. `train.py --thinker-preset released` and `evaluate.py
# --think-preset released` apply these over the flags' values; "ours" (the default) leaves the flags as given.
RELEASED_TRAINING = {"w_format": 1.0, "w_score": 0.0, "w_gain": 1.0, "beta": 0.0}  # (f + g) / 2, no KL
RELEASED_MODEL = "Qwen/Qwen3-VL-8B-Instruct"  # trained when --model is left at train.py's default
RELEASED_LOOP = {"max_turns": 5, "think_threshold": 8.0}

# Why the loop stopped (ThinkResult.stop_reason).
STOP_SATISFIED = "critic satisfied"
STOP_UNCHANGED = "instruction unchanged"
STOP_MAX_TURNS = "max turns"
STOP_UNPARSED = "critique did not parse"
STOP_CRITIC_FAILED = "critic failed"
STOP_EDIT_ERROR = "editor refused"


@dataclass
class ThinkTurn:
    """One turn of the loop: the instruction, the edit of the SOURCE it gave, and the critique of that edit.

    image None: the editor refused (edit_error says why) and nothing was critiqued. critique_text None with an image:
    the critic failed (critic_error). critique None with a text: the text did not parse (rewards.parse_critique).
    Seconds: the edit's wall clock, and this turn's share of its batched critic call.
    """

    number: int  # 1-based
    instruction: str
    image: Image.Image | None = None
    edit_error: str | None = None
    critique_text: str | None = None
    critique: rewards.Critique | None = None
    critic_error: str | None = None
    edit_seconds: float = 0.0
    critique_seconds: float = 0.0

    @property
    def score(self) -> float | None:
        return None if self.critique is None else self.critique.score

    def summary(self) -> dict:
        return {
            "turn": self.number,
            "instruction": self.instruction,
            "edit_error": self.edit_error,
            "critique_text": self.critique_text,
            "critic_error": self.critic_error,
            "score": self.score,
            "refined_instruction": None if self.critique is None else self.critique.instruction,
            "seconds": {"edit": self.edit_seconds, "critique": self.critique_seconds},
        }


@dataclass
class ThinkResult:
    """Everything the Think-while-Edit loop did on one example. The returned edit is `final_image`, the best turn's.

    plan          the chain that wrote the first instruction ("chain-rl+think"), not edited; None for the raw request.
    turns         every turn, in order (see ThinkTurn).
    best_turn     the number of the turn whose edit is returned: highest critic score, earliest on a tie, turn 1 when
                  no critique parsed; None when turn 1 was refused (then `edit_error` is its message).
    stop_reason   one of the STOP_* strings.
    """

    request: str
    seed: int
    first_instruction: str
    max_turns: int
    threshold: float
    plan: agents.ChainResult | None = None
    turns: list[ThinkTurn] = field(default_factory=list)
    best_turn: int | None = None
    stop_reason: str | None = None
    method: str = "think"

    @property
    def final_image(self) -> Image.Image | None:
        return None if self.best_turn is None else self.turns[self.best_turn - 1].image

    @property
    def edit_error(self) -> str | None:
        return self.turns[0].edit_error if self.turns and self.final_image is None else None

    @property
    def instructions(self) -> list[str]:
        return [turn.instruction for turn in self.turns]

    @property
    def seconds(self) -> agents.StageSeconds:
        plan = self.plan.seconds if self.plan is not None else agents.StageSeconds()
        return agents.StageSeconds(
            decompose=plan.decompose,
            sequence=plan.sequence,
            edit=sum(turn.edit_seconds for turn in self.turns),
            critique=sum(turn.critique_seconds for turn in self.turns),
        )

    def summary(self) -> dict:
        """The JSON-serialisable part (no images), for logs and result files."""
        seconds = self.seconds
        return {
            "request": self.request,
            "method": self.method,
            "seed": self.seed,
            "plan": None if self.plan is None else self.plan.summary(),
            "first_instruction": self.first_instruction,
            "max_turns": self.max_turns,
            "threshold": self.threshold,
            "turns": [turn.summary() for turn in self.turns],
            "best_turn": self.best_turn,
            "stop_reason": self.stop_reason,
            "instructions": self.instructions,
            "edit_error": self.edit_error,
            "seconds": {
                "decompose": seconds.decompose,
                "sequence": seconds.sequence,
                "edit": seconds.edit,
                "critique": seconds.critique,
                "total": seconds.total,
            },
        }


def _edit_turn(source: Image.Image, instruction: str, editor: Editor, seed: int, number: int) -> ThinkTurn:
    """Edit the SOURCE image with `instruction`; an EditError becomes the turn's edit_error."""
    turn = ThinkTurn(number=number, instruction=instruction)
    start = time.perf_counter()
    try:
        turn.image = editor.edit(source, instruction, seed=seed)
    except EditError as err:
        turn.edit_error = f"{type(err).__name__} on turn {number} ({instruction!r}): {err}"
    turn.edit_seconds = time.perf_counter() - start
    return turn


def _next_instruction(result: ThinkResult, turn: ThinkTurn, answer: str | CriticFailure) -> str | None:
    """Record the critique of the newest turn; return the next turn's instruction, or None after setting stop_reason."""
    if isinstance(answer, CriticFailure):
        turn.critic_error = answer.reason
        result.stop_reason = STOP_CRITIC_FAILED
        return None
    turn.critique_text, turn.critique = answer, rewards.parse_critique(answer)
    tried = {rewards.normalise_item(t.instruction) for t in result.turns}
    if turn.critique is None:
        result.stop_reason = STOP_UNPARSED
    elif turn.critique.score >= result.threshold:
        result.stop_reason = STOP_SATISFIED
    elif rewards.normalise_item(turn.critique.instruction) in tried:
        result.stop_reason = STOP_UNCHANGED
    elif len(result.turns) >= result.max_turns:
        result.stop_reason = STOP_MAX_TURNS
    else:
        return turn.critique.instruction
    return None


def _best_turn(turns: Sequence[ThinkTurn]) -> int | None:
    """The number of the highest-scored turn (earliest on a tie); turn 1 if none is scored; None if turn 1 failed."""
    scored = [turn for turn in turns if turn.image is not None and turn.score is not None]
    if scored:
        return max(scored, key=lambda turn: (turn.score, -turn.number)).number
    return 1 if turns and turns[0].image is not None else None


def run_think_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    critic: Critic,
    *,
    first_instructions: Sequence[str] | None = None,
    plans: Sequence[agents.ChainResult] | None = None,
    seed: int | Sequence[int] = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> list[ThinkResult]:
    """The Think-while-Edit loop on many examples, in lock step (see the section comment above).

    Each round edits every example still going, then critiques all their new edits in ONE `critic.critique_many`
    call (a local critic batches its generate calls), so a 7B critic runs max_turns large batches, not one call per
    edit. first_instructions: turn 1's instruction per example (default: the raw request). plans: the chains that
    wrote them, kept for the report. seed: one editor seed for all examples or one each; every turn of an example
    uses its seed, so turn 1 of "think" is the very edit "original" makes.
    """
    n = len(images)
    first = list(requests) if first_instructions is None else list(first_instructions)
    if not len(requests) == len(first) == n or (plans is not None and len(plans) != n):
        raise ValueError(
            f"run_think_batch: {n} images, {len(requests)} requests, {len(first)} first instructions"
            + ("" if plans is None else f", {len(plans)} plans")
        )
    if max_turns < 1:
        raise ValueError(f"run_think_batch: max_turns must be >= 1, got {max_turns}")
    seeds = agents.editor_seeds(seed, n, "run_think_batch")
    results = [
        ThinkResult(request, s, instruction, max_turns, threshold, plan=None if plans is None else plans[i])
        for i, (request, s, instruction) in enumerate(zip(requests, seeds, first))
    ]
    pending = dict(enumerate(first))  # example -> the instruction of its next turn
    while pending:
        for i, instruction in pending.items():  # always the SOURCE image, never the previous turn's edit
            results[i].turns.append(_edit_turn(images[i], instruction, editor, seeds[i], len(results[i].turns) + 1))
        edited = [i for i in pending if results[i].turns[-1].image is not None]
        for i in pending:
            if results[i].turns[-1].image is None:
                results[i].stop_reason = STOP_EDIT_ERROR
        samples = [CritiqueSample(images[i], results[i].turns[-1].image, requests[i], pending[i]) for i in edited]
        start = time.perf_counter()
        answers = critic.critique_many(samples) if samples else []
        if len(answers) != len(samples):
            raise ValueError(f"critic {critic.name!r} gave {len(answers)} answers for {len(samples)} samples")
        share = (time.perf_counter() - start) / max(1, len(samples))
        pending = {}
        for i, answer in zip(edited, answers):
            turn = results[i].turns[-1]
            turn.critique_seconds = share
            instruction = _next_instruction(results[i], turn, answer)
            if instruction is not None:
                pending[i] = instruction
    for result in results:
        result.best_turn = _best_turn(result.turns)
    return results


def run_think(
    image: Image.Image,
    request: str,
    editor: Editor,
    critic: Critic,
    *,
    first_instruction: str | None = None,
    seed: int = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> ThinkResult:
    """The Think-while-Edit loop on one example; first_instruction None starts from the raw request."""
    return run_think_batch(
        [image],
        [request],
        editor,
        critic,
        first_instructions=None if first_instruction is None else [first_instruction],
        seed=seed,
        max_turns=max_turns,
        threshold=threshold,
    )[0]


def run_chain_think_batch(
    images: Sequence[Image.Image],
    requests: Sequence[str],
    editor: Editor,
    critic: Critic,
    decomposer: agents.Agent,
    sequencer: agents.Agent | None = None,
    settings: agents.ChainSettings = agents.DEFAULT_CHAIN,
    seed: int | Sequence[int] = 0,
    max_turns: int = DEFAULT_MAX_TURNS,
    threshold: float = DEFAULT_THINK_THRESHOLD,
) -> list[ThinkResult]:
    """ImageEdit-R1's plan as the loop's first instruction ("chain-rl+think"): decompose and sequence, join the
    sub-requests for single-turn (or the raw request when the chain fell back), then think while editing. Turn 1 is
    therefore the very edit the single-turn chain makes; the critic sees the user's raw request. `settings.turns` must
    be "single": the loop edits with one instruction per turn."""
    if settings.turns != "single":
        raise ValueError(
            f"run_chain_think_batch: the loop starts from a single-turn plan, got turns={settings.turns!r}"
        )
    planned = agents.decompose_and_sequence(images, requests, decomposer, sequencer, settings, seed)
    results = run_think_batch(
        images,
        requests,
        editor,
        critic,
        first_instructions=[instructions[0] for _, instructions in planned],
        plans=[plan for plan, _ in planned],
        seed=seed,
        max_turns=max_turns,
        threshold=threshold,
    )
    for result in results:
        result.method = "chain+think"
    return results


# ---------------------------------------------------------------------------------------------------------------------
# EditThinker's RL task: the critic-refiner's reward (train.py --agent think)


@dataclass
class FirstTurn:
    """Turn 1 of the Think-while-Edit loop for one example: the editor's output for the raw request, and its score."""

    edited: Image.Image
    score: float  # the judge's rubric total, 0-10


@dataclass
class ThinkerTask:
    """EditThinker's reward for one critique of turn 1 (the source edited with the raw request):

        s0 = J(x, E(x, request))                        the judged score of turn 1 (cached per example)
        s1 = J(x, E(x, refined))                        the SOURCE x re-edited with the critique's instruction
        r  = (w_f R_format + w_s (1 - |score - s0| / 10) + w_g (s1 - s0) / 10) / (w_f + w_s + w_g)

    R_format is rewards.critique_format_reward (strict). A critique that does not parse (rewards.parse_critique) gets
    0 for score accuracy and 0 gain: the loop would stop there and keep turn 1, so nothing was gained. The gain is in
    [-1, 1]; a critique that repeats the request gets exactly 0 from a deterministic editor. The weights are ours: the
    EditThinker summary names the parts of its reward, not their weights.

    `editor` has `edit(image, instruction, seed)` (editors.py, miniature.procedural.ProceduralEditor); `judge` has
    `judge_many([(source, edited, request), ...])` (judge.py's judges, miniature.procedural.ShapesJudge). Within one call of
    `rewards` identical (example, instruction) pairs are edited and judged once, and all new edits are judged in one
    `judge_many` call (API judges run it concurrently).
    """

    editor: editors.Editor
    judge: object
    w_format: float = 1.0
    w_score: float = 1.0
    w_gain: float = 2.0
    satisfied_at: float = DEFAULT_THINK_THRESHOLD  # warm-up targets: repeat the instruction at this score
    seed: int = 0  # the editor's seed for every edit (a fixed seed: the gain measures the instruction, not the noise)
    prompt: critics.CriticPrompt = critics.PAPER_CRITIC  # the critic's prompt (train.py / warmup.py --prompts)
    _first: dict[str, FirstTurn] = field(default_factory=dict, repr=False)

    name = "think"
    components = ("format", "score", "gain")

    @property
    def system(self) -> str | None:
        return self.prompt.system

    def first_turns(self, examples: Sequence[data.RLExample]) -> list[FirstTurn]:
        """Turn 1 of each example, computed on first use and kept (an example's turn 1 never changes)."""
        new = list({e.id: e for e in examples if e.id not in self._first}.values())
        if new:
            sources = [e.load_image() for e in new]
            edited = [self.editor.edit(x, e.request, seed=self.seed) for x, e in zip(sources, new)]
            verdicts = self.judge.judge_many([(x, y, e.request) for x, y, e in zip(sources, edited, new)])
            for e, y, v in zip(new, edited, verdicts):
                self._first[e.id] = FirstTurn(y, v.total)
        return [self._first[e.id] for e in examples]

    def prompts(self, examples):
        images, texts = [], []
        for e, first in zip(examples, self.first_turns(examples)):
            sample = critics.CritiqueSample(e.load_image(), first.edited, e.request, e.request)
            image, text = critics.critic_input(sample, self.prompt)
            images.append(image)
            texts.append(text)
        return images, texts

    def rewards(self, examples, texts):
        firsts = self.first_turns(examples)
        critiques = [rewards.parse_critique(t) for t in texts]
        # one edit per distinct (example, refined instruction): G samples of a group often agree
        wanted = {(e.id, c.instruction): e for e, c in zip(examples, critiques) if c is not None}
        keys = list(wanted)
        sources = {e.id: e.load_image() for e in wanted.values()}
        edited = [self.editor.edit(sources[i], instruction, seed=self.seed) for i, instruction in keys]
        verdicts = self.judge.judge_many(
            [(sources[i], y, wanted[(i, ins)].request) for (i, ins), y in zip(keys, edited)]
        )
        s1 = {key: v.total for key, v in zip(keys, verdicts)}
        total_w = self.w_format + self.w_score + self.w_gain
        out = []
        for e, text, c, first in zip(examples, texts, critiques, firsts, strict=True):
            fmt = rewards.critique_format_reward(text)
            score = 0.0 if c is None else 1.0 - abs(c.score - first.score) / 10.0
            gain = 0.0 if c is None else (s1[(e.id, c.instruction)] - first.score) / 10.0
            total = (self.w_format * fmt + self.w_score * score + self.w_gain * gain) / total_w
            out.append({"reward": total, "format": fmt, "score": score, "gain": gain})
        return out

    def warmup_target(self, example: data.RLExample, subrequests: Sequence[str]) -> tuple[Image.Image, str, str]:
        """(image, user text, target critique) for a supervised warm-up (warmup.py), following critics.CRITIC_FORMAT:
        the judged score of turn 1 (rounded), then, when turn 1 already satisfies (score >= satisfied_at), the current
        instruction repeated; otherwise the gold sub-requests joined as one instruction. The think says which."""
        (image,), (text,) = self.prompts([example])
        first = self._first[example.id]  # computed by prompts()
        if first.score >= self.satisfied_at:
            think, instruction = "The edit is right.", example.request
        else:
            n = len(subrequests)
            think = f"The request asks for {n} change{'s' if n != 1 else ''}."
            instruction = agents.join_single_turn(subrequests)
        return image, text, rewards.render_critique(think, round(first.score), instruction)

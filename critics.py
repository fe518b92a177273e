"""EditThinker's critic-refiner agent: its prompt, its input, and the critics that answer it (local, judge, API).

The critic sees the SOURCE image, the current EDIT, the user's REQUEST and the INSTRUCTION that made the edit, and
answers in the format `rewards.parse_critique` reads and `rewards.critique_format_reward` checks:
    <think>...</think><score>0-10, the judge's scale</score><instruction>the refined instruction</instruction>
A critic is anything with `name` and `critique_many(samples) -> [text | CriticFailure]` (`Critic`):

    LocalCritic   a Qwen-VL policy in this process (the base model or a trained thinker), shown source and edit side by
                  side in ONE image (`side_by_side`), so a model trained on one image per prompt can read both
    JudgeCritic   a judge's rubric total as the score, a refiner's (or a fixed rule's) instruction
    OpenAICritic  a chat model behind an OpenAI-compatible API (GPT-4o, Gemini, vLLM), shown the two images

The loop that calls a critic, and EditThinker's RL task, are in thinker.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

import agents
import judge
import policy
import rewards

SIDE_BY_SIDE_GAP = 28  # px between the two images of a local critic's input: one merged Qwen-VL token (2x2 of 14 px)
SIDE_BY_SIDE_GAP_RGB = (128, 128, 128)

CRITIC_SYSTEM = (
    "You are the critic of an image-editing system. You compare an edited image with the original, judge how well "
    "the edit carried out the user's request, and rewrite the editor's instruction so that the next edit does better."
)

CRITIC_FORMAT = """\
Score the edit from 0 to 10, the sum of three parts:
- request fulfilment, 0-4: did the edit make every change the user asked for (4: all of them, 0: none);
- image quality, 0-3: is the edited image clean and natural (3: no artefacts at all);
- preservation, 0-3: is everything the request does not mention left as it was (3: nothing else changed).
Then write a better instruction for the image editor. The editor will edit the ORIGINAL image again, from scratch, \
so the instruction must ask for the whole change. Editors follow short, explicit instructions: name each object by \
what it looks like, write one short imperative clause per change and separate the clauses with "; ". If the edit \
is already right, repeat the current instruction.
First reason briefly inside <think></think>, then write the score inside <score></score> and the instruction inside \
<instruction></instruction>:
<think>...</think><score>...</score><instruction>...</instruction>
Example: <think>The coat is scarlet, but the hair kept its colour.</think><score>6</score>\
<instruction>Recolor the coat to scarlet; recolor the hair to copper red</instruction>"""

_LAYOUT_TWO_IMAGES = "The first image is the ORIGINAL image; the second is the EDITED image."
_LAYOUT_SIDE_BY_SIDE = (
    "The image shows the ORIGINAL image on the left and the EDITED image on the right, separated by a gray bar."
)


def _paper_template(layout: str) -> str:
    return f"{layout}\nThe user's request: {{request}}\nThe instruction the editor was given: {{instruction}}\n\n{CRITIC_FORMAT}"


@dataclass(frozen=True)
class CriticPrompt:
    """A local critic's prompt: its system turn (None: no system turn) and its user-text template, which fills
    {request} and {instruction}. The paper-style prompt (`PAPER_CRITIC`) is the default; a small model trained on a
    short template of its own takes that one from its prompts file (`from_prompts`)."""

    system: str | None
    template: str

    def text(self, request: str, instruction: str) -> str:
        return agents.fill_template(self.template, request=request.strip(), instruction=instruction.strip())

    @classmethod
    def from_prompts(cls, prompts: agents.Prompts) -> CriticPrompt:
        """The critic prompt of an agents.Prompts (`--prompts PATH`): its critic fields, or PAPER_CRITIC without."""
        return PAPER_CRITIC if prompts.critic is None else cls(prompts.critic_system, prompts.critic)


PAPER_CRITIC = CriticPrompt(CRITIC_SYSTEM, _paper_template(_LAYOUT_SIDE_BY_SIDE))


def critic_prompt(request: str, instruction: str, *, side_by_side: bool) -> str:
    """The paper-style critic's user text: how the images are laid out, the request, the instruction that was edited,
    the format.

    side_by_side=True describes the one composed image of `side_by_side` (local critics: PAPER_CRITIC's text); False,
    two images in the order ORIGINAL, EDITED (API critics, like judge.py's rubric messages).
    """
    layout = _LAYOUT_SIDE_BY_SIDE if side_by_side else _LAYOUT_TWO_IMAGES
    return CriticPrompt(CRITIC_SYSTEM, _paper_template(layout)).text(request, instruction)


def side_by_side(source: Image.Image, edited: Image.Image) -> Image.Image:
    """One RGB image for a one-image-per-prompt VLM: the source on the left, a SIDE_BY_SIDE_GAP-px gray bar, the
    edit on the right (resized to the source's size if it differs). Size: (2 w + gap, h) of the source.

    policy.encode_prompts takes one image per prompt, and so does grpo.py's batch layout; composing keeps a local
    critic (and a thinker trained on these inputs) on that one-image path. With 28-px-aligned sources (the shapes
    world) every cell of both images stays one merged visual token.
    """
    source = source.convert("RGB")
    edited = edited.convert("RGB")
    if edited.size != source.size:
        edited = edited.resize(source.size, Image.Resampling.BICUBIC)
    width, height = source.size
    canvas = Image.new("RGB", (2 * width + SIDE_BY_SIDE_GAP, height), SIDE_BY_SIDE_GAP_RGB)
    canvas.paste(source, (0, 0))
    canvas.paste(edited, (width + SIDE_BY_SIDE_GAP, 0))
    return canvas


@dataclass(frozen=True)
class CritiqueSample:
    """What a critic looks at: the source image, the current edit, the user's request, the instruction edited."""

    source: Image.Image
    edited: Image.Image
    request: str
    instruction: str


@dataclass(frozen=True)
class CriticFailure:
    """A critique that could not be obtained (an API error after retries); `reason` says why, keys redacted."""

    reason: str


class Critic(Protocol):
    """Anything that critiques a batch of edits: one answer text (or CriticFailure) per sample, in order.

    Implementations: `LocalCritic` (a transformers VLM, e.g. a trained thinker), `JudgeCritic` (a judge's rubric
    score plus a refiner), and evaluate.py's OpenAI-compatible critic; tests hand in scripted fakes.
    """

    name: str

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]: ...


def critic_input(sample: CritiqueSample, prompt: CriticPrompt = PAPER_CRITIC) -> tuple[Image.Image, str]:
    """The local critic's (image, user text) for one sample: the one prompt builder a thinker's trainer shares."""
    return side_by_side(sample.source, sample.edited), prompt.text(sample.request, sample.instruction)


class LocalCritic:
    """A Qwen-VL policy (policy.load_policy: the base model or a trained thinker) as the critic, in this process.

    Each sample becomes one prompt with ONE image, `side_by_side(source, edited)`, and `prompt`'s text under its
    system turn (PAPER_CRITIC: `critic_prompt(..., side_by_side=True)` under CRITIC_SYSTEM); `batch_size` samples share
    one `generate_texts` call. greedy=True for evaluation; greedy=False samples at `temperature` (a trainer's rollouts).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        name: str = "local",
        max_new_tokens: int = agents.DEFAULT_MAX_NEW_TOKENS,
        batch_size: int = agents.DEFAULT_BATCH_SIZE,
        greedy: bool = True,
        temperature: float = 1.0,
        prompt: CriticPrompt = PAPER_CRITIC,
    ) -> None:
        self.model, self.processor, self.name, self.prompt = model, processor, name, prompt
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.greedy, self.temperature = greedy, temperature

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]:
        texts: list[str | CriticFailure] = []
        for rows in agents.batches(len(samples), self.batch_size):
            inputs = [critic_input(samples[i], self.prompt) for i in rows]
            texts += policy.generate_texts(
                self.model,
                self.processor,
                [image for image, _ in inputs],
                [prompt for _, prompt in inputs],
                self.prompt.system,
                max_new_tokens=self.max_new_tokens,
                greedy=self.greedy,
                temperature=self.temperature,
            )
        return texts


_CLAUSE_SPLIT_RE = re.compile(r"[;\n]+|[.!?]+(?:\s+|$)")  # ";", newlines, a sentence end (not the "." in "1.5")


def restate_instruction(instruction: str) -> str:
    """JudgeCritic's refinement rule when it has no refiner model: the SAME words, one clause per sentence, line or
    ";"-part, list numbering dropped, JOINER-joined ("Remove the cat. Then add a dog." -> "Remove the cat; Then add
    a dog"). It reads nothing but the instruction, so it cannot use a hidden answer: it only gives the editor a
    cleaner form of what it was already asked, and returns a fixed point on its own output."""
    clauses = [agents.clean_step(clause) for clause in _CLAUSE_SPLIT_RE.split(instruction)]
    clauses = [clause for clause in clauses if agents.is_usable_step(clause)]
    return agents.join_single_turn(clauses) if clauses else instruction.strip()


class JudgeCritic:
    """A critic whose SCORE is a judge's rubric total and whose INSTRUCTION comes from a refiner.

    judge: anything with `judge(original, edited, request)` returning a judge.Verdict-like record (`fulfilment`,
    `quality`, `preservation`, `total`), e.g. miniature.procedural.ShapesJudge: like a VLM critic it sees only the two images and
    the request. refiner: another Critic whose <instruction> is used and whose score is ignored (a local thinker);
    None uses `restate_instruction`, a rule that cannot know the answer. When the refiner's answer does not parse (or
    it fails), the current instruction is kept, so the loop stops with "instruction unchanged" and the turn keeps its
    score. The <think> block is the rubric's sub-scores (plus the refiner's reasoning), never the judge's free-text
    reason: the shapes judge names the missed edits there, which would leak the hidden answer into the critique.

    Caveat for reading results: when the same judge also scores the evaluation, choosing the best turn by its score
    selects with the evaluator's own eyes (best of k draws), a gain that is not evidence that refinement works.
    """

    def __init__(self, judge, refiner: Critic | None = None, name: str | None = None) -> None:
        self.judge, self.refiner = judge, refiner
        refined_by = "restate-rule" if refiner is None else refiner.name
        self.name = name or f"{getattr(judge, 'name', type(judge).__name__)}+{refined_by}"

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]:
        verdicts = [self.judge.judge(s.source, s.edited, s.request) for s in samples]
        refined = self._refine(samples)
        texts: list[str | CriticFailure] = []
        for verdict, (instruction, note) in zip(verdicts, refined):
            think = (
                f"Rubric: fulfilment {verdict.fulfilment:.1f}/4, quality {verdict.quality:.1f}/3, "
                f"preservation {verdict.preservation:.1f}/3. {note}"
            )
            texts.append(rewards.render_critique(think, verdict.total, instruction))
        return texts

    def _refine(self, samples: Sequence[CritiqueSample]) -> list[tuple[str, str]]:
        """(next instruction, a note for the reasoning) per sample."""
        if self.refiner is None:
            return [(restate_instruction(s.instruction), "Instruction restated by rule.") for s in samples]
        out = []
        for sample, answer in zip(samples, self.refiner.critique_many(samples)):
            parsed = None if isinstance(answer, CriticFailure) else rewards.parse_critique(answer)
            if parsed is None:
                why = answer.reason if isinstance(answer, CriticFailure) else "its answer did not parse"
                out.append((sample.instruction, f"Refiner {self.refiner.name}: {why}; instruction kept."))
            else:
                out.append((parsed.instruction, f"Refiner {self.refiner.name}: {parsed.think}"))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# A critic behind an API. It is a judge.ChatEndpoint, so it keeps the judges' conventions (key from the environment
# variable the spec names, the openai client's retries, redacted errors) and sends PNG data URLs like them.


def critic_messages(sample: CritiqueSample) -> list[dict]:
    """System turn, then one user turn: the critic prompt, the ORIGINAL image, the EDITED image (judge.py's order)."""
    content = [
        {"type": "text", "text": critic_prompt(sample.request, sample.instruction, side_by_side=False)},
        {"type": "image_url", "image_url": {"url": judge.png_data_url(sample.source)}},
        {"type": "image_url", "image_url": {"url": judge.png_data_url(sample.edited)}},
    ]
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": content}]


class OpenAICritic(judge.ChatEndpoint):
    """The critic-refiner behind an OpenAI-compatible chat API (GPT-4o, Gemini, a vLLM server): a ChatEndpoint.

    The reply is free text in the critique format (CRITIC_FORMAT; no JSON schema, the tags are the format), and
    is returned as it is: one that does not parse ends that example's loop, counted as "critique did not parse". An
    API failure after the client's retries becomes an CriticFailure with a redacted reason. At most
    `max_concurrency` requests are in flight. endpoint: ChatEndpoint's keyword arguments (base_url, api_key_env,
    default_key, timeout, max_retries, temperature).
    """

    def __init__(self, model: str, *, max_concurrency: int = 8, **endpoint: Any) -> None:
        super().__init__(model, role="critic", **endpoint)
        self.max_concurrency = max(1, max_concurrency)

    def critique_many(self, samples: Sequence[CritiqueSample]) -> list[str | CriticFailure]:
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="critic") as pool:
            return list(pool.map(self._critique, samples))

    def _critique(self, sample: CritiqueSample) -> str | CriticFailure:
        try:
            return self.complete(critic_messages(sample)).text  # the text and the errors are already redacted
        except judge.ChatError as err:  # an API failure after the client's retries
            return CriticFailure(str(err))
        except judge.ReplyError as err:  # a 200 reply with no usable text: an HTML page, a refusal, no text
            return CriticFailure(f"{self.name}: {err}")

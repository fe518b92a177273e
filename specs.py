"""Short specs on the command line ("flux", "gpt-4o", "local:PATH", "shapes") turned into editors, judges and critics.

The one place where the miniature's "shapes" spec is resolved: its procedural editor and programmatic judge are
imported here, lazily, when that spec is asked for, so the system's modules never import the miniature and
`import train` / `import evaluate` load none of it. Every other spec goes to the module that owns it, in one step:

    editor  "shapes" | an editors.py name ("flux", "qwen", "nano-banana", "gpt-image", "fake")
    judge   "shapes" (or "shapes-judge") | a judge.py spec ("gpt-4o", "gemini-2.5-flash", "openai:MODEL@URL",
            "local:PATH")
    critic  "shapes" (the shapes rubric's score, a rule's instruction) | "shapes+local:PATH" (that score, a local
            model's instruction) | "local:PATH" | an API spec as for judges
Entry scripts (train.py, evaluate.py, miniature/warmup.py) call these; tests may too.
"""

from __future__ import annotations

from collections.abc import Callable

import editors

SHAPES = "shapes"
SHAPES_JUDGE_SPECS = (SHAPES, "shapes-judge")  # the miniature's programmatic judge, by spec or by its name
SHAPES_REFINED_PREFIX = "shapes+"  # "shapes+local:PATH": the shapes rubric's score, a local model's instruction


def make_editor(spec: str, options: editors.EditorOptions | None = None) -> editors.Editor:
    """The editor a spec names: the miniature's procedural editor for "shapes", else editors.make_editor."""
    if spec == SHAPES:
        from miniature.procedural import ProceduralEditor

        return ProceduralEditor()
    return editors.make_editor(spec, options)


def make_judge(spec: str, concurrency: int | None = None):
    """The judge a spec names: the miniature's programmatic judge for "shapes", else judge.make_judge (API judges
    get at most `concurrency` requests in flight; None keeps judge.py's default)."""
    if spec in SHAPES_JUDGE_SPECS:
        from miniature.procedural import ShapesJudge

        return ShapesJudge()
    import judge  # imported here: it loads the openai client, which `import train` must not

    if spec.startswith("local:") or concurrency is None:
        return judge.make_judge(spec)
    return judge.make_judge(spec, max_concurrency=concurrency)


def make_critic(
    spec: str, load_agent: Callable[[str], tuple], *, max_new_tokens: int, batch_size: int, concurrency: int,
    prompt=None,
):  # fmt: skip
    """The critic of the think rows (module docstring). load_agent(path) loads (or reuses) a local checkpoint;
    `prompt` (a critics.CriticPrompt; None: critics.PAPER_CRITIC) is a local critic's prompt."""
    import critics  # imported here: critics.py and judge.py load the openai client, which `import train` must not
    import judge

    if spec in SHAPES_JUDGE_SPECS:
        return critics.JudgeCritic(make_judge(SHAPES), name=SHAPES)
    if spec.startswith(SHAPES_REFINED_PREFIX + "local:"):
        refiner = make_critic(spec.removeprefix(SHAPES_REFINED_PREFIX), load_agent, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, concurrency=concurrency, prompt=prompt)  # fmt: skip
        return critics.JudgeCritic(make_judge(SHAPES), refiner=refiner, name=spec)
    if spec.startswith("local:"):
        path = spec.removeprefix("local:")
        if not path:
            raise ValueError(f"critic spec {spec!r} should look like 'local:PATH'")
        model, processor = load_agent(path)
        return critics.LocalCritic(model, processor, name=spec, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   prompt=prompt or critics.PAPER_CRITIC)  # fmt: skip
    endpoint = judge.parse_api_spec(spec, "critic", judge.LOCAL_SERVER_KEY_ENV)
    if endpoint is not None:
        return critics.OpenAICritic(**endpoint, max_concurrency=concurrency)
    choices = ", ".join(
        [*judge.PRESETS, "openai:MODEL@URL", "local:PATH", SHAPES, SHAPES_REFINED_PREFIX + "local:PATH"]
    )
    raise ValueError(f"unknown critic spec {spec!r}; expected one of: {choices}")

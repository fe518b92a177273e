"""The miniature: ImageEdit-R1's whole method on a CPU, in a synthetic shapes world (`python -m miniature.demo`).

The real system needs a 7B VLM, a diffusion editor and a GPT-4o judge. The miniature replaces the last two (and the
data) with small, exact stand-ins so that the SAME train.py, agents and evaluate.py reproduce the paper's comparisons
on a laptop. The system's modules never import this package; the entry scripts resolve the spec "shapes" through
specs.py, and the tests use it directly. One job per module:

    world.py           the world: vocabulary, scenes, edits, render and read back the pixels
    language.py        the one parser of requests (clauses, references, goals) and the oracle `interpret`
    dataset.py         request generation with gold decompositions, and the JSONL files that hold them
    procedural.py      the procedural editor and the programmatic judge (the stand-ins for FLUX and GPT-4o)
    tiny.py            the tiny Qwen2.5-VL / Qwen3-VL policies of the real architectures, built offline
    tiny_pipelines.py  tiny FLUX.1-Kontext and Qwen-Image-Edit pipelines of the real classes (editor tests)
    skills.py          the generic skills of a base model (perception, copying, the format, sequencing): items, tests
    base.py            builds the shipped base model (base_model/: weights, prompts.json, manifest.json) from them
    warmup.py          the short supervised warm-up of a random tiny policy (today's demo, and the thinker's SFT)
    demo.py            the whole pipeline per seed (`make demo`)
Run its scripts from the repository root as modules: `python -m miniature.demo`, `python -m miniature.warmup ...`.
"""

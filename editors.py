"""The editing agents: four image editors behind one interface, `edit(image, instruction, seed) -> image`.

ImageEdit-R1 (§2, Table 1) plugs different off-the-shelf editors under the same decomposition agent. This module
wraps the four the paper uses; each is a small class with a `name` and an `edit` method, so agents, the judge loop
and tests can hand in any of them (or a fake):

    name          class               backend                                   official settings we default to
    "flux"        FluxKontextEditor   diffusers FluxKontextPipeline (local)      FLUX.1-Kontext-dev, 28 steps, guidance 2.5
    "qwen"        QwenImageEditor     diffusers QwenImageEditPipeline (local)    Qwen-Image-Edit, 50 steps, true CFG 4.0, neg " "
    "nano-banana" NanoBananaEditor    Google's `google-genai` SDK (API)          gemini-2.5-flash-image
    "gpt-image"   GPTImageEditor      `openai` images.edit (API)                 gpt-image-1, input_fidelity "high"

Every editor returns an RGB image at the SOURCE size, so a judge compares like with like. Three rules hold for all:

1. Lazy: constructing an editor loads nothing. The pipeline or API client is created on the first `edit`, so that
   `import editors` is cheap and a missing model, SDK or key is reported only for the editor actually used.
2. Two kinds of failure. `EditorSetupError` (missing weights, SDK or API key) means the editor cannot run at all: it
   is raised with a message that says how to fix it, and callers should let it crash. `EditError` means this one
   edit produced no image (a safety block, a refusal): callers record it as a failed example and go on.
3. Seeds: the diffusion editors are deterministic given `seed` (a CPU `torch.Generator`, so the initial noise is the
   same on every device). The APIs take no seed; `seed` is accepted for the interface and ignored.

Working resolution of the diffusion editors (both pipelines need sides that are multiples of the VAE's downsampling
factor times the 2x2 latent packing, `vae_scale_factor * 2` = 16 for the real models): the source is scaled down
only if its area exceeds `max_area` (default 1024*1024, the pipelines' own default area), rounded to the nearest
valid size, edited, and resized back to the source size. This departs from the stock pipelines in one way: they
also *upscale* small inputs to ~1 MP; we edit at the source resolution (4x cheaper for the benchmarks' 512x512
images). Two pipeline internals had to be reached for this (see the classes): Kontext needs `max_area=w*h` and
`_auto_resize=False`, and Qwen-Image-Edit hard-codes a 1024*1024 area for its condition image.

This module imports only third-party packages (PIL at import; torch, diffusers, transformers, openai and google-genai
inside functions) and none of the project's modules.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

DEFAULT_AREA = 1024 * 1024  # both pipelines' default working area in pixels (FluxKontext's max_area, Qwen's target)
RESAMPLE = Image.Resampling.LANCZOS  # for every resize to and from the working size


class EditError(RuntimeError):
    """An edit that produced no image (an API refusal, a safety block): recorded by callers, not a crash."""


class EditorSetupError(RuntimeError):
    """The editor cannot run at all (missing weights, SDK or API key); the message says how to fix it."""


class Editor(Protocol):
    """Anything with `edit(image, instruction, seed) -> image` is an editor."""

    name: str

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image: ...


@dataclass
class EditorOptions:
    """How to build and run an editor. `None` means the editor's official default (listed in the module docstring)."""

    model: str | None = None  # hub id or local folder (diffusion), or API model name; None = the official model
    dtype: str = "bfloat16"  # "bfloat16" | "float16" | "float32": weights and activations of the diffusion editors
    device: str | None = None  # "cuda" | "cpu" | None = cuda when available, else cpu
    cpu_offload: bool = False  # diffusers' enable_model_cpu_offload: one component on the GPU at a time (less memory)
    max_area: int | None = None  # pixel cap of the working resolution; None = DEFAULT_AREA (1 MP)
    steps: int | None = None  # denoising steps; None = 28 (FLUX Kontext) / 50 (Qwen-Image-Edit)
    guidance: float | None = None  # FLUX: distilled guidance_scale (2.5); Qwen: true_cfg_scale (4.0)
    negative_prompt: str | None = None  # Qwen only; None = " " (CFG runs only when a negative prompt is given)
    api_key: str | None = None  # API editors; None = read OPENAI_API_KEY / GEMINI_API_KEY / GOOGLE_API_KEY
    base_url: str | None = None  # GPT-Image only: an OpenAI-compatible endpoint (tests point it at a local server)
    size: str | None = None  # GPT-Image only: "1024x1024" | "1536x1024" | "1024x1536" | "auto"; None = closest aspect
    input_fidelity: str | None = "high"  # GPT-Image only: how closely to preserve the input ("high" | "low")
    timeout_s: float = 300.0  # API editors: seconds to wait for one edit
    max_retries: int = 2  # GPT-Image only: the openai client's retries of 408, 409, 429, 5xx, timeouts, connections


# ------------------------------------------------------------------------------------------------- shared geometry


def working_size(width: int, height: int, multiple: int, max_area: int) -> tuple[int, int]:
    """The size a pipeline edits at: the source scaled down to fit `max_area` (aspect kept), each side rounded to the
    nearest multiple of `multiple` (and at least one multiple). Sources within the cap keep their size, up to rounding.
    """
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def _torch_dtype(name: str):
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"EditorOptions.dtype={name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


def _place(pipe, options: EditorOptions):
    """Move a loaded pipeline to its device (or let diffusers offload it component by component)."""
    import torch

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _looks_like_path(model: str) -> bool:
    """A hub id is "owner/name"; anything absolute, relative-dotted or deeper is meant as a local folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle checkpoints


def check_local_folder(model: str, how_to_get: str) -> None:
    """A local path that does not exist fails here with our message (diffusers would raise a bare ValueError), and so
    does a pipeline folder with a component whose weights are pickle files only: unpickling runs arbitrary code, so
    the editors load safetensors only (`use_safetensors=True`, as policy.py does), and diffusers' own refusal would
    only say that a .safetensors file is missing."""
    if _looks_like_path(model) and not Path(model).is_dir():
        raise EditorSetupError(f"model folder {model!r} does not exist. {how_to_get}")
    if not Path(model).is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) refuses a pickle-only repository
    pickled = []
    for component in sorted(p for p in Path(model).iterdir() if p.is_dir()):
        names = sorted(f.name for f in component.iterdir() if f.is_file())
        if not any(name.endswith(".safetensors") for name in names):
            pickled += [f"{component.name}/{name}" for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickled:
        raise EditorSetupError(
            f"weights {model!r}: {', '.join(pickled)} are pickle files, which can run code when loaded; the editors "
            f"load safetensors only. Get the model's safetensors release, or convert a copy you trust: load it once "
            f"with diffusers and save_pretrained() it (diffusers writes safetensors). {how_to_get}"
        )


def _weights_error(model: str, how_to_get: str, err: OSError) -> EditorSetupError:
    return EditorSetupError(
        f"cannot load weights {model!r}: neither a complete local pipeline folder nor in the Hugging Face cache, with "
        f"safetensors weights (this project never downloads at run time, HF_HUB_OFFLINE=1, and loads no pickle "
        f"weights). {how_to_get} Underlying error: {err}"
    )


def _seeded_generator(seed: int):
    import torch

    # A CPU generator makes the initial noise identical on every device; diffusers moves the noise where it is needed.
    return torch.Generator(device="cpu").manual_seed(seed)


# -------------------------------------------------------------------------------------- the diffusion editors' loading


class DiffusionEditor:
    """What the two diffusion editors share: the options, the model folder, and the pipeline loaded on first use.

    A subclass names its DEFAULT_MODEL, says how to get the weights (`how_to_get`) and builds its pipeline from
    `self.model` (`from_pretrained`); `load` checks a local folder first, turns a failed load (not cached offline,
    gated without a token, a folder that is not this pipeline) into an `EditorSetupError` that says how to get the
    weights, and places the pipeline on its device.
    """

    DEFAULT_MODEL: str

    def __init__(self, options: EditorOptions | None = None):
        self.options = options or EditorOptions()
        self.model = os.path.expanduser(self.options.model or self.DEFAULT_MODEL)  # diffusers does not expand "~"
        self._pipe = None

    def how_to_get(self) -> str:
        """How to get the weights: the end of every setup error."""
        raise NotImplementedError

    def from_pretrained(self):
        """The pipeline read from `self.model`, on the CPU (OSError when it cannot be read)."""
        raise NotImplementedError

    def load(self):
        """The pipeline, loaded on first use."""
        if self._pipe is None:
            check_local_folder(self.model, self.how_to_get())
            try:
                pipe = self.from_pretrained()
            except OSError as err:
                raise _weights_error(self.model, self.how_to_get(), err) from err
            self._pipe = _place(pipe, self.options)
        return self._pipe


# ------------------------------------------------------------------------------------------------ FLUX.1 Kontext


class FluxKontextEditor(DiffusionEditor):
    """FLUX.1-Kontext-dev (Black Forest Labs) through diffusers' `FluxKontextPipeline`.

    Kontext is guidance-distilled: `guidance_scale` is an input of the model, not classifier-free guidance, so each
    step is one transformer call. Two arguments keep it at our working size: `_auto_resize=False` (else the input is
    snapped to one of Kontext's ~1 MP training resolutions) and `max_area=w*h` (else the output size is rescaled to
    `max_area`, 1 MP by default, whatever `width`/`height` say).
    """

    name = "flux"
    DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
    DEFAULT_STEPS = 28
    DEFAULT_GUIDANCE = 2.5  # BFL's recommended value for Kontext (the pipeline's default is 3.5)

    def how_to_get(self) -> str:
        return (
            f"FLUX.1-Kontext-dev is a GATED model (non-commercial licence): accept the licence on "
            f"https://huggingface.co/{self.DEFAULT_MODEL}, run `hf auth login` and `hf download {self.DEFAULT_MODEL}` "
            f"on a machine with network access, or pass a local pipeline folder as the model option "
            f"(EditorOptions(model=...))."
        )

    def from_pretrained(self):
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline.from_pretrained(
            self.model, dtype=_torch_dtype(self.options.dtype), use_safetensors=True
        )

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        pipe = self.load()
        source = image.convert("RGB")
        max_area = self.options.max_area or DEFAULT_AREA
        width, height = working_size(*source.size, multiple=pipe.vae_scale_factor * 2, max_area=max_area)
        edited = pipe(
            image=source.resize((width, height), RESAMPLE),
            prompt=instruction,
            width=width,
            height=height,
            max_area=width * height,  # the pipeline rescales (width, height) to this area: make that a no-op
            _auto_resize=False,  # keep our size instead of snapping to Kontext's preferred ~1 MP resolutions
            num_inference_steps=self.options.steps or self.DEFAULT_STEPS,
            guidance_scale=self.options.guidance if self.options.guidance is not None else self.DEFAULT_GUIDANCE,
            generator=_seeded_generator(seed),
        ).images[0]
        return edited.resize(source.size, RESAMPLE) if edited.size != source.size else edited


# ----------------------------------------------------------------------------------------------- Qwen-Image-Edit


def _load_qwen_edit_processor(model: str):
    """Qwen-Image-Edit's `processor` component (a Qwen2VLProcessor), loaded without torchvision.

    transformers 5 refuses to build or load a Qwen-VL processor without a video processor, which needs torchvision,
    and there is no CPU torchvision. The pipeline only ever gives the processor text and images, so we load the stock
    class with the video processor left out. (policy.py uses the same trick; it is repeated here because editors.py
    imports none of the project's modules.)
    """
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return ImageOnlyQwen2VLProcessor.from_pretrained(model, subfolder="processor")


def call_with_condition_area(pipe, condition_area: int, **call_kwargs):
    """Run `QwenImageEditPipeline.__call__` with its condition-image area set to `condition_area` pixels.

    The stock `__call__` computes the size of the condition image (the one the VLM reads and the VAE encodes) as
    `calculate_dimensions(1024 * 1024, aspect)`, a hard-coded ~1 MP whatever the input size: 30 s and 1.7 GB per edit
    on a CPU even for a 64x64 image. That name is looked up in the pipeline module's globals at call time, so we run
    the very same code object with a copy of those globals in which `calculate_dimensions` uses our area. Nothing is
    patched: other pipelines and threads keep the stock behaviour.
    """
    import torch
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as upstream

    stock_call = type(pipe).__call__.__wrapped__  # the undecorated function inside @torch.no_grad()

    def calculate_dimensions(_stock_area: int, ratio: float):
        return upstream.calculate_dimensions(condition_area, ratio)  # same rounding (to 32 px), our area

    call = types.FunctionType(
        stock_call.__code__,
        {**stock_call.__globals__, "calculate_dimensions": calculate_dimensions},
        stock_call.__name__,
        stock_call.__defaults__,
        stock_call.__closure__,
    )
    call.__kwdefaults__ = stock_call.__kwdefaults__
    with torch.no_grad():
        return call(pipe, **call_kwargs)


class QwenImageEditor(DiffusionEditor):
    """Qwen-Image-Edit (Alibaba Qwen) through diffusers' `QwenImageEditPipeline`.

    Qwen-Image-Edit is not guidance-distilled: it uses true classifier-free guidance, which the pipeline runs only when
    a negative prompt is given, so we always pass one (" " by default, as in the model card). Each step is then two
    transformer calls, conditional and unconditional, mixed with `true_cfg_scale`. The instruction is read by a
    Qwen2.5-VL that also sees the condition image; its area is our working area (see `call_with_condition_area`).
    """

    name = "qwen"
    DEFAULT_MODEL = "Qwen/Qwen-Image-Edit"
    DEFAULT_STEPS = 50
    DEFAULT_TRUE_CFG = 4.0
    DEFAULT_NEGATIVE_PROMPT = " "  # the model card's value: a blank prompt, but non-empty so that CFG runs

    def how_to_get(self) -> str:
        return (
            f"Run `hf download {self.DEFAULT_MODEL}` on a machine with network access (about 58 GB in bf16), or pass "
            f"a local pipeline folder as the model option (EditorOptions(model=...))."
        )

    def from_pretrained(self):
        from diffusers import QwenImageEditPipeline

        processor = _load_qwen_edit_processor(self.model)
        return QwenImageEditPipeline.from_pretrained(
            self.model, processor=processor, dtype=_torch_dtype(self.options.dtype), use_safetensors=True
        )

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        pipe = self.load()
        source = image.convert("RGB")
        max_area = self.options.max_area or DEFAULT_AREA
        width, height = working_size(*source.size, multiple=pipe.vae_scale_factor * 2, max_area=max_area)
        negative = (
            self.options.negative_prompt if self.options.negative_prompt is not None else self.DEFAULT_NEGATIVE_PROMPT
        )
        edited = call_with_condition_area(
            pipe,
            width * height,
            image=source.resize((width, height), RESAMPLE),
            prompt=instruction,
            negative_prompt=negative,
            true_cfg_scale=self.options.guidance if self.options.guidance is not None else self.DEFAULT_TRUE_CFG,
            width=width,
            height=height,
            num_inference_steps=self.options.steps or self.DEFAULT_STEPS,
            generator=_seeded_generator(seed),
        ).images[0]
        return edited.resize(source.size, RESAMPLE) if edited.size != source.size else edited


# ------------------------------------------------------------------------------------- Nano Banana (Gemini image)


def _reason_name(value: Any) -> str | None:
    """An SDK enum (FinishReason.IMAGE_SAFETY) or a plain string, as a short name."""
    return None if value is None else getattr(value, "name", str(value))


def _decode_reply_image(data: bytes, editor: str) -> Image.Image:
    """An API's image bytes -> RGB image, decoded now; EditError when they are not an image Pillow can decode."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise EditError(f"{editor} returned image data that does not decode ({type(e).__name__})") from None


def image_from_gemini_response(response: Any) -> Image.Image:
    """The first image in a `generate_content` response, or EditError saying why there is none.

    Shape (google-genai): response.candidates[0].content.parts[i].inline_data.{mime_type, data: bytes}; a blocked
    prompt has no candidates and response.prompt_feedback.block_reason; a candidate without an image part has a
    finish_reason (IMAGE_SAFETY, NO_IMAGE, STOP with only text, ...) and sometimes a finish_message.
    """
    candidates = response.candidates or []
    if not candidates:
        feedback = response.prompt_feedback
        block_reason = _reason_name(feedback.block_reason) if feedback is not None else None
        raise EditError(f"nano-banana returned no candidates (prompt blocked: {block_reason})")
    candidate = candidates[0]
    parts = (candidate.content.parts if candidate.content is not None else None) or []
    for part in parts:
        blob = part.inline_data
        if blob is not None and blob.data and (blob.mime_type or "").startswith("image/"):
            return _decode_reply_image(blob.data, "nano-banana")
    texts = " ".join(part.text for part in parts if part.text)
    raise EditError(
        f"nano-banana returned no image (finish_reason={_reason_name(candidate.finish_reason)}, "
        f"finish_message={candidate.finish_message!r}, text={texts[:200]!r})"
    )


class APIEditor:
    """What the two API editors share: the options, the model name, and the SDK client made on first use (`client`)."""

    DEFAULT_MODEL: str

    def __init__(self, options: EditorOptions | None = None):
        self.options = options or EditorOptions()
        self.model = self.options.model or self.DEFAULT_MODEL
        self._client = None


class NanoBananaEditor(APIEditor):
    """Nano Banana (`gemini-2.5-flash-image`) through Google's own SDK.

    Image editing is only available through `google-genai` (`client.models.generate_content` with the instruction and
    the image as contents); the OpenAI-compatible Gemini endpoint does not return images. The SDK is an optional
    extra, not in requirements.txt: `pip install google-genai`. The output (about 1 MP) is resized to the source size.
    """

    name = "nano-banana"
    DEFAULT_MODEL = "gemini-2.5-flash-image"
    KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

    def client(self):
        """The google-genai client, created on first use."""
        if self._client is None:
            api_key = self.options.api_key or next(filter(None, map(os.environ.get, self.KEY_VARIABLES)), None)
            if not api_key:
                raise EditorSetupError(
                    f"nano-banana needs a Gemini API key: set {' or '.join(self.KEY_VARIABLES)} "
                    f"(or EditorOptions.api_key)"
                )
            try:
                from google import genai
            except ImportError as err:
                raise EditorSetupError(
                    "nano-banana needs Google's SDK, an optional extra: pip install google-genai"
                ) from err
            self._client = genai.Client(api_key=api_key)
        return self._client

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        source = image.convert("RGB")
        response = self.client().models.generate_content(model=self.model, contents=[instruction, source])
        return image_from_gemini_response(response).resize(source.size, RESAMPLE)


# ------------------------------------------------------------------------------------------------------ GPT-Image

GPT_IMAGE_SIZES = {"1024x1024": 1.0, "1536x1024": 1.5, "1024x1536": 2 / 3}  # the sizes gpt-image-1 can output


def gpt_image_size(width: int, height: int) -> str:
    """The gpt-image-1 output size whose aspect ratio is closest to the source's (compared on a log scale)."""
    aspect = width / height
    return min(GPT_IMAGE_SIZES, key=lambda size: abs(math.log(GPT_IMAGE_SIZES[size] / aspect)))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_from_openai_reply(body: str) -> Image.Image:
    """The image in the raw body of an `images.edit` reply ({"data": [{"b64_json": ...}]}), or EditError saying why
    there is none. Read from the raw body: the openai client hands back a bare string for a body that is not JSON (an
    HTML page from a proxy) and builds objects of any shape without validating them."""
    try:
        reply = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        raise EditError(f"gpt-image reply is not JSON: {body[:200]!r}") from None
    items = reply.get("data") if isinstance(reply, dict) else None
    first = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
    encoded = first.get("b64_json")
    if not isinstance(encoded, str) or not encoded:
        raise EditError(f"gpt-image returned no image data (reply: {body[:200]!r})")
    try:
        data = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise EditError(f"gpt-image image data is not base64: {encoded[:40]!r}") from None
    return _decode_reply_image(data, "gpt-image")


class GPTImageEditor(APIEditor):
    """OpenAI's gpt-image-1 through `client.images.edit`.

    The source goes up as a PNG file, the edit comes back as base64 at one of three sizes (the closest aspect ratio
    by default) and is resized to the source size. `input_fidelity="high"` asks the model to preserve the input's
    details (faces, textures) outside the edit, which is what an editing benchmark rewards.

    Failures: a rejected key (HTTP 401, 403) is an EditorSetupError, since no edit can work. Every other failure is an
    EditError that callers record for this example: an API error after the client's `max_retries` (a moderation
    refusal, HTTP 400 with code "moderation_blocked"; a 429 or 5xx; a timeout; a lost connection) and a reply with no
    image (`image_from_openai_reply`). The API key is removed from both messages (servers echo it back: "Incorrect
    API key provided: ..."), and they are raised outside the `except` blocks so the openai error is not attached.
    (editors.py imports nothing of ours, so this is a small copy of judge.ChatEndpoint's conventions for one call.)
    """

    name = "gpt-image"
    DEFAULT_MODEL = "gpt-image-1"

    def client(self):
        """The openai client, created on first use."""
        if self._client is None:
            import openai

            api_key = self.options.api_key or os.environ.get("OPENAI_API_KEY")
            if not api_key:
                raise EditorSetupError(
                    "gpt-image needs an OpenAI API key: set OPENAI_API_KEY (or EditorOptions.api_key)"
                )
            self._secret = api_key  # kept only to redact it from error text
            self._client = openai.OpenAI(
                api_key=api_key,
                base_url=self.options.base_url,
                timeout=self.options.timeout_s,
                max_retries=self.options.max_retries,
            )
        return self._client

    def edit(self, image: Image.Image, instruction: str, seed: int = 0) -> Image.Image:
        import openai

        source = image.convert("RGB")
        extra = {} if self.options.input_fidelity is None else {"input_fidelity": self.options.input_fidelity}
        client, failure = self.client(), EditError
        try:
            raw = client.images.with_raw_response.edit(  # the raw reply: see image_from_openai_reply
                model=self.model,  # explicit: the endpoint's default model is dall-e-2
                image=("source.png", png_bytes(source), "image/png"),
                prompt=instruction,
                size=self.options.size or gpt_image_size(*source.size),
                **extra,
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:  # a wrong key: no edit can work
            failure, message = EditorSetupError, f"gpt-image: HTTP {err.status_code}: {err.message}"
        except openai.APIStatusError as err:  # moderation_blocked (400), 429 or 5xx after the retries, ...
            message = f"gpt-image: HTTP {err.status_code}{f' ({err.code})' if err.code else ''}: {err.message}"
        except openai.APITimeoutError:
            retries = self.options.max_retries
            message = f"gpt-image: no reply within the {self.options.timeout_s:g} s timeout ({retries} retries)"
        except openai.APIConnectionError as err:
            message = f"gpt-image: connection failed ({self.options.max_retries} retries): {err}"
        else:
            try:
                return image_from_openai_reply(raw.text).resize(source.size, RESAMPLE)
            except EditError as err:  # a 200 reply with no image in it
                message = str(err)
        raise failure(message.replace(self._secret, "[redacted API key]"))  # outside the excepts: nothing attached


# ---------------------------------------------------------------------------------------------------------- factory

EDITORS = {
    "flux": FluxKontextEditor,
    "qwen": QwenImageEditor,
    "nano-banana": NanoBananaEditor,
    "gpt-image": GPTImageEditor,
}


def make_editor(name: str, options: EditorOptions | None = None) -> Editor:
    """The editor called `name` ("flux", "qwen", "nano-banana", "gpt-image"); nothing is loaded until its first edit."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; expected one of {', '.join(EDITORS)}")
    return EDITORS[name](options)

"""The one place that knows how a Qwen-VL policy is loaded and how its inputs are laid out.

The decomposition agent is a vision-language model (Qwen2.5-VL-7B-Instruct in the paper, Qwen3-VL-8B-Instruct as an
alternative). Everything else in the project (the agents, GRPO's log-prob function, the trainer, the tiny CPU models)
goes through the functions here, so there is exactly one answer to "what does a batch look like":

    prompt   = chat template(system?, user: [image, text]) + "<|im_start|>assistant\\n"
    batch    = processor(images, prompts), LEFT-padded:
        input_ids          (B, L)   the image placeholder is expanded to one <|image_pad|> per merged patch
        attention_mask     (B, L)   0 on the left padding
        pixel_values       (P, D)   flat: every patch of every image, image after image (P = sum of grid t*h*w)
        image_grid_thw     (B, 3)   one (t, h, w) patch grid per image; images may differ in size
        mm_token_type_ids  (B, L)   1 on <|image_pad|> tokens, 0 elsewhere

Two traps shape this module (measured, see ENVIRONMENT.md):

1. transformers 5 refuses to build or load a stock Qwen-VL processor without torchvision, because it also wants a
   video processor, and there is no CPU torchvision. `Qwen2_5_VLImageOnlyProcessor` / `Qwen3VLImageOnlyProcessor`
   are the stock classes with the video processor left out. They save themselves under the stock class name, because
   `AutoProcessor` silently returns a bare tokenizer (and drops the image) for a class name it does not know.
2. `mm_token_type_ids` must reach the model. Without it Qwen3-VL raises and Qwen2.5-VL silently falls back to 1-D
   positions, which changes every log-prob. `encode_prompts` guarantees the key is present.

Padding is on the left for prompts (generation appends on the right) and for supervised examples too, so the two
layouts agree: the last column of a batch is always a real token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, BatchFeature, Qwen2_5_VLProcessor, Qwen3VLProcessor

import grpo

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips: prompt and padding positions
IM_END = "<|im_end|>"  # Qwen's end-of-turn token: the policy's answer ends here
END_OF_TEXT = "<|endoftext|>"  # Qwen's end-of-document token, also its padding token
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


class PolicyNotFoundError(FileNotFoundError):
    """The policy's weights are neither a local folder nor in the local Hugging Face cache."""


class _ImageOnly:
    """Mixin for a stock Qwen-VL processor without its video processor, so it works without torchvision.

    It still saves under the stock class name (`stock_class_name`), so a machine with torchvision can load the folder
    with AutoProcessor.
    """

    stock_class_name: str

    @classmethod
    def get_attributes(cls) -> list[str]:
        return ["image_processor", "tokenizer"]

    def save_pretrained(self, save_directory, **kwargs):
        saved = super().save_pretrained(save_directory, **kwargs)
        write_stock_processor_class(save_directory, self.stock_class_name)
        return saved


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    stock_class_name = "Qwen2_5_VLProcessor"


class Qwen3VLImageOnlyProcessor(_ImageOnly, Qwen3VLProcessor):
    stock_class_name = "Qwen3VLProcessor"


IMAGE_ONLY_PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor, "qwen3_vl": Qwen3VLImageOnlyProcessor}


def write_stock_processor_class(save_directory: str | Path, stock_class_name: str) -> None:
    """Rewrite `processor_class` in every saved JSON config to the stock name that AutoProcessor knows."""
    for path in sorted(Path(save_directory).glob("*.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "processor_class" in config:
            config["processor_class"] = stock_class_name
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------- loading


def _not_found(name_or_path: str, err: OSError) -> PolicyNotFoundError:
    return PolicyNotFoundError(
        f"Policy model {name_or_path!r} was not found as a local folder or in the Hugging Face cache "
        f"(this project never downloads at run time; HF_HUB_OFFLINE=1). To get it, run on a machine with network "
        f"access `hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir models/qwen2_5_vl` (or the model you want) and "
        f"pass that folder; for the tiny CPU policy run `python -m miniature.tiny DIR` and pass DIR/qwen2_5_vl. "
        f"Underlying error: {err}"
    )


def load_config(name_or_path: str) -> transformers.PretrainedConfig:
    """The model's config, or PolicyNotFoundError naming the model and how to get it."""
    folder = Path(name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():  # e.g. an interrupted download or a wrong folder
        raise _not_found(name_or_path, FileNotFoundError(f"{folder / 'config.json'} does not exist"))
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:  # a missing folder, a folder without config.json, or a hub id not in the offline cache
        raise _not_found(name_or_path, err) from err
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path}: config.json has model_type={config.model_type!r}; policy.py knows the input layout of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} only"
        )
    return config


def load_processor(name_or_path: str) -> transformers.ProcessorMixin:
    """The model's processor, left-padded, guaranteed to turn an image into `pixel_values`.

    We always load the image-only subclass matching config.model_type, with or without torchvision: the policy never
    sees videos, and one code path behaves the same on every machine. (With torchvision installed the stock
    AutoProcessor would load these folders too, since they name the stock class.)
    """
    config = load_config(name_or_path)
    processor = IMAGE_ONLY_PROCESSORS[config.model_type].from_pretrained(name_or_path)
    # The silent failure to guard against: a bare tokenizer (what AutoProcessor returns for an unknown saved class
    # name) or a processor that drops the image would train a policy that never sees the picture.
    if not isinstance(processor, transformers.ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise TypeError(
            f"{name_or_path}: loaded a {type(processor).__name__}, not a Qwen-VL processor with an image processor; "
            f"check `processor_class` in its processor_config.json / tokenizer_config.json"
        )
    processor.tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end together
    probe = processor(images=[Image.new("RGB", (32, 32))], text=["<|vision_start|><|image_pad|><|vision_end|>"])
    if "pixel_values" not in probe:
        raise TypeError(f"{name_or_path}: processor {type(processor).__name__} returned no pixel_values for an image")
    return processor


def load_policy(
    name_or_path: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Load a Qwen2.5-VL / Qwen3-VL policy and its processor from a hub id, a local folder or a saved checkpoint.

    dtype None keeps the dtype stored in the checkpoint; the model comes back in eval mode (no dropout) and callers
    switch to train() themselves. attn_implementation None is transformers' default (SDPA); "flash_attention_2"
    needs the flash-attn package and a GPU.
    """
    load_config(name_or_path)  # fails early with PolicyNotFoundError before any weights are touched
    kwargs = {} if dtype is None else {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, load_processor(name_or_path)


def save_policy(
    model: transformers.PreTrainedModel,
    processor: transformers.ProcessorMixin,
    out_dir: str | Path,
    *,
    original_format: bool = True,
) -> Path:
    """Save weights (safetensors), generation config and processor so that load_policy(out_dir) restores them.

    original_format=False writes the parameter names of the live modules instead of the hub checkpoints' legacy
    layout. train.py needs it under ZeRO-3, where transformers 5.24 reverts the layout wrongly (it writes
    "model.language_model.model.*"); both layouts load with from_pretrained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, save_original_format=original_format)  # transformers 5 always writes safetensors
    processor.save_pretrained(out_dir)  # the image-only processors write the stock class name themselves
    return out_dir


# ---------------------------------------------------------------------------------------------------------- inputs


def eos_token_ids(processor: transformers.ProcessorMixin) -> list[int]:
    """Token ids that end a completion: <|im_end|> (end of turn) and <|endoftext|>, read from the tokenizer."""
    return [_token_id(processor, IM_END), _token_id(processor, END_OF_TEXT)]


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")


def vision_token_ids(processor: transformers.ProcessorMixin) -> list[int]:
    """Ids of the image/video placeholder tokens the tokenizer has. A completion must never contain them: scoring it
    with the image inputs would count one image token too many ("Image features and image tokens do not match")."""
    vocab = processor.tokenizer.get_vocab()
    return [vocab[t] for t in VISION_TOKENS if t in vocab]


def pad_token_id(processor: transformers.ProcessorMixin) -> int:
    """The tokenizer's padding id (Qwen pads with <|endoftext|>)."""
    pad = processor.tokenizer.pad_token_id
    return _token_id(processor, END_OF_TEXT) if pad is None else pad


def _token_id(processor: transformers.ProcessorMixin, token: str) -> int:
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == processor.tokenizer.unk_token_id and token != processor.tokenizer.unk_token):
        raise KeyError(f"the tokenizer has no {token!r} token")
    return token_id


def chat_prompt(
    processor: transformers.ProcessorMixin, text: str, system: str | None = None, *, images: int = 1, text_first=False
) -> str:
    """One user turn through the model's chat template, ending with the assistant header: `images` image slots, then
    the text (the agents' layout), or the text first (the local judge's: rubric, original, edited)."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    slots = [{"type": "image"}] * images
    content = [{"type": "text", "text": text}, *slots] if text_first else [*slots, {"type": "text", "text": text}]
    messages.append({"role": "user", "content": content})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _ensure_mm_token_type_ids(processor: transformers.ProcessorMixin, batch: BatchFeature) -> BatchFeature:
    # Stock processors in transformers >= 5 return it; older ones did not, and the model then silently uses
    # 1-D positions (Qwen2.5-VL), so we build it the same way: 1 on image placeholder tokens.
    if "mm_token_type_ids" not in batch:
        batch["mm_token_type_ids"] = (batch["input_ids"] == processor.image_token_id).long()  # (B, L)
    return batch


def encode_prompts(
    processor: transformers.ProcessorMixin,
    images: list[Image.Image] | list[list[Image.Image]],
    texts: list[str],
    system: str | None = None,
    *,
    text_first: bool = False,
) -> BatchFeature:
    """A left-padded batch of prompts ready for `model.generate` (layout in the module docstring): one image per text,
    or a list of images per text (the local judge's two), laid out by `chat_prompt`."""
    if len(images) != len(texts):
        raise ValueError(f"encode_prompts: {len(images)} images but {len(texts)} texts; need one image per text")
    per_text = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
    prompts = [chat_prompt(processor, t, system, images=len(x), text_first=text_first) for t, x in zip(texts, per_text)]
    batch = processor(
        images=[image.convert("RGB") for x in per_text for image in x],
        text=prompts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    return _ensure_mm_token_type_ids(processor, batch)


def encode_supervised(
    processor: transformers.ProcessorMixin,
    images: list[Image.Image],
    prompts: list[str],
    targets: list[str],
    system: str | None = None,
) -> BatchFeature:
    """A left-padded batch of prompt + target + <|im_end|>, with `labels` for next-token cross-entropy.

    labels (B, L) equal input_ids on the target tokens and the closing <|im_end|> (so the model learns to stop), and
    IGNORE_INDEX on the padding and the prompt. The model shifts labels itself.
    """
    if not len(images) == len(prompts) == len(targets):
        raise ValueError(f"encode_supervised: {len(images)} images, {len(prompts)} prompts, {len(targets)} targets")
    prompt_texts = [chat_prompt(processor, prompt, system) for prompt in prompts]
    full_texts = [prompt + target + IM_END for prompt, target in zip(prompt_texts, targets)]
    rgb = [image.convert("RGB") for image in images]
    prompt_batch = processor(images=rgb, text=prompt_texts, padding=True, padding_side="left", return_tensors="pt")
    batch = processor(images=rgb, text=full_texts, padding=True, padding_side="left", return_tensors="pt")

    prompt_lengths = prompt_batch["attention_mask"].sum(dim=1)  # (B,)
    full_lengths = batch["attention_mask"].sum(dim=1)  # (B,)
    length = batch["input_ids"].shape[1]
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # (B, L)
    for i in range(len(full_texts)):
        start = length - int(full_lengths[i])  # first real token of this left-padded row
        target_start = start + int(prompt_lengths[i])
        prompt_ids = prompt_batch["input_ids"][i, prompt_batch["input_ids"].shape[1] - int(prompt_lengths[i]) :]
        # Tokenising prompt+target jointly must not change the prompt's tokens, or the mask would be off by some.
        if not torch.equal(batch["input_ids"][i, start:target_start], prompt_ids):
            raise ValueError(f"encode_supervised: example {i}: the target {targets[i]!r} merges with the prompt tokens")
        labels[i, target_start:] = batch["input_ids"][i, target_start:]
    batch["labels"] = labels
    return _ensure_mm_token_type_ids(processor, batch)


# ------------------------------------------------------------------------------------------------------ generation


@torch.no_grad()
def generate(
    model,
    processor: transformers.ProcessorMixin,
    inputs: dict,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    **generate_kwargs,
) -> list[str]:
    """One completion per row of an encoded batch, decoded up to and including its first end-of-turn token.

    The one generate-and-decode path of the agents, the local judge and the held-out evaluation. greedy=True is the
    argmax at every step; greedy=False samples at `temperature` from the full softmax, the distribution GRPO rollouts
    use (seed torch's RNG beforehand). Either way nothing comes from the checkpoint's generation_config
    (`grpo.generate`). `generate_kwargs` are generate's own arguments (`synced_gpus`).
    """
    eos = eos_token_ids(processor)
    fields = {"do_sample": not greedy, "max_new_tokens": max_new_tokens, "eos_token_id": eos,
              "pad_token_id": pad_token_id(processor)}  # fmt: skip
    if not greedy:
        fields.update(temperature=temperature, top_k=0, top_p=1.0)
    sequences = grpo.generate(model, dict(inputs), fields, **generate_kwargs)  # (B, P + T)
    completion_ids = sequences[:, inputs["input_ids"].shape[1] :]  # (B, T)
    completion_mask = grpo.completion_mask_from_eos(completion_ids, eos)  # (B, T) 1 up to and including first EOS
    # each row's own tokens only: the padding after a short row's EOS must not reach the text
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]
    return processor.tokenizer.batch_decode(rows, skip_special_tokens=True)


@torch.no_grad()
def generate_texts(
    model,
    processor: transformers.ProcessorMixin,
    images: list[Image.Image] | list[list[Image.Image]],
    prompts: list[str],
    system: str | None,
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    text_first: bool = False,
) -> list[str]:
    """Encode (image(s), prompt) pairs as one left-padded batch and `generate` one completion each, in one call: what
    the agents, the critic, the local judge and the local teacher all run."""
    batch = encode_prompts(processor, list(images), list(prompts), system=system, text_first=text_first)
    return generate(
        model, processor, batch.to(model.device), max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature
    )

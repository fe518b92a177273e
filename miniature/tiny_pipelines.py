"""Tiny random editing pipelines, built offline, so tests and the CPU demo exercise the real editor code.

The real editors (`editors.FluxKontextEditor`, `editors.QwenImageEditor`) load 12B / 20B diffusion pipelines from the
Hugging Face Hub. Nothing here can reach the hub and there is no GPU, so this module builds the *same pipeline
classes* from tiny component configs (random weights, 16k-250k parameters per component), calls `.eval()` on every
component and writes them with `save_pretrained`. The editors then load the folder through the very same
`from_pretrained(path)` call they use for the real weights: only the size of the numbers differs.

    save_tiny_flux_kontext(out_dir)     -> FluxKontextPipeline:    CLIP + T5 text encoders, FLUX transformer, KL VAE
    save_tiny_qwen_image_edit(out_dir)  -> QwenImageEditPipeline:  tiny Qwen2.5-VL text encoder, MMDiT, Qwen VAE

Usage: `python -m miniature.tiny_pipelines OUT_DIR [--seed S]` writes OUT_DIR/flux_kontext and OUT_DIR/qwen_image_edit.

Design choices a reader should know:
1. The tokenizers come from small vocabularies written here, never downloaded. CLIP gets a character-level BPE
   (every byte-level character, alone and with CLIP's end-of-word marker `</w>`, and no merges); T5 gets a
   character-level Unigram. They tokenise any English instruction, just into more pieces than the real ones.
2. The VAEs keep the real *downsampling factors* (FLUX: 8, Qwen-Image: 8), so the editors' rounding of the working
   size to a multiple of `vae_scale_factor * 2` (= 16) is tested exactly as it runs on the real models.
3. The FLUX transformer is guidance-distilled (`guidance_embeds=True`) like FLUX.1-Kontext-dev, so the editor's
   `guidance_scale` really reaches the model. The Qwen transformer is not (like Qwen-Image-Edit), so its guidance
   comes from true classifier-free guidance with a negative prompt.
4. `.eval()` matters: a freshly built T5 has dropout on, and two edits with the same seed would then differ.
5. The tiny Qwen2.5-VL text encoder, its tokenizer and its processor come from the miniature's `tiny.py` (shared with
   the policy tests) and `policy.py` (a processor that works without torchvision); they are imported inside
   `build_tiny_qwen_image_edit` so that building the FLUX pipeline needs neither. The saved model_index.json names
   the processor the way the real repository does, so the folder loads exactly like Qwen/Qwen-Image-Edit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# Real FLUX and Qwen-Image VAEs downsample by 8 (three stride-2 stages); the tiny ones keep that factor.
VAE_DOWNSAMPLE_STAGES = 3
CLIP_MAX_LENGTH = 77  # CLIP's context length; the FLUX pipeline pads the prompt to the tokenizer's model_max_length.
STOCK_PROCESSOR_CLASS = "Qwen2VLProcessor"  # what Qwen/Qwen-Image-Edit's model_index.json names
T5_MAX_LENGTH = 512  # The FLUX pipeline's default `max_sequence_length`; T5 has relative positions, so any value works.


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes (GPT-2's `bytes_to_unicode`)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_clip_tokenizer():
    """A character-level CLIP BPE tokenizer: every byte-level character alone and word-final, no merges."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = _byte_level_alphabet()
    pieces = specials + alphabet + [char + "</w>" for char in alphabet]
    vocab = {piece: index for index, piece in enumerate(pieces)}  # 514 entries
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def build_t5_tokenizer():
    """A character-level T5 (Unigram) tokenizer over printable ASCII; anything else becomes `<unk>`."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's fixed ids 0, 1, 2
    characters = [("▁", -2.0)] + [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
    return T5Tokenizer(vocab=specials + characters, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_tiny_flux_kontext(seed: int = 0):
    """Build a random `FluxKontextPipeline` small enough to run a 64x64 edit in well under a second on a CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seed locally: callers' random streams are left alone
        torch.manual_seed(seed)
        text_encoder, text_encoder_2, transformer, vae = _flux_components(tokenizer, tokenizer_2)
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def _flux_components(tokenizer, tokenizer_2):
    """Random CLIP and T5 text encoders, FLUX transformer and KL VAE, sized to the tokenizers."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    text_dim = 32  # CLIP pooled width == T5 width == the transformer's joint attention width, to keep it tiny
    latent_channels = 4  # packed 2x2 into 16 transformer input channels, as FLUX packs its 16 into 64
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=text_dim,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=text_dim,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,  # FLUX.1-Kontext-dev is guidance-distilled: guidance_scale is a model input
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
    )
    stages = VAE_DOWNSAMPLE_STAGES + 1  # AutoencoderKL downsamples between consecutive blocks
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * stages,
        up_block_types=("UpDecoderBlock2D",) * stages,
        block_out_channels=(8,) * stages,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        shift_factor=0.0609,  # FLUX's VAE latent statistics, so the pipeline's (de)normalisation is exercised
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    return text_encoder, text_encoder_2, transformer, vae


def save_tiny_flux_kontext(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny FLUX Kontext pipeline and save it; `FluxKontextEditor(model=<returned path>)` loads it."""
    out_dir = Path(out_dir)
    build_tiny_flux_kontext(seed).save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen_image_edit(seed: int = 0):
    """Build a random `QwenImageEditPipeline` whose text encoder is the project's tiny Qwen2.5-VL."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    from miniature import tiny  # the tiny Qwen2.5-VL, its tokenizer and its torchvision-free processor

    tokenizer = tiny.build_tokenizer()
    processor = tiny.build_processor(tokenizer, "qwen2_5_vl")
    text_encoder = tiny.build_model("qwen2_5_vl", tokenizer, seed=seed)
    z_dim = 4  # latent channels (the real VAE has 16)

    with torch.random.fork_rng(devices=[]):  # seed locally: callers' random streams are left alone
        torch.manual_seed(seed)
        transformer, vae = _qwen_image_components(z_dim, text_dim=text_encoder.config.text_config.hidden_size)
    return QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer.eval(),
    )


def _qwen_image_components(z_dim: int, text_dim: int):
    """A random Qwen-Image MMDiT reading `text_dim`-wide VLM states, and a Qwen-Image VAE with `z_dim` channels."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,  # latents are packed into 2x2 patches
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,  # the transformer reads the VLM's last hidden states
        guidance_embeds=False,  # Qwen-Image-Edit is not guidance-distilled: it uses true CFG
        axes_dims_rope=(8, 4, 4),  # must sum to attention_head_dim
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsampling stages: spatial factor 8, as in the real VAE
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    return transformer, vae


def save_tiny_qwen_image_edit(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny Qwen-Image-Edit pipeline and save it; `QwenImageEditor(model=<returned path>)` loads it.

    The processor is the project's torchvision-free subclass, which diffusers would record in model_index.json as
    ["policy", "Qwen2_5_VLImageOnlyProcessor"]: a library diffusers refuses to import. We write the entry the real
    Qwen-Image-Edit repository has, ["transformers", "Qwen2VLProcessor"], so the folder loads like the real one.
    """
    out_dir = Path(out_dir)
    build_tiny_qwen_image_edit(seed).save_pretrained(out_dir)
    write_json_field(out_dir / "model_index.json", "processor", ["transformers", STOCK_PROCESSOR_CLASS])
    for config_path in sorted((out_dir / "processor").glob("*.json")):
        if "processor_class" in json.loads(config_path.read_text(encoding="utf-8")):
            write_json_field(config_path, "processor_class", STOCK_PROCESSOR_CLASS)
    return out_dir


def write_json_field(path: Path, key: str, value) -> None:
    """Set one top-level field of a JSON file."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config[key] = value
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write flux_kontext/ and qwen_image_edit/ into")
    parser.add_argument("--seed", type=int, default=0, help="weight-initialisation seed (same seed, same weights)")
    args = parser.parse_args(argv)
    print(f"flux: {save_tiny_flux_kontext(args.out_dir / 'flux_kontext', seed=args.seed)}")
    print(f"qwen: {save_tiny_qwen_image_edit(args.out_dir / 'qwen_image_edit', seed=args.seed)}")


if __name__ == "__main__":
    main()

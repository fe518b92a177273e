"""LoRA for train.py (Hu et al. 2021, arXiv 2106.09685): wrap, switch off and merge adapters, apart from the loop.

A target nn.Linear y = W x keeps W frozen and learns a low-rank update beside it:

    y = W x + (alpha / r) * B A dropout(x),    A: (r, in) Kaiming-uniform,  B: (out, r) zeros

so the adapted model starts exactly as the base one and only A and B train (r * (in + out) numbers per layer).
Three things follow from keeping W untouched:
- the reference policy of the KL term is the same model with the adapters switched off (`disabled`), so no second
  copy of the weights is loaded;
- an export merges W + (alpha / r) B A into a plain nn.Linear for the save only (`merged_for_save`): exports stay
  plain `from_pretrained` folders that the agents and evaluate.py load as before, and W itself is never rounded;
- the adapter alone (A and B of every layer, and the settings) is saved beside each export (`save_adapter`).

Targets are matched by the last part of a module's name (q_proj, ..., down_proj: the language model's projections);
the vision tower is left out unless asked for, as EasyR1 does.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_PREFIXES = ("model.visual.", "visual.")  # Qwen2.5-VL's and Qwen3-VL's vision tower and merger


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    vision: bool = False  # also adapt the vision tower's matching layers


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`base`) plus its trainable low-rank update."""

    def __init__(self, base: nn.Linear, config: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, config.rank, dtype=weight.dtype, device=weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight (and PEFT A)
        self.scale = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        # (alpha / r) * B A x, applied as two thin matmuls: (..., in) -> (..., r) -> (..., out)
        return y + (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T * self.scale

    def delta(self) -> torch.Tensor:
        """(alpha / r) * B A: (out, in), the update the adapter adds to W."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scale).to(self.base.weight.dtype)


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap each target nn.Linear in a LoRALinear (in place); returns the
    wrapped module names. Raises ValueError when nothing matches, so a typo in the targets cannot train nothing."""
    if config.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {config.rank}")
    model.requires_grad_(False)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in config.targets
        and (config.vision or not name.startswith(VISION_PREFIXES))
    ]
    if not names:
        raise ValueError(f"no nn.Linear named {', '.join(config.targets)} in {type(model).__name__}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config))
    return names


def layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def disabled(model: nn.Module):
    """The base model: every adapter switched off (train.py's reference policy with LoRA)."""
    wrapped = layers(model).values()
    for m in wrapped:
        m.enabled = False
    try:
        yield model
    finally:
        for m in wrapped:
            m.enabled = True


@contextmanager
def merged_for_save(model: nn.Module):
    """Each LoRALinear replaced by a plain nn.Linear holding W + (alpha / r) B A, for the duration of a save; the
    LoRALinear modules (and W, unrounded) are put back afterwards. Under ZeRO-3, call it inside a gather of all
    parameters."""
    wrapped = layers(model)
    for name, m in wrapped.items():
        plain = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None,
                          device="meta")  # fmt: skip
        plain.weight = nn.Parameter((m.base.weight.detach() + m.delta().detach()).clone(), requires_grad=False)
        if m.base.bias is not None:
            plain.bias = nn.Parameter(m.base.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    try:
        yield model
    finally:
        for name, m in wrapped.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m)


def save_adapter(model: nn.Module, config: LoRAConfig, out_dir: str | Path) -> Path:
    """adapter.safetensors (every layer's lora_A, lora_B under its module name) and adapter.json (the settings and
    the base weights' names), in `out_dir`. Under ZeRO-3, call it inside a gather of all parameters."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers(model).items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    save_file(tensors, out_dir / "adapter.safetensors")
    meta = {**asdict(config), "targets": list(config.targets), "layers": sorted(layers(model)), "scale": "alpha / rank"}
    (out_dir / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out_dir / "adapter.safetensors"

"""A model's dimensions and parameter counts from ``config.json`` alone: the real class built on the meta device.

Nothing is read but the config, and no memory is allocated, so planning an 11B run takes about a second on a
laptop. LoRA and ``modules_to_save`` are counted by PEFT's own matching rules on the same meta model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from vlm_pipeline.architectures import Architecture, architecture_for_model
from vlm_pipeline.training.trainable import component_of, lora_target_modules


@dataclass
class Stack:
    """One transformer stack (the language model, or the vision tower) as the activation estimate needs it."""

    layers: int
    hidden: int
    intermediate: int
    gated_mlp: bool
    """SwiGLU (gate, up, down: four saved tensors of width ``intermediate``) rather than a two-layer MLP."""


@dataclass
class ModelShape:
    architecture: str
    parameters: dict[str, int]
    """Parameters per component (vision_tower, projector, language_model)."""
    text: Stack
    vocab: int
    vision: Stack | None = None
    linear_weights: dict[str, int] = field(default_factory=dict)
    """Weights of nn.Linear layers per component, lm_head excluded: what bitsandbytes quantizes."""
    largest_layer: int = 0
    """Parameters of the largest repeated block: what ZeRO-3 and FSDP gather at once."""
    trainable: int = 0
    trainable_matrices: list[tuple[int, ...]] = field(default_factory=list)
    """Shapes of the trainable tensors (Adafactor factors the second moment of the 2-D ones)."""
    lora: bool = False
    """Adapters train over a frozen base (else: full fine-tuning, perhaps with frozen components)."""
    trains_vision: bool = False
    """The vision tower's weights train, so its activations are kept for backward."""

    @property
    def total(self) -> int:
        return sum(self.parameters.values())


def read_model_shape(model_dir: str | Path, method: Any, trust_remote_code: bool = False) -> ModelShape:
    """Shape of the model in ``model_dir`` (only its config.json is read) and what ``method`` trains of it."""
    architecture = architecture_for_model(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = architecture.model_class._from_config(config)
    parameters: dict[str, int] = {}
    linear: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        component = component_of(name, architecture)
        parameters[component] = parameters.get(component, 0) + parameter.numel()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("lm_head"):
            component = component_of(name, architecture)
            linear[component] = linear.get(component, 0) + module.weight.numel()
    trainable, matrices = _trainable(model, architecture, method)
    text_config = getattr(config, "text_config", config)
    return ModelShape(
        architecture=architecture.name,
        parameters=parameters,
        text=_stack(text_config, "num_hidden_layers", "hidden_size", "intermediate_size", gated=True),
        vocab=text_config.vocab_size,
        vision=_vision_stack(config, architecture),
        linear_weights=linear,
        largest_layer=max(
            (
                sum(p.numel() for p in block.parameters())
                for module in model.modules()
                if isinstance(module, nn.ModuleList)
                for block in module
            ),
            default=0,
        ),
        trainable=trainable,
        trainable_matrices=matrices,
        lora=method.lora is not None,
        trains_vision="vision_tower" in parameters and method.lora is None and not method.freeze.vision_tower,
    )


def _trainable(model: nn.Module, architecture: Architecture, method: Any) -> tuple[int, list[tuple[int, ...]]]:
    """Trainable parameter count and the shapes of trainable tensors, for full FT (minus frozen parts) or LoRA."""
    if method.lora is None:
        frozen = {component for component, value in method.freeze.model_dump().items() if value}
        shapes = [tuple(p.shape) for n, p in model.named_parameters() if component_of(n, architecture) not in frozen]
        return sum(math.prod(s) for s in shapes), shapes
    lora = method.lora
    targets = lora_target_modules(model, architecture, lora.target_modules)
    shapes: list[tuple[int, ...]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _is_lora_target(name, targets):
            shapes += [(lora.r, module.in_features), (module.out_features, lora.r)]
        if any(name == saved or name.endswith(f".{saved}") for saved in lora.modules_to_save or []):
            shapes += [tuple(p.shape) for p in module.parameters()]
    return sum(math.prod(s) for s in shapes), shapes


def _is_lora_target(name: str, targets: Any) -> bool:
    # PEFT's rule: a string is a full-match regex over module names; a list matches the last name component.
    if isinstance(targets, str):
        return targets == "all-linear" and not name.startswith("lm_head") or bool(re.fullmatch(targets, name))
    return name.rsplit(".", 1)[-1] in targets


def _stack(config: Any, layers: str, hidden: str, intermediate: str, *, gated: bool) -> Stack:
    return Stack(getattr(config, layers), getattr(config, hidden), getattr(config, intermediate), gated)


def _vision_stack(config: Any, architecture: Architecture) -> Stack | None:
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    layers = getattr(vision, "depth", None) or vision.num_hidden_layers + getattr(vision, "num_global_layers", 0)
    return Stack(layers, vision.hidden_size, vision.intermediate_size, bool(architecture.vision_mlp_gated))

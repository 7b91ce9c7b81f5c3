"""Which parts of a model train: freezing by component, LoRA scoped to the language model, and the table.

Components (vision tower, projector, language model) come from each architecture's parameter-name prefixes
(``Architecture.components``), so the same parameters work for Qwen2.5-VL, Mllama and Llama.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from vlm_pipeline.architectures import Architecture

COMPONENTS = ("vision_tower", "projector", "language_model")
# PEFT prefixes the wrapped model's parameter names with this.
PEFT_PREFIX = "base_model.model."


def component_of(name: str, architecture: Architecture) -> str:
    name = name.removeprefix(PEFT_PREFIX) + "."  # a module's own name ("model.visual") matches its prefix too
    for component, prefix in architecture.components:
        if name.startswith(prefix):
            return component
    return "language_model"


def freeze(model: nn.Module, architecture: Architecture, frozen: dict[str, bool]) -> None:
    """Stop gradients into every component set true in ``frozen`` (``method.freeze``)."""
    wanted = {component for component, value in frozen.items() if value}
    for name, parameter in model.named_parameters():
        if component_of(name, architecture) in wanted:
            parameter.requires_grad_(False)


def lora_target_modules(model: nn.Module, architecture: Architecture, target_modules: list[str] | str) -> Any:
    """``target_modules`` as PEFT should see it: inside the language model of a VLM unless a regex is given.

    Module names such as ``q_proj`` exist in the vision towers too (Mllama), and ``all-linear`` would adapt
    them; a VLM's adapters belong in the language model by default. A string other than ``all-linear`` is a
    regex over full module names (PEFT's own rule) and is passed through unchanged: the override.
    """
    if not architecture.is_vision or (isinstance(target_modules, str) and target_modules != "all-linear"):
        return target_modules
    names = None if target_modules == "all-linear" else set(target_modules)
    selected = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and component_of(name, architecture) == "language_model"
        and not name.startswith("lm_head")  # PEFT's all-linear leaves the output layer out too
        and (names is None or name.rsplit(".", 1)[-1] in names)
    ]
    if not selected:
        raise ValueError(f"LoRA target_modules {target_modules} match no linear layer of the language model")
    return "|".join(re.escape(name) for name in selected)


def parameter_table(model: nn.Module, architecture: Architecture) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per component, plus the total."""
    table = {component: {"trainable": 0, "total": 0} for component in (*COMPONENTS, "all")}
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:  # tied weights (embeddings / lm_head) count once
            continue
        seen.add(id(parameter))
        count = getattr(parameter, "ds_numel", None) or parameter.numel()  # ZeRO-3 partitions at load: numel() is 0
        for row in (table[component_of(name, architecture)], table["all"]):
            row["total"] += count
            row["trainable"] += count if parameter.requires_grad else 0
    return {component: row for component, row in table.items() if row["total"]}

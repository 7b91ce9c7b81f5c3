"""Is a saved model complete? Its safetensors headers (names and shapes, never the data) against the base's.

``from_pretrained`` fills a tensor missing from a checkpoint with random values and only logs a warning, so a save
that lost a tensor (a gather under ZeRO-3 or FSDP, a cut file) would otherwise pass silently down the pipeline.
Every stage that writes a model checks it here, and ``load_model`` refuses a load with missing tensors.

Names are compared in the model's module form: transformers renames a checkpoint's keys on load (Qwen2.5-VL's
``visual.*`` and ``model.*`` become ``model.visual.*`` and ``model.language_model.*``) and back on save, and
which form a file holds depends on the transformers version that wrote it. Shapes are compared, dtypes are not
(a bf16 save of an fp32 base is complete). With ``tie_word_embeddings`` the head may be stored or not.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
TIED_HEAD = "lm_head.weight"
SHOWN = 5  # tensors named in an error message; the count says how many more


class IncompleteModelError(RuntimeError):
    """A saved model lacks tensors of its base (or holds others, or other shapes); the message names them."""


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a saved folder (sharded or not), read from the safetensors headers."""
    index = folder / INDEX
    if index.is_file():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise IncompleteModelError(f"{folder} holds no safetensors weights")
    shapes = {}
    for file in files:
        if not file.is_file():
            raise IncompleteModelError(f"{folder}: {INDEX} names {file.name}, which is missing")
        with safe_open(str(file), "pt") as tensors:
            shapes.update({name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()})
    return shapes


def _renames(config: dict) -> list[tuple[str, str]]:
    """transformers' own checkpoint-to-module key renames for this model (by class, then by model type)."""
    classes = config.get("architectures") or []
    mapping = next(filter(None, map(get_checkpoint_conversion_mapping, classes)), None)
    mapping = mapping or get_checkpoint_conversion_mapping(config.get("model_type")) or []
    return [
        (source, target)
        for rule in mapping
        if isinstance(rule, WeightRenaming)
        for source, target in zip(rule.source_patterns, rule.target_patterns, strict=True)
    ]


def module_names(shapes: dict[str, tuple[int, ...]], config: dict) -> dict[str, tuple[int, ...]]:
    """``shapes`` under the module's parameter names (a key already in that form is left as it is)."""
    renames = _renames(config)
    renamed = {}
    for key, shape in shapes.items():
        for source, target in renames:
            key = re.sub(source, target, key)
        renamed[key] = shape
    return renamed


def base_module(base: Path) -> torch.nn.Module:
    """A weightless (meta-device) instance of the base model's class: its parameter and module names are those
    PEFT's ``target_modules`` and an adapter's keys use."""
    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])._from_config(config)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _ties_head(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_full_model(saved: Path, base: Path) -> dict:
    """Raise ``IncompleteModelError`` unless ``saved`` holds exactly the base's tensors, in the base's shapes."""
    config = _config(base)
    expected = module_names(tensor_shapes(base), config)
    actual = module_names(tensor_shapes(saved), config)
    if _ties_head(config):  # the head is the embedding: stored in one file, maybe not in the other
        expected.pop(TIED_HEAD, None)
        actual.pop(TIED_HEAD, None)
    missing = sorted(expected.keys() - actual.keys())
    extra = sorted(actual.keys() - expected.keys())
    reshaped = sorted(f"{key} {actual[key]} (base {expected[key]})" for key in expected.keys() & actual.keys()
                      if actual[key] != expected[key])  # fmt: skip
    problems = [
        f"{len(names)} tensor(s) {what}: {_listed(names)}"
        for what, names in (("missing", missing), ("not in the base", extra), ("of another shape", reshaped))
        if names
    ]
    if problems:
        raise IncompleteModelError(f"saved model {saved} does not match its base {base}: " + "; ".join(problems))
    return {"tensors": len(actual), "matches_base": True}


def _targets(adapter_config: dict, model: torch.nn.Module) -> list[str]:
    """The base modules LoRA was asked to wrap, by PEFT's rule: ``all-linear`` is every linear layer but the
    output head, another string a full-match regex, a list holds names matched as the name or its last parts."""
    targets = adapter_config.get("target_modules") or []
    modules = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    if targets == "all-linear":
        head = model.get_output_embeddings()
        return [name for name in modules if model.get_submodule(name) is not head]
    if isinstance(targets, str):
        return [module for module in modules if re.fullmatch(targets, module)]
    return [module for module in modules if any(module == t or module.endswith(f".{t}") for t in targets)]


def check_adapter(adapter: Path, base: Path) -> dict:
    """Raise ``IncompleteModelError`` unless the adapter holds LoRA A and B for every base module it targets and
    every tensor of each ``modules_to_save`` module, in the base's shapes."""
    adapter_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    model = base_module(base)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    saved = {key.removeprefix(PEFT_PREFIX): shape for key, shape in tensor_shapes(adapter).items()}
    required = [f"{module}.lora_{part}.weight" for module in _targets(adapter_config, model) for part in "AB"]
    kept = adapter_config.get("modules_to_save") or []
    full = [key for key in expected if any(f".{name}." in f".{key}" for name in kept)]
    missing = sorted({*required, *full} - saved.keys())
    reshaped = sorted(f"{key} {saved[key]} (base {expected[key]})" for key in full
                      if key in saved and saved[key] != expected[key])  # fmt: skip
    problems = [f"{len(names)} tensor(s) {what}: {_listed(names)}"
                for what, names in (("missing", missing), ("of another shape", reshaped)) if names]  # fmt: skip
    if not required:
        problems.append(f"its target_modules match no module of the base {base}")
    if problems:
        raise IncompleteModelError(f"saved adapter {adapter} does not cover its targets: " + "; ".join(problems))
    return {"tensors": len(saved), "targets_covered": True}


def check_saved_model(saved: Path, base: Path) -> dict:
    """A LoRA adapter against the targets it claims, a full model against the base checkpoint."""
    if (saved / ADAPTER_CONFIG).is_file():
        return check_adapter(saved, base)
    return check_full_model(saved, base)


def check_loading_info(model_dir: Path, info: dict) -> None:
    """After ``from_pretrained(..., output_loading_info=True)``: a tensor the checkpoint lacked was filled at
    random, so stop (transformers itself leaves a tied head out of ``missing_keys``)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise IncompleteModelError(
            f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint: {_listed(missing)}"
        )

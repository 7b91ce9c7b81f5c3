"""LoRA adapter extraction and merge, with a logits check that the merge changed nothing.

The check compares base+adapter (PEFT, unmerged) against the merged model *reloaded from disk with
``from_pretrained`` alone*, so it also catches weights lost on save (e.g. a ``modules_to_save`` head).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open

from vlm_pipeline.architectures import architecture_for_model, load_model, load_processor
from vlm_pipeline.model_files import check_full_model
from vlm_pipeline.training.collator import SFTCollator

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What a model folder handed to users holds: what from_pretrained and serving tools read. Pickles
# (training_args.bin) and training logs live beside the model, never in it.
MODEL_FILE_NAMES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
}


def is_model_file(name: str) -> bool:
    """Whether a file belongs in a model folder handed to users (weights only as safetensors)."""
    return name in MODEL_FILE_NAMES or name.endswith(".safetensors")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_adapter(trained_dir: Path, dest: Path) -> dict[str, Any]:
    """Copy the adapter (safetensors only; pickles are never produced or read) and summarise it."""
    missing = [name for name in ADAPTER_FILES if not (trained_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{trained_dir} holds no LoRA adapter: missing {', '.join(missing)}")
    for name in ADAPTER_FILES:
        shutil.copy2(trained_dir / name, dest / name)
    config = json.loads((dest / "adapter_config.json").read_text())
    with safe_open(str(dest / "adapter_model.safetensors"), "pt") as tensors:  # reads the header, not the data
        shapes = [tensors.get_slice(name).get_shape() for name in tensors.keys()]
    return {
        "tensors": len(shapes),
        "parameters": sum(math.prod(shape) for shape in shapes),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "modules_to_save": config.get("modules_to_save"),
        "size_bytes": (dest / "adapter_model.safetensors").stat().st_size,
    }


@torch.no_grad()
def batch_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs).logits.float()


def merge_and_verify(
    base_model: Path,
    adapter_dir: Path,
    processor_dir: Path,
    check_rows: list[dict],
    image_root: Path,
    dest: Path,
    *,
    dtype: str,
    tolerance: dict[str, float],
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Merge ``adapter_dir`` into ``base_model`` (unquantised, in ``dtype``), save to ``dest``, verify.

    The processor saved with the merged model is the one training used (``processor_dir``), image bounds included.
    ``tolerance`` maps each dtype to its bound: absolute in float32, relative to the largest |logit| in bfloat16.

    Raises ``MergeVerificationError`` if merged logits differ from base+adapter by more than the tolerance, or if
    a ``modules_to_save`` tensor did not survive the save.
    """
    torch_dtype = DTYPES[dtype]
    architecture = architecture_for_model(base_model)
    processor = load_processor(processor_dir, architecture=architecture, trust_remote_code=trust_remote_code)
    collator = SFTCollator(processor, architecture, image_root)
    batch = collator(check_rows)

    peft_model = PeftModel.from_pretrained(
        load_model(
            base_model, dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
        ),
        str(adapter_dir),
    ).eval()
    expected = batch_logits(peft_model, batch)
    saved_modules = list(peft_model.peft_config["default"].modules_to_save or [])
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(dest), safe_serialization=True)
    processor.save_pretrained(str(dest))
    check_full_model(dest, base_model)  # every base tensor saved, in its shape (IncompleteModelError)

    reloaded = load_model(
        dest, dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation
    ).eval()
    actual = batch_logits(reloaded, batch)
    mask = batch["attention_mask"].bool()
    result = {
        "records": len(check_rows),
        **compare_logits(expected[mask], actual[mask], dtype, tolerance[dtype]),
        "modules_to_save": compare_saved_modules(merged, reloaded, saved_modules),
    }
    problems = []
    if not result["logits_passed"]:
        problems.append(
            f"max |Δlogits| = {result['max_abs_diff']:.3g} ({result['criterion']} {result['measured']:.3g} > "
            f"{result['tolerance']:g}) on {len(check_rows)} test records"
        )
        if dtype == "bfloat16":
            problems.append("rerun with adapter.merge_dtype=float32 to tell bf16 rounding from a broken merge")
    if result["modules_to_save"]["changed_on_save"]:
        changed = ", ".join(result["modules_to_save"]["changed_on_save"])
        problems.append(f"modules_to_save tensors changed on save: {changed}")
    result["passed"] = not problems
    if problems:
        raise MergeVerificationError("Merged model differs from base+adapter: " + "; ".join(problems))
    return result


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, dtype: str, tolerance: float) -> dict[str, Any]:
    """float32: absolute max |Δ|. bfloat16: max |Δ| over the largest |logit|, since bf16 error scales with value."""
    max_abs_diff = (actual - expected).abs().max().item()
    max_abs_logit = expected.abs().max().item()
    relative = dtype == "bfloat16"
    measured = max_abs_diff / max(max_abs_logit, 1e-12) if relative else max_abs_diff
    return {
        "dtype": dtype,
        "max_abs_diff": max_abs_diff,
        "max_abs_logit": max_abs_logit,
        "criterion": "relative to the largest |logit|" if relative else "absolute",
        "measured": measured,
        "tolerance": tolerance,
        "top1_agreement": (actual.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        "logits_passed": measured <= tolerance,
    }


def compare_saved_modules(merged: torch.nn.Module, reloaded: torch.nn.Module, names: list[str]) -> dict[str, Any]:
    """Every tensor of a ``modules_to_save`` module (trained in full, outside LoRA) must reload bit-identical."""
    before = merged.state_dict()
    after = reloaded.state_dict()
    keys = [key for key in before if any(f".{name}." in f".{key}" for name in names)]
    return {
        "modules": names,
        "tensors": len(keys),
        "changed_on_save": [key for key in keys if key not in after or not torch.equal(before[key], after[key])],
    }


class MergeVerificationError(RuntimeError):
    """The merged model does not reproduce base+adapter logits within tolerance."""

"""Merge verification on each architecture: LoRA plus a module trained in full (``modules_to_save``), in float32
and bfloat16, and a check that fails when the merge does not reproduce base+adapter; a merged model missing a
tensor is refused by the completeness check and by every load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, chat_encoder
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlm_pipeline.adapters import MergeVerificationError, merge_and_verify
from vlm_pipeline.architectures import load_model
from vlm_pipeline.config.schema import MergeTolerance
from vlm_pipeline.data.encoding import encode_record
from vlm_pipeline.data.formats import normalise_record
from vlm_pipeline.model_files import IncompleteModelError, check_full_model

# The module trained outside LoRA for each architecture: the vision-language projector of both VLMs, the head
# of the text model.
CASES = {
    "qwen2_5_vl": ("data/01_raw/shapes_vqa", "merger"),
    "mllama": ("data/01_raw/shapes_vqa", "multi_modal_projector"),
    "llama": ("data/01_raw/alpaca_glossary", "lm_head"),
}
TOLERANCE = MergeTolerance().model_dump()


def trained_adapter(base: Path, module: str, dest: Path) -> dict[str, torch.Tensor]:
    """A LoRA adapter with nonzero A and B and ``module`` changed as training would; returns that module's tensors."""
    torch.manual_seed(0)
    model = get_peft_model(
        load_model(base),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, modules_to_save=[module]
        ),
    )
    trained = {}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".modules_to_save.default." in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
                trained[name] = parameter.detach().clone()
    model.save_pretrained(dest)
    return trained


def check_rows(base: Path, raw: Path, count: int = 6) -> list[dict]:
    encoder = chat_encoder(base)
    lines = (raw / "test.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    records = [{**normalise_record(json.loads(line)), "source_line": i + 1} for i, line in enumerate(lines)]
    return [
        encode_record(encoder, record, raw, max_length=4096, train_on="all_assistant_turns", truncate_text_only=False)
        for record in records
    ]


@pytest.mark.parametrize("arch", list(CASES))
def test_merge_keeps_modules_to_save_and_matches_base_plus_adapter(arch, tiny_models, tmp_path):
    raw_name, module = CASES[arch]
    raw, base = PROJECT_ROOT / raw_name, tiny_models[arch]
    trained = trained_adapter(base, module, tmp_path / "adapter")
    rows = check_rows(base, raw)
    with safe_open(str(tmp_path / "adapter/adapter_model.safetensors"), "pt") as saved:
        assert any(module in key and "lora" not in key for key in saved.keys()), "the adapter holds the trained module"

    for dtype in ("float32", "bfloat16"):
        dest = tmp_path / f"merged-{dtype}"
        dest.mkdir()
        check = merge_and_verify(base, tmp_path / "adapter", base, rows, raw, dest, dtype=dtype, tolerance=TOLERANCE)
        assert check["passed"] and check["records"] == len(rows)
        assert check["modules_to_save"]["tensors"] == len(trained) and not check["modules_to_save"]["changed_on_save"]
        assert check["measured"] <= TOLERANCE[dtype] and check["top1_agreement"] > 0.9
        if dtype == "float32":
            assert check["max_abs_diff"] < 1e-4
        # The merged directory alone carries the trained module, not the base's copy.
        merged = load_model(dest, dtype=torch.float32).state_dict()
        for name, tensor in trained.items():
            key = name.replace("base_model.model.", "", 1).replace(".modules_to_save.default", "")
            atol = 0 if dtype == "float32" else 1e-2
            assert torch.allclose(merged[key], tensor, atol=atol), key
            assert not torch.allclose(merged[key], load_model(base).state_dict()[key], atol=1e-3), key

    # The merged model with a tensor cut out: its check names it, and no later stage can load it.
    merged_dir = tmp_path / "merged-float32"
    assert check_full_model(merged_dir, base)["matches_base"]
    tensors = load_file(merged_dir / "model.safetensors")
    cut = next(key for key in tensors if key.endswith("layers.0.mlp.down_proj.weight"))
    del tensors[cut]
    save_file(tensors, merged_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteModelError, match=r"1 tensor\(s\) missing: \S*layers\.0\.mlp\.down_proj\.weight$"):
        check_full_model(merged_dir, base)
    with pytest.raises(IncompleteModelError, match=r"1 tensor\(s\) missing from the checkpoint: \S*layers\.0\.mlp\."):
        load_model(merged_dir)


def merge_llama_adapter(base: Path, tmp_path: Path, dtype: str, tolerance: dict[str, float]) -> dict:
    """Train a tiny Llama adapter over ``base`` and merge it into ``tmp_path/merged``."""
    raw_name, module = CASES["llama"]
    trained_adapter(base, module, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    raw, merged = PROJECT_ROOT / raw_name, tmp_path / "merged"
    rows = check_rows(base, raw)
    return merge_and_verify(base, tmp_path / "adapter", base, rows, raw, merged, dtype=dtype, tolerance=tolerance)


def test_merge_check_fails_the_merge_beyond_tolerance(tiny_models, tmp_path):
    """The bf16 merge really differs from bf16 base+adapter by rounding: a tolerance below that must fail, naming
    the measured difference and the float32 remedy."""
    with pytest.raises(MergeVerificationError, match=r"max \|Δlogits\|.*relative.*merge_dtype=float32"):
        merge_llama_adapter(tiny_models["llama"], tmp_path, "bfloat16", {**TOLERANCE, "bfloat16": 1e-5})


def test_a_merge_that_loses_a_base_tensor_stops_naming_it(tiny_models, tmp_path):
    """The merge stage checks what it saved against the base checkpoint: a tensor the base holds and the loaded
    model drops (so the merged save lacks it) stops the merge, named."""
    base = tmp_path / "base"
    shutil.copytree(tiny_models["llama"], base)
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].clone()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteModelError, match=r"1 tensor\(s\) missing: model\.layers\.0\.mlp\.extra\.weight$"):
        merge_llama_adapter(base, tmp_path, "float32", TOLERANCE)

"""Node functions for the adapter stage. The merge logic lives in ``vlm_pipeline.adapters``."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from vlm_pipeline.adapters import copy_adapter, is_model_file, merge_and_verify
from vlm_pipeline.atomic import link_tree, staging_dir_for


def extract_adapter(trained_model: Path, method: dict) -> tuple[Path, dict]:
    """Stage the adapter files (safetensors + config) for the ``adapter`` dataset; return its summary."""
    staged = staging_dir_for(Path(method["output_dir"]) / "adapter")
    return staged, copy_adapter(trained_model, staged)


def merge_adapter(
    base_model: Path,
    adapter: Path,
    trained_model: Path,
    test_data: Dataset,
    raw_data: str,
    method: dict,
    params: dict,
    model: dict,
    trust_remote_code: bool = False,
) -> tuple[Path, dict]:
    """Merge into the base model and verify logits on the first ``merge_check_records`` test records."""
    staged = staging_dir_for(Path(method["output_dir"]) / "merged")
    rows = list(test_data.select(range(min(params["merge_check_records"], len(test_data)))))
    check = merge_and_verify(
        base_model,
        adapter,
        trained_model,
        rows,
        Path(raw_data),
        staged,
        dtype=params["merge_dtype"],
        tolerance=params["merge_tolerance"],
        attn_implementation=model["attn_implementation"],
        trust_remote_code=trust_remote_code,
    )
    return staged, check


def pass_through_full_model(trained_model: Path, method: dict) -> tuple[Path, dict]:
    """A full fine-tune is already a standalone model: hard-link its model files (not the logs beside them) into
    place as the merged model."""
    staged = link_tree(trained_model, staging_dir_for(Path(method["output_dir"]) / "merged"), only=is_model_file)
    return staged, {"method": "full_ft", "merged": False, "reason": "full fine-tuning has no adapter to merge"}

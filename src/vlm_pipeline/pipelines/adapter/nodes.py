"""Node functions for the adapter stage. The merge logic lives in ``vlm_pipeline.adapters``.

``vlm_pipeline.adapters`` and ``model_files`` import torch, transformers and PEFT: they are imported in the
functions that use them, so loading the pipeline registry (every ``kedro run``) does not pay for them."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset

from vlm_pipeline.atomic import link_tree
from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import AdapterParams


def extract_adapter(trained_model: Path, adapter_staging: Path) -> tuple[Path, dict]:
    """Stage the adapter files (safetensors + config) for the ``adapter`` dataset; return its summary."""
    from vlm_pipeline.adapters import copy_adapter

    return adapter_staging, copy_adapter(trained_model, adapter_staging)


def merge_adapter(
    context: RunContext,
    adapter: Path,
    trained_model: Path,
    test_data: Dataset,
    params: AdapterParams,
    merged_model_staging: Path,
) -> tuple[Path, dict]:
    """Merge into the base model and verify logits on the first ``merge_check_records`` test records."""
    from vlm_pipeline.adapters import merge_and_verify

    rows = list(test_data.select(range(min(params.merge_check_records, len(test_data)))))
    check = merge_and_verify(
        context.base_model,
        adapter,
        trained_model,
        rows,
        context.image_root,
        merged_model_staging,
        dtype=params.merge_dtype,
        tolerance=params.merge_tolerance.model_dump(),
        attn_implementation=context.model.attn_implementation,
        trust_remote_code=context.model.trust_remote_code,
    )
    return merged_model_staging, check


def pass_through_full_model(context: RunContext, trained_model: Path, merged_model_staging: Path) -> tuple[Path, dict]:
    """A full fine-tune is already a standalone model: hard-link its model files (not the logs beside them) into
    place as the merged model, once its tensors are checked against the base's (``IncompleteModelError``)."""
    from vlm_pipeline.adapters import is_model_file
    from vlm_pipeline.model_files import check_full_model

    check_full_model(trained_model, context.base_model)
    staged = link_tree(trained_model, merged_model_staging, only=is_model_file)
    return staged, {"method": "full_ft", "merged": False, "reason": "full fine-tuning has no adapter to merge"}

"""Stage 4: save the LoRA adapter and merge it into the base; a full fine-tune passes straight through."""

from vlm_pipeline.pipelines.adapter.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""Stage 2: tokenise with the model's chat template and processor, mask labels to assistant turns."""

from vlm_pipeline.pipelines.preprocessing.pipeline import create_pipeline

__all__ = ["create_pipeline"]

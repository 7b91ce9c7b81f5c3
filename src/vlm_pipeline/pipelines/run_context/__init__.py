"""The run context: the base model, the image folder and the loading options, as one typed input."""

from vlm_pipeline.pipelines.run_context.pipeline import create_pipeline

__all__ = ["create_pipeline"]

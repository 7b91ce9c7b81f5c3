"""The fine-tuned (merged) model as an MLflow model a user loads back:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")     # or "models:/vlm-pipeline-lora/1"
    model.predict([{"prompt": "What shape is this?", "image": "/data/shapes/test_0000.png"}])

It answers with the evaluation stage's own greedy generation (the checkpoint's chat template, stop tokens and
processor), so the answers are the ones in predictions.jsonl. Loading it needs vlm-pipeline installed (the model's
code is this module); the weights are the merged model folder, logged as the model's artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc


class FineTunedModel(mlflow.pyfunc.PythonModel):
    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens  # evaluation.max_new_tokens of the run that logged it

    def load_context(self, context) -> None:
        from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
        from vlm_pipeline.config.schema import PreprocessingParams

        path = Path(context.artifacts["model"])
        self.architecture = architecture_for_model(path)
        self.encoder = load_chat_encoder(path, PreprocessingParams())
        self.model = load_model(path).eval()

    def predict(self, model_input: list[dict[str, str]]) -> list[str]:
        """One answer per ``{"prompt": ..., "image": path}`` (``image`` only for a vision model)."""
        from vlm_pipeline.scoring import generate_answers

        records = []
        for row in model_input:
            image = row.get("image")
            content = [{"type": "image"}, {"type": "text", "text": row["prompt"]}] if image else row["prompt"]
            records.append(
                {
                    "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": ""}],
                    "images": [str(Path(image).resolve())] if image else [],
                }
            )
        return generate_answers(
            self.model,
            self.encoder,
            self.architecture,
            records,
            Path("/"),  # image paths above are absolute
            max_new_tokens=self.max_new_tokens,
            batch_size=1,
        )


def log_model(run_id: str, model_dir: Path, registered_name: str | None, max_new_tokens: int) -> None:
    """Log ``model_dir`` (a merged model folder) as the run's ``model``; register it as ``registered_name``."""
    import mlflow

    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=FineTunedModel(max_new_tokens),
            artifacts={"model": str(model_dir)},
            registered_model_name=registered_name,
        )

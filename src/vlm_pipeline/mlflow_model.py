"""The fine-tuned (merged) model as an MLflow model a user loads back:

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")     # or "models:/vlm-pipeline-lora/1"
    model.predict([{"prompt": "What shape is this?", "image": "/data/shapes/test_0000.png"}])

It answers with the evaluation stage's own greedy generation (the checkpoint's chat template, stop tokens and
processor), so the answers are the ones in predictions.jsonl. It is logged as MLflow "models from code", not as a
pickle: the logged model holds :mod:`vlm_pipeline.mlflow_model_code` (which hands a :class:`FineTunedModel` to
``mlflow.models.set_model``), ``max_new_tokens`` in its model config (the run's evaluation.max_new_tokens; a load
overrides it with ``load_model(uri, model_config={"max_new_tokens": 64})``), and the merged model folder as its
artifact. Loading it needs vlm-pipeline installed (that file imports this module).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc

# The file MLflow logs as the model's code (it calls mlflow.models.set_model).
MODEL_CODE = Path(__file__).with_name("mlflow_model_code.py")


class FineTunedModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
        from vlm_pipeline.config.schema import PreprocessingParams

        path = Path(context.artifacts["model"])
        # evaluation.max_new_tokens of the run that logged it (log_model's model_config)
        self.max_new_tokens = int(context.model_config["max_new_tokens"])
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
    from importlib.metadata import version

    import mlflow

    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),  # a path: models from code, nothing pickled
            artifacts={"model": str(model_dir)},
            model_config={"max_new_tokens": max_new_tokens},
            # Given, not inferred: MLflow infers requirements by loading the model in a subprocess, weights and all,
            # which for an 11B model costs minutes and its memory again.
            pip_requirements=[f"{name}=={version(name)}" for name in ("vlm-pipeline", "torch", "transformers")],
            registered_model_name=registered_name,
        )

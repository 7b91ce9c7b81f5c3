"""Kedro hooks: parameter checks as soon as the context exists, before pipelines, datasets or models load.

``after_context_created`` runs before Kedro imports the pipeline registry (and with it torch and transformers),
so a typo fails in about a second; ``before_pipeline_run`` checks again with the exact parameters the run got,
and logs them to the run's MLflow run flattened (``sft.num_train_epochs``, ``lora.method.learning_rate``): the
nodes receive typed sections, which kedro-mlflow would log only as one value per group.
"""

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from vlm_pipeline.config import check_parameters, validate_parameters


class ParameterChecks:
    def __init__(self) -> None:
        self.project_path = Path.cwd()

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        # config_loader, not context.params: the latter imports every pipeline (and torch) to validate them
        validate_parameters(context.config_loader["parameters"])

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        parameters = check_parameters(catalog.load("parameters"), self.project_path)
        import mlflow

        if mlflow.active_run() is not None:  # kedro-mlflow's hook (a plugin, so called first) started it
            mlflow.log_params(flatten(parameters.model_dump(mode="json")))


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameter groups as MLflow params: {"sft": {"seed": 42}} -> {"sft.seed": 42}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

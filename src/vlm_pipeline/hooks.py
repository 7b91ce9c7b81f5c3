"""Kedro hooks: parameter checks as soon as the context exists, before pipelines, datasets or models load.

``after_context_created`` runs before Kedro imports the pipeline registry (and with it torch and transformers),
so a misspelt ``--env``, a typo or a missing data folder fails in about a second, and it runs first
(``tryfirst``), before kedro-mlflow's hook opens the MLflow store; ``before_pipeline_run`` checks again with the
exact parameters the run got, and logs them to the run's MLflow run flattened (``sft.num_train_epochs``,
``lora.method.learning_rate``): the nodes receive typed sections, which kedro-mlflow would log only as one value
per group. The model folder is checked there too, before the MLflow run starts, and only when the run's nodes read
it: which nodes run is known only then.
"""

from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from vlm_pipeline.config import (
    check_base_model,
    check_environment,
    check_parameters,
    check_paths,
    validate_parameters,
)

# The catalog entry of the model folder: a run whose nodes read it must find a checkpoint there.
BASE_MODEL = "base_model"


class ParameterChecks:
    """Stops a run that cannot succeed before anything starts: each problem is one ConfigError line (see cli.py)."""

    def __init__(self) -> None:
        self.project_path = Path.cwd()

    @hook_impl(tryfirst=True)  # before kedro-mlflow's, which reads the configuration and opens the MLflow store
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        loader = context.config_loader
        check_environment(loader.conf_source, loader.env)
        # config_loader, not context.params: the latter imports every pipeline (and torch) to validate them
        check_paths(validate_parameters(loader["parameters"]), self.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        parameters = check_parameters(catalog.load("parameters"), self.project_path)
        import mlflow

        if mlflow.active_run() is not None:  # kedro-mlflow's hook (a plugin, so called first) started it
            mlflow.log_params(flatten(parameters.model_dump(mode="json")))


class BaseModelCheck:
    """``base_model`` is checked only by a run that reads it (preprocessing, training, adapter, evaluation): a
    data-validation-only run needs no model. The run's nodes are known only here, after the context exists. The
    model's family also settles ``sft.padding_free`` here: true for a family that cannot pack stops the run."""

    @hook_impl(tryfirst=True)  # before kedro-mlflow's starts the MLflow run
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        # By dataset name, bare or inside a namespace (``lora.base_model``), never by node name.
        if any(name.rpartition(".")[2] == BASE_MODEL for name in pipeline.inputs()):
            base_model, project = catalog.load(f"params:{BASE_MODEL}"), Path(run_params["project_path"])
            check_base_model(base_model, project)
            # The family decides whether its records can be packed: known from config.json, before anything runs.
            from vlm_pipeline.architectures import architecture_for_model  # torch: only runs that read the model

            sft = validate_parameters(catalog.load("parameters")).sft
            architecture_for_model(project / base_model).padding_free(sft.padding_free)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameter groups as MLflow params: {"sft": {"seed": 42}} -> {"sft.seed": 42}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class LibraryProgressBars:
    """Library progress bars in the Kedro process only on a terminal (see ``hide_library_bars_in_logs``)."""

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        from vlm_pipeline.library_bars import hide_library_bars_in_logs  # datasets: at run time

        hide_library_bars_in_logs()

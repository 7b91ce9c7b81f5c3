"""Kedro hooks: parameter checks as soon as the context exists, before pipelines, datasets or models load.

``after_context_created`` runs before Kedro imports the pipeline registry (and with it torch and transformers),
so a typo fails in about a second; ``before_pipeline_run`` checks again with the exact parameters the run got.
"""

from pathlib import Path

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
        check_parameters(catalog.load("parameters"), self.project_path)

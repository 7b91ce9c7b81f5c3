"""Kedro hooks: parameter checks before any node runs, so bad configuration fails in seconds."""

from pathlib import Path

from kedro.framework.hooks import hook_impl

from vlm_pipeline.config import check_parameters


class ParameterChecks:
    def __init__(self) -> None:
        self.project_path = Path.cwd()

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)

    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        check_parameters(catalog.load("parameters"), self.project_path)

"""Kedro hooks: parameter checks before any node runs, so bad configuration fails in seconds."""

from kedro.framework.hooks import hook_impl

from vlm_pipeline.config import check_parameters


class ParameterChecks:
    @hook_impl
    def before_pipeline_run(self, run_params, pipeline, catalog) -> None:
        check_parameters(catalog.load("parameters"))

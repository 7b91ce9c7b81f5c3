"""Kedro's CLI extension for this project (Kedro imports ``<package>.cli`` and its ``cli`` group overrides built-in
commands): ``kedro run`` with vlm-pipeline's own errors as one line.

``run`` here is Kedro's own ``run`` command (the same options and callback, so ``dvc repro``, ``--params`` and
``--config`` behave as before) plus ``--verbose``. An error raised on purpose by vlm-pipeline (a ConfigError from
the parameter checks, a DataValidationError over the reject budget, a PlanError over the GPU budget, a
TrainingLaunchError) already says what is wrong and what to do, so it prints as ``PlanError: ...`` and the hint to
use ``--verbose``, without the traceback; exit status 2 for a configuration mistake, 1 for a run that failed. A
misspelt ``--pipelines`` name is one line listing the registered pipelines, exit status 2. Any other exception is
a bug and keeps Kedro's full traceback, as does every error with ``--verbose`` (or with Kedro's own
``KedroCliError.VERBOSE_ERROR`` set).
"""

from __future__ import annotations

from typing import IO, Any

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.cli.utils import KedroCliError

from vlm_pipeline.commands import is_input_error, is_own_error


class RunStopped(KedroCliError):
    """One of vlm-pipeline's errors, shown as Kedro shows a CLI error: its message and the --verbose hint."""

    def __init__(self, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.exit_code = 2 if is_input_error(error) else 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.secho(f"{self.message}\nRun with --verbose to see the full exception", fg="yellow", err=True)


class UnknownPipeline(KedroCliError):
    """``--pipelines`` names a pipeline that is not registered: one line listing those that are, exit status 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.secho(self.message, fg="yellow", err=True)


def _run(verbose: bool, **options: Any) -> Any:
    """Kedro's run; an error of ours becomes RunStopped (click prints it and exits), anything else propagates."""
    try:
        return kedro_run.callback(**options)
    except Exception as error:
        unknown = _unknown_pipelines(options)  # Kedro's own error for a misspelt name is a 40-line traceback
        if unknown and not (verbose or KedroCliError.VERBOSE_ERROR):
            raise UnknownPipeline(unknown) from error
        if verbose or KedroCliError.VERBOSE_ERROR or not is_own_error(error):
            raise
        raise RunStopped(error) from error


def _unknown_pipelines(options: dict[str, Any]) -> str | None:
    """After a failed run: the requested pipeline names that are not registered, as the line to print, or None.
    Asked only once the run has failed, when Kedro has loaded the registry (so a run starts no slower)."""
    from kedro.framework.project import pipelines

    requested = [*(options.get("pipelines") or []), *([options["pipeline"]] if options.get("pipeline") else [])]
    if not requested:
        return None
    try:
        registered = sorted(pipelines.keys())
    except Exception:  # the registry itself fails to load: that error, with its traceback, is the one to show
        return None
    missing = [name for name in requested if name not in registered]
    if not missing:
        return None
    return f"no pipeline named {', '.join(map(repr, missing))}; registered: {', '.join(registered)}"


VERBOSE = click.Option(
    ["--verbose", "-v"], is_flag=True, help="Show the traceback of vlm-pipeline's own errors too (a bug always has it)."
)


@click.group(name="vlm_pipeline")
def cli() -> None:
    """vlm-pipeline's project commands (they override Kedro's built-in ones of the same name)."""


cli.add_command(
    click.Command(
        name="run",
        context_settings=kedro_run.context_settings,
        callback=_run,
        params=[*kedro_run.params, VERBOSE],
        help=kedro_run.help,
        short_help=kedro_run.short_help,
    )
)

"""What a Kedro run's MLflow run records besides kedro-mlflow's parameters and metrics: enough to find it, trust it
and reproduce it.

kedro-mlflow starts the run (named after the pipeline) and logs the parameters; this hook then gives it

* a name saying variant, model and time (``lora · tiny-qwen2_5_vl · 2026-11-29 21:40``), and tags for the git
  commit (MLflow's own ``mlflow.source.git.commit``), the conf environment, the Kedro tags (the DVC stage) and the
  DVC experiment (``DVC_EXP_NAME``, which ``dvc exp run`` sets for its stages);
* when it is one stage of a chain (``--tags``, as each DVC stage runs), the stage in its name and a parent run
  shared by the chain's stages (``chain_run``), so the UI shows one ``dvc repro`` as one run with its stages;
* the experiment tag that opens it in the MLflow UI's model-training view rather than the GenAI view;
* the evaluation's verdict as soon as evaluation_details.json is saved (``vlm_pipeline.verdict``: ``ok`` or
  ``not better``, and the reasons in ``vlm_pipeline.verdict.reasons``), so a run that failed on
  ``evaluation.fail_if_worse`` carries it too;
* at the end, the input datasets the run read or wrote (``valid.jsonl`` of each split, with their SHA-256 digests),
  the evaluation's predictions as an MLflow table, and the merged model it made as an MLflow model
  (:mod:`vlm_pipeline.mlflow_model`), registered when mlflow.yml names a registry URI.

The run id is kept from the start: kedro-mlflow ends the run in its own ``after_pipeline_run``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

logger = logging.getLogger(__name__)
# MLflow 3's UI picks the experiment's view from this tag; without it a new experiment opens in the GenAI view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The datasets logged as run inputs, with the MLflow input context each is used in.
INPUT_DATASETS = {"train_records": "training", "test_records": "evaluation"}
# The tag naming a chain's parent run (``chain_run``): a digest of what makes two stages one chain.
CHAIN_TAG = "vlm_pipeline.chain"
# The evaluation's verdict on the tuned model (scoring.tuned_verdict): "ok" or "not better", and why.
VERDICT_TAG = "vlm_pipeline.verdict"


class RunDetails:
    def __init__(self) -> None:
        self.project_path = Path.cwd()
        self.env: str | None = None
        self.run_id: str | None = None
        self.registry_uri: str | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        self.env = context.env
        self.registry_uri = context.config_loader["mlflow"].get("server", {}).get("mlflow_registry_uri")

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        self.run_id = run.info.run_id
        variant = _pipeline_name(run_params)
        model = _model_name(catalog)
        tags = {
            "mlflow.runName": f"{variant} · {model} · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "vlm_pipeline.variant": variant,
            "vlm_pipeline.base_model": model,
            "kedro.env": self.env or run_params.get("env") or "local",
            "kedro.tags": ",".join(sorted(run_params.get("tags") or [])) or "all",
            "runner": _runner_name(run_params.get("runner")),
        }
        commit = git_commit(self.project_path)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        stage = tags["kedro.tags"]
        if run_params.get("tags"):  # one stage of a chain (a DVC stage): nested under the chain's run
            tags["mlflow.runName"] = f"{variant} · {stage} · {model} · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
            parameters = catalog.load("parameters")
            tags["mlflow.parentRunId"] = chain_run(run.info.experiment_id, variant, model, commit, parameters)
        mlflow.set_tags(tags)
        logger.info("MLflow run '%s' (%s)", tags["mlflow.runName"], self.run_id)
        mlflow.MlflowClient().set_experiment_tag(run.info.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self.run_id is None or not dataset_name.endswith(".evaluation_details"):
            return
        import mlflow

        verdict = data["verdict"]
        tags = {VERDICT_TAG: verdict["status"]}
        if verdict["reasons"]:
            tags[f"{VERDICT_TAG}.reasons"] = "; ".join(verdict["reasons"])
        for key, value in tags.items():
            mlflow.MlflowClient().set_tag(self.run_id, key, value)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from vlm_pipeline.config import validate_parameters
        from vlm_pipeline.mlflow_model import log_model  # mlflow.pyfunc: imported only when a run ends

        if self.run_id is None:
            return
        names = pipeline.datasets()
        log_inputs(self.run_id, {name: context for name, context in INPUT_DATASETS.items() if name in names}, catalog)
        for name in sorted(names):
            if name.endswith(".predictions") and catalog.exists(name):
                # Validated image paths are relative to the project folder.
                log_predictions(self.run_id, catalog.load(name), name.split(".")[0], catalog.load("project_folder"))
        for name in sorted(pipeline.all_outputs()):  # the run that made the merged model logs it, once
            if not name.endswith(".merged_model"):
                continue
            # Parameters arrive typed only where a node's annotation asks for them: validate here as well.
            params = validate_parameters(catalog.load("parameters"))
            if params.adapter.log_model:
                default = f"vlm-pipeline-{name.split('.')[0]}"
                registered = (params.adapter.registered_model_name or default) if self.registry_uri else None
                log_model(self.run_id, catalog.get(name).path, registered, params.evaluation.max_new_tokens)
        self.run_id = None


def chain_run(experiment_id: str, variant: str, model: str, commit: str | None, parameters: dict) -> str:
    """The id of the parent run that the stages of one chain share, created by the first of them.

    DVC runs each stage as its own ``kedro run --tags <stage>``, so each is its own MLflow run; this groups them.
    A chain is one variant at one commit (``-dirty`` aside: dvc.lock changes between stages) with the same
    parameters (environment, paths, every value) in the same DVC experiment: the stages of one ``dvc repro`` or
    ``dvc exp run``. Running it again adds its stages to the same parent."""
    from mlflow import MlflowClient

    experiment = os.environ.get("DVC_EXP_NAME")
    identity = json.dumps(
        [variant, (commit or "").removesuffix("-dirty"), experiment, parameters], sort_keys=True, default=str
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{CHAIN_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    revision = experiment or (commit[:8] if commit else "no git")
    parent = client.create_run(
        experiment_id,
        run_name=f"{variant} · {model} · {revision} (DVC stages)",
        tags={
            CHAIN_TAG: key,
            "vlm_pipeline.variant": variant,
            "vlm_pipeline.base_model": model,
            **({"mlflow.source.git.commit": commit} if commit else {}),
            **({"dvc.experiment": experiment} if experiment else {}),
        },
    )
    client.set_terminated(parent.info.run_id)  # holds no work of its own; its stages report their own status
    return parent.info.run_id


def active_run_target() -> tuple[str, str] | None:
    """(tracking URI, run id) of the MLflow run kedro-mlflow started for this Kedro run, or None without one."""
    import mlflow

    run = mlflow.active_run()
    return (mlflow.get_tracking_uri(), run.info.run_id) if run is not None else None


def git_commit(project_path: Path) -> str | None:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it; None outside a git clone."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_path, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_path,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_inputs(run_id: str, datasets: dict[str, str], catalog) -> None:
    """Each dataset file that exists as an MLflow run input (name, local source, digest, context)."""
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name, context in datasets.items():
        path = catalog.get(name).filepath.resolve()
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            # Two registered sources accept a local path and MLflow warns it picks the first; both are the file.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(path))
        dataset = MetaDataset(source, name=name, digest=file_digest(path)[:16])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
    if inputs:
        MlflowClient().log_inputs(run_id, datasets=inputs)


def log_predictions(run_id: str, predictions: Any, variant: str, image_root: Path) -> None:
    """The evaluation's predictions as an MLflow table (browsable and comparable in the UI's artifact view), and
    beside it a sample of the wrong answers with their images (``image_root``: where the image paths start)."""
    import mlflow

    from vlm_pipeline.reporting.mistakes import wrong_answer_table

    rows = list(predictions)
    if not rows:
        return
    columns = {key: [_cell(row.get(key)) for row in rows] for key in rows[0]}
    mlflow.log_table(columns, artifact_file=f"evaluation/{variant}_predictions.json", run_id=run_id)
    wrong = wrong_answer_table(rows, image_root)
    if wrong["line"]:
        mlflow.log_table(wrong, artifact_file=f"evaluation/{variant}_wrong_answers.json", run_id=run_id)


def _cell(value: Any) -> Any:
    """Table cells are scalars: nested values (a prompt's content parts, image lists) as their JSON text."""
    return value if isinstance(value, str | int | float | bool | type(None)) else json.dumps(value)


def _runner_name(runner: Any) -> str:
    """kedro-mlflow tags the runner as Kedro passes it: an object's repr, or "None" for the default. Its class name
    is what a person filters on."""
    if runner is not None and not isinstance(runner, str):
        return type(runner).__name__
    found = re.search(r"(\w*Runner)\b", runner or "")
    return found.group(1) if found else "SequentialRunner"


def _pipeline_name(run_params: dict[str, Any]) -> str:
    names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
    return ",".join(name or "__default__" for name in names)


def _model_name(catalog) -> str:
    """The base model folder's name, from the catalog's ``base_model`` entry (no weights are read)."""
    try:
        return catalog.get("base_model").path.name
    except Exception:  # noqa: BLE001 - a run without a base model entry still gets a name
        return "no-model"

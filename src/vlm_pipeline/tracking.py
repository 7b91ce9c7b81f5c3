"""What a Kedro run's MLflow run records besides kedro-mlflow's parameters and metrics: enough to find it, trust it
and reproduce it.

kedro-mlflow starts the run (named after the pipeline) and logs the parameters; this hook then gives it

* a name saying variant, model and time (``lora · tiny-qwen2_5_vl · 2026-11-29 21:40``), and tags for the git
  commit (MLflow's own ``mlflow.source.git.commit``), the conf environment, the Kedro tags (the DVC stage) and the
  DVC experiment (``DVC_EXP_NAME``, which ``dvc exp run`` sets for its stages);
* when it is one stage of a chain (``--tags``, as each DVC stage runs), the stage in its name and a parent run
  shared by the chain's stages (``chain_run``), so the UI shows one ``dvc repro`` as one run with its stages; the
  parent holds the chain's key parameters and data digests (``chain_params``) and each stage's final metrics;
* Kedro's run parameters, which kedro-mlflow tags as Python reprs (``('evaluation',)``), as plain strings;
* the experiment tag that opens it in the MLflow UI's model-training view rather than the GenAI view;
* the evaluation's verdict as soon as evaluation_details.json is saved (``vlm_pipeline.verdict``: ``ok`` or
  ``not better``, and the reasons in ``vlm_pipeline.verdict.reasons``), so a run that failed on
  ``evaluation.fail_if_worse`` carries it too;
* at the end, the input datasets the run read or wrote (``valid.jsonl`` of each split, with their SHA-256 digests),
  the evaluation's predictions as an MLflow table, and the merged model it made as an MLflow model
  (:mod:`vlm_pipeline.mlflow_model`), registered when mlflow.yml names a registry URI.

The run id is kept from the start: kedro-mlflow ends the run in its own ``after_pipeline_run``.

When the context is created it also makes the project's own MLflow store follow the project folder
(``follow_project``): a moved or copied project reads and writes its artifacts in its own ``mlruns``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
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
# The experiment tag naming the project folder that the store's local artifact paths point into (follow_project).
PROJECT_TAG = "vlm_pipeline.project_path"
# Where MLflow's SQL store records artifact locations: experiments, runs, logged and registered models, traces.
# The training settings a chain's parent run shows (sft.<name>), beside the method's.
CHAIN_SFT_PARAMS = (
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "max_tokens_per_batch",
    "gradient_accumulation_steps",
    "padding_free",
)
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
    ("trace_tags", "value"),
)


class RunDetails:
    def __init__(self) -> None:
        self.project_path = Path.cwd()
        self.env: str | None = None
        self.run_id: str | None = None
        self.registry_uri: str | None = None
        # A chain stage's parent run, and what finds it once the stage has made the chain's data (see below).
        self.parent_run_id: str | None = None
        self.chain: tuple[str, str, str, str | None] | None = None

    @hook_impl
    def after_context_created(self, context) -> None:
        self.project_path = Path(context.project_path)
        self.env = context.env
        self.registry_uri = context.config_loader["mlflow"].get("server", {}).get("mlflow_registry_uri")
        # kedro-mlflow (a plugin hook, so called before this project hook) has set up the store and experiment.
        mlflow_config = getattr(context, "mlflow", None)
        if mlflow_config is not None:
            tracking = mlflow_config.server.mlflow_tracking_uri
            follow_project(self.project_path, tracking, mlflow_config.tracking.experiment.name)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        import mlflow

        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline
            return
        self.run_id = run.info.run_id
        self.parent_run_id = self.chain = None
        variant = _pipeline_name(run_params)
        model = _model_name(catalog)
        tags = {
            "mlflow.runName": f"{variant} · {model} · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "vlm_pipeline.variant": variant,
            "vlm_pipeline.base_model": model,
            "kedro.env": self.env or run_params.get("env") or "local",
            "kedro.tags": ",".join(sorted(run_params.get("tags") or [])) or "all",
            "runner": _runner_name(run_params.get("runner")),
            **plain_run_param_tags(run_params),
        }
        commit = git_commit(self.project_path)
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
        stage = tags["kedro.tags"]
        if run_params.get("tags"):  # one stage of a chain (a DVC stage): nested under the chain's run
            tags["mlflow.runName"] = f"{variant} · {stage} · {model} · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
            self.chain = (run.info.experiment_id, variant, model, commit)
            # The chain is known by its data: a stage that writes the splits (data validation) joins it at its end.
            if not set(INPUT_DATASETS) & pipeline.all_outputs():
                self.parent_run_id = tags["mlflow.parentRunId"] = self._join_chain(catalog)
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
        for run_id in filter(None, (self.run_id, self.parent_run_id)):  # the chain's run shows its verdict too
            for key, value in tags.items():
                mlflow.MlflowClient().set_tag(run_id, key, value)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from vlm_pipeline.config import validate_parameters
        from vlm_pipeline.mlflow_model import log_model  # mlflow.pyfunc: imported only when a run ends

        if self.run_id is None:
            return
        if self.chain is not None:
            self._end_chain_stage(catalog)
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
        self.run_id = self.parent_run_id = self.chain = None

    def _join_chain(self, catalog) -> str:
        experiment_id, variant, model, commit = self.chain
        digests = data_digests(catalog)
        return chain_run(experiment_id, variant, model, commit, catalog.load("parameters"), digests)

    def _end_chain_stage(self, catalog) -> None:
        """Nest a stage that made the chain's data under its chain now, and give the parent the stage's final
        metrics (training loss after training, the evaluation's numbers after evaluation)."""
        from mlflow import MlflowClient

        client = MlflowClient()
        if self.parent_run_id is None:
            self.parent_run_id = self._join_chain(catalog)
            client.set_tag(self.run_id, "mlflow.parentRunId", self.parent_run_id)
            for key, value in client.get_run(self.run_id).data.tags.items():  # set before the parent was known
                if key.startswith(VERDICT_TAG):
                    client.set_tag(self.parent_run_id, key, value)
        copy_final_metrics(client, self.run_id, self.parent_run_id)
        client.set_terminated(self.parent_run_id)  # its end time: the chain's last stage so far


def chain_run(
    experiment_id: str, variant: str, model: str, commit: str | None, parameters: dict, data: dict[str, str]
) -> str:
    """The id of the parent run that the stages of one chain share, created by the first of them.

    DVC runs each stage as its own ``kedro run --tags <stage>``, so each is its own MLflow run; this groups them.
    A chain is one variant at one commit (``-dirty`` aside: dvc.lock changes between stages) with the same
    parameters (environment, paths, every value) on the same data (``data``: the digests of the validated splits)
    in the same DVC experiment: the stages of one ``dvc repro`` or ``dvc exp run``. A rerun after a change of
    data or parameters is a new chain; a stage rerun on the same inputs joins its chain. DVC reruns only stale
    stages, so a chain may hold only the stages a change made stale (an evaluation parameter: evaluation alone)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from vlm_pipeline.config import validate_parameters

    experiment = os.environ.get("DVC_EXP_NAME")
    identity = json.dumps(
        [variant, (commit or "").removesuffix("-dirty"), experiment, parameters, data], sort_keys=True, default=str
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    client = MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{CHAIN_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    revision = experiment or (commit[:8] if commit else "no git")
    parent = client.create_run(
        experiment_id,
        run_name=f"{variant} · {model} · {revision} · {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (DVC stages)",
        tags={
            CHAIN_TAG: key,
            "vlm_pipeline.variant": variant,
            "vlm_pipeline.base_model": model,
            **({"mlflow.source.git.commit": commit} if commit else {}),
            **({"dvc.experiment": experiment} if experiment else {}),
        },
    )
    values = chain_params(variant, validate_parameters(parameters), data)
    client.log_batch(parent.info.run_id, params=[Param(name, value) for name, value in values.items()])
    client.set_terminated(parent.info.run_id)  # holds no work of its own; its stages report their own status
    return parent.info.run_id


def chain_params(variant: str, params: Any, data: dict[str, str]) -> dict[str, str]:
    """What tells one chain from another at a glance: the base model, the method and its learning rate, the
    training length and batch, and the data digests. Keys and values as kedro-mlflow logs them on the stages."""
    values = {
        "base_model": params.base_model,
        **{f"sft.{name}": getattr(params.sft, name) for name in CHAIN_SFT_PARAMS},
        **{f"data.{name}.digest": digest for name, digest in data.items()},
    }
    section = getattr(params, variant, None)
    if section is not None:
        method = section.method
        quantized = method.quantization is not None and (
            method.quantization.load_in_4bit or method.quantization.load_in_8bit
        )
        values["method"] = "full fine-tuning" if method.lora is None else "QLoRA" if quantized else "LoRA"
        values[f"{variant}.method.learning_rate"] = method.learning_rate
        if method.lora is not None:
            values[f"{variant}.method.lora.r"] = method.lora.r
    return {key: str(value) for key, value in values.items()}


def copy_final_metrics(client: Any, run_id: str, parent_run_id: str) -> None:
    """Each metric's last value on ``run_id`` logged to ``parent_run_id`` (step 0: a later stage's value is newer)."""
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = client.get_run(run_id).data.metrics
    items = [Metric(key, value, now, 0) for key, value in sorted(metrics.items())]
    for start in range(0, len(items), 1000):  # MLflow's batch limit
        client.log_batch(parent_run_id, metrics=items[start : start + 1000])


def data_digests(catalog) -> dict[str, str]:
    """The validated splits' digests (``dataset_digest``), by catalog name; a split not yet made is left out."""
    paths = {name: catalog.get(name).filepath for name in INPUT_DATASETS}
    return {name: dataset_digest(path) for name, path in paths.items() if path.is_file()}


def follow_project(project_path: Path, tracking_uri: str, experiment_name: str) -> None:
    """Point the store's local artifact paths into this project folder when the project has moved or been copied.

    MLflow records a local artifact location as an absolute path: it resolves a relative one against the working
    directory when the experiment is made (mlflow#7670) and copies the experiment's into every run and logged
    model; only a tracking server's proxied ``mlflow-artifacts:`` URIs are free of the folder. A project's own
    sqlite store (mlflow.yml's default) sits in the project beside its ``mlruns``, so both move together: the
    experiment tag ``PROJECT_TAG`` records the folder the paths point into, and when it is another folder its
    prefix is rewritten to this one. A store outside the project (a server, a shared database) is left alone."""
    from mlflow import MlflowClient

    store = _project_sqlite_file(tracking_uri, project_path)
    experiment = MlflowClient().get_experiment_by_name(experiment_name) if store else None
    if experiment is None:
        return
    here = project_path.resolve()
    recorded = experiment.tags.get(PROJECT_TAG)
    if recorded == str(here):
        return
    if recorded:
        moved = relocate_artifact_paths(store, Path(recorded), here)
        logger.info("The project moved from %s: %d artifact locations in %s now point here", recorded, moved, store)
    MlflowClient().set_experiment_tag(experiment.experiment_id, PROJECT_TAG, str(here))


def relocate_artifact_paths(store: Path, old: Path, new: Path) -> int:
    """Rewrite the local artifact paths under ``old`` to ``new`` in a sqlite MLflow store (plain paths and
    ``file://`` URIs alike); returns how many values changed. MLflow has no API to change a recorded location."""
    prefixes = ((f"{old}/", f"{new}/"), (f"{old.as_uri()}/", f"{new.as_uri()}/"))
    changed = 0
    with sqlite3.connect(store) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in ARTIFACT_COLUMNS:
            if table not in tables:
                continue
            for before, after in prefixes:  # table and column names come from ARTIFACT_COLUMNS, values bound
                changed += connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (after, len(before) + 1, len(before), before),
                ).rowcount
    return changed


def plain_run_param_tags(run_params: dict[str, Any]) -> dict[str, str]:
    """kedro-mlflow tags each Kedro run parameter with a value as ``str(value)``: a tuple of tags reads
    ``('evaluation',)``. The same tags with lists comma-joined and mappings as JSON, so a filter matches
    ``tags.tags = 'evaluation'``."""
    plain = {}
    for key, value in run_params.items():
        if value and isinstance(value, list | tuple | set | frozenset):
            plain[key] = ",".join(map(str, sorted(value) if isinstance(value, set | frozenset) else value))
        elif value and isinstance(value, dict):
            plain[key] = json.dumps(value, sort_keys=True, default=str)
    return plain


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


def dataset_digest(path: Path) -> str:
    """A dataset file's digest as the run inputs and the chain runs show it: its SHA-256's first 16 digits."""
    return file_digest(path)[:16]


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
        dataset = MetaDataset(source, name=name, digest=dataset_digest(path))
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


def _project_sqlite_file(tracking_uri: str, project_path: Path) -> Path | None:
    """The sqlite file of a ``sqlite:`` tracking URI when it lies inside the project folder, else None."""
    from sqlalchemy.engine import make_url

    if not tracking_uri.startswith("sqlite:"):
        return None
    database = make_url(tracking_uri).database
    path = Path(database).resolve() if database else None  # a relative one is relative to the cwd, as in sqlite
    return path if path is not None and path.is_relative_to(project_path.resolve()) else None


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

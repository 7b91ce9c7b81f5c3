"""Shared fixtures: tiny models built once per session, and throw-away copies of the Kedro project."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import offline
import pytest

# `make test` runs the suite in pytest-xdist workers, one per core: one intra-op thread each (torch, and the
# kedro/accelerate subprocesses a test starts, read OMP_NUM_THREADS), so workers do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# Modules whose tests run a minute or more each (docs/testing.md), started before the other slow ones.
LONGEST_FIRST = ("test_dvc.py", "test_resume.py", "test_gpu_bench.py", "test_bench.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, the longest of them before the rest (a stable sort: each keeps its order among its
    kind). `make test` (--dist loadgroup) hands the workers one test at a time in this order, after the
    `torch_distributed_ports` group (xdist starts the largest groups first), so the quick ones fill the workers'
    last minutes instead of one worker ending on a long test alone."""

    def order(item: pytest.Item) -> tuple[bool, int]:
        name = item.path.name
        return item.get_closest_marker("slow") is None, (
            LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        )

    items.sort(key=order)


def live_servers(model: Path | None = None) -> list[str]:
    """Command lines of the live `transformers serve` processes this pytest process started, itself or through a
    Kedro stage (known by the PYTEST_XDIST_WORKER they inherited); with ``model``, only those serving that folder."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    found = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, not a process folder, or another user's
            continue
        if "serve" not in words or not any(word.endswith("/transformers") for word in words[:2]):
            continue
        if model is not None and str(model) not in words:
            continue
        # Started under this worker, or (no xdist) under any pytest: pytest sets PYTEST_VERSION for its process.
        mine = (
            f"PYTEST_XDIST_WORKER={worker}".encode() in environment
            if worker
            else any(variable.startswith(b"PYTEST_VERSION=") for variable in environment)
        )
        if mine:
            found.append(" ".join(words))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_server_outlives_the_session() -> Iterator[None]:
    """No `transformers serve` started by this session's tests or stages is left running when it ends."""
    yield
    assert live_servers() == [], "a server outlived the tests that started it"


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", ".telemetry", "dvc.yaml", "params.yaml", ".dvcignore", "README.md")
PROJECT_DIRS = ("conf", "data/01_raw", "src")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Every registered architecture's tiny twin, built offline with the project's own builder (seed 0)."""
    from vlm_pipeline.architectures import ARCHITECTURES

    root = tmp_path_factory.mktemp("models")
    return {name: architecture.build_tiny(root / name, 0) for name, architecture in ARCHITECTURES.items()}


def copy_project(dest: Path) -> Path:
    """A copy of the project's config and raw data, where a run may write freely."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def run_data_stages(project: Path, env: str = "base", **params) -> Path:
    """Validation and preprocessing of a project copy in a real Kedro session; returns data/03_primary."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"  # never the developer's store
    try:
        with KedroSession.create(project_path=project, env=env, runtime_params=params) as session:
            session.run(pipeline_names=["lora"], tags=["data_validation", "preprocessing"])
    finally:
        while mlflow.active_run():  # kedro-mlflow ends its run in another thread (thread-local run stack)
            mlflow.end_run()
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
    return project / "data/03_primary"


# Step counts shrunk through run-time parameters; everything else is the committed configuration.
SHORT_TRAINING = {"sft": {"max_steps": 12, "logging_steps": 2, "save_steps": 6}}


def run_kedro(project: Path, pipeline: str, env: str = "base", short: bool = True, **params) -> None:
    """One pipeline of a project copy in a real Kedro session (as ``kedro run --pipeline P --params ...``)."""
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    runtime = {**(SHORT_TRAINING if short else {}), **params}
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime) as session:
        session.run(pipeline_names=[pipeline])
    # kedro-mlflow ends the run from another thread; MLflow's active-run stack is thread-local, so this
    # (test-only) process still points at the finished run. Drop it so the next session starts its own.
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def short_lora_run(tmp_path_factory, tiny_models) -> Path:
    """The demo project after one shortened `lora` chain (SHORT_TRAINING) on the default tiny Qwen2.5-VL, with its
    own MLflow store. Built once for the whole run: the first worker to need it builds it, under a lock in the
    folder the xdist workers share (xdist's own recipe for a once-only session fixture; filelock comes with
    huggingface_hub). Tests that need a finished run copy it (``copy_run``) instead of training again."""
    from filelock import FileLock

    shared = (
        tmp_path_factory.getbasetemp().parent
        if os.environ.get("PYTEST_XDIST_WORKER")
        else tmp_path_factory.getbasetemp()
    )
    project = shared / "short_lora_run"
    with FileLock(str(shared / "short_lora_run.lock")):
        if not (project / "data/08_reporting/lora/metrics.json").is_file():
            shutil.rmtree(project, ignore_errors=True)  # a build that failed halfway
            copy_project(project)
            shutil.copytree(tiny_models["qwen2_5_vl"], project / "data/00_base_models/tiny-qwen2_5_vl")
            with pytest.MonkeyPatch.context() as patch:  # undone when the run ends, as the project fixture's are
                patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
                patch.chdir(project)  # the catalog's relative paths, as `kedro run` in the project folder
                # Its merged model is served by test_serving itself; the chain tests own the check's claim.
                run_kedro(project, "lora", evaluation={"serving_check": False})
    return project


def copy_run(run: Path, dest: Path, *, tracking: bool = True) -> Path:
    """A copy of a finished run's project to change freely. Its MLflow store still names the original's artifact
    folder (runs read from there); ``tracking=False`` leaves the store out, for a test that logs new runs."""
    ignore = None if tracking else shutil.ignore_patterns("mlflow.db", "mlruns")
    return Path(shutil.copytree(run, dest, ignore=ignore, symlinks=True))


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project copy as the working directory, with its own MLflow store (sqlite in the temp dir)."""
    root = copy_project(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    return root


def chat_encoder(model_dir: Path, **preprocessing):
    """The encoder preprocessing builds for ``model_dir``: the schema's preprocessing defaults, overridden."""
    from vlm_pipeline.architectures import load_chat_encoder
    from vlm_pipeline.config.schema import PreprocessingParams

    return load_chat_encoder(model_dir, PreprocessingParams(**preprocessing))


def run_context(model_dir: Path, image_root: Path, **model):
    """The typed run context the pipeline's model stages receive (what build_run_context returns)."""
    from vlm_pipeline.config.run import RunContext
    from vlm_pipeline.config.schema import ModelParams

    return RunContext(base_model=Path(model_dir), image_root=Path(image_root), model=ModelParams(**model))


def trainer_run_config(
    *,
    base_model: Path,
    train_dataset: Path,
    image_root: Path,
    output_dir: Path,
    final_dir: Path,
    sft: dict,
    method: dict,
    model: dict | None = None,
    eval_dataset: Path | None = None,
    image_bounds: dict | None = None,
):
    """The trainer's RunConfig as the training stage builds it, from plain test values; checkpoints go to
    ``output_dir/checkpoints/<identity>``."""
    from vlm_pipeline.config.schema import ImageBounds, MethodParams, SFTParams
    from vlm_pipeline.training.launcher import resolve_run_config

    return resolve_run_config(
        context=run_context(base_model, image_root, **(model or {})),
        train_dataset=Path(train_dataset),
        eval_dataset=eval_dataset,
        image_bounds=ImageBounds(**(image_bounds or {})),
        sft=SFTParams(**sft),
        method=MethodParams(**method),
        checkpoint_root=Path(output_dir) / "checkpoints",
        final_dir=Path(final_dir),
    )


def launched_run_config(
    out: Path,
    base_model: Path,
    data: Path,
    image_root: Path,
    accelerate_config: str,
    per_device: int,
    method: dict | None = None,
    **sft,
) -> Path:
    """A short full fine-tuning run (lr 1e-3 unless ``method`` says otherwise, 1 epoch, loss logged each step, no
    checkpoints unless ``sft`` asks), written to ``out/run_config.json`` for ``accelerate launch`` or torchrun; the
    model goes to ``out/final``."""
    from vlm_pipeline.training.launcher import write_run_config

    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    config = trainer_run_config(
        base_model=base_model,
        train_dataset=data,
        image_root=image_root,
        output_dir=out,
        final_dir=final,
        sft={
            "seed": 0,
            "num_train_epochs": 1,
            "per_device_train_batch_size": per_device,
            "logging_steps": 1,
            "save_steps": 1000,
            "dataloader_pin_memory": False,
            "accelerate_config": accelerate_config,
            **sft,
        },
        method=method or {"learning_rate": 1e-3},
    )
    return write_run_config(config, out / "run_config.json")


@pytest.fixture
def network_blocked(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """The network blocked for this test's processes (``tests/offline.py``): in this process, and through the
    environment in every Python process it starts. Returns the log of attempts; any attempt fails the test, but for
    the tolerated hosts (``offline.TOLERATED``: blocked too, nothing the run needs)."""
    folder = tmp_path_factory.mktemp("offline")
    log = folder / "attempts.log"
    for name, value in offline.child_environment(folder, log).items():
        monkeypatch.setenv(name, value)
    offline.block(log)
    try:
        yield log
    finally:
        offline.unblock()
    tried = offline.untolerated(log)
    assert not tried, "a process of this test tried the network:\n" + "\n".join(map(offline.describe, tried))

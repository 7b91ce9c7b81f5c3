"""A directory output (a model, an adapter, a checkpoint root) handled as a path.

Model-sized artefacts are not passed between nodes as objects: a node receives the directory's path,
and returns the path of a finished staging directory, which this dataset moves into place atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from vlm_pipeline.atomic import replace_dir_atomic, staging_dir_for


class DirectoryDataset(AbstractDataset[Path, Path]):
    """Load: the directory's ``Path`` (checked to hold ``required_files``). Save: a staged ``Path`` → atomic rename.

    Args:
        path: where the directory lives.
        required_files: files that must exist for the directory to count as complete, e.g. ``config.json``.
        mlflow_artifact_path: if set and an MLflow run is active, the saved directory is logged under it.
        missing_hint: a sentence added to the error when the directory is absent (how to create it).
        create: load creates the directory when absent (a work folder, e.g. the checkpoint root).
    """

    def __init__(
        self,
        path: str,
        required_files: list[str] | None = None,
        mlflow_artifact_path: str | None = None,
        missing_hint: str = "",
        create: bool = False,
        metadata: dict | None = None,
    ):
        self._path = Path(path)
        self._required_files = list(required_files or [])
        self._mlflow_artifact_path = mlflow_artifact_path
        self._missing_hint = missing_hint
        self._create = create
        self.metadata = metadata

    @property
    def path(self) -> Path:
        """The folder (for hooks that record where a run's model came from, without loading anything)."""
        return self._path

    def load(self) -> Path:
        if self._create:
            self._path.mkdir(parents=True, exist_ok=True)
        if not self._path.is_dir():
            raise DatasetError(f"Directory not found: {self._path}. {self._missing_hint}".strip())
        missing = [name for name in self._required_files if not (self._path / name).exists()]
        if missing:
            raise DatasetError(f"{self._path} is incomplete: missing {', '.join(missing)}")
        return self._path

    def save(self, data: Path) -> None:
        staged = Path(data)
        if not staged.is_dir():
            raise DatasetError(f"Expected a finished directory to move into {self._path}, got {staged}")
        replace_dir_atomic(staged, self._path)
        self._log_to_mlflow()

    def _log_to_mlflow(self) -> None:
        if not self._mlflow_artifact_path:
            return
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_artifacts(str(self._path), artifact_path=self._mlflow_artifact_path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "required_files": self._required_files}

    def _exists(self) -> bool:
        return self._path.is_dir()


class StagingDirectoryDataset(AbstractDataset[Path, None]):
    """Load: a fresh, empty staging folder beside ``path``, for a node to build a directory output in.

    The node returns the folder to the ``DirectoryDataset`` of the same ``path``, which renames it into place;
    so the catalog, not the node, says where a model goes, and a crash leaves only a hidden staging folder.
    In ``catalog.yml`` both entries take their path from one YAML anchor.
    """

    def __init__(self, path: str, metadata: dict | None = None):
        self._target = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        return staging_dir_for(self._target)

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._target}: a staging folder is only loaded; save the built folder to its target")

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._target)}


class FilePathDataset(AbstractDataset[Path, None]):
    """Load: the path of an existing file, for a subprocess that reads it itself (the trainer's run config)."""

    def __init__(self, path: str, metadata: dict | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Path:
        if not self._path.is_file():
            raise DatasetError(f"File not found: {self._path}")
        return self._path

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._path}: only loaded as a path; it is written through another dataset")

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

"""A Hugging Face ``datasets.Dataset`` saved to disk in Arrow format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from vlm_pipeline.atomic import replace_dir_atomic, staging_dir_for


class ArrowDataset(AbstractDataset[Any, Any]):
    """``save_to_disk`` into a staging directory, then an atomic rename; ``load_from_disk`` to load."""

    def __init__(self, path: str, metadata: dict | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Any:
        from datasets import Dataset, DatasetInfo, load_from_disk

        state = json.loads((self._path / "state.json").read_text())
        if not state["_data_files"]:  # an empty split (e.g. no validation) is saved with no Arrow file
            features = DatasetInfo.from_directory(str(self._path)).features
            return Dataset.from_dict({name: [] for name in features}, features=features)
        return load_from_disk(str(self._path))

    def save(self, data: Any) -> None:
        staged = staging_dir_for(self._path)
        data.save_to_disk(str(staged))
        replace_dir_atomic(staged, self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return (self._path / "dataset_info.json").is_file()

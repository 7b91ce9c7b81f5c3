"""A Hugging Face ``datasets.Dataset`` saved to disk in Arrow format, byte-identical for identical data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset

from vlm_pipeline.atomic import replace_dir_atomic, staging_dir_for


class ArrowDataset(AbstractDataset[Any, Any]):
    """``save_to_disk`` into a staging directory, then an atomic rename; ``load_from_disk`` to load.

    datasets writes the dataset's ``_fingerprint`` into ``state.json``, and after a ``map`` whose function it cannot
    hash that fingerprint is random: every save would differ, and DVC would rerun every stage that reads the folder.
    The saved fingerprint is the digest of the folder's other files instead, so the same data saves the same bytes
    (and a fingerprint still names the content, which is what datasets' caching relies on).
    """

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
        _pin_fingerprint(staged)
        replace_dir_atomic(staged, self._path)

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return (self._path / "dataset_info.json").is_file()


def _pin_fingerprint(folder: Path) -> None:
    """Rewrite ``state.json`` with a fingerprint derived from the saved files' bytes, in datasets' own layout."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name != "state.json":
            with path.open("rb") as handle:  # streamed: a split's Arrow file may be gigabytes
                digest.update(path.name.encode() + b"\0" + hashlib.file_digest(handle, "sha256").digest())
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text(encoding="utf-8"))
    state["_fingerprint"] = digest.hexdigest()[:16]  # datasets' own fingerprints are 16 hex digits
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")

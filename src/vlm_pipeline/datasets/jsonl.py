"""JSON and JSON Lines datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from vlm_pipeline.atomic import write_bytes_atomic


class RawLinesDataset(AbstractDataset[None, list[bytes]]):
    """A JSONL file read as raw physical lines (bytes), so validation can report line numbers and bad UTF-8.

    Read-only: raw data is an input, never overwritten by the pipeline.
    """

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> list[bytes]:
        if not self._filepath.is_file():
            raise DatasetError(f"Raw data file not found: {self._filepath}")
        return self._filepath.read_bytes().splitlines()

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is raw input data and is never written by the pipeline")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()


class JSONLinesDataset(AbstractDataset[list[dict], list[dict]]):
    """A list of JSON objects, one per line, UTF-8, saved atomically."""

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> list[dict]:
        with self._filepath.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def save(self, data: list[dict]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in data)
        write_bytes_atomic(self._filepath, text.encode("utf-8"))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()


class JSONDataset(AbstractDataset[Any, Any]):
    """One JSON document, pretty-printed with sorted keys (stable diffs for DVC metrics), saved atomically."""

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> Any:
        return json.loads(self._filepath.read_text(encoding="utf-8"))

    def save(self, data: Any) -> None:
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        write_bytes_atomic(self._filepath, text.encode("utf-8"))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()

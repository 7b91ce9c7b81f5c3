"""JSON and JSON Lines datasets."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from vlm_pipeline.atomic import write_bytes_atomic, write_chunks_atomic


class RawLines:
    """A file's physical lines as bytes (line endings removed), read from disk each time it is iterated."""

    def __init__(self, path: Path):
        self._path = path

    def __iter__(self) -> Iterator[bytes]:
        with self._path.open("rb") as handle:
            for line in handle:
                yield line.rstrip(b"\r\n")


class RawLinesDataset(AbstractDataset[None, "RawLines | None"]):
    """A JSONL file read as raw physical lines (bytes), so validation can report line numbers and bad UTF-8.

    Loading gives a lazy :class:`RawLines`, never the whole file in memory. With ``optional: true`` a missing file
    loads as None (the node decides what that means). Read-only: raw data is never overwritten by the pipeline.
    """

    def __init__(self, filepath: str, optional: bool = False, metadata: dict | None = None):
        self._filepath = Path(filepath)
        self._optional = optional
        self.metadata = metadata

    def load(self) -> RawLines | None:
        if not self._filepath.is_file():
            if self._optional:
                return None
            raise DatasetError(f"Raw data file not found: {self._filepath}")
        return RawLines(self._filepath)

    def save(self, data: None) -> None:
        raise DatasetError(f"{self._filepath} is raw input data and is never written by the pipeline")

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "optional": self._optional}

    def _exists(self) -> bool:
        return self._filepath.is_file()


class JSONLines:
    """The JSON objects of a JSON Lines file, parsed one at a time each time it is iterated; ``len()`` counts the
    lines once."""

    def __init__(self, path: Path):
        self._path = path
        self._length: int | None = None

    def __iter__(self) -> Iterator[dict]:
        with self._path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def __len__(self) -> int:
        if self._length is None:
            with self._path.open("rb") as handle:
                self._length = sum(1 for line in handle if line.strip())
        return self._length


class JSONLinesDataset(AbstractDataset[Iterable[dict], JSONLines]):
    """JSON objects, one per line, UTF-8. Saves any iterable (a list, a spool, a generator) as a stream, atomically;
    loads as a lazy :class:`JSONLines`."""

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._filepath = Path(filepath)
        self.metadata = metadata

    @property
    def filepath(self) -> Path:
        """The file (for hooks that log it as a run input with its digest)."""
        return self._filepath

    def load(self) -> JSONLines:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath} does not exist")
        return JSONLines(self._filepath)

    def save(self, data: Iterable[dict]) -> None:
        rows = (json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n" for row in data)
        write_chunks_atomic(self._filepath, rows)

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

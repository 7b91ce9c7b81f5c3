"""Lists that live on disk: records appended one at a time and read back in order, so a stage can hand a
million records to the next without holding them in memory."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from datasets import Dataset, Features, Value
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import get_temporary_cache_files_directory


class RecordSpool:
    """JSON objects in an anonymous temporary file (removed when the spool is garbage-collected).

    Append everything first, then iterate (any number of times); ``len()`` is the number appended."""

    def __init__(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix="vlm-spool-", suffix=".jsonl")  # noqa: SIM115 - lives with self
        self._count = 0

    def append(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[dict]:
        self._file.flush()
        # A second handle: its own read position, so reading never disturbs the writer's.
        with open(self._file.name, "rb") as reader:
            for line in reader:
                yield json.loads(line)


def records_dataset(records: Iterable[dict], *, writer_batch_size: int = 1000) -> Dataset:
    """A memory-mapped ``datasets.Dataset`` with one column, ``record`` (each record as JSON text), written in
    batches to datasets' own temporary folder (removed at exit), so ``map`` over it streams as well.

    JSON text, not nested columns: Arrow would reshape the ragged message parts (and fill absent keys with null).
    """
    path = Path(get_temporary_cache_files_directory()) / f"records-{uuid.uuid4().hex}.arrow"
    features = Features({"record": Value("string")})
    with ArrowWriter(features=features, path=str(path), writer_batch_size=writer_batch_size) as writer:
        for record in records:
            writer.write({"record": json.dumps(record, ensure_ascii=False)})
        writer.finalize()
    return Dataset.from_file(str(path))

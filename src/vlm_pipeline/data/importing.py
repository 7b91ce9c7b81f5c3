"""Turn a downloaded Hugging Face dataset (Parquet, or a ``save_to_disk`` folder) into our JSONL + images folder.

Offline by construction: the files are read with pyarrow alone (no ``load_dataset``, no pickles, no remote code),
one record batch at a time, and each batch's lines are written before the next is read, so memory does not grow
with the number of rows. Every column is copied to the JSON line as is, except image structs (``{bytes, path}``,
the datasets Image feature) in an ``images`` or ``image`` column: their bytes are stored once under
``images/<sha256>.<ext>`` and replaced by that relative path.

Splits: a Parquet file's split is the ``{split}`` of ``{split}-00000-of-00002.parquet``, a file named after a split
(``test.parquet``), or the folder of the parquet-converter's ``{split}/0000.parquet``; any other file is training
data. ``train`` and ``test`` are written as such; ``validation`` (or ``valid``, ``val``, ``dev``) becomes ``test``
when the source has no ``test`` split; every other split is skipped and reported by name with its row count.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from vlm_pipeline.atomic import write_bytes_atomic
from vlm_pipeline.data.formats import RecordError
from vlm_pipeline.data.images import ImageBytesError, store_image

BATCH_ROWS = 256
PARQUET_BUFFER = 1 << 20  # bytes read at a time from a column chunk
IMAGE_COLUMNS = ("images", "image")
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
QUARANTINE_FILE = "import_quarantine.jsonl"
REPORT_FILE = "import_report.json"
EXPECTED = "expected a .parquet file, a folder of .parquet files, or a datasets save_to_disk folder"

IMAGE_NOT_EMBEDDED = "image_not_embedded"
IMAGE_UNREADABLE = "image_unreadable"
NOT_JSON = "not_json"
# The reasons (RecordError codes) in import_quarantine.jsonl, with the split, the file and the 0-based row in it.
REASONS: dict[str, str] = {
    IMAGE_NOT_EMBEDDED: "An image struct has no bytes, only a path (or nothing): it cannot be resolved offline.",
    IMAGE_UNREADABLE: "An image struct's bytes are not an image PIL can identify (truncated, corrupt, other data).",
    NOT_JSON: "A value has no JSON form: binary data outside an image column, NaN or infinity.",
}

_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")  # datasets' and the Hub's shard names


class ImportSourceError(ValueError):
    """The source is none of the accepted layouts, or a file in it cannot be read: one line naming the path."""


@dataclass(frozen=True)
class Part:
    """One file of one source split; ``rows`` is read from its metadata before anything is written."""

    split: str
    path: Path
    kind: str  # "parquet" or "arrow" (an Arrow IPC stream, as save_to_disk writes)
    rows: int


def find_parts(src: Path) -> list[Part]:
    """Every data file of ``src`` with its split, in a stable order; :class:`ImportSourceError` if there is none."""
    src = Path(src)
    if not src.exists():
        raise ImportSourceError(f"{src}: does not exist; {EXPECTED}")
    if src.is_file() and src.suffix == ".parquet":
        return [_part(_parquet_split(src, src.parent), src, "parquet")]
    if (src / "dataset_dict.json").is_file():
        splits = json.loads((src / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [part for name in splits for part in _arrow_parts(src / name, name)]
    if (src / "state.json").is_file():
        return _arrow_parts(src, None)
    if src.is_dir():
        # Hidden folders (.cache/huggingface from `hf download --local-dir`) hold no data.
        files = [path for path in sorted(src.rglob("*.parquet")) if not _hidden(path.relative_to(src))]
        if files:
            return [_part(_parquet_split(path, src), path, "parquet") for path in files]
    raise ImportSourceError(f"{src}: no .parquet file, state.json or dataset_dict.json found; {EXPECTED}")


def _hidden(relative: Path) -> bool:
    return any(name.startswith(".") for name in relative.parts)


def _parquet_split(path: Path, root: Path) -> str:
    """The split a Parquet file belongs to, from its name (see the module docstring); ``train`` when it names none."""
    match = _SHARD.match(path.stem)
    if match:
        return match["split"]
    if path.stem in ("train", "test", *VALIDATION_NAMES):
        return path.stem
    if path.stem.isdigit() and path.parent != root:
        return path.parent.name
    return "train"


def _arrow_parts(folder: Path, split: str | None) -> list[Part]:
    """The Arrow files of one saved Dataset, in state.json's order; its split is the DatasetDict key, else the
    split it was saved from (``_split``), else ``train``."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise ImportSourceError(f"{folder}: no state.json; {EXPECTED}")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    split = split or state.get("_split") or "train"
    return [_part(split, folder / entry["filename"], "arrow") for entry in state["_data_files"]]


def _part(split: str, path: Path, kind: str) -> Part:
    """Open the file once to count its rows (from the Parquet footer, or the Arrow batches, read as by
    :func:`_batches`), so a corrupt file fails before any output is written."""
    try:
        if kind == "parquet":
            rows = pq.ParquetFile(path).metadata.num_rows
        else:
            with pa.OSFile(str(path)) as source:
                rows = sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    except (pa.ArrowException, OSError) as error:
        raise ImportSourceError(f"{path}: not a readable {kind} file ({_first_line(error)}); {EXPECTED}") from None
    return Part(split, path, kind, rows)


def plan_splits(parts: list[Part]) -> tuple[dict[str, list[Part]], dict[str, list[Part]]]:
    """Output split (``train``, ``test``) -> its parts, and skipped source split -> its parts."""
    names = list(dict.fromkeys(part.split for part in parts))
    targets = {name: name for name in names if name in ("train", "test")}
    validation = next((name for name in VALIDATION_NAMES if name in names), None)
    if validation and "test" not in names:
        targets[validation] = "test"
    outputs: dict[str, list[Part]] = {name: [] for name in ("train", "test") if name in targets.values()}
    skipped: dict[str, list[Part]] = {}
    for part in parts:
        target = targets.get(part.split)
        (outputs[target] if target else skipped.setdefault(part.split, [])).append(part)
    return outputs, skipped


def _batches(part: Part) -> Iterator[list[dict]]:
    """The file's rows, one record batch at a time, as Python values (lists, dicts, None: plain JSON already).

    Parquet: pyarrow's default ``pre_buffer`` reads every row group's columns up front (memory grows with the file)
    and ``buffer_size=0`` reads a whole column chunk at once (a file written as one row group); both are off.
    Arrow files are read, not memory-mapped: mapped pages once touched count in the resident memory."""
    try:
        if part.kind == "parquet":
            reader = pq.ParquetFile(part.path, pre_buffer=False, buffer_size=PARQUET_BUFFER)
            yield from (batch.to_pylist() for batch in reader.iter_batches(BATCH_ROWS, use_threads=False))
            return
        with pa.OSFile(str(part.path)) as source:
            yield from (batch.to_pylist() for batch in pa.ipc.open_stream(source))
    except pa.ArrowException as error:  # a file that opened but is corrupt further on
        raise ImportSourceError(f"{part.path}: cannot be read ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    """Arrow's messages can run over several lines; the command's error is one."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def convert_row(row: dict, out: Path) -> tuple[dict, list[str]]:
    """The row with each image struct of its image columns replaced by the stored image's path, and those paths."""
    stored: list[str] = []
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if isinstance(value, list):
            row[column] = [_store(item, out, stored) for item in value]
        elif isinstance(value, dict):
            row[column] = _store(value, out, stored)
    return row, stored


def _store(value: Any, out: Path, stored: list[str]) -> Any:
    """An image struct's bytes stored (once, by content) under ``out``; anything else (a path, None) kept."""
    if not isinstance(value, dict) or "bytes" not in value:
        return value
    if value["bytes"] is None:
        raise RecordError(IMAGE_NOT_EMBEDDED, f"image has no bytes, only path {value.get('path')!r}")
    try:
        relative = store_image(value["bytes"], out)
    except ImageBytesError as error:
        raise RecordError(IMAGE_UNREADABLE, str(error)) from None
    stored.append(relative)
    return relative


def _plain(value: Any) -> Any:
    """JSON for what ``to_pylist`` gives beyond JSON types: dates and times as ISO text, decimals as text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


def json_line(row: dict) -> bytes:
    """One JSONL line (UTF-8, as JSONLinesDataset writes); :class:`RecordError` when a value has no JSON form."""
    try:
        return (json.dumps(row, ensure_ascii=False, allow_nan=False, default=_plain) + "\n").encode("utf-8")
    except (TypeError, ValueError) as error:
        raise RecordError(NOT_JSON, str(error)) from None


def _import_split(name: str, parts: list[Part], src: Path, out: Path, quarantine: IO[bytes]) -> dict:
    """Write ``out/.{name}.jsonl.tmp`` batch by batch (quarantined rows to ``quarantine``) and return its counts.

    Distinct images are counted with a set of 64-bit hash prefixes: about 60 bytes per distinct image."""
    start, rows, seen, images = time.perf_counter(), 0, 0, set()
    bar = tqdm(total=sum(part.rows for part in parts), desc=name, unit=" rows", file=sys.stderr, mininterval=0.5)
    with open(out / f".{name}.jsonl.tmp", "wb") as handle, bar:
        for part in parts:
            where = {"split": name, "file": part.path.relative_to(src).as_posix() if part.path != src else src.name}
            first = 0  # the row's index in its file, for the quarantine
            for batch in _batches(part):
                lines = [
                    _line(row, out, images, quarantine, {**where, "row": first + i}) for i, row in enumerate(batch)
                ]
                handle.write(b"".join(lines))
                rows += sum(1 for line in lines if line)
                first, seen = first + len(batch), seen + len(batch)
                bar.update(len(batch))
        handle.flush()
        os.fsync(handle.fileno())
    counts = {"rows": rows, "quarantined": seen - rows, "distinct_images": len(images)}
    return {**counts, "seconds": round(time.perf_counter() - start, 3), "from": sorted({p.split for p in parts})}


def _line(row: dict, out: Path, images: set[int], quarantine: IO[bytes], where: dict) -> bytes:
    """The row's JSON line, its images stored and counted in ``images``; or ``b""`` and a quarantine entry."""
    try:
        row, stored = convert_row(row, out)
        line = json_line(row)
    except RecordError as problem:
        quarantine.write(json_line({**where, "reason": problem.reason, "detail": problem.detail}))
        return b""
    images.update(int(Path(path).stem[:16], 16) for path in stored)
    return line


def import_dataset(src: Path, out: Path) -> dict:
    """Import ``src`` into ``out`` and return the report (also written to ``out/import_report.json``).

    Each output is written to a dot-prefixed ``.tmp`` file and renamed into place only after every split is
    complete, the old report removed first: an interrupted import leaves the previous outputs (or none) and no
    half-written file under a final name; a rerun rewrites everything and gives the same bytes."""
    src, out = Path(src), Path(out)
    outputs, skipped = plan_splits(find_parts(src))
    if not outputs:
        found = ", ".join(skipped)
        raise ImportSourceError(f"{src}: no train, test or validation split (found: {found}); nothing to import")
    out.mkdir(parents=True, exist_ok=True)
    names = [*(f"{name}.jsonl" for name in outputs), QUARANTINE_FILE]
    try:
        with open(out / f".{QUARANTINE_FILE}.tmp", "wb") as quarantine:
            splits = {name: _import_split(name, parts, src, out, quarantine) for name, parts in outputs.items()}
            quarantine.flush()
            os.fsync(quarantine.fileno())
        (out / REPORT_FILE).unlink(missing_ok=True)
        for name in names:
            os.replace(out / f".{name}.tmp", out / name)
    except BaseException:
        for name in names:
            (out / f".{name}.tmp").unlink(missing_ok=True)
        raise
    report = {
        "source": str(src.resolve()),
        "splits": {name: {"file": f"{name}.jsonl", **counts} for name, counts in splits.items()},
        "skipped_splits": {name: {"rows": sum(p.rows for p in parts)} for name, parts in skipped.items()},
        "quarantine_file": QUARANTINE_FILE,
    }
    write_bytes_atomic(out / REPORT_FILE, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return report


def summary_lines(report: dict, out: Path) -> list[str]:
    """One line per written split and per skipped split, for the command's output."""
    lines = []
    for name, split in report["splits"].items():
        origin = "" if split["from"] == [name] else f" (from {', '.join(split['from'])})"
        counts = f"{split['rows']} rows written, {split['quarantined']} quarantined"
        images = f"{split['distinct_images']} distinct images, {split['seconds']:.1f} s"
        lines.append(f"{name}{origin}: {counts}, {images} → {Path(out) / split['file']}")
    for name, split in report["skipped_splits"].items():
        lines.append(f"{name}: skipped ({split['rows']} rows): only train, test and validation are imported")
    return lines

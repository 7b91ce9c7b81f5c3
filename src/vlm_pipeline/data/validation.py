"""Validate raw JSONL lines: every non-blank line becomes a normalised record or a quarantined one with a reason.

A bad line never stops the scan; ``valid + quarantined == total`` always holds. Whether too many lines were
rejected is a separate decision, :func:`check_reject_budget`, so the quarantine can be written first.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from vlm_pipeline.data.formats import (
    BAD_MESSAGES,
    IMAGE_COUNT_MISMATCH,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    UNKNOWN_FORMAT,
    UNKNOWN_ROLE,
    RecordError,
    normalise_record,
    record_text_chars,
)

NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_OUTSIDE_ROOT = "image_outside_root"
IMAGE_TOO_LARGE = "image_too_large"
DUPLICATE = "duplicate"

# The stable reason codes written to quarantine.jsonl and report.json, in the order checks run.
REASONS: dict[str, str] = {
    NOT_UTF8: "The line is not valid UTF-8 text.",
    NOT_JSON: "The line is not valid JSON.",
    NOT_OBJECT: "The line is JSON but not an object (e.g. a list, string or number).",
    UNKNOWN_FORMAT: "The object has neither 'messages' (conversational) nor 'instruction'/'output' (alpaca).",
    MISSING_FIELD: "A required field is missing, null, empty or of the wrong type (alpaca instruction/output, "
    "a message's role or content, a text part's text, an image path).",
    BAD_MESSAGES: "'messages' is not a non-empty list of objects, or a content part is not a text or image part.",
    UNKNOWN_ROLE: "A message's role is not one of system, user, assistant.",
    NO_ASSISTANT_TURN: "The conversation has no assistant turn, or its last turn is not the assistant's.",
    IMAGE_COUNT_MISMATCH: "The number of {'type': 'image'} parts differs from the number of paths in 'images'.",
    DUPLICATE: "Same normalised messages and images as an earlier valid record (duplicates='reject').",
    IMAGE_OUTSIDE_ROOT: "An image path is absolute or resolves outside the data folder ('..' or a symlink).",
    IMAGE_MISSING: "An image path does not name an existing file.",
    IMAGE_TOO_LARGE: "An image has more pixels than max_image_pixels, or PIL flags it as a decompression bomb.",
    IMAGE_UNREADABLE: "An image file cannot be decoded (truncated, corrupt, or not an image).",
}

DUPLICATE_POLICIES = ("reject", "keep")


class DataValidationError(ValueError):
    """Too many records were quarantined (or none is valid) for the run to go on."""


@dataclass
class ValidationResult:
    """Normalised valid records (each with ``source_line``), quarantined lines, and the summary report."""

    valid: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _ImageCheck:
    """The outcome of checking one image file: its size, or the reason it was rejected."""

    size: tuple[int, int] | None = None
    reason: str | None = None
    detail: str | None = None


def validate_lines(
    lines: Iterable[bytes], image_root: Path, *, max_image_pixels: int, duplicates: str = "reject"
) -> ValidationResult:
    """Check each physical line (1-based numbering, blank lines skipped but counted in numbering)."""
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, not {duplicates!r}")
    root = Path(image_root).resolve()
    result = ValidationResult()
    first_line_of: dict[str, int] = {}  # duplicate key -> line of the valid record it first appeared on
    # Many records may share an image: decode each file once per scan.
    image_checks: dict[str, _ImageCheck] = {}
    image_sizes: list[tuple[int, int]] = []
    text_chars: list[int] = []
    total = 0
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        total += 1
        try:
            record = parse_line(line, first_line=line_number == 1)
            key = duplicate_key(record)
            if duplicates == "reject" and key in first_line_of:
                earlier = first_line_of[key]
                raise RecordError(DUPLICATE, f"messages and images repeat the valid record on line {earlier}")
            sizes = [_checked_image(path, root, max_image_pixels, image_checks) for path in record["images"]]
        except RecordError as error:
            result.quarantine.append(_quarantine_entry(line_number, error, line))
            continue
        first_line_of.setdefault(key, line_number)
        image_sizes.extend(sizes)
        text_chars.append(record_text_chars(record))
        result.valid.append({**record, "source_line": line_number})
    result.report = build_report(total, result.quarantine, image_sizes, text_chars)
    return result


def parse_line(line: bytes, *, first_line: bool = False) -> dict:
    """Decode, parse and normalise one line, or raise :class:`RecordError` with the first problem found."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecordError(NOT_UTF8, f"byte {error.start + 1} (0x{line[error.start]:02x}) is not valid UTF-8") from None
    if first_line:
        # Editors on Windows often save a byte-order mark; it is not part of the JSON.
        text = text.removeprefix("\ufeff")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(NOT_JSON, f"invalid JSON at column {error.colno}: {error.msg}") from None
    if not isinstance(record, dict):
        raise RecordError(NOT_OBJECT, f"the line is a JSON {type(record).__name__}, not an object")
    return normalise_record(record)


def duplicate_key(record: dict) -> str:
    """A canonical text of a normalised record's messages and images: equal keys mean duplicate records."""
    return json.dumps({"messages": record["messages"], "images": record["images"]}, sort_keys=True, ensure_ascii=False)


def check_image(relative: str, root: Path, max_image_pixels: int) -> tuple[int, int]:
    """(width, height) of an image inside ``root``, fully decoded; :class:`RecordError` if it must be rejected."""
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute():
        raise RecordError(IMAGE_OUTSIDE_ROOT, f"image path {relative!r} is absolute; paths must be relative to {root}")
    # resolve() follows symlinks and collapses '..', so both escape routes are caught by one comparison.
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise RecordError(IMAGE_OUTSIDE_ROOT, f"image path {relative!r} resolves to {path}, outside {root}")
    if not path.is_file():
        raise RecordError(IMAGE_MISSING, f"image path {relative!r} names no file under {root}")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; a possible bomb is rejected either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                # Checked from the header, before decoding, so an oversized image never reaches memory.
                if width * height > max_image_pixels:
                    raise RecordError(
                        IMAGE_TOO_LARGE,
                        f"image {relative!r} is {width}x{height} = {width * height} pixels, "
                        f"above max_image_pixels {max_image_pixels}",
                    )
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RecordError(IMAGE_TOO_LARGE, f"image {relative!r} is a possible decompression bomb: {error}") from None
    except RecordError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt files raise OSError, SyntaxError, struct.error, ...
        raise RecordError(IMAGE_UNREADABLE, f"image {relative!r} cannot be decoded: {error}") from None
    return width, height


def _checked_image(relative: str, root: Path, max_image_pixels: int, cache: dict[str, _ImageCheck]) -> tuple[int, int]:
    """:func:`check_image` remembered per path for the length of one scan."""
    if relative not in cache:
        try:
            cache[relative] = _ImageCheck(size=check_image(relative, root, max_image_pixels))
        except RecordError as error:
            cache[relative] = _ImageCheck(reason=error.reason, detail=error.detail)
    outcome = cache[relative]
    if outcome.reason is not None:
        raise RecordError(outcome.reason, outcome.detail or "")
    return outcome.size  # type: ignore[return-value]


def build_report(total: int, quarantine: list[dict], image_sizes: list[tuple[int, int]], text_chars: list[int]) -> dict:
    """Counts, reasons (most frequent first) and size statistics of the valid records."""
    reasons = Counter(entry["reason"] for entry in quarantine)
    return {
        "total": total,
        "valid": total - len(quarantine),
        "quarantined": len(quarantine),
        "reasons": dict(sorted(reasons.items(), key=lambda item: (-item[1], item[0]))),
        "image_sizes": {
            "count": len(image_sizes),
            **_min_max_mean("width", [width for width, _ in image_sizes]),
            **_min_max_mean("height", [height for _, height in image_sizes]),
        },
        "text_chars": _min_max_mean("", text_chars),
    }


def check_reject_budget(
    report: dict, max_invalid_fraction: float, *, source: str = "the input", quarantine_file: str = "quarantine.jsonl"
) -> None:
    """Raise :class:`DataValidationError` if no record is valid or the quarantined share exceeds the limit."""
    total, quarantined = report["total"], report["quarantined"]
    if total == 0:
        raise DataValidationError(f"{source} has no records (the file is empty or only blank lines)")
    share = quarantined / total
    if report["valid"] > 0 and share <= max_invalid_fraction:
        return
    reasons = ", ".join(f"{count} {reason}" for reason, count in report["reasons"].items())
    limit = "no valid record" if report["valid"] == 0 else f"above the limit {max_invalid_fraction:.1%}"
    raise DataValidationError(
        f"{quarantined} of {total} records ({share:.1%}) quarantined in {source}, {limit}: {reasons}; "
        f"see {quarantine_file}"
    )


def _quarantine_entry(line_number: int, error: RecordError, line: bytes) -> dict:
    raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
    return {"line": line_number, "reason": error.reason, "detail": error.detail, "raw": raw}


def _min_max_mean(name: str, values: list[int]) -> dict:
    """``{"min_<name>", "max_<name>", "mean_<name>"}`` (plain min/max/mean when name is empty); None if empty."""
    suffix = f"_{name}" if name else ""
    if not values:
        return {f"min{suffix}": None, f"max{suffix}": None, f"mean{suffix}": None}
    return {
        f"min{suffix}": min(values),
        f"max{suffix}": max(values),
        f"mean{suffix}": round(sum(values) / len(values), 2),
    }

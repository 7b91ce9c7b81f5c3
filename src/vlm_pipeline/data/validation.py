"""Validate raw JSONL lines: every non-blank line becomes a normalised record or a quarantined one with a reason.

A bad line never stops the scan; ``valid + quarantined == total`` always holds. Lines are read, checked and
handed on one at a time (to a list, or to a spool on disk), so memory does not grow with the file. Whether too
many lines were rejected is a separate decision, :func:`check_reject_budget`, so the quarantine is written first.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_string  # a str as json.dumps(ensure_ascii=False) writes it
from pathlib import Path
from typing import Any, Protocol

import orjson

from vlm_pipeline.config.schema import DataValidationParams
from vlm_pipeline.data.formats import (
    ALPACA_MEDIA,
    AUDIO_UNSUPPORTED,
    BAD_MESSAGES,
    FORMAT_NAMES,
    IMAGE_COUNT_MISMATCH,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    UNKNOWN_FORMAT,
    UNKNOWN_ROLE,
    VIDEO_COUNT_MISMATCH,
    RecordError,
    detect_format,
    normalise_record,
    record_text_chars,
)
from vlm_pipeline.data.image_refs import (
    BAD_DATA_URI,
    IMAGE_MISSING,
    IMAGE_OUTSIDE_ROOT,
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    REMOTE_IMAGE,
    ImageChecker,
)
from vlm_pipeline.data.video_refs import (
    REMOTE_VIDEO,
    VIDEO_MISSING,
    VIDEO_OUTSIDE_ROOT,
    VIDEO_TOO_LARGE,
    VIDEO_TOO_LONG,
    VIDEO_UNREADABLE,
    VideoChecker,
)

NOT_UTF8 = "not_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
FORMAT_MISMATCH = "format_mismatch"
DUPLICATE = "duplicate"
TRAIN_TEST_OVERLAP = "train_test_overlap"

# The stable reason codes written to quarantine.jsonl and report.json, in the order checks run.
REASONS: dict[str, str] = {
    NOT_UTF8: "The line is not valid UTF-8 text, or a \\u escape in it is a lone surrogate (half of a UTF-16 pair), "
    "which no UTF-8 text can hold.",
    NOT_JSON: "The line is not valid JSON, or it nests deeper than Python's JSON reader goes (about 1,000 levels).",
    NOT_OBJECT: "The line is JSON but not an object (e.g. a list, string or number).",
    UNKNOWN_FORMAT: "The object has none of 'messages', 'conversations' or 'instruction'/'output'.",
    FORMAT_MISMATCH: "The object is in another format than the file's, which its first record decided.",
    MISSING_FIELD: "A required field is missing, null, empty or of the wrong type (alpaca instruction/output, "
    "a turn's role or content, a text part's text, an image path).",
    BAD_MESSAGES: "The turns are not a non-empty list of objects, a content part is not a text, image or image_url "
    "part, or both 'image' and 'images' are set.",
    UNKNOWN_ROLE: "A turn's role is not system, user or assistant (or a LLaVA/ShareGPT name mapped to one).",
    NO_ASSISTANT_TURN: "The conversation has no assistant turn, or its last turn is not the assistant's.",
    IMAGE_COUNT_MISMATCH: "The <image> placeholders and image parts do not match the record's images one to one.",
    VIDEO_COUNT_MISMATCH: "The <video> placeholders and video parts do not match the record's videos one to one.",
    AUDIO_UNSUPPORTED: "The record carries audio (an 'audios' or 'audio' field, an audio part or an <audio> "
    "placeholder): no model here reads it, and read as text its sounds would be dropped.",
    ALPACA_MEDIA: "An alpaca record has a media field (images, videos, audios) or a <image>/<video>/<audio> "
    "placeholder: alpaca is text only, so it would be dropped or trained as words.",
    DUPLICATE: "Same normalised messages and images as an earlier valid record (duplicates='reject').",
    REMOTE_IMAGE: "An image is an http(s) or other remote URL: nothing is downloaded at run time.",
    BAD_DATA_URI: "A data: URI is not base64 image data, or its base64 cannot be decoded.",
    IMAGE_OUTSIDE_ROOT: "An image path is absolute or has a '..' component (a symlink inside the data folder is "
    "followed, so images/ may link to a larger volume).",
    IMAGE_MISSING: "An image path does not name an existing file.",
    IMAGE_TOO_LARGE: "An image has more pixels than max_image_pixels, or PIL flags it as a decompression bomb.",
    IMAGE_UNREADABLE: "An image file cannot be decoded (truncated, corrupt, or not an image).",
    REMOTE_VIDEO: "A video is an http(s) or other remote URL: nothing is downloaded at run time.",
    VIDEO_OUTSIDE_ROOT: "A video path is absolute or has a '..' component (as for images).",
    VIDEO_MISSING: "A video path names no file and no folder.",
    VIDEO_TOO_LARGE: "A video's frames have more pixels than max_image_pixels.",
    VIDEO_UNREADABLE: "A video cannot be decoded to its last frame (truncated, corrupt, no video stream, no frame "
    "rate), or a folder of frames holds no image, an undecodable one, or frames of different sizes.",
    VIDEO_TOO_LONG: "A video lasts longer than max_video_seconds (a folder of frames plays at frame_folder_fps): "
    "a video is never cut.",
    TRAIN_TEST_OVERLAP: "A test record whose prompt and images (by content) are also in train (leakage='reject').",
}

DUPLICATE_POLICIES = ("reject", "keep")
FAST_MAX_BRACKETS = 200  # a line with more is read by json alone (fast_object says why)
# json reads a \ud800-\udfff escape as a lone surrogate (orjson refuses it): a line holding one is checked whole.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class DataValidationError(ValueError):
    """Too many records were quarantined (or none is valid) for the run to go on."""


class Sink(Protocol):
    def append(self, item: dict, /) -> Any: ...


@dataclass
class ValidationResult:
    """Normalised valid records (each with ``source_line``), quarantined lines, and the summary report."""

    valid: Any = field(default_factory=list)
    quarantine: Any = field(default_factory=list)
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ValidRecord:
    """A normalised record with ``source_line``, and digests: of the whole record (duplicates, the test split) and
    of its prompt with its images' content (train/test overlap)."""

    record: dict
    record_digest: bytes
    prompt_digest: bytes
    image_sizes: tuple[tuple[int, int], ...] = ()
    video_seconds: tuple[float, ...] = ()


class RunningStats:
    """min, max and mean of a stream of numbers, in constant memory."""

    def __init__(self) -> None:
        self.count, self.total, self.low, self.high = 0, 0, None, None

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        if self.low is None or value < self.low:
            self.low = value
        if self.high is None or value > self.high:
            self.high = value

    def summary(self, name: str = "") -> dict:
        """``{"min_<name>", "max_<name>", "mean_<name>"}`` (plain min/max/mean when name is empty)."""
        suffix = f"_{name}" if name else ""
        mean = round(self.total / self.count, 2) if self.count else None
        return {f"min{suffix}": self.low, f"max{suffix}": self.high, f"mean{suffix}": mean}


class SplitTally:
    """What one split received: counts by reason and size statistics of its valid records, in constant memory."""

    def __init__(self) -> None:
        self.total = 0
        self.reasons: Counter = Counter()
        self._widths, self._heights, self._chars = RunningStats(), RunningStats(), RunningStats()
        self._video_seconds = RunningStats()

    def kept(self, valid: ValidRecord) -> None:
        self.total += 1
        for width, height in valid.image_sizes:
            self._widths.add(width)
            self._heights.add(height)
        for seconds in valid.video_seconds:
            self._video_seconds.add(seconds)
        self._chars.add(record_text_chars(valid.record))

    def quarantined(self, reason: str) -> None:
        self.total += 1
        self.reasons[reason] += 1

    def report(self, **extra: Any) -> dict:
        """Counts, reasons (most frequent first) and size statistics, plus ``extra`` keys."""
        quarantined = sum(self.reasons.values())
        return {
            "total": self.total,
            "valid": self.total - quarantined,
            "quarantined": quarantined,
            "reasons": dict(sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))),
            "image_sizes": {
                "count": self._widths.count,
                **self._widths.summary("width"),
                **self._heights.summary("height"),
            },
            "text_chars": self._chars.summary(),
            # Only where the split has videos: a set without them reports as it did before video existed.
            **(
                {"videos": {"count": self._video_seconds.count, **self._video_seconds.summary("seconds")}}
                if self._video_seconds.count
                else {}
            ),
            **extra,
        }


class FileValidator:
    """Checks one JSONL file's lines in order: the first record's format is the file's, duplicates are found by
    digest, and images are resolved and decoded once each.

    A valid record names its images as :class:`vlm_pipeline.data.image_refs.ImageChecker` gives them (``image_store``
    and ``paths_from`` are passed to it) and carries their content hashes, ``image_sha256``: an image edited in
    place changes the record, so DVC reruns what reads it and the trainer's run identity changes."""

    def __init__(
        self,
        image_root: Path,
        *,
        max_image_pixels: int,
        duplicates: str = "reject",
        image_store: Path | None = None,
        paths_from: Path | None = None,
        max_video_seconds: float = DataValidationParams.model_fields["max_video_seconds"].default,
        frame_folder_fps: float = DataValidationParams.model_fields["frame_folder_fps"].default,
    ):
        if duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, not {duplicates!r}")
        self.duplicates = duplicates
        self.images = ImageChecker(image_root, max_image_pixels, image_store, paths_from)
        self.videos = VideoChecker(
            image_root,
            max_seconds=max_video_seconds,
            max_frame_pixels=max_image_pixels,
            frame_folder_fps=frame_folder_fps,
            paths_from=paths_from,
        )
        self.file_format: str | None = None
        self._format_line = 0
        self._first_line_of: dict[bytes, int] = {}  # record digest -> line of its first valid copy
        self.duplicate_count = 0

    def check(self, line_number: int, line: bytes) -> ValidRecord:
        """The line's valid record, or :class:`RecordError` with the first problem found."""
        raw = fast_object(line)
        by_json = raw is None
        if by_json:
            raw = parse_object(line, first_line=line_number == 1)
        record_format = detect_format(raw)
        if record_format is not None and self.file_format is None:
            self.file_format, self._format_line = record_format, line_number
        elif record_format is not None and record_format != self.file_format:
            raise RecordError(
                FORMAT_MISMATCH,
                f"the line is {FORMAT_NAMES[record_format]}, but this file is {FORMAT_NAMES[self.file_format]} "
                f"(from line {self._format_line})",
            )
        try:
            record = normalise_record(raw)
        except RecordError:
            if by_json:
                raise
            # orjson reads an integer beyond 64 bits as a float, and error details show numbers: say what json reads.
            record = normalise_record(parse_object(line, first_line=line_number == 1))
        names, sizes = self._check_images(record)
        video_names, seconds = self._check_videos(record)
        # By the images' names in their folders, not where the folders lie: moving the data keeps the test split.
        record_digest, prompt_digest = record_digests(
            record["messages"], names, record["image_sha256"], video_names, record.get("video_sha256", [])
        )
        earlier = self._first_line_of.get(record_digest)
        if earlier is not None:
            self.duplicate_count += 1
            if self.duplicates == "reject":
                raise RecordError(DUPLICATE, f"messages and images repeat the valid record on line {earlier}")
        else:
            self._first_line_of[record_digest] = line_number
        record["source_line"] = line_number  # record is ours, made by normalise_record: no copy needed
        return ValidRecord(record, record_digest, prompt_digest, sizes, seconds)

    def _check_images(self, record: dict) -> tuple[list[str], tuple[tuple[int, int], ...]]:
        """Checks the images, names them as :class:`ImageChecker` does, adds ``image_sha256``; (names, sizes)."""
        if not record["images"]:  # a text record: none of the lists below, built for every line, is needed
            record["image_sha256"] = []
            return [], ()
        checked = [self.images(reference) for reference in record["images"]]
        record["images"] = [image.path for image in checked]
        record["image_sha256"] = [image.sha256 for image in checked]
        return [image.name for image in checked], tuple(image.size for image in checked)

    def _check_videos(self, record: dict) -> tuple[list[str], tuple[float, ...]]:
        """Checks the videos, names them as :class:`VideoChecker` does, adds ``video_sha256`` and ``video_info``
        (frames, fps, seconds, width, height: what frame sampling needs, read once here); (names, seconds)."""
        if "videos" not in record:
            return [], ()
        checked = [self.videos(reference) for reference in record["videos"]]
        record["videos"] = [video.path for video in checked]
        record["video_sha256"] = [video.sha256 for video in checked]
        record["video_info"] = [
            {"frames": v.frames, "fps": v.fps, "seconds": v.seconds, "width": v.size[0], "height": v.size[1]}
            for v in checked
        ]
        return [video.name for video in checked], tuple(video.seconds for video in checked)

    def describe(self) -> dict:
        """The report keys about the file itself: its format and its exact duplicates."""
        return {
            "format": FORMAT_NAMES.get(self.file_format),
            "duplicates": {"count": self.duplicate_count, "policy": self.duplicates},
        }


def validate_lines(
    lines: Iterable[bytes],
    image_root: Path,
    *,
    max_image_pixels: int,
    duplicates: str = "reject",
    valid: Sink | None = None,
    quarantine: Sink | None = None,
    image_store: Path | None = None,
    max_video_seconds: float = DataValidationParams.model_fields["max_video_seconds"].default,
) -> ValidationResult:
    """Check each physical line (1-based numbering, blank lines skipped but counted in numbering).

    Valid records and quarantine entries are appended to ``valid`` and ``quarantine`` as they are found
    (lists unless given, e.g. a :class:`vlm_pipeline.data.spool.RecordSpool`); decoded ``data:`` URI images go to
    ``image_store``, and image paths are relative to ``image_root`` (absolute for a store outside it)."""
    validator = FileValidator(
        image_root,
        max_image_pixels=max_image_pixels,
        duplicates=duplicates,
        image_store=image_store,
        max_video_seconds=max_video_seconds,
    )
    tally = SplitTally()
    result = ValidationResult(valid=[] if valid is None else valid, quarantine=[] if quarantine is None else quarantine)
    with _full_collections_paused():
        for checked, _ in checked_lines(_collecting_young(lines), validator, tally, result.quarantine):
            tally.kept(checked)
            result.valid.append(checked.record)
    result.report = tally.report(**validator.describe())
    return result


@contextmanager
def _full_collections_paused() -> Iterator[None]:
    """No automatic garbage collection during a scan: valid records kept in a list are ten containers each, and each
    full collection walks them all and the rest of the process (half a million objects once transformers is loaded):
    60% of the time on 100,000 lines. Records form no cycles; the few a library makes (PIL: about 3 per image) are
    young, and :func:`_collecting_young` collects the young generations."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _collecting_young(lines: Iterable[bytes], every: int = 2_000) -> Iterator[bytes]:
    """``lines``, with a collection of the two young generations every ``every`` lines (cheap: no old objects)."""
    for count, line in enumerate(lines, start=1):
        if count % every == 0:
            gc.collect(1)
        yield line


def checked_lines(
    lines: Iterable[bytes], validator: FileValidator, tally: SplitTally, quarantine: Sink
) -> Iterator[tuple[ValidRecord, bytes]]:
    """(valid record, its line) for each valid line; the others go to ``quarantine`` (and ``tally``) as met."""
    for line_number, line in numbered_records(lines):
        try:
            checked = validator.check(line_number, line)
        except RecordError as error:
            tally.quarantined(error.reason)
            quarantine.append(quarantine_entry(line_number, error, line))
            continue
        yield checked, line


def numbered_records(lines: Iterable[bytes]) -> Iterable[tuple[int, bytes]]:
    """(1-based physical line number, line) for each non-blank line."""
    for line_number, line in enumerate(lines, start=1):
        if line.strip():
            yield line_number, line


def fast_object(line: bytes) -> dict | None:
    """The line's JSON object as orjson reads it (4 times faster than json), or None: then :func:`parse_object`.

    orjson refuses all that json refuses (bad UTF-8, a byte-order mark, bad syntax), and reads an object as json
    does, except: NaN, Infinity and lone surrogates (refused: json reads them), integers beyond 64 bits (floats:
    on any error, FileValidator.check normalises json's reading) and nesting deeper than json's recursion limit
    (read, where json fails: lines with many brackets are left to json)."""
    if line.count(b"{") + line.count(b"[") > FAST_MAX_BRACKETS:
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_object(line: bytes, *, first_line: bool = False) -> dict:
    """Decode and parse one line into a JSON object, or raise :class:`RecordError`."""
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
    except RecursionError:
        raise RecordError(NOT_JSON, "nested deeper than Python's JSON reader goes (about 1,000 levels)") from None
    if not isinstance(record, dict):
        raise RecordError(NOT_OBJECT, f"the line is a JSON {type(record).__name__}, not an object")
    if SURROGATE_ESCAPE.search(line) and not _holds_utf8_text(record):
        raise RecordError(
            NOT_UTF8, "a \\u escape is a lone surrogate (half of a UTF-16 pair), which no UTF-8 text can hold"
        )
    return record


def _holds_utf8_text(record: dict) -> bool:
    """Every string of ``record`` (keys too) can be written as UTF-8: no lone surrogate (a pair is one character)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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


def quarantine_entry(line_number: int, error: RecordError, line: bytes) -> dict:
    raw = line.decode("utf-8", errors="replace").rstrip("\r\n")
    return {"line": line_number, "reason": error.reason, "detail": error.detail, "raw": raw}


def canonical_digest(value: Any) -> bytes:
    """16 bytes of SHA-256 over a canonical JSON text (sorted keys): equal digests mean equal values."""
    return _sha16(_canonical(value))


def record_digests(
    messages: list[dict],
    image_names: list[str],
    image_hashes: list[str],
    video_names: list[str] = (),
    video_hashes: list[str] = (),
) -> tuple[bytes, bytes]:
    """``canonical_digest`` of ``{"messages": messages, "images": image_names}`` (the record) and of
    ``{"prompt": messages[:-1], "images": image_hashes}`` (its prompt), the canonical texts written by hand; with
    videos, both also hold ``"videos"`` (names, then hashes).

    json.dumps with sorted keys took half of validation's time; this writes each turn once, for both digests
    (the same bytes: tests/test_validation_speed_equivalence.py)."""
    if video_names:
        return (
            canonical_digest({"messages": messages, "images": image_names, "videos": list(video_names)}),
            canonical_digest({"prompt": messages[:-1], "images": image_hashes, "videos": list(video_hashes)}),
        )
    turns = [_canonical_turn(message) for message in messages]
    record_text = '{"images": [' + ", ".join(map(_json_string, image_names)) + '], "messages": [' + ", ".join(turns)
    prompt_text = '{"images": [' + ", ".join(map(_json_string, image_hashes)) + '], "prompt": [' + ", ".join(turns[:-1])
    return _sha16(record_text + "]}"), _sha16(prompt_text + "]}")


def _canonical_turn(message: dict) -> str:
    """``_canonical(message)`` for a normalised turn, ``{"role": str, "content": [parts]}``."""
    if len(message) != 2:
        return _canonical(message)
    parts = ", ".join([_canonical_part(part) for part in message["content"]])
    return '{"content": [' + parts + '], "role": ' + _json_string(message["role"]) + "}"


def _canonical_part(part: dict) -> str:
    """``_canonical(part)`` for a normalised part, ``{"type": "text", "text": str}`` or ``{"type": "image"}``."""
    if part["type"] == "text" and len(part) == 2:
        return '{"text": ' + _json_string(part["text"]) + ', "type": "text"}'
    return '{"type": "image"}' if part["type"] == "image" and len(part) == 1 else _canonical(part)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _sha16(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]

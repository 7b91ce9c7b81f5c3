"""Node functions for data_validation. The rules themselves live in ``vlm_pipeline.data.validation``."""

from __future__ import annotations

from pathlib import Path

from vlm_pipeline.config.schema import DataValidationParams
from vlm_pipeline.data.validation import check_reject_budget, validate_lines


def validate_split(
    raw_lines: list[bytes], raw_images: Path, params: DataValidationParams
) -> tuple[list[dict], list[dict], dict]:
    """Split one JSONL file's lines into (candidate records, quarantined records, report)."""
    result = validate_lines(
        raw_lines, raw_images, max_image_pixels=params.max_image_pixels, duplicates=params.duplicates
    )
    return result.valid, result.quarantine, result.report


def enforce_reject_budget(
    train_candidates: list[dict],
    test_candidates: list[dict],
    train_report: dict,
    test_report: dict,
    raw_images: Path,
    params: DataValidationParams,
) -> tuple[list[dict], list[dict], dict]:
    """The valid records of both splits, released only if neither split rejected too much (the quarantine
    files are written before this runs, so a stopped run still says why)."""
    for split, report in (("train", train_report), ("test", test_report)):
        check_reject_budget(report, params.max_invalid_fraction, source=str(raw_images / f"{split}.jsonl"))
    summary = {
        "raw_data": str(raw_images),
        "train": {key: train_report[key] for key in ("total", "valid", "quarantined")},
        "test": {key: test_report[key] for key in ("total", "valid", "quarantined")},
    }
    return train_candidates, test_candidates, summary

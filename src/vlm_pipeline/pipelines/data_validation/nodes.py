"""Node functions for data_validation. The rules themselves live in ``vlm_pipeline.data.validation``."""

from __future__ import annotations

from pathlib import Path

from vlm_pipeline.data.validation import check_reject_budget, validate_lines


def validate_split(raw_lines: list[bytes], raw_data: str, params: dict) -> tuple[list[dict], list[dict], dict]:
    """Split one JSONL file's lines into (valid records, quarantined records, report)."""
    result = validate_lines(
        raw_lines,
        Path(raw_data),
        max_image_pixels=params["max_image_pixels"],
        duplicates=params["duplicates"],
    )
    return result.valid, result.quarantine, result.report


def enforce_reject_budget(train_report: dict, test_report: dict, raw_data: str, params: dict) -> dict:
    """Stop the run (after both quarantine files are written) if either split rejected too much."""
    for split, report in (("train", train_report), ("test", test_report)):
        check_reject_budget(report, params["max_invalid_fraction"], source=str(Path(raw_data) / f"{split}.jsonl"))
    return {
        "raw_data": raw_data,
        "train": {key: train_report[key] for key in ("total", "valid", "quarantined")},
        "test": {key: test_report[key] for key in ("total", "valid", "quarantined")},
    }

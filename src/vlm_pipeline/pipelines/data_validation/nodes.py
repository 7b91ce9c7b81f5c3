"""Node functions for data_validation. The rules themselves live in ``vlm_pipeline.data.validation`` and
``vlm_pipeline.data.splits``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from vlm_pipeline.config.schema import DataValidationParams
from vlm_pipeline.data.image_refs import path_from
from vlm_pipeline.data.splits import validate_splits
from vlm_pipeline.data.validation import FileValidator, check_reject_budget

logger = logging.getLogger(__name__)


def validate_raw_data(
    raw_train: Iterable[bytes],
    raw_test: Iterable[bytes] | None,
    raw_images: Path,
    decoded_images: Path,
    project_folder: Path,
    params: DataValidationParams,
) -> tuple:
    """Both files' lines as (train candidates, test candidates, train quarantine, test quarantine, train report,
    test report). Without a test file (``raw_test`` None), ``test_fraction`` of train is held out as test.

    The raw folder is only read: ``data:`` URI images are decoded into ``decoded_images``, and every image path in a
    valid record is relative to ``project_folder`` (the run context's image root). Records stream through on-disk
    spools, so memory does not grow with the files."""
    validator = partial(
        FileValidator,
        raw_images,
        max_image_pixels=params.max_image_pixels,
        duplicates=params.duplicates,
        image_store=decoded_images,
        paths_from=project_folder,
        max_video_seconds=params.max_video_seconds,
        frame_folder_fps=params.frame_folder_fps,
    )
    splits = validate_splits(raw_train, raw_test, validator, test_fraction=params.test_fraction, leakage=params.leakage)
    train, test = splits["train"], splits["test"]
    for split, result in splits.items():
        report = result.report
        logger.info(
            "%s: %d valid, %d quarantined of %d (%s)%s",
            split,
            report["valid"],
            report["quarantined"],
            report["total"],
            report.get("format") or f"held out of {report.get('held_out_from')}",
            f", {report['held_out_to_test']} held out as test" if "held_out_to_test" in report else "",
        )
    overlap = test.report["overlap_with_train"]["count"]
    if overlap and params.leakage == "warn":
        logger.warning(
            "%d test records have the prompt and images of a train record: their scores measure recall, not "
            "generalisation (data_validation.leakage: reject quarantines them)",
            overlap,
        )
    return train.valid, test.valid, train.quarantine, test.quarantine, train.report, test.report


def enforce_reject_budget(
    train_candidates: Iterable[dict],
    test_candidates: Iterable[dict],
    train_report: dict,
    test_report: dict,
    raw_images: Path,
    project_folder: Path,
    params: DataValidationParams,
) -> tuple[Iterable[dict], Iterable[dict], dict]:
    """The valid records of both splits, released only if neither split rejected too much (the quarantine
    files are written before this runs, so a stopped run still says why)."""
    for split, report in (("train", train_report), ("test", test_report)):
        source = raw_images / ("train.jsonl" if report.get("held_out_from") else f"{split}.jsonl")
        check_reject_budget(report, params.max_invalid_fraction, source=str(source))
    summary = {
        "raw_data": path_from(project_folder, raw_images),  # as the parameter names it: the same bytes anywhere
        "train": {key: train_report[key] for key in ("total", "valid", "quarantined")},
        "test": {key: test_report[key] for key in ("total", "valid", "quarantined")},
        "test_held_out_of_train": bool(test_report.get("held_out_from")),
        "test_overlap_with_train": test_report["overlap_with_train"]["count"],
    }
    return train_candidates, test_candidates, summary

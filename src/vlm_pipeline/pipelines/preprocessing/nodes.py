"""Node functions for preprocessing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from vlm_pipeline.data.encoding import encode_messages, load_images

logger = logging.getLogger(__name__)


def tokenize_split(
    records: list[dict], processor: Any, raw_data: str, params: dict, validation_summary: dict
) -> tuple[Dataset, dict]:
    """Encode every validated record; set aside (never truncate) those longer than ``max_length``.

    ``validation_summary`` is an input only so that this stage runs after the reject budget passed.
    """
    image_root = Path(raw_data)
    rows, too_long, lengths = [], [], []
    for record in tqdm(records, desc="tokenize", unit="record"):
        encoded = encode_messages(processor, record["messages"], load_images(record, image_root))
        length = len(encoded["input_ids"])
        if length > params["max_length"]:
            too_long.append({"line": record["source_line"], "length": length})
            continue
        lengths.append(length)
        rows.append({**encoded, "image_paths": record["images"], "source_line": record["source_line"]})
    if not rows:
        raise ValueError(f"No record fits max_length={params['max_length']}; longest was {max(t['length'] for t in too_long)}")
    report = {
        "records": len(records),
        "kept": len(rows),
        "too_long": too_long,
        "length": {"min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)},
        "label_tokens": sum(sum(1 for t in row["labels"] if t != -100) for row in rows),
    }
    return Dataset.from_list(rows), report


def combine_reports(train_report: dict, test_report: dict) -> dict:
    return {"train": train_report, "test": test_report}

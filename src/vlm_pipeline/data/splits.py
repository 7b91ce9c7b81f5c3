"""Validate the train and test files together: the test split (held out of train.jsonl when there is no
test.jsonl), and test records that leak from train.

* **One file is enough.** Without a test file, a record goes to test when the hash of its normalised content
  falls below ``test_fraction``: the same record always lands on the same side, so appending records never moves
  earlier ones between the splits, and duplicates land together.
* **Leakage.** A test record whose prompt (every turn but the final answer) and images (by content hash) also
  appear in train would score what training saw. Such records are counted, and with ``leakage="reject"``
  quarantined as ``train_test_overlap``.

Memory: records go to the sinks as they are checked; only 16-byte digests (duplicates, train prompts) are kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable

from vlm_pipeline.data.formats import RecordError
from vlm_pipeline.data.spool import RecordSpool
from vlm_pipeline.data.validation import (
    TRAIN_TEST_OVERLAP,
    FileValidator,
    SplitTally,
    ValidationResult,
    ValidRecord,
    checked_lines,
    quarantine_entry,
)

LEAKAGE_POLICIES = ("warn", "reject")


def validate_splits(
    train_lines: Iterable[bytes],
    test_lines: Iterable[bytes] | None,
    validator: Callable[[], FileValidator],
    *,
    test_fraction: float,
    leakage: str,
    sink: Callable[[], object] = RecordSpool,
) -> dict[str, ValidationResult]:
    """``{"train": ..., "test": ...}``: each split's valid records, quarantine entries and report.

    ``test_lines`` None means there is no test file: ``test_fraction`` of train.jsonl is held out instead.
    ``validator()`` makes a fresh :class:`FileValidator` per file; ``sink()`` a fresh list-like per output."""
    if leakage not in LEAKAGE_POLICIES:
        raise ValueError(f"leakage must be one of {', '.join(LEAKAGE_POLICIES)}, not {leakage!r}")
    hold_out = test_lines is None
    train = ValidationResult(valid=sink(), quarantine=sink())
    held_out = RecordSpool()  # the held-out test records, with their prompt digests, until train is complete
    train_prompts: dict[bytes, int] = {}  # prompt digest -> first train line with it
    train_validator, train_tally = validator(), SplitTally()
    for checked, _ in checked_lines(train_lines, train_validator, train_tally, train.quarantine):
        if hold_out and unit_interval(checked.record_digest) < test_fraction:
            held_out.append(_spooled(checked))
            continue
        train_tally.kept(checked)
        train.valid.append(checked.record)
        train_prompts.setdefault(checked.prompt_digest, checked.record["source_line"])
    held = len(held_out)
    train.report = train_tally.report(
        **train_validator.describe(), **({"held_out_to_test": held, "test_fraction": test_fraction} if hold_out else {})
    )
    train.report["total"] += held  # lines of the file: kept + quarantined + held out
    if hold_out and not held:
        raise ValueError(
            f"data_validation.test_fraction {test_fraction} holds out no record of train.jsonl "
            f"({train.report['valid']} valid) and there is no test.jsonl: raise it or add a test file"
        )

    test = ValidationResult(valid=sink(), quarantine=sink())
    test_tally = SplitTally()
    overlaps = 0
    if hold_out:
        checked_test = ((_unspooled(row), json.dumps(row["record"]).encode()) for row in held_out)
        test_validator = train_validator
    else:
        test_validator = validator()
        checked_test = checked_lines(test_lines, test_validator, test_tally, test.quarantine)
    for checked, line in checked_test:
        train_line = train_prompts.get(checked.prompt_digest)
        if train_line is not None:
            overlaps += 1
            if leakage == "reject":
                error = RecordError(TRAIN_TEST_OVERLAP, f"its prompt and images are those of train line {train_line}")
                test_tally.quarantined(error.reason)
                test.quarantine.append(quarantine_entry(checked.record["source_line"], error, line))
                continue
        test_tally.kept(checked)
        test.valid.append(checked.record)
    source = {"held_out_from": "train.jsonl"} if hold_out else test_validator.describe()
    test.report = test_tally.report(**source, overlap_with_train={"count": overlaps, "policy": leakage})
    return {"train": train, "test": test}


def unit_interval(digest: bytes) -> float:
    """A digest as a number in [0, 1): the same record always maps to the same number."""
    return int.from_bytes(hashlib.sha256(digest).digest()[:8], "big") / 2**64


def _spooled(checked: ValidRecord) -> dict:
    return {
        "record": checked.record,
        "record_digest": checked.record_digest.hex(),
        "prompt_digest": checked.prompt_digest.hex(),
        "image_sizes": checked.image_sizes,
    }


def _unspooled(row: dict) -> ValidRecord:
    sizes = tuple(tuple(size) for size in row["image_sizes"])
    return ValidRecord(row["record"], bytes.fromhex(row["record_digest"]), bytes.fromhex(row["prompt_digest"]), sizes)

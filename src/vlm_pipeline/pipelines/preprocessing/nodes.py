"""Node functions for preprocessing. Encoding rules live in ``vlm_pipeline.data.encoding``.

The checkpoint's tokenizer and processor are loaded through ``vlm_pipeline.architectures``, which imports torch and
transformers: it is imported in the functions that load them, so loading the pipeline registry does not pay for it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset

from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import ConfigError, PreprocessingParams, SFTParams
from vlm_pipeline.data.encoding import NO_LABEL_TOKENS, TOO_LONG, VIDEO_UNSUPPORTED, encode_record
from vlm_pipeline.data.labels import ChatEncoder, ChatTemplateError
from vlm_pipeline.data.spool import RecordSpool, records_dataset
from vlm_pipeline.reporting.data import (
    data_figure,
    data_markdown,
    image_sizes,
    label_preview,
    padding_share,
    reason_counts,
)

# image_sha256 is read by no model code: it makes the rows, and so the run identity, change with the pixels.
# video_samples: each video's path, the frame indices read and their rate (JSON text; empty without video).
MODEL_COLUMNS = ["input_ids", "labels", "image_paths", "image_sha256", "video_samples", "source_line", "length"]


def _encode_row(row: dict, *, encoder: ChatEncoder, image_root: Path, params: PreprocessingParams) -> dict:
    record = json.loads(row["record"])
    if record["images"] and not encoder.takes_images:
        # A text-only template would write each image part as text (Llama 3.1's prints the part's Python repr).
        raise ConfigError(
            f"valid.jsonl record from line {record['source_line']} has {len(record['images'])} image(s), but the "
            "model reads text only: set base_model to a vision model, or raw_data to text records"
        )
    try:
        return encode_record(
            encoder,
            record,
            image_root,
            max_length=params.max_length,
            train_on=params.train_on,
            truncate_text_only=params.truncate_text_only,
            video_sampling=params.videos,
        )
    except ChatTemplateError as error:
        raise ChatTemplateError(f"valid.jsonl record from line {record['source_line']}: {error}") from None


def tokenize_split(
    records: Iterable[dict], context: RunContext, params: PreprocessingParams
) -> tuple[Dataset, RecordSpool, dict]:
    """Encode every validated record (in ``num_proc`` processes); records that cannot train are set aside.

    Images are bounded (``params.images``) by the processor before tokenisation, so the image-token
    counts, and so the lengths, are those training will see. The records are read into an on-disk Arrow
    table in batches, and ``map`` writes its output in batches too: memory does not grow with the set.
    """
    from vlm_pipeline.architectures import load_chat_encoder

    encoder = load_chat_encoder(context.base_model, params, trust_remote_code=context.model.trust_remote_code)
    raw = records_dataset(records)
    encode = partial(_encode_row, encoder=encoder, image_root=context.image_root, params=params)
    try:
        encoded = raw.map(encode, num_proc=params.processes if params.processes > 1 else None, desc="tokenize")
    except ChatTemplateError as error:
        raise ChatTemplateError(f"{context.base_model}: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{context.base_model}: {error}") from None
    reasons = encoded["reason"]
    rejected = [i for i, reason in enumerate(reasons) if reason is not None]
    report = _split_report(encoded, reasons)
    quarantine = RecordSpool()
    for row in encoded.select(rejected).select_columns(["source_line", "reason", "detail", "record"]):
        quarantine.append(
            {"line": row["source_line"], "reason": row["reason"], "detail": row["detail"], "raw": row["record"]}
        )
    # An index selection, not a filter pass: no copy of the data when nothing (or little) is rejected.
    kept = encoded.select([i for i, reason in enumerate(reasons) if reason is None]) if rejected else encoded
    return kept.select_columns(MODEL_COLUMNS), quarantine, report


def hold_out_validation(encoded: Dataset, params: PreprocessingParams) -> tuple[Dataset, Dataset]:
    """Move ``validation_fraction`` of the training records to the validation split (eval during training).

    A record's side is decided by a hash of its line number in valid.jsonl, so the choice is stable across
    runs and machines, and adding records at the end never moves old ones between the splits.
    """
    fraction = params.validation_fraction
    held = [i for i, line in enumerate(encoded["source_line"]) if _unit_hash(line) < fraction]
    if fraction and not held:
        raise ValueError(f"preprocessing.validation_fraction {fraction} holds out no record of {len(encoded)}")
    held_set = set(held)
    return encoded.select([i for i in range(len(encoded)) if i not in held_set]), encoded.select(held)


def _unit_hash(value: Any) -> float:
    return int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], "big") / 2**64


def _split_report(encoded: Dataset, reasons: list) -> dict:
    """Counts from the small per-row bookkeeping columns only (never the token lists)."""
    columns = encoded.select_columns(["cut", "length", "label_tokens"]).to_dict()
    kept = [i for i, reason in enumerate(reasons) if reason is None]
    cuts = [cut for cut in columns["cut"] if cut > 0]
    lengths = [columns["length"][i] for i in kept]
    set_aside = [reason for reason in reasons if reason is not None]
    return {
        "records": len(encoded),
        "kept": len(kept),
        "too_long": set_aside.count(TOO_LONG),
        "reasons": {reason: set_aside.count(reason) for reason in sorted(set(set_aside))},
        "truncated": {"records": len(cuts), "tokens_cut": sum(cuts), "max_cut": max(cuts, default=0)},
        "length": {
            "min": min(lengths, default=0),
            "max": max(lengths, default=0),
            "mean": sum(lengths) / len(lengths) if lengths else 0.0,
        },
        "label_tokens": sum(columns["label_tokens"][i] for i in kept),
    }


def combine_reports(
    train_report: dict,
    train_data: Dataset,
    validation_data: Dataset,
    test_report: dict,
    context: RunContext,
    sft: SFTParams,
) -> dict:
    """Both splits' reports, plus the pad-token share of padded training batches in file order vs length-grouped,
    and whether training packs them instead (``sft.padding_free``, as the model's family settles it)."""
    from vlm_pipeline.architectures import architecture_for_model

    if len(train_data) == 0:
        unlabelled = train_report["reasons"].get(NO_LABEL_TOKENS, 0)
        cause = (
            f"all {unlabelled} records have no label token: the chat template marks no assistant turn"
            if unlabelled == train_report["records"]
            else "see the *_set_aside.jsonl files"
        )
        raise ValueError(f"No training record is left after preprocessing: {cause}")
    unreadable = test_report["reasons"].get(VIDEO_UNSUPPORTED, 0)
    if unreadable:  # evaluation answers every valid test record: one it cannot show its video would fail there
        raise ConfigError(
            f"{context.base_model}: {unreadable} test record(s) have video, which this model reads not (see "
            "test_set_aside.jsonl): remove them from the test split, or use a video model (Qwen2.5-VL)"
        )
    batch_size = sft.per_device_train_batch_size
    lengths = list(train_data["length"])
    padding_free = architecture_for_model(context.base_model).padding_free(sft.padding_free)
    return {
        "train": train_report,
        "validation": {"records": len(validation_data), "held_out_of_train": True},
        "test": test_report,
        "padding": {
            "batch_size": batch_size,
            "padding_free": padding_free,
            "pad_share_in_file_order": padding_share(lengths, batch_size, group_by_length=False),
            "pad_share_length_grouped": padding_share(lengths, batch_size, group_by_length=True),
        },
    }


PREVIEW_RECORDS = 3


def build_data_report(
    train_validation: dict,
    test_validation: dict,
    preprocessing: dict,
    train_data: Dataset,
    context: RunContext,
    params: PreprocessingParams,
) -> tuple[str, Any]:
    """The Markdown summary and the figure (reasons, token lengths, image sizes) for data/08_reporting, with the
    first training records' trained tokens marked (what ``vlm-pipeline inspect-labels`` prints)."""
    from vlm_pipeline.architectures import load_chat_encoder

    reasons = reason_counts(train_validation, test_validation, preprocessing["train"], preprocessing["test"])
    sizes = image_sizes(train_data["image_paths"], context.image_root)
    tokenizer = load_chat_encoder(
        context.base_model, params, trust_remote_code=context.model.trust_remote_code
    ).tokenizer
    previews = label_preview(tokenizer, list(train_data.select(range(min(PREVIEW_RECORDS, len(train_data))))))
    markdown = data_markdown(
        {"train": train_validation, "test": test_validation}, preprocessing, reasons, sizes, previews
    )
    return markdown, data_figure(reasons, list(train_data["length"]), sizes, params.max_length)

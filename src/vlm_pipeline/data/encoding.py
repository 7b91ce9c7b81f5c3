"""Turn a validated record into model inputs with the model's own chat template and processor.

Labels are exactly the assistant turns (their text and end-of-turn token), found by rendering the checkpoint's
own chat template turn by turn (``vlm_pipeline.data.labels``). Everything else (system, user, image and pad
tokens) is -100. A record left with no label token is set aside with the reason ``no_label_tokens``.

A record longer than ``max_length`` is never truncated through image tokens: it is set aside with the
reason ``too_long``, or, for a text-only record when ``truncate_text_only`` is on, cut at ``max_length``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from vlm_pipeline.config.schema import VideoSampling
from vlm_pipeline.data.formats import message_text, record_videos
from vlm_pipeline.data.labels import ChatEncoder, TurnBoundaryMerge
from vlm_pipeline.data.video_sampling import SampledVideo, load_samples, record_samples

IGNORE_INDEX = -100
TOO_LONG = "too_long"
NO_LABEL_TOKENS = "no_label_tokens"
TEMPLATE_REFUSED = "chat_template_refused"
TOKEN_MERGE = "token_merge_at_turn_boundary"
VIDEO_UNSUPPORTED = "video_unsupported"
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")


def load_images(record: dict, image_root: Path) -> list[Image.Image]:
    """The record's images as RGB PIL images (paths were checked to lie inside ``image_root``)."""
    images = []
    for relative in record.get("images", []):
        with Image.open(image_root / relative) as image:
            images.append(image.convert("RGB"))
    return images


def attach_images(messages: list[dict], images: list[Image.Image], videos: Sequence[SampledVideo] = ()) -> list[dict]:
    """Copy of ``messages`` whose ``{"type": "image"}`` parts carry the images and ``{"type": "video"}`` parts the
    videos' sampled frames, in order."""
    remaining = {"image": iter(images), "video": iter([video.frames for video in videos])}
    attached = []
    for message in messages:
        parts = []
        for part in message["content"]:
            kind = part.get("type")
            if kind in remaining:
                part = {"type": kind, kind: next(remaining[kind])}
            parts.append(part)
        attached.append({"role": message["role"], "content": parts})
    return attached


def encode_messages(
    encoder: ChatEncoder,
    messages: list[dict],
    images: list[Image.Image],
    *,
    train_on: str = "all_assistant_turns",
    videos: Sequence[SampledVideo] = (),
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` for one conversation, image and video placeholders expanded by the processor."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"preprocessing.train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    media = images or videos
    input_ids, spans = encoder.assistant_spans(attach_images(messages, images, videos) if media else messages)
    if train_on == "last_assistant_turn":
        spans = spans[-1:]
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels}


def encode_record(
    encoder: ChatEncoder,
    record: dict,
    image_root: Path,
    *,
    max_length: int,
    train_on: str,
    truncate_text_only: bool,
    video_sampling: VideoSampling | None = None,
) -> dict[str, Any]:
    """Encode one validated record and apply the length policy.

    Returns the row for the Arrow dataset plus bookkeeping: ``length`` (before any cut), ``cut`` (tokens
    removed by truncation) and ``reason``/``detail`` (set when the record must go to quarantine). A video's
    frames are sampled by ``video_sampling`` (``preprocessing.videos``) and the row records which
    (``video_samples``), so training reads the very frames counted here.
    """
    refused = _video_refusal(encoder, record)
    if refused is not None:
        return _set_aside(record, *refused)
    samples = record_samples(record, encoder.processor, video_sampling)
    try:
        encoded = encode_messages(
            encoder,
            record["messages"],
            load_images(record, image_root),
            train_on=train_on,
            videos=load_samples(samples, image_root),
        )
    except jinja2.TemplateError as error:  # raise_exception() in the template: this checkpoint refuses the record
        return _set_aside(record, TEMPLATE_REFUSED, f"the chat template refused it: {error}")
    except TurnBoundaryMerge as error:
        return _set_aside(record, TOKEN_MERGE, str(error))
    if samples:
        for sample, patches in zip(samples, _video_patches(encoder, encoded["input_ids"]), strict=True):
            sample["patches"] = patches  # the vision tower's sequence for this video: the planner's memory term
    length = len(encoded["input_ids"])
    row = {
        **encoded,
        "image_paths": record["images"],
        "image_sha256": _image_hashes(record),
        "video_samples": json.dumps(samples) if samples else "",
        "source_line": record["source_line"],
        "length": length,
        "cut": 0,
        "reason": None,
        "detail": None,
        "label_tokens": sum(token != IGNORE_INDEX for token in encoded["labels"]),
    }
    if not row["label_tokens"]:
        return {**row, "reason": NO_LABEL_TOKENS, "detail": f"the chat template marks no assistant token ({train_on})"}
    if length <= max_length:
        return row
    if record["images"] or samples or not truncate_text_only:
        why = (
            "it has images or video, which are never cut"
            if record["images"] or samples
            else "truncate_text_only is off"
        )
        return {**row, "reason": TOO_LONG, "detail": f"{length} tokens is over max_length {max_length} and {why}"}
    labels = encoded["labels"][:max_length]
    if all(token == IGNORE_INDEX for token in labels):
        detail = f"{length} tokens; cutting at max_length {max_length} would leave no assistant token to learn"
        return {**row, "reason": TOO_LONG, "detail": detail}
    return {
        **row,
        "input_ids": encoded["input_ids"][:max_length],
        "labels": labels,
        "length": max_length,
        "cut": length - max_length,
        "label_tokens": sum(token != IGNORE_INDEX for token in labels),
    }


def _video_refusal(encoder: ChatEncoder, record: dict) -> tuple[str, str] | None:
    """Why a video record cannot be encoded for this model, or None. A processor without a video processor
    (Mllama, a text model's tokenizer) reads no video."""
    videos = record_videos(record)
    if videos and not hasattr(encoder.processor, "video_processor"):
        family = type(encoder.processor).__name__
        return VIDEO_UNSUPPORTED, f"{family} reads no video, and the record has {len(videos)}: use a video model"
    return None


def _video_patches(encoder: ChatEncoder, input_ids: list[int]) -> list[int]:
    """Each video's patches as the vision tower reads them, in order: its run of video tokens in the rendered ids
    (the processor's count) × the spatial merge, which turns merge² patches into one language-model token."""
    video_token = encoder.tokenizer.convert_tokens_to_ids(encoder.processor.video_token)
    runs: list[int] = []
    previous = None
    for token in input_ids:
        if token == video_token:
            if previous != video_token:
                runs.append(0)
            runs[-1] += 1
        previous = token
    merge = encoder.processor.video_processor.merge_size
    return [run * merge * merge for run in runs]


def vision_rows(dataset: Any) -> list[bool]:
    """Which preprocessed rows feed the vision tower (an image or a video): the modality batches are grouped by."""
    videos = dataset["video_samples"] if "video_samples" in dataset.column_names else [""] * len(dataset)
    return [bool(paths) or bool(clips) for paths, clips in zip(dataset["image_paths"], videos, strict=True)]


def _set_aside(record: dict, reason: str, detail: str) -> dict[str, Any]:
    """A row for a record that could not be encoded: no tokens, only the reason."""
    return {
        "input_ids": [],
        "labels": [],
        "image_paths": record["images"],
        "image_sha256": _image_hashes(record),
        "video_samples": "",
        "source_line": record["source_line"],
        "length": 0,
        "cut": 0,
        "reason": reason,
        "detail": detail,
        "label_tokens": 0,
    }


def _image_hashes(record: dict) -> list[str]:
    """The images' content hashes, kept in the Arrow row beside their paths: the rows then change when an image is
    edited in place, and with them DVC's hash of the split and the trainer's run identity. Validated records carry
    them; a record built in code (a test, a benchmark) may not."""
    return record.get("image_sha256", [])


def prompt_messages(record: dict) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what the model is asked."""
    return record["messages"][:-1]


def reference_answer(record: dict) -> str:
    """The text of the final assistant turn."""
    return message_text(record["messages"][-1])

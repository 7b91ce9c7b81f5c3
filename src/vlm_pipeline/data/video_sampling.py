"""Which frames of a video are read: Qwen's own rule (qwen-vl-utils ``smart_nframes``), with our parameters.

A clip of ``frames`` frames at ``fps`` is sampled at ``preprocessing.videos.fps`` frames per second, kept within
``min_frames``..``max_frames`` (and never more than the clip has), rounded down to a whole number of the vision
tower's temporal patches (2 frames for Qwen2.5-VL), and spread evenly from the first frame to the last. The indices
depend on nothing else, so preprocessing records them in the row and training reads those very frames on every
rerun. The rate they were sampled at (``sampled_fps``) sets the time between the model's temporal positions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_pipeline.config.schema import VideoSampling


@dataclass(frozen=True)
class SampledFrames:
    """The frame indices read from one video (ascending, 0-based) and the rate they stand for."""

    indices: list[int]
    sampled_fps: float


def sample_frames(frames: int, fps: float, sampling: VideoSampling, temporal_patch: int) -> SampledFrames:
    """The frames of a ``frames``-frame clip at ``fps`` that the model sees under ``sampling``."""
    if frames < temporal_patch:  # too short for one temporal patch: every frame (the processor repeats the last)
        return SampledFrames(list(range(frames)), fps)
    wanted = frames / fps * sampling.fps
    low = _round_up(sampling.min_frames, temporal_patch)
    high = _round_down(min(sampling.max_frames, frames), temporal_patch)
    count = _round_down(min(max(wanted, low), high, frames), temporal_patch)
    count = max(count, temporal_patch)
    if count == 1:
        return SampledFrames([0], fps)
    indices = [round(i * (frames - 1) / (count - 1)) for i in range(count)]
    return SampledFrames(indices, count / frames * fps)


def _round_up(value: float, factor: int) -> int:
    return math.ceil(value / factor) * factor


def _round_down(value: float, factor: int) -> int:
    return math.floor(value / factor) * factor


@dataclass(frozen=True)
class SampledVideo:
    """A video as the model reads it: its sampled frames (RGB arrays) and the rate they were sampled at."""

    frames: list[Any]
    sampled_fps: float


def record_samples(record: dict, processor: Any, sampling: VideoSampling | None) -> list[dict]:
    """Each video of a validated record (its ``video_info``, read once by validation) as the row stores it:
    ``{"path", "indices", "sampled_fps"}``, in whole temporal patches of ``processor``'s video processor;
    ``sampling`` None is ``preprocessing.videos``' defaults. [] for a record without video."""
    if not record.get("videos"):
        return []
    temporal_patch = processor.video_processor.temporal_patch_size
    sampling = sampling or VideoSampling()
    samples = []
    for path, info in zip(record.get("videos", []), record.get("video_info", []), strict=True):
        chosen = sample_frames(info["frames"], info["fps"], sampling, temporal_patch)
        samples.append({"path": path, "indices": chosen.indices, "sampled_fps": chosen.sampled_fps})
    return samples


def load_samples(samples: list[dict], image_root: Path) -> list[SampledVideo]:
    """The frames ``samples`` (:func:`record_samples`, or a row's ``video_samples``) name, decoded."""
    from vlm_pipeline.data.clips import read_frames

    return [
        SampledVideo(read_frames(image_root / sample["path"], sample["indices"]), sample["sampled_fps"])
        for sample in samples
    ]


def row_samples(row: dict) -> list[dict]:
    """A preprocessed row's videos (its ``video_samples`` column: JSON text, empty for a row without video)."""
    text = row.get("video_samples") or ""
    return json.loads(text) if text else []


def saved_sampling(model_dir: str | Path) -> VideoSampling:
    """The frame sampling a saved model folder was trained with: its video processor's ``fps``, ``min_frames`` and
    ``max_frames`` (``bound_videos`` writes them there), the schema's defaults where it has none (a checkpoint
    that was never trained here). Its pixel bounds stay in the processor's own size, so they are left unset."""
    from transformers import AutoVideoProcessor

    video = AutoVideoProcessor.from_pretrained(str(model_dir))
    saved = {name: getattr(video, name, None) for name in ("fps", "min_frames", "max_frames")}
    return VideoSampling(**{name: value for name, value in saved.items() if value is not None})

"""Resolve a record's video references inside the data folder, and check each video once.

A video is a clip file (any container and codec FFmpeg reads: mp4, webm, mkv, avi, ...) or a folder of frame images
(read in name order, as Qwen's and LLaMA-Factory's frame lists are). References follow the images' confinement
rules (:func:`vlm_pipeline.data.image_refs.confined_path`): relative paths or ``file://`` URIs inside the data
folder, nothing remote.

Every clip is decoded to its last frame here, so a truncated file fails validation, not a training step, and its
frame count, frame rate, duration and frame size are read for the planner and the report. A clip longer than
``max_seconds`` is refused whole: a video is never cut. Decoding uses PyAV, whose wheel bundles FFmpeg
(docs/architecture.md says why not torchcodec).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vlm_pipeline.config.run import file_sha256
from vlm_pipeline.data.formats import RecordError
from vlm_pipeline.data.image_refs import Confinement, confined_path, inspect_image, path_from

VIDEO_MISSING = "video_missing"
VIDEO_UNREADABLE = "video_unreadable"
VIDEO_OUTSIDE_ROOT = "video_outside_root"
VIDEO_TOO_LONG = "video_too_long"
VIDEO_TOO_LARGE = "video_too_large"
REMOTE_VIDEO = "remote_video"
VIDEO_RULES = Confinement("video", VIDEO_OUTSIDE_ROOT, REMOTE_VIDEO)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_SIZE = 4096


@dataclass(frozen=True)
class CheckedVideo:
    """A resolved video: where the pipeline opens it, its name in the data folder, its content hash, and what was
    read from it (frames, frames per second, seconds, frame width and height)."""

    path: str
    name: str
    sha256: str
    frames: int
    fps: float
    seconds: float
    size: tuple[int, int]


def frame_files(folder: Path) -> list[Path]:
    """A video folder's frames: its image files in name order (validation counts them, training reads them)."""
    return sorted(entry for entry in folder.iterdir() if entry.suffix.lower() in FRAME_SUFFIXES)


class VideoChecker:
    """Resolve and check video references under one data folder, remembering the last ``CACHE_SIZE`` outcomes.

    ``frame_folder_fps`` is the rate a folder of frames is played at (a folder carries none);
    ``max_frame_pixels`` bounds a frame's size as ``max_image_pixels`` bounds an image's."""

    def __init__(
        self,
        root: Path,
        *,
        max_seconds: float,
        max_frame_pixels: int,
        frame_folder_fps: float,
        paths_from: Path | None = None,
    ):
        self.root = Path(os.path.abspath(root))
        self.paths_from = Path(os.path.abspath(paths_from)) if paths_from is not None else self.root
        self.max_seconds = max_seconds
        self.max_frame_pixels = max_frame_pixels
        self.frame_folder_fps = frame_folder_fps
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._check)

    def __call__(self, reference: str) -> CheckedVideo:
        """The checked video; :class:`RecordError` with the reason if it must be rejected."""
        outcome = self._cached(reference)
        if isinstance(outcome, RecordError):
            raise RecordError(outcome.reason, outcome.detail)
        return outcome

    def _check(self, reference: str) -> CheckedVideo | RecordError:
        try:
            relative = confined_path(reference, self.root, VIDEO_RULES)
            path = self.root / relative
            if path.is_dir():
                checked = self._frame_folder(path, relative)
            elif path.is_file():
                checked = self._clip(path, relative)
            else:
                raise RecordError(VIDEO_MISSING, f"video path {relative!r} names no file or folder under {self.root}")
        except RecordError as error:
            return error
        return checked

    def _clip(self, path: Path, relative: str) -> CheckedVideo:
        import av  # PyAV, only where a record has a clip

        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise RecordError(VIDEO_UNREADABLE, f"video {relative!r} has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                if not rate:
                    raise RecordError(VIDEO_UNREADABLE, f"video {relative!r} states no frame rate")
                fps = float(rate)
                size = (stream.codec_context.width, stream.codec_context.height)
                self._refuse_large(relative, size)
                stated = float(container.duration / av.time_base) if container.duration else None
                if stated is not None:  # refused from the header before decoding a long clip
                    self._refuse_long(relative, stated)
                frames = sum(1 for _ in container.decode(stream))
        except RecordError:
            raise
        except Exception as error:  # noqa: BLE001 - FFmpeg's errors (InvalidDataError, EOF, ...) and a bad header
            raise RecordError(VIDEO_UNREADABLE, f"video {relative!r} cannot be decoded: {error}") from None
        if frames == 0:
            raise RecordError(VIDEO_UNREADABLE, f"video {relative!r} decodes to no frame")
        seconds = frames / fps
        self._refuse_long(relative, seconds)
        return self._checked(path, relative, file_sha256(path), frames, fps, seconds, size)

    def _frame_folder(self, path: Path, relative: str) -> CheckedVideo:
        frames = frame_files(path)
        if not frames:
            raise RecordError(
                VIDEO_UNREADABLE, f"video folder {relative!r} holds no frame image ({', '.join(FRAME_SUFFIXES)})"
            )
        seconds = len(frames) / self.frame_folder_fps
        self._refuse_long(relative, seconds)
        digest = hashlib.sha256()
        sizes = set()
        for frame in frames:
            data = frame.read_bytes()
            try:
                sizes.add(inspect_image(data, repr(f"{relative}/{frame.name}"), self.max_frame_pixels))
            except RecordError as error:
                raise RecordError(VIDEO_UNREADABLE, f"a frame of video folder {relative!r}: {error.detail}") from None
            digest.update(frame.name.encode() + b"\0" + hashlib.sha256(data).digest())
        if len(sizes) > 1:
            listed = ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
            raise RecordError(VIDEO_UNREADABLE, f"the frames of video folder {relative!r} differ in size ({listed})")
        (size,) = sizes
        return self._checked(path, relative, digest.hexdigest(), len(frames), self.frame_folder_fps, seconds, size)

    def _refuse_long(self, relative: str, seconds: float) -> None:
        if seconds > self.max_seconds:
            raise RecordError(
                VIDEO_TOO_LONG,
                f"video {relative!r} lasts {seconds:.1f} s, above data_validation.max_video_seconds "
                f"{self.max_seconds:g}: a video is never cut",
            )

    def _refuse_large(self, relative: str, size: tuple[int, int]) -> None:
        width, height = size
        if width * height > self.max_frame_pixels:
            raise RecordError(
                VIDEO_TOO_LARGE,
                f"video {relative!r} has {width}x{height} frames, above max_image_pixels {self.max_frame_pixels}",
            )

    def _checked(
        self, path: Path, relative: str, sha256: str, frames: int, fps: float, seconds: float, size: tuple[int, int]
    ) -> CheckedVideo:
        return CheckedVideo(
            path=path_from(self.paths_from, path),
            name=relative,
            sha256=sha256,
            frames=frames,
            fps=round(fps, 6),
            seconds=round(seconds, 6),
            size=size,
        )

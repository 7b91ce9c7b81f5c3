"""Write and read short video clips with PyAV (its wheel bundles FFmpeg and its encoders).

``write_clip`` makes the generated demo clips and the tests' clips: MPEG-4 in mp4, one encoder thread and fixed
settings, so the same frames give the same bytes. ``read_frames`` decodes chosen frames of a clip, or of a folder
of frame images, as RGB arrays: what preprocessing and training read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlm_pipeline.data.video_refs import frame_files


def write_clip(path: Path, frames: Sequence[np.ndarray], fps: int) -> Path:
    """Encode RGB frames (height × width × 3, uint8, even sides) at ``fps`` frames per second into ``path``."""
    import av

    height, width = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        # FFmpeg's own MPEG-4 Part 2 encoder, one thread: the same frames give the same bytes. x264 did not, even
        # with one thread (about 1 clip in 100 differed between two runs).
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1
        stream.bit_rate = 2_000_000  # near lossless at these sizes
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def read_frames(path: Path, indices: Sequence[int]) -> list[np.ndarray]:
    """The frames at ``indices`` (ascending, 0-based in decoding order) of a clip or a folder of frames, as RGB
    arrays (height × width × 3, uint8)."""
    wanted = list(indices)
    if path.is_dir():
        from PIL import Image

        names = frame_files(path)
        frames = []
        for index in wanted:
            with Image.open(names[index]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        return frames
    import av

    chosen = set(wanted)
    found: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in chosen:
                found[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    missing = [index for index in wanted if index not in found]
    if missing:
        raise ValueError(f"{path} has no frame {missing[0]} (validation counted more frames than decode now)")
    return [found[index] for index in wanted]

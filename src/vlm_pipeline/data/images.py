"""Images stored by content: one file per distinct image, named by the SHA-256 of its bytes.

Used where images arrive as bytes rather than paths (``data:`` URIs in a record, image structs in Parquet or
Arrow files), so a data folder holds each image once however many records share it, and storing the same
bytes again is a no-op.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

from vlm_pipeline.atomic import write_bytes_atomic

IMAGE_FOLDER = "images"
# PIL's format name -> the file suffix a person expects; anything else is stored under its own name lowercased.
_SUFFIXES = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class ImageBytesError(ValueError):
    """The bytes are not an image PIL can identify."""


def image_suffix(data: bytes) -> str:
    """The file suffix for these image bytes, from their header (not from any name they came with)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or ""
    except Exception as error:  # noqa: BLE001 - PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageBytesError(f"not a readable image ({error})") from None
    return _SUFFIXES.get(image_format, image_format.lower() or "img")


def store_image(data: bytes, root: Path) -> str:
    """Write ``data`` once under ``root/images/<sha256>.<suffix>`` (atomically) and return that path relative
    to ``root``. Bytes already stored are not written again."""
    relative = f"{IMAGE_FOLDER}/{hashlib.sha256(data).hexdigest()}.{image_suffix(data)}"
    target = Path(root) / relative
    if not target.is_file():
        write_bytes_atomic(target, data)
    return relative

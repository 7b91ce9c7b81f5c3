"""Resolve a record's image references inside the data folder, and check each image once.

A reference is a relative path, a ``file://`` URI, a ``data:image/...;base64,`` URI or a remote URL:

* a relative path (or a ``file://`` URI naming a file) must stay inside the data folder *lexically*: no absolute
  path, no ``..`` component. Symlinks are followed, not judged: on GPU hosts ``images/`` is often a link to a big
  volume, and a link inside the data folder is the folder owner's choice, whereas ``..`` in a record is the record's;
* a ``data:`` URI is decoded once and stored in the image store, a folder of the pipeline's own (the data folder
  is only ever read: on GPU hosts it is often a read-only mount), named by content hash
  (:func:`vlm_pipeline.data.images.store_image`), after its header passed the pixel limit;
* a remote URL is rejected: nothing is downloaded at run time.

Every image is fully decoded once (a truncated file fails here, not in a training step) and hashed, so
evaluation leakage can be judged by image content rather than by file name, and an image edited in place changes
the validated records (they carry the hashes) and so everything DVC runs after them.

A checked image has two names: ``name``, its path inside its own folder (the record's relative path, or
``images/<sha256>.<ext>`` in the store, as ``vlm-pipeline import`` names it), which identifies records (duplicates,
the held-out test split) wherever the folders lie; and ``path``, where the pipeline opens it: relative to the
``paths_from`` folder when it lies inside it (the pipeline gives the project folder, so outputs stay portable),
absolute otherwise. Every later stage opens ``<that folder> / path``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote, urlparse

from PIL import Image

from vlm_pipeline.data.formats import RecordError
from vlm_pipeline.data.images import ImageBytesError, store_image

IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_OUTSIDE_ROOT = "image_outside_root"
IMAGE_TOO_LARGE = "image_too_large"
REMOTE_IMAGE = "remote_image"
BAD_DATA_URI = "bad_data_uri"
# Distinct references remembered per scan: many records share an image, and the bound keeps memory flat on sets
# with millions of distinct images.
CACHE_SIZE = 65536


@dataclass(frozen=True)
class CheckedImage:
    """A resolved image (where the pipeline opens it, its name in its folder, size and content hash) or why it was
    rejected."""

    path: str | None = None
    name: str | None = None
    size: tuple[int, int] | None = None
    sha256: str | None = None
    reason: str | None = None
    detail: str | None = None


class ImageChecker:
    """Resolve and check references under one data folder, remembering the last ``CACHE_SIZE`` outcomes.

    ``image_store`` is where decoded ``data:`` URI images are written (a data URI without one is a caller's bug);
    ``paths_from`` is the folder checked paths are given relative to (default: the data folder itself)."""

    def __init__(
        self, image_root: Path, max_image_pixels: int, image_store: Path | None = None, paths_from: Path | None = None
    ):
        # Absolute but not resolved: a symlinked data folder keeps the name the records and the catalog use.
        self.root = Path(os.path.abspath(image_root))
        self.store = Path(os.path.abspath(image_store)) if image_store is not None else None
        self.paths_from = Path(os.path.abspath(paths_from)) if paths_from is not None else self.root
        self.max_image_pixels = max_image_pixels
        self._cached = lru_cache(maxsize=CACHE_SIZE)(self._check)

    def __call__(self, reference: str) -> CheckedImage:
        """The checked image; :class:`RecordError` with the reason if it must be rejected."""
        # A data: URI is keyed by its hash: the cache should not hold megabytes of base64.
        key = "sha256:" + hashlib.sha256(reference.encode()).hexdigest() if reference.startswith("data:") else reference
        outcome = self._cached(key, reference if key != reference else None)
        if outcome.reason is not None:
            raise RecordError(outcome.reason, outcome.detail or "")
        return outcome

    def _check(self, key: str, data_uri: str | None) -> CheckedImage:
        try:
            if data_uri is not None:
                return self._stored(data_uri)
            return self._inspected(self._relative_path(key))
        except RecordError as error:
            return CheckedImage(reason=error.reason, detail=error.detail)

    def _relative_path(self, reference: str) -> str:
        return confined_path(reference, self.root, IMAGE_RULES)

    def _inspected(self, relative: str) -> CheckedImage:
        # Not resolved: the lexical checks above are the confinement, and a symlink inside the folder is followed.
        path = self.root / relative
        if not path.is_file():
            raise RecordError(IMAGE_MISSING, f"image path {relative!r} names no file under {self.root}")
        data = path.read_bytes()
        size = inspect_image(data, repr(relative), self.max_image_pixels)
        return self._checked(self.root, relative, size, data)

    def _stored(self, uri: str) -> CheckedImage:
        data = decode_data_uri(uri)
        size = inspect_image(data, "the data: URI image", self.max_image_pixels)
        if self.store is None:
            raise ValueError("a data: URI image needs an image_store: the folder decoded images are written to")
        try:
            relative = store_image(data, self.store)
        except ImageBytesError as error:
            raise RecordError(BAD_DATA_URI, f"{_short(uri)} is {error}") from None
        return self._checked(self.store, relative, size, data)

    def _checked(self, folder: Path, relative: str, size: tuple[int, int], data: bytes) -> CheckedImage:
        """The image ``relative`` in ``folder``, named as records name it (see the module's docstring)."""
        path = path_from(self.paths_from, folder / relative)
        return CheckedImage(path=path, name=relative, size=size, sha256=hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Confinement:
    """The reason codes that refuse one kind of media reference for where it points."""

    kind: str
    outside_root: str
    remote: str


IMAGE_RULES = Confinement("image", IMAGE_OUTSIDE_ROOT, REMOTE_IMAGE)


def confined_path(reference: str, root: Path, rules: Confinement) -> str:
    """A relative path or ``file://`` URI as a path relative to the data folder ``root``, judged by its text: no
    absolute path, no ``..`` component, no other host or URL scheme (:class:`RecordError` with ``rules``' codes)."""
    parsed = urlparse(reference)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise RecordError(rules.remote, f"{reference!r} names another host; only local files are read")
        return _inside_root(reference, PurePosixPath(unquote(parsed.path)), root, rules)
    if len(parsed.scheme) > 1:  # one letter is a Windows drive, caught as absolute below
        raise RecordError(
            rules.remote,
            f"{_short(reference)} is a {parsed.scheme} URL: nothing is downloaded at run time; download the "
            f"{rules.kind} into the data folder and give its relative path",
        )
    if PurePosixPath(reference).is_absolute() or PureWindowsPath(reference).is_absolute():
        raise RecordError(
            rules.outside_root, f"{rules.kind} path {reference!r} is absolute; paths must be relative to {root}"
        )
    _refuse_parent_steps(reference, reference, rules)
    return reference


def _inside_root(reference: str, path: PurePosixPath, root: Path, rules: Confinement) -> str:
    """A ``file://`` path as a path relative to the data folder, judged by its text, as a relative path is."""
    _refuse_parent_steps(reference, str(path), rules)
    for folder in (root, root.resolve()):  # the folder's own name, or where a symlinked folder points
        if path.is_relative_to(folder.as_posix()):
            return path.relative_to(folder.as_posix()).as_posix()
    raise RecordError(rules.outside_root, f"{reference!r} is outside the data folder {root}")


def path_from(folder: Path, path: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it (judged lexically, as links are kept), else absolute:
    what outputs record, so they hold the same bytes wherever the project folder is."""
    folder, path = Path(os.path.abspath(folder)), Path(os.path.abspath(path))
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:image/<type>;base64,<payload>`` URI; :class:`RecordError` if it is not one."""
    header, comma, payload = uri.partition(",")
    media_type = header.removeprefix("data:").split(";")[0]
    if not comma or not header.endswith(";base64"):
        raise RecordError(BAD_DATA_URI, f"{_short(uri)} is not a base64 data URI (data:image/png;base64,...)")
    if not media_type.startswith("image/"):
        raise RecordError(BAD_DATA_URI, f"{_short(uri)} has media type {media_type!r}; expected image/...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RecordError(BAD_DATA_URI, f"{_short(uri)} has unreadable base64: {error}") from None


def inspect_image(data: bytes, name: str, max_image_pixels: int) -> tuple[int, int]:
    """(width, height) of image bytes, fully decoded; :class:`RecordError` if the image must be rejected."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; a possible bomb is rejected either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                # Checked from the header, before decoding, so an oversized image never reaches memory.
                if width * height > max_image_pixels:
                    raise RecordError(
                        IMAGE_TOO_LARGE,
                        f"image {name} is {width}x{height} = {width * height} pixels, "
                        f"above max_image_pixels {max_image_pixels}",
                    )
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RecordError(IMAGE_TOO_LARGE, f"image {name} is a possible decompression bomb: {error}") from None
    except RecordError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt files raise OSError, SyntaxError, struct.error, ...
        raise RecordError(IMAGE_UNREADABLE, f"image {name} cannot be decoded: {error}") from None
    return width, height


def _refuse_parent_steps(reference: str, path: str, rules: Confinement) -> None:
    """A ``..`` component is refused wherever it points: the text alone decides, never the filesystem, so a record
    cannot reach outside the data folder however its symlinks are laid out."""
    if ".." in PurePosixPath(path).parts or ".." in PureWindowsPath(path).parts:
        raise RecordError(
            rules.outside_root,
            f"{rules.kind} path {_short(reference)} has a '..' component; paths must stay inside the data folder",
        )


def _short(reference: str) -> str:
    """A reference as a message quotes it: a data URI is cut to its header."""
    return repr(reference if len(reference) <= 80 else reference[:60] + "...")

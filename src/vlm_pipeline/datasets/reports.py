"""Report datasets: Markdown text and matplotlib figures, saved atomically.

Kedro's stock ``text.TextDataset`` and ``matplotlib.MatplotlibDataset`` open the existing file and write into it.
When DVC has linked that file to its cache (``cache.type = hardlink,symlink``), writing in place either changes the
cache entry through the hard link or fails on the read-only file; renaming a new file over it does neither.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from vlm_pipeline.atomic import write_bytes_atomic


class TextDataset(AbstractDataset[str, str]):
    """A text file (a Markdown report), UTF-8, saved atomically."""

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._filepath = Path(filepath)  # kedro-mlflow's MlflowArtifactDataset logs the file at ``_filepath``
        self.metadata = metadata

    def load(self) -> str:
        return self._filepath.read_text(encoding="utf-8")

    def save(self, data: str) -> None:
        if not isinstance(data, str):
            raise DatasetError(f"{self._filepath} holds text: expected a str, got {type(data).__name__}")
        write_bytes_atomic(self._filepath, data.encode("utf-8"))

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return self._filepath.is_file()


class FigureDataset(AbstractDataset[Any, None]):
    """One matplotlib ``Figure``, rendered in memory in the format of the file's suffix, then saved atomically.

    The figure is closed once rendered (pyplot keeps every open figure alive). Write-only: the image is for people,
    DVC plots and MLflow; no node reads a figure back.

    Args:
        filepath: where the image goes; its suffix (``.png``, ``.svg``, ``.pdf``) picks the format.
        save_args: passed to ``Figure.savefig`` (e.g. ``dpi``); a ``format`` here overrides the suffix.
    """

    def __init__(self, filepath: str, save_args: dict[str, Any] | None = None, metadata: dict | None = None):
        self._filepath = Path(filepath)  # kedro-mlflow's MlflowArtifactDataset logs the file at ``_filepath``
        self._save_args = {"format": self._filepath.suffix.lstrip(".").lower(), **(save_args or {})}
        if not self._save_args["format"]:
            raise DatasetError(f"{self._filepath} has no suffix: name the image format (.png) or set save_args.format")
        self.metadata = metadata

    def load(self) -> None:
        raise DatasetError(f"{self._filepath} is a rendered figure and is write-only: open the image file instead")

    def save(self, data: Any) -> None:
        from matplotlib import pyplot as plt
        from matplotlib.figure import Figure

        if not isinstance(data, Figure):
            raise DatasetError(f"{self._filepath} holds one figure: expected a matplotlib Figure, got {type(data)}")
        try:
            buffer = BytesIO()
            data.savefig(buffer, **self._save_args)
        finally:
            plt.close(data)
        write_bytes_atomic(self._filepath, buffer.getvalue())

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "save_args": self._save_args}

    def _exists(self) -> bool:
        return self._filepath.is_file()

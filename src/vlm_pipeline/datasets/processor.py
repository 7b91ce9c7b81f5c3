"""The processor (or tokenizer, for text models) of a model directory, loaded the way a real checkpoint is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError


class ProcessorDataset(AbstractDataset[None, Any]):
    """Read-only: ``AutoProcessor``/``AutoTokenizer.from_pretrained(path)``; remote code only on opt-in."""

    def __init__(self, path: str, trust_remote_code: bool = False, metadata: dict | None = None):
        self._path = Path(path)
        self._trust_remote_code = trust_remote_code
        self.metadata = metadata

    def load(self) -> Any:
        from vlm_pipeline.architectures import load_processor

        if not (self._path / "config.json").is_file():
            raise DatasetError(
                f"No model at {self._path} (no config.json). Build the tiny default with "
                f"`vlm-pipeline tiny-model --arch qwen2_5_vl --out {self._path}` or point base_model at a checkpoint."
            )
        return load_processor(self._path, trust_remote_code=self._trust_remote_code)

    def save(self, data: Any) -> None:
        raise DatasetError("The base model's processor is an input and is never written by the pipeline")

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "trust_remote_code": self._trust_remote_code}

    def _exists(self) -> bool:
        return (self._path / "config.json").is_file()

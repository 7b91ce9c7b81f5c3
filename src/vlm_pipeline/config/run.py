"""What one run hands its nodes and its trainer, typed: the run context and the trainer's run config.

``RunContext`` replaces the scalars that used to be threaded into every model stage (the image folder, the
model directory, how the model loads). ``RunConfig`` is the trainer's whole input: the same pydantic sections
the nodes receive, serialised to JSON by the training stage and read back into the same models by every
process ``accelerate launch`` starts. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vlm_pipeline.config.schema import ImageBounds, MethodParams, ModelParams, SFTParams, VideoSampling


class RunContext(BaseModel):
    """The model directory, the image folder and the loading options: what every model stage needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: Path = Field(description="The base model directory (the catalog's base_model).")
    image_root: Path = Field(
        description="The folder validated image paths are relative to: the project folder (see data/image_refs.py)."
    )
    model: ModelParams = Field(description="How every stage loads a model: dtype, attention, trust_remote_code.")


# Fields that say where a run writes, not what it computes: they stay out of the run's identity.
OUTPUT_FIELDS = {"checkpoint_root", "final_dir"}


class RunConfig(BaseModel):
    """Everything one training run reads. Its identity (a hash of all but the output fields) names the
    checkpoint folder, so a killed run resumes from its own checkpoints and never from another run's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: Path
    image_root: Path
    train_dataset: Path
    train_dataset_sha256: str = Field(description="Digest of the training split's Arrow files: new data, new run.")
    eval_dataset: Path | None = Field(description="Only set when sft.eval_strategy is not no.")
    image_bounds: ImageBounds
    video_sampling: VideoSampling = Field(
        default_factory=VideoSampling, description="preprocessing.videos: the frame sizes the collator resizes to."
    )
    chat_template: Path | None
    chat_template_sha256: str | None = Field(description="Editing the template file changes the run's identity.")
    model: ModelParams
    sft: SFTParams
    method: MethodParams
    checkpoint_root: Path = Field(description="The catalog's checkpoint folder; checkpoints go in <identity>/.")
    final_dir: Path = Field(description="The staging folder the trained model is written to.")

    def identity(self) -> str:
        content = self.model_dump(mode="json", exclude=OUTPUT_FIELDS)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint_root / self.identity()

    @classmethod
    def read(cls, path: Path) -> RunConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (a video clip may be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def dataset_sha256(folder: Path) -> str:
    """Digest of a saved Arrow dataset's data files (not its state.json, whose fingerprint may be random)."""
    digest = hashlib.sha256()
    for data_file in sorted(Path(folder).glob("*.arrow")):
        digest.update(data_file.name.encode())
        with data_file.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()

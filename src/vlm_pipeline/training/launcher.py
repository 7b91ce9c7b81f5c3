"""The Kedro side of training: resolve the run config, start ``accelerate launch``, wait, read results."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

from vlm_pipeline.config.run import RunConfig, RunContext, dataset_sha256, file_sha256
from vlm_pipeline.config.schema import ImageBounds, MethodParams, SFTParams


class TrainingLaunchError(RuntimeError):
    """The training subprocess failed; the message carries its command, exit code and last output lines."""


def resolve_run_config(
    *,
    context: RunContext,
    train_dataset: Path,
    eval_dataset: Path | None = None,
    image_bounds: ImageBounds,
    chat_template: str | None = None,
    sft: SFTParams,
    method: MethodParams,
    checkpoint_root: Path,
    final_dir: Path,
) -> RunConfig:
    """The trainer's input: the typed sections as they are, plus digests of the data and the chat template."""
    return RunConfig(
        base_model=context.base_model,
        image_root=context.image_root,
        train_dataset=train_dataset,
        train_dataset_sha256=dataset_sha256(train_dataset),
        # Only read when sft.eval_strategy is not "no", so an unused validation split does not change the identity.
        eval_dataset=eval_dataset if eval_dataset and sft.eval_strategy != "no" else None,
        image_bounds=image_bounds,
        # The template's text, not only its path: editing the file changes the identity, so no stale resume.
        chat_template=Path(chat_template).resolve() if chat_template else None,
        chat_template_sha256=file_sha256(Path(chat_template)) if chat_template else None,
        model=context.model,
        sft=sft,
        method=method,
        checkpoint_root=checkpoint_root,
        final_dir=final_dir,
    )


def launch_command(accelerate_config: str | Path, run_config_path: Path) -> list[str]:
    """``accelerate launch`` of the trainer module with this interpreter (so the same venv is used)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "-m",
        "vlm_pipeline.training.trainer",
        "--config",
        str(run_config_path),
    ]


def launch(command: list[str], tail_lines: int = 40) -> None:
    """Run ``command``, echoing its output live; on failure raise with the last ``tail_lines`` lines."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
    if proc.returncode != 0:
        raise TrainingLaunchError(
            f"Training failed with exit code {proc.returncode}: {' '.join(command)}\n"
            f"Last output lines:\n{''.join(tail)}"
        )


def write_run_config(config: RunConfig, path: Path) -> Path:
    """For tests and manual launches; the training stage saves the run config through the catalog."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=2))
    return path

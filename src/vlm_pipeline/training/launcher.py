"""The Kedro side of training: resolve the run config, start ``accelerate launch``, wait, read results."""

from __future__ import annotations

import collections
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from vlm_pipeline.config import MethodParams, ModelParams, SFTParams
from vlm_pipeline.config.schema import parse_section


class TrainingLaunchError(RuntimeError):
    """The training subprocess failed; the message carries its command, exit code and last output lines."""


def resolve_run_config(
    *,
    base_model: Path,
    train_dataset: Path,
    eval_dataset: Path | None = None,
    image_root: Path,
    image_bounds: dict,
    chat_template: str | None = None,
    model: dict | None = None,
    sft: dict,
    method: dict,
    final_dir: Path,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The JSON document the trainer entry point reads: every SFTConfig field from the schema, resolved."""
    sft_params = parse_section(SFTParams, sft, "sft")  # legacy names mapped, schema defaults filled in
    method_params = parse_section(MethodParams, method, "method")
    config = {
        "base_model": str(base_model),
        "train_dataset": str(train_dataset),
        # Only read when sft.eval_strategy is not "no", so an unused validation split does not change the hash.
        "eval_dataset": str(eval_dataset) if eval_dataset and sft_params.eval_strategy != "no" else None,
        "image_root": str(image_root),
        "image_bounds": image_bounds,
        # The template's text, not only its path: editing the file changes the hash, so no stale resume.
        "chat_template": str(Path(chat_template).resolve()) if chat_template else None,
        "chat_template_sha256": hashlib.sha256(Path(chat_template).read_bytes()).hexdigest() if chat_template else None,
        "model": parse_section(ModelParams, model or {}, "model").model_dump(),
        "trust_remote_code": trust_remote_code,
        "padding_free": sft_params.padding_free,
        "learning_rate": method_params.learning_rate,
        "lora": method_params.lora.model_dump() if method_params.lora else None,
        "freeze": method_params.freeze.model_dump(),
        "quantization": method_params.quantization.model_dump() if method_params.quantization else None,
        "sft": sft_params.trainer_args(),
    }
    # Checkpoints live under a folder named by the run config's hash: a killed run resumes from its own
    # checkpoints, and a run with other data or settings never resumes from (or deletes) another's.
    config["checkpoint_dir"] = str(Path(method["output_dir"]) / "checkpoints" / config_hash(config))
    config["final_dir"] = str(final_dir)
    return config


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def launch_command(accelerate_config: str, run_config_path: Path) -> list[str]:
    """``accelerate launch`` of the trainer module with this interpreter (so the same venv is used)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
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


def write_run_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return path

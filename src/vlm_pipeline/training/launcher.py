"""The Kedro side of training: resolve the run config, start ``accelerate launch``, wait, read results."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
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


def launch_command(accelerate_config: str | Path, run_config_path: Path, **node: int | str) -> list[str]:
    """``accelerate launch`` of the trainer module with this interpreter (so the same venv is used).

    ``node``: accelerate's own flags overriding the file, for one machine of several (``machine_rank``,
    ``num_machines``, ``num_processes``, ``main_process_ip``, ``main_process_port``)."""
    flags = [part for name, value in node.items() for part in (f"--{name}", str(value))]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        *flags,
        "-m",
        "vlm_pipeline.training.trainer",
        "--config",
        str(run_config_path),
    ]


def launch(command: list[str], tail_lines: int = 40) -> None:
    """Run ``command``, echoing its output live; on failure raise with the last ``tail_lines`` lines.

    The command runs in its own process group, and SIGTERM or SIGINT sent to this (Kedro) process is passed on to
    the whole group: ``accelerate launch`` does not forward signals to the trainer it starts, so without this a
    cluster's SIGTERM to ``kedro run`` would leave the trainer running as an orphan. The trainer then saves a
    checkpoint and exits non-zero (``training/stopping.py``), and this raises with its message.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True
    ) as proc:
        with forward_signals_to_group(proc.pid, (signal.SIGTERM, signal.SIGINT)):
            assert proc.stdout is not None
            for line in proc.stdout:  # until every process of the group has closed its output
                sys.stdout.write(line)
                tail.append(line)
    if proc.returncode != 0:
        raise TrainingLaunchError(
            f"Training failed with exit code {proc.returncode}: {' '.join(command)}\n"
            f"Last output lines:\n{''.join(tail)}"
        )


@contextlib.contextmanager
def forward_signals_to_group(group: int, signals: tuple[signal.Signals, ...]):
    """While inside, ``signals`` received by this process are sent to process group ``group`` instead."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signum)

    previous = {sig: signal.signal(sig, forward) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def write_run_config(config: RunConfig, path: Path) -> Path:
    """For tests and manual launches; the training stage saves the run config through the catalog."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.model_dump_json(indent=2))
    return path

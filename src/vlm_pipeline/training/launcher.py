"""The Kedro side of training: resolve the run config, start ``accelerate launch``, wait, read results."""

from __future__ import annotations

import codecs
import collections
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

from vlm_pipeline.config.run import RunConfig, RunContext, dataset_sha256, file_sha256
from vlm_pipeline.config.schema import ImageBounds, MethodParams, SFTParams, VideoSampling

# The line with which the trainer reports a stop by one of its checks (``training.stopping.TrainingStopped``).
STOPPED_PREFIX = "vlm-pipeline: training stopped"


class TrainingLaunchError(RuntimeError):
    """The training subprocess failed; the message carries its command, exit code and last output lines."""


def resolve_run_config(
    *,
    context: RunContext,
    train_dataset: Path,
    eval_dataset: Path | None = None,
    image_bounds: ImageBounds,
    video_sampling: VideoSampling | None = None,
    chat_template: str | None = None,
    sft: SFTParams,
    method: MethodParams,
    checkpoint_root: Path,
    final_dir: Path,
) -> RunConfig:
    """The trainer's input: the typed sections as they are, plus digests of the data and the chat template."""
    if eval_dataset is None and sft.eval_strategy != "no":
        # A direct call without a validation split (tests, benchmarks): nothing to evaluate on. A Kedro run always
        # has one where sft.eval_strategy asks for it (the parameters' check, preprocessing's hold-out).
        sft = sft.model_copy(update={"eval_strategy": "no"})
    return RunConfig(
        base_model=context.base_model,
        image_root=context.image_root,
        train_dataset=train_dataset,
        train_dataset_sha256=dataset_sha256(train_dataset),
        # Only read when sft.eval_strategy is not "no", so an unused validation split does not change the identity.
        eval_dataset=eval_dataset if eval_dataset and sft.eval_strategy != "no" else None,
        image_bounds=image_bounds,
        video_sampling=video_sampling or VideoSampling(),
        # The template's text, not only its path: editing the file changes the identity, so no stale resume.
        chat_template=Path(chat_template).resolve() if chat_template else None,
        chat_template_sha256=file_sha256(Path(chat_template)) if chat_template else None,
        model=context.model,
        sft=sft,
        method=method,
        checkpoint_root=checkpoint_root,
        final_dir=final_dir,
    )


def launch_command(
    accelerate_config: str | Path, run_config_path: Path, curves: Path | None = None, **node: int | str
) -> list[str]:
    """``accelerate launch`` of the trainer module with this interpreter (so the same venv is used).

    ``curves``: the JSON-lines file the trainer appends its logged metrics to (``live_metrics.FollowCurves``).

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
        *cpu_thread_flags(Path(accelerate_config), node),
        "-m",
        "vlm_pipeline.training.trainer",
        "--config",
        str(run_config_path),
        *(["--curves", str(curves)] if curves else []),
    ]


def cpu_thread_flags(accelerate_config: Path, node: dict[str, int | str]) -> list[str]:
    """For a CPU-only accelerate config (``use_cpu``), the threads per process accelerate would choose itself
    (physical cores over this machine's processes), given explicitly: accelerate prints a three-line notice
    whenever it chooses them. Nothing when OMP_NUM_THREADS is set, which accelerate then uses."""
    import psutil
    import yaml

    config = yaml.safe_load(accelerate_config.read_text()) or {}
    if not config.get("use_cpu") or "OMP_NUM_THREADS" in os.environ:
        return []
    try:
        processes = int(node.get("num_processes", config.get("num_processes", 1)))
        machines = int(node.get("num_machines", config.get("num_machines", 1)))
    except ValueError:  # shell variables: a command for a job script, run on another machine that decides itself
        return []
    threads = (psutil.cpu_count(logical=False) or 1) // max(1, processes // machines)
    return ["--num_cpu_threads_per_process", str(max(1, threads))]


def launch(command: list[str], tail_lines: int = 40) -> None:
    """Run ``command``, relaying its output live; on failure raise with the last ``tail_lines`` lines.

    On a terminal the command writes to a pseudo-terminal and its bytes pass through untouched, so progress bars
    redraw in place (and the trainer knows to draw them: ``training/progress.py``). Elsewhere (a log file, CI) it
    writes to a pipe and each line is relayed once finished, as a terminal would have left it: of a line redrawn
    with carriage returns, only its last state, not one line per redraw.

    The command runs in its own process group, and SIGTERM or SIGINT sent to this (Kedro) process is passed on to
    the whole group: ``accelerate launch`` does not forward signals to the trainer it starts, so without this a
    cluster's SIGTERM to ``kedro run`` would leave the trainer running as an orphan. The trainer then saves a
    checkpoint and exits non-zero (``training/stopping.py``), and this raises with its message.
    """
    live = sys.stdout.isatty()
    reader, writer = pseudo_terminal() if live else os.pipe()
    try:
        try:
            proc = subprocess.Popen(command, stdout=writer, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            os.close(writer)  # the group holds its own copies: the output ends when the last of them closes
        with proc, forward_signals_to_group(proc.pid, (signal.SIGTERM, signal.SIGINT)):
            tail = relay(reader, live, tail_lines)
    finally:
        os.close(reader)
    if proc.returncode != 0:
        stopped = [line.strip() for line in tail if line.startswith(STOPPED_PREFIX)]
        if stopped:  # one of our checks, which says what happened and what to do: that first, once
            raise TrainingLaunchError(
                f"{stopped[0].removeprefix('vlm-pipeline: ')}\n(exit code {proc.returncode}: {' '.join(command)})"
            )
        raise TrainingLaunchError(
            f"Training failed with exit code {proc.returncode}: {' '.join(command)}\n"
            f"Last output lines:\n{''.join(tail)}"
        )


def pseudo_terminal() -> tuple[int, int]:
    """A pseudo-terminal (reading end, writing end) the size of ours, so that bars drawn on it fit our screen.

    It passes bytes through as written (no ``\\n`` to ``\\r\\n``): our own terminal translates them once."""
    reader, writer = os.openpty()
    modes = termios.tcgetattr(writer)
    modes[1] &= ~termios.ONLCR  # output flags
    termios.tcsetattr(writer, termios.TCSANOW, modes)
    size = shutil.get_terminal_size()  # 80x24 for a terminal that reports no size: tqdm draws nothing in 0 columns
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines, size.columns, 0, 0))
    return reader, writer


def relay(reader: int, live: bool, tail_lines: int) -> list[str]:
    """Copy the output to our stdout until it ends (raw bytes when ``live``, finished lines otherwise); return
    its last ``tail_lines`` lines for an error message."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    lines = FinishedLines()
    for chunk in read_chunks(reader):
        finished = lines.feed(chunk)
        write_out(chunk if live else "".join(finished))
        tail.extend(finished)
    rest = lines.close()
    if not live:
        write_out("".join(rest))
    tail.extend(rest)
    return list(tail)


def read_chunks(fd: int, size: int = 65536) -> Iterator[bytes]:
    """The output as it comes, until every writer has closed it (a pseudo-terminal then fails with EIO)."""
    while True:
        try:
            chunk = os.read(fd, size)
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            return
        if not chunk:
            return
        yield chunk


def write_out(data: bytes | str) -> None:
    """To our stdout at once: bytes as they are (a terminal's control characters included), text through its
    encoding."""
    if isinstance(data, bytes):
        sys.stdout.flush()  # anything written as text before goes first
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data)
    sys.stdout.flush()


class FinishedLines:
    """Complete lines from a stream of output bytes, each as a terminal would leave it: a line redrawn in place
    with carriage returns (a progress bar) counts once, in its last state."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span chunks
        self._pending = ""

    def feed(self, data: bytes) -> list[str]:
        *finished, pending = (self._pending + self._decoder.decode(data)).split("\n")
        self._pending = _compact(pending)
        return [line for text in finished if (line := _finished(text)) is not None]

    def close(self) -> list[str]:
        """The unfinished last line, if any, once the output has ended."""
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        line = _finished(text) if text else None
        return [line] if line is not None else []


def _finished(text: str) -> str | None:
    """A line as left on screen; None for one whose last drawing was blank (a bar that erased itself)."""
    shown = _last_drawn(text)
    return None if "\r" in text and not shown.strip() else shown + "\n"


def _last_drawn(text: str) -> str:
    """What follows the last carriage return; one at the very end (``\\r\\n`` from a terminal) does not count."""
    return text.rstrip("\r").rpartition("\r")[2]


def _compact(text: str) -> str:
    """An unfinished line keeps only its last drawing, with the carriage returns around it: a bar redrawn for
    hours does not pile up, and still reads as redrawn."""
    body = text.rstrip("\r")
    _, redrawn, last = body.rpartition("\r")
    return redrawn + last + text[len(body) :]


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

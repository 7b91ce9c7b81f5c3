"""Live, readable training progress: the bar passes through intact on a terminal; a log gets a few lines.

The launcher relays the trainer's output as bytes on a terminal (progress bars redraw in place) and as finished
lines elsewhere, each redrawn line once, in its last state; ``ProgressLog`` prints step/total, rate and ETA
when the bar is off. The launcher's other duties (the tail in the error, signals to the group) are kept.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PROJECT_ROOT, launched_run_config

from vlm_pipeline.training.launcher import FinishedLines, TrainingLaunchError, launch, launch_command
from vlm_pipeline.training.progress import ProgressLog

BAR = "bar 1/3\rbar 2/3\rbar 3/3\n"  # what tqdm writes outside a terminal: one line, redrawn


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def fed(*chunks: bytes) -> list[str]:
    lines = FinishedLines()
    return [line for chunk in chunks for line in lines.feed(chunk)] + lines.close()


# --- finished lines -------------------------------------------------------------------------------------------


def test_a_redrawn_line_counts_once_in_its_last_state():
    assert fed(b"start\n" + BAR.encode() + b"end\n") == ["start\n", "bar 3/3\n", "end\n"]


def test_lines_and_characters_split_across_chunks_are_joined():
    bar = "▕█▏ 50%\r▕██▏ 100%\n".encode()  # 3-byte characters, cut anywhere
    assert fed(bar[:2], bar[2:9], bar[9:]) == ["▕██▏ 100%\n"]
    assert fed(b"hel", b"lo\nwor", b"ld") == ["hello\n", "world\n"]


def test_terminal_line_ends_and_blank_lines_are_kept_as_lines_but_an_erased_bar_is_dropped():
    assert fed(b"one\r\n\r\ntwo\r", b"\n") == ["one\n", "two\n"]  # a pseudo-terminal's \r\n; a blank line drawn
    assert fed(b"a\n\nb\n") == ["a\n", "\n", "b\n"]  # a pipe's blank line stays
    assert fed(b"eval 1\reval 2\r      \rnext\n") == ["next\n"]  # a bar with leave=False erases itself
    assert fed(b"eval 1\reval 2\r", b"      \r\n") == []


def test_a_long_redrawn_line_does_not_pile_up_before_it_ends():
    lines = FinishedLines()
    for step in range(10_000):
        assert lines.feed(f"\r{step}/10000".encode()) == []
    assert len(lines._pending) < 20
    assert lines.feed(b"\n") == ["9999/10000\n"]


# --- the launcher ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_in_a_log_each_line_comes_once_and_the_command_sees_no_terminal(capsys):
    launch(python(f"import sys; print('first'); sys.stderr.write({BAR!r}); print('tty', sys.stderr.isatty())"))
    assert capsys.readouterr().out == "first\nbar 3/3\ntty False\n"


@pytest.mark.slow
def test_a_failure_raises_with_the_last_lines_as_left_on_screen(capsys):
    code = f"import sys; print('\\n'.join(map(str, range(50)))); sys.stdout.write({BAR!r}); sys.exit(3)"
    with pytest.raises(TrainingLaunchError, match="exit code 3") as failure:
        launch(python(code), tail_lines=3)
    assert failure.value.args[0].endswith("Last output lines:\n48\n49\nbar 3/3\n")


@pytest.mark.slow
def test_a_stop_by_our_checks_raises_with_its_one_line_first_and_no_traceback(capsys):
    stop = "vlm-pipeline: training stopped at optimizer step 3: the loss is nan; lower the learning rate"
    code = f"import sys; print({stop!r}); sys.stderr.write('Traceback (most recent call last):\\n'); sys.exit(1)"
    with pytest.raises(TrainingLaunchError) as failure:
        launch(python(code))
    message = failure.value.args[0].splitlines()
    assert message[0] == stop.removeprefix("vlm-pipeline: ")
    assert message[1].startswith("(exit code 1: ") and len(message) == 2


@pytest.mark.slow
def test_sigterm_to_the_launching_process_reaches_the_command_and_its_last_words_are_in_the_error():
    """As a cluster stops a job: SIGTERM to kedro's process only; the trainer's group gets it."""
    child = python(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print('saved a checkpoint', flush=True), sys.exit(1)))
        print('ready', flush=True)
        time.sleep(60)
        """
    )
    parent = python(
        f"""
        import sys
        from vlm_pipeline.training.launcher import launch, TrainingLaunchError
        try:
            launch({child!r})
        except TrainingLaunchError as error:
            print('RAISED', error, flush=True)
        """
    )
    with subprocess.Popen(parent, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
    assert "saved a checkpoint\nRAISED Training failed with exit code 1" in rest
    assert rest.rstrip().endswith("saved a checkpoint")


def read_terminal(fd: int, proc: subprocess.Popen, limit: float = 60) -> bytes:
    """Everything written to a pseudo-terminal until its writers are gone."""
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError as error:
            assert error.errno == errno.EIO
            break
        if not chunk:
            break
        data += chunk
    proc.wait(timeout=limit)
    return data


@pytest.mark.slow
def test_on_a_terminal_the_bytes_pass_through_intact_and_the_command_sees_a_terminal():
    """``kedro run`` in a terminal: the trainer's bar must redraw in place, so its carriage returns survive."""
    child = f"import sys; sys.stderr.write({BAR!r}); print('tty', sys.stderr.isatty())"
    parent = python(f"from vlm_pipeline.training.launcher import launch; launch({python(child)!r})")
    reader, writer = os.openpty()
    with subprocess.Popen(parent, stdout=writer, stderr=writer) as proc:
        os.close(writer)
        output = read_terminal(reader, proc)
    os.close(reader)
    assert proc.returncode == 0, output
    assert b"bar 1/3\rbar 2/3\rbar 3/3\r\n" in output  # the terminal's own \r\n after each line
    assert b"tty True" in output


# --- progress lines -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def train(callback: ProgressLog, clock: Clock, steps: range, total: int, seconds_per_step: float, **state) -> None:
    """The callback's view of a run: train begins at ``steps.start``, then one optimizer step at a time."""
    args = SimpleNamespace(disable_tqdm=state.pop("disable_tqdm", True))
    logging_steps = state.pop("logging_steps", None)
    run = SimpleNamespace(global_step=steps.start, max_steps=total, **{"is_world_process_zero": True, **state})
    callback.on_train_begin(args, run, None)
    for step in steps[1:]:
        clock.now += seconds_per_step
        run.global_step = step
        # As transformers orders them: the flow callback sets should_log, on_step_end, then on_log when it logs.
        control = SimpleNamespace(should_log=bool(logging_steps) and step % logging_steps == 0)
        callback.on_step_end(args, run, control)
        if control.should_log:
            callback.on_log(args, run, control, logs={"loss": 10 / step, "learning_rate": 1e-4})
    if logging_steps:
        callback.on_log(args, run, None, logs={"train_runtime": 1.0, "train_loss": 0.5})


def test_a_log_gets_a_line_per_tenth_of_the_run_with_rate_and_eta(capsys):
    clock = Clock()
    train(ProgressLog(clock=clock), clock, range(0, 361), 360, 1.5)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(set(lines)) == 10
    assert lines[0] == "vlm-pipeline: training step 36/360 (10%), 1.50 s/step, elapsed 0:00:54, ETA 0:08:06"
    assert lines[-1] == "vlm-pipeline: training step 360/360 (100%), 1.50 s/step, elapsed 0:09:00, ETA 0:00:00"


def test_each_line_carries_the_loss_logged_at_its_own_step_and_the_end_says_what_this_run_trained(capsys):
    clock = Clock()
    train(ProgressLog(clock=clock), clock, range(0, 101), 100, 2.0, logging_steps=5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vlm-pipeline: training step 10/100 (10%), loss 1, 2.00 s/step, elapsed 0:00:20, ETA 0:03:00"
    assert lines[1].startswith("vlm-pipeline: training step 20/100 (20%), loss 0.5, ")
    assert lines[-1] == "vlm-pipeline: trained steps 1-100 of 100 in 0:03:20 (2.00 s/step), mean training loss 0.5"
    assert len(lines) == 11


def test_a_run_resumed_at_its_last_step_says_it_trained_nothing(capsys):
    clock = Clock()
    train(ProgressLog(clock=clock), clock, range(10, 11), 10, 1.0, logging_steps=1)
    assert capsys.readouterr().out.splitlines() == ["vlm-pipeline: no step left to train: resumed at step 10 of 10"]


def test_a_line_between_logging_steps_shows_the_last_logged_loss_and_evaluations_get_their_own_line(capsys):
    clock = Clock()
    callback = ProgressLog(clock=clock)
    train(callback, clock, range(0, 13), 100, 1.0, logging_steps=4)  # step 10 is due but does not log
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("vlm-pipeline: training step 10/100 (10%), loss 1.25, ")  # step 8's
    callback.on_log(None, SimpleNamespace(global_step=12, max_steps=100), None, logs={"eval_loss": 0.123456})
    assert capsys.readouterr().out == "vlm-pipeline: evaluation at step 12: eval_loss 0.1235\n"


def test_fast_steps_read_as_steps_per_second_and_a_resumed_run_counts_only_its_own_steps(capsys):
    clock = Clock()
    train(ProgressLog(clock=clock), clock, range(200, 401), 400, 0.25)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vlm-pipeline: training step 240/400 (60%), 4.00 steps/s, elapsed 0:00:10, ETA 0:00:40"
    assert len(lines) == 5


def test_slow_runs_still_say_something_every_interval(capsys):
    clock = Clock()
    train(ProgressLog(every_seconds=60, clock=clock), clock, range(0, 101), 1000, 25.0)
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in capsys.readouterr().out.splitlines()]
    assert steps == [*range(3, 100, 3), 100]  # 75 s apart at most; step 100 is a tenth of the run


def test_silent_while_the_bar_shows_and_on_other_ranks(capsys):
    clock = Clock()
    train(ProgressLog(clock=clock), clock, range(0, 101), 100, 1.0, disable_tqdm=False)
    train(ProgressLog(clock=clock), clock, range(0, 101), 100, 1.0, is_world_process_zero=False)
    assert capsys.readouterr().out == ""


# --- the trainer in a log -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_into_a_log_prints_progress_lines_and_no_bar(tiny_models, tmp_path, capsys):
    from datasets import Dataset

    rows = [
        {"input_ids": [20 + i, 30, 40, 50], "labels": [-100, 30, 40, 50], "image_paths": [], "length": 4}
        for i in range(10)
    ]
    Dataset.from_list(rows).save_to_disk(tmp_path / "train")
    config = launched_run_config(
        tmp_path / "run",
        tiny_models["llama"],
        tmp_path / "train",
        PROJECT_ROOT / "data/01_raw",
        str(PROJECT_ROOT / "conf/accelerate/cpu_single_process.yaml"),
        1,
        max_steps=10,
        logging_steps=5,
        train_sampling_strategy="sequential",
    )
    launch(launch_command(PROJECT_ROOT / "conf/accelerate/cpu_single_process.yaml", config))
    output = capsys.readouterr().out
    progress = re.findall(r"vlm-pipeline: training step (\d+)/10 \(\d+%\), .* ETA \d+:\d\d:\d\d\n", output)
    assert progress == [str(step) for step in range(1, 11)], output[-3000:]
    assert "\r" not in output and not re.search(r"\|\s*\d+/10 \[", output), output[-3000:]  # no tqdm bar
    assert "{'loss':" not in output  # no printer dicts: the lines carry the loss
    assert "had defaults used instead" not in output  # the CPU thread count was given (cpu_thread_flags)
    losses = re.findall(r"training step (\d+)/10 \(\d+%\), loss ([\d.]+),", output)
    history = json.loads((tmp_path / "run/final/training_history.json").read_text())
    logged = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert [int(step) for step, _ in losses] == list(range(5, 11))  # from the first logged loss on
    assert float(losses[0][1]) == pytest.approx(logged[5], rel=1e-3)  # step 5's own loss, not an older one
    assert float(losses[-1][1]) == pytest.approx(logged[10], rel=1e-3)
    summary = r"vlm-pipeline: trained steps 1-10 of 10 in \d+:\d\d:\d\d \(.*\), mean training loss [\d.]+\n"
    assert re.search(summary, output), output[-3000:]


# --- library warnings -----------------------------------------------------------------------------------------


def test_understood_warnings_are_hidden_and_every_other_one_is_a_log_record(caplog):
    import warnings

    from vlm_pipeline.warning_filters import hide_understood_warnings

    # As a fresh process starts: an in-process `vlm-pipeline` main() of another test captured warnings, and pytest's
    # per-test catch_warnings has since put its own showwarning back, which captureWarnings(True) would then keep.
    logging.captureWarnings(False)
    logging.getLogger("py.warnings").filters.clear()
    hide_understood_warnings()
    hide_understood_warnings()  # Kedro may call init hooks again: still one filter
    try:
        with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings.catch_warnings():
            warnings.simplefilter("always")  # as MLflow raises it: inside its own catch_warnings
            understood = "\x1b[33mAdd type hints to the `predict` method to enable data validation\x1b[0m"
            warnings.warn(understood, UserWarning, stacklevel=1)
            warnings.warn("a warning nobody looked at", UserWarning, stacklevel=1)
        assert [record.getMessage().split("UserWarning: ")[1].splitlines()[0] for record in caplog.records] == [
            "a warning nobody looked at"
        ]
        assert len(logging.getLogger("py.warnings").filters) == 1
    finally:
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").filters.clear()


@pytest.mark.slow
def test_kedro_starts_without_the_plugin_warning(tmp_path):
    """kedro-mlflow's CLI plugin raises MLflow's type-hint warning at import: hidden by the kedro.init hook."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "kedro"), "info"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "kedro_mlflow" in result.stdout  # the plugin was loaded
    assert "type hints" not in result.stdout + result.stderr, result.stderr


# --- the launch command ---------------------------------------------------------------------------------------


def test_cpu_configs_get_accelerates_own_thread_count_explicitly(monkeypatch):
    import psutil

    from vlm_pipeline.training.launcher import cpu_thread_flags

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    physical = psutil.cpu_count(logical=False)
    accelerate = PROJECT_ROOT / "conf/accelerate"
    assert cpu_thread_flags(accelerate / "cpu_single_process.yaml", {}) == [
        "--num_cpu_threads_per_process",
        str(physical),
    ]
    assert cpu_thread_flags(accelerate / "cpu_ddp.yaml", {}) == [
        "--num_cpu_threads_per_process",
        str(max(1, physical // 2)),
    ]
    assert cpu_thread_flags(accelerate / "deepspeed_zero3.yaml", {}) == []  # GPUs: nothing to choose
    assert cpu_thread_flags(accelerate / "cpu_ddp.yaml", {"num_processes": "$((SLURM_NNODES * 2))"}) == []
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # accelerate uses it as it is
    assert cpu_thread_flags(accelerate / "cpu_single_process.yaml", {}) == []

"""Training progress a log can hold: a line every tenth of the run (or 5 minutes) instead of a progress bar.

On a terminal, transformers' tqdm bar redraws one line in place and its ``PrinterCallback``-style log dicts go
above it. In a log file or CI every redraw is kept as a new line, and a dict every ``logging_steps`` fills
hundreds more, so there the trainer turns tqdm off (``disable_tqdm``), drops transformers' ``PrinterCallback``
and ``ProgressLog`` prints a few lines with the step, the last training loss, the rate and the time left, one
line per evaluation, and one when training ends. The full history stays in ``training_history.json`` and MLflow.
Whether the output is a terminal is the trainer's own stderr (where tqdm draws): the launcher gives it a
pseudo-terminal exactly when ``kedro run`` itself writes to one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from transformers import TrainerCallback


class ProgressLog(TrainerCallback):
    """Prints ``step/total``, loss, rate and ETA at every ``every_fraction`` of the run, and at least every
    ``every_seconds``, but only when the progress bar is off (``args.disable_tqdm``): never both, never a repeat.

    Only the main process prints (like tqdm). The rate counts the steps this process trained, so a resumed run
    does not look faster for the steps its checkpoint already held."""

    def __init__(
        self, every_fraction: float = 0.1, every_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic
    ):
        self.every_fraction = every_fraction
        self.every_seconds = every_seconds
        self.clock = clock
        self.active = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.active = bool(args.disable_tqdm) and state.is_world_process_zero
        self.first_step = self.last_step = state.global_step
        self.started = self.last_printed = self.clock()
        self.loss: float | None = None
        self.due_at_log = False

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active or state.global_step == self.last_step:
            return
        now = self.clock()
        if self._due(state.global_step, state.max_steps, now):
            self.last_step, self.last_printed = state.global_step, now
            # transformers' flow callback (which runs first) decided whether this step logs: if it does, the line
            # waits for on_log, right after, so that it carries this step's loss rather than an older one.
            if control is not None and control.should_log:
                self.due_at_log = True
            else:
                self._print(self.line(state.global_step, state.max_steps, now))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.active or not logs:
            return
        if "loss" in logs:
            self.loss = float(logs["loss"])
        if self.due_at_log:
            self.due_at_log = False
            self._print(self.line(state.global_step, state.max_steps, self.last_printed))
        if "eval_loss" in logs:
            self._print(f"evaluation at step {state.global_step}: eval_loss {float(logs['eval_loss']):.4g}")
        if "train_runtime" in logs:
            self._print(self.summary(state.global_step, state.max_steps, logs))

    def _due(self, step: int, total: int, now: float) -> bool:
        """At the last step, on crossing a mark (a tenth of the run), or when slow steps left the log silent."""
        mark = max(1, round(total * self.every_fraction))
        return step >= total or step // mark > self.last_step // mark or now - self.last_printed >= self.every_seconds

    def line(self, step: int, total: int, now: float) -> str:
        """``training step 36/360 (10%), loss 2.984, 1.52 s/step, elapsed 0:00:55, ETA 0:08:12``."""
        elapsed = now - self.started
        per_step = elapsed / max(1, step - self.first_step)
        eta = _clock(per_step * max(0, total - step))
        loss = f"loss {self.loss:.4g}, " if self.loss is not None else ""
        return (
            f"training step {step}/{total} ({step / total:.0%}), {loss}{_rate(per_step)}, "
            f"elapsed {_clock(elapsed)}, ETA {eta}"
        )

    def summary(self, step: int, total: int, logs: dict) -> str:
        """``trained steps 1-360 of 360 in 0:00:09 (39.85 steps/s), mean training loss 1.336``: which steps this
        process trained (a resumed run starts after its checkpoint) and transformers' own mean loss."""
        elapsed = self.clock() - self.started
        trained = max(0, step - self.first_step)
        if trained == 0:  # resumed from a checkpoint at the last step: transformers' "mean loss" is then 0
            return f"no step left to train: resumed at step {step} of {total}"
        mean_loss = f", mean training loss {float(logs['train_loss']):.4g}" if "train_loss" in logs else ""
        return (
            f"trained steps {self.first_step + 1}-{step} of {total} in {_clock(elapsed)} "
            f"({_rate(elapsed / max(1, trained))}){mean_loss}"
        )

    @staticmethod
    def _print(message: str) -> None:
        print(f"vlm-pipeline: {message}", flush=True)


def _rate(per_step: float) -> str:
    return f"{per_step:.2f} s/step" if per_step >= 1 else f"{1 / per_step:.2f} steps/s" if per_step else "-"


def _clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``, like tqdm's times."""
    return str(timedelta(seconds=round(seconds)))

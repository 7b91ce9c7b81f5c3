"""Training progress a log can hold: a line every tenth of the run (or 5 minutes) instead of a progress bar.

On a terminal, transformers' tqdm bar redraws one line in place. In a log file or CI every redraw is kept as a new
line, hundreds per run, so there the trainer turns tqdm off (``disable_tqdm``) and ``ProgressLog`` prints a few
lines with the step, the rate and the time left. Whether the output is a terminal is the trainer's own stderr (where
tqdm draws): the launcher gives it a pseudo-terminal exactly when ``kedro run`` itself writes to one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import timedelta

from transformers import TrainerCallback


def on_terminal() -> bool:
    """Whether someone watches the output live, so tqdm's bar (drawn on stderr) redraws in place."""
    return sys.stderr.isatty()


class ProgressLog(TrainerCallback):
    """Prints ``step/total``, rate and ETA at every ``every_fraction`` of the run, and at least every
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

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active or state.global_step == self.last_step:
            return
        now = self.clock()
        if self._due(state.global_step, state.max_steps, now):
            print(f"vlm-pipeline: {self.line(state.global_step, state.max_steps, now)}", flush=True)
            self.last_step, self.last_printed = state.global_step, now

    def _due(self, step: int, total: int, now: float) -> bool:
        """At the last step, on crossing a mark (a tenth of the run), or when slow steps left the log silent."""
        mark = max(1, round(total * self.every_fraction))
        return step >= total or step // mark > self.last_step // mark or now - self.last_printed >= self.every_seconds

    def line(self, step: int, total: int, now: float) -> str:
        """``training step 36/360 (10%), 1.52 s/step, elapsed 0:00:55, ETA 0:08:12``."""
        elapsed = now - self.started
        per_step = elapsed / max(1, step - self.first_step)
        rate = f"{per_step:.2f} s/step" if per_step >= 1 else f"{1 / per_step:.2f} steps/s" if per_step else "-"
        eta = _clock(per_step * max(0, total - step))
        return f"training step {step}/{total} ({step / total:.0%}), {rate}, elapsed {_clock(elapsed)}, ETA {eta}"


def _clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``, like tqdm's times."""
    return str(timedelta(seconds=round(seconds)))

"""A clean stop on SIGTERM: how clusters end jobs (Slurm cancel, time limit, preemption, Kubernetes).

The signal only sets a flag. At the end of each optimizer step every rank learns whether any rank was signalled
(one small all-reduce, so all ranks stop at the same step and no collective is left waiting), the Trainer saves
a checkpoint of that step and stops, and the entry point exits non-zero saying where it saved. A rerun resumes
from that checkpoint. The launcher (``training/launcher.py``) forwards SIGTERM from the Kedro process to the
whole ``accelerate launch`` process group, so the trainer gets it even when only ``kedro run`` was signalled.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback


class TrainingStopped(RuntimeError):
    """One of our checks stopped training (a non-finite or diverged loss, a component without gradient). Its
    message starts "training stopped at optimizer step N" and says what to do; the trainer's entry point prints it
    as one line and exits 1, and the launcher raises with that line first."""


class StopRequested(SystemExit):
    """Training stopped on SIGTERM after saving a checkpoint; exits with status 143 (128 + SIGTERM)."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message


class StopOnSignal(TrainerCallback):
    """Save a checkpoint and stop at the end of the step during which SIGTERM arrived (on any rank)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.requested = False
        self.stopped_at: int | None = None

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def _any_rank_requested(self) -> bool:
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_requested():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

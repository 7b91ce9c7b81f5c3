"""Runs that cannot help stop, with the cause: a diverged loss, and a trainable component that gets no gradient.

Both are checked at the end of each optimizer step's last micro-batch (``training_step`` with the gradients
synchronised), before the optimizer applies them, and both decide from values that are the same on every process
(reduced across them), so all ranks stop at the same step and none is left waiting in a collective.

**Divergence** (``sft.divergence_check``): each optimizer step's loss is the sum of its micro-batches' losses (what
transformers logs), averaged over the processes. The run stops at the first step where the mean of the last
``RECENT_STEPS`` step losses is above ``DIVERGENCE_FACTOR`` times the mean of the first ``START_STEPS``. Per step,
not per logged value, so the rule does not depend on ``logging_steps``. The start is only a few steps, taken while
warm-up keeps the learning rate small: at a learning rate of 0.99 the demo's loss is already several times its
start by step 5, so a longer start would include the divergence it is meant to catch. A run resumed from a
checkpoint measures its start again from its own first steps.

**Untrained components** (``component_gradients.py``): see there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from vlm_pipeline.training.component_gradients import ComponentGradients
from vlm_pipeline.training.stopping import TrainingStopped

START_STEPS = 3
RECENT_STEPS = 10
DIVERGENCE_FACTOR = 3.0


class DivergedTrainingError(TrainingStopped):
    """The training loss stayed far above its start (the rule in this module); the message names the step."""


def newest_checkpoint_note(output_dir: str | Path) -> str:
    """Which checkpoint a stopped run leaves as its newest: the resume point, written before the bad step."""
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not checkpoints:
        return "no checkpoint was written yet"
    return f"the newest checkpoint, {checkpoints[-1]}, was written before it"


class LossDivergence:
    """The divergence rule over per-optimizer-step losses (see the module's docstring)."""

    def __init__(self) -> None:
        self.start: list[float] = []
        self.recent: list[float] = []

    def add(self, step_loss: float) -> str | None:
        """Record one optimizer step's loss; return why the run diverged, or None."""
        if len(self.start) < START_STEPS:
            self.start.append(step_loss)
        self.recent = [*self.recent, step_loss][-RECENT_STEPS:]
        if len(self.recent) < RECENT_STEPS:
            return None
        start, recent = sum(self.start) / len(self.start), sum(self.recent) / RECENT_STEPS
        if recent <= DIVERGENCE_FACTOR * start:
            return None
        return (
            f"the mean training loss of the last {RECENT_STEPS} optimizer steps is {recent:.4g}, above "
            f"{DIVERGENCE_FACTOR:g} times the mean of the first {len(self.start)} ({start:.4g})"
        )


class GuardedTraining:
    """Mixin for our transformers ``Trainer``: stops a diverged run and one whose trainable component gets no
    gradient, and logs each component's gradient norm at ``logging_steps`` (``grad_norm/<group>``).

    Keyword argument: ``divergence_check`` (``sft.divergence_check``). The trainer's ``architecture`` attribute
    (set before this ``__init__``) names the components."""

    def __init__(self, *args: Any, divergence_check: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.divergence = LossDivergence() if divergence_check else None
        self.component_gradients = ComponentGradients(self.architecture)
        self._step_loss: torch.Tensor | None = None
        self._step_has_images = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The collator adds pixel_values only to a batch with images: the vision tower and projector get input.
        self._step_has_images |= "pixel_values" in inputs
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = loss.detach() if self._step_loss is None else self._step_loss + loss.detach()
        if self.accelerator.sync_gradients:  # the optimizer step's last micro-batch: gradients are complete
            step_loss, self._step_loss = self._step_loss, None
            has_images, self._step_has_images = self._step_has_images, False
            self._check_components(has_images)
            if self.divergence is not None:
                self._check_divergence(step_loss)
        return loss

    def _check_components(self, has_images: bool) -> None:
        untrained = self.component_gradients.measure(self, has_images)
        if untrained is not None:
            raise untrained.error(self.state.global_step + 1, newest_checkpoint_note(self.args.output_dir))

    def _check_divergence(self, step_loss: torch.Tensor) -> None:
        value = self.accelerator.reduce(step_loss.float().reshape(1), reduction="mean").item()
        if not math.isfinite(value):
            return  # the non-finite guard's case, with its own message
        reason = self.divergence.add(value)
        if reason is None:
            return
        peak = self.args.learning_rate
        raise DivergedTrainingError(
            f"training stopped at optimizer step {self.state.global_step + 1}: the loss diverged: {reason}, at a "
            f"learning rate of {self._get_learning_rate():.4g} at this step (peak {peak:g}); "
            f"{newest_checkpoint_note(self.args.output_dir)}. Lower the learning rate (method.learning_rate), or "
            "set sft.divergence_check false to train on"
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log entry (not evaluation's or the closing summary)
            logs.update({f"grad_norm/{group}": norm for group, norm in self.component_gradients.norms.items()})
        super().log(logs, start_time)

"""Each trainable component's gradient norm, per optimizer step, and the check that every one of them trains.

Groups: each component of ``Architecture.components`` (vision tower, projector, language model) with parameters
that train in full, and ``<component>.lora`` for the LoRA adapters whose modules live in it. A group is checked
once, at the first optimizer step that could give it a gradient: the vision tower and projector (and their
adapters) only at a step whose batches hold images, since a text-only batch gives them none by design. There its
gradient norm must be non-zero; otherwise training stops naming the group and the likely cause. (A non-finite norm
is the non-finite guard's case: it stops the run on the total gradient norm.) The check is per group, not per
parameter: Mllama's cross-attention layers, part of its language model, get no gradient from a text-only step
while the rest of the language model does.

Norms are measured when the step's last backward pass is done, before clipping, and logged at ``logging_steps``
as ``grad_norm/<group>`` (their squares add up to the Trainer's ``grad_norm`` before clipping). Under FSDP each
process holds a shard of every gradient, so the squared sums are added across processes; under DDP every process
holds the same averaged gradients. Under DeepSpeed neither is measured: accelerate's DeepSpeed wrapper runs the
engine's step (clipping, update, zeroing) inside the backward call, so no gradient is left for the trainer to read,
and ZeRO partitions them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType

from vlm_pipeline.architectures import Architecture
from vlm_pipeline.training.stopping import TrainingStopped
from vlm_pipeline.training.trainable import component_of

# The components whose only input is the batch's images.
IMAGE_FED = {"vision_tower", "projector"}


class UntrainedComponentError(TrainingStopped):
    """A trainable component got no gradient at a step that gave it input; the message names it and the cause."""


def is_adapter(name: str) -> bool:
    """PEFT's LoRA parameters (``lora_A``, ``lora_B``, ``lora_embedding_A``, DoRA's ``lora_magnitude_vector``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def gradient_group(name: str, architecture: Architecture) -> str:
    component = component_of(name, architecture)
    return f"{component}.lora" if is_adapter(name) else component


@dataclass
class Untrained:
    group: str
    parameters: int
    never_reached: bool  # no parameter of the group has a gradient at all (None), rather than a zero one
    checkpointing: bool

    def error(self, step: int, checkpoint_note: str) -> UntrainedComponentError:
        if self.never_reached and self.checkpointing:
            cause = (
                "gradient checkpointing with reentrant checkpoints over a frozen input: when no input of a "
                "checkpointed block needs a gradient, its parameters get none. Set "
                "sft.gradient_checkpointing_kwargs {use_reentrant: false}"
            )
        elif self.never_reached:
            cause = (
                "the model never calls these modules in its forward pass, or their output never reaches the loss "
                "(a LoRA target module outside the forward pass). Drop them from lora.target_modules, or freeze them"
            )
        else:
            cause = "their output reaches the loss only through a zero factor (the gradient arrives, but is zero)"
        return UntrainedComponentError(
            f"training stopped at optimizer step {step}: the {self.group} ({self.parameters} trainable parameters) "
            f"got no gradient although this step gave it input. Likely cause: {cause}. {checkpoint_note}"
        )


class ComponentGradients:
    """Per-group gradient norms of one trainer's model, and the groups still to check (see the module)."""

    def __init__(self, architecture: Architecture) -> None:
        self.architecture = architecture
        self.norms: dict[str, float] = {}
        self._groups: dict[str, list[torch.Tensor]] | None = None
        self._unchecked: set[str] = set()
        self._skipped_said = False

    def _grouped(self, model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
        # Built at the first step, after the engine has wrapped the model (FSDP2 replaces the parameters).
        if self._groups is None:
            self._groups = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    self._groups.setdefault(gradient_group(name, self.architecture), []).append(parameter)
            self._unchecked = set(self._groups)
        return self._groups

    def measure(self, trainer: Any, has_images: bool) -> Untrained | None:
        """This step's norms (kept in ``norms``) and the first group that should have trained but did not."""
        if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED:
            if not self._skipped_said and trainer.is_world_process_zero():
                print(
                    "vlm-pipeline: per-component gradient norms are not measured under DeepSpeed (its engine steps "
                    "and zeroes the gradients inside backward; ZeRO partitions them)",
                    flush=True,
                )
            self._skipped_said = True
            return None
        groups = self._grouped(trainer.model)
        sums = torch.zeros(len(groups), 2, dtype=torch.float64, device=trainer.accelerator.device)
        for row, parameters in enumerate(groups.values()):
            # A DTensor's local shard; one fused norm over the group, as clipping computes it (no full-size copy
            # in another dtype: a 7B model's embedding gradient alone is gigabytes).
            grads = [g.to_local() if hasattr(g, "to_local") else g for p in parameters if (g := p.grad) is not None]
            if grads:
                sums[row, 0] = torch.nn.utils.get_total_norm(grads, norm_type=2.0).double() ** 2
                sums[row, 1] = len(grads)
        if trainer.accelerator.distributed_type == DistributedType.FSDP:
            sums = trainer.accelerator.reduce(sums, reduction="sum")
        sums = sums.tolist()
        self.norms = {group: total**0.5 for group, (total, _) in zip(groups, sums, strict=True)}
        for group, (total, present) in zip(groups, sums, strict=True):
            if group not in self._unchecked or (group.split(".")[0] in IMAGE_FED and not has_images):
                continue
            self._unchecked.discard(group)
            if total == 0.0:
                return Untrained(
                    group,
                    sum(getattr(p, "ds_numel", None) or p.numel() for p in groups[group]),
                    never_reached=present == 0,
                    checkpointing=bool(trainer.args.gradient_checkpointing),
                )
        return None

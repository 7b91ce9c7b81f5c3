"""Optimizer parameter groups by component, each with its own peak learning rate (``method.learning_rates``).

Every trainable parameter goes to its component's group (``Architecture.components``: vision tower, projector,
language model; LoRA adapters to the component their module lives in), split in two by transformers' own
weight-decay rule (``Trainer.get_decay_parameter_names``: no decay for biases and norms). A group's ``lr`` is its
component's rate from ``method.learning_rates``, else ``method.learning_rate``; the scheduler scales every group by
the same factor, so each keeps its ratio to the others all run long. Each group carries its component's name
(``component``), so the optimizer's groups can be read back (``run_info.json``) and each component's learning rate
is logged at ``logging_steps`` as ``learning_rate/<component>``. The language model's groups come first: transformers'
own ``learning_rate`` log is the first group's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlm_pipeline.architectures import Architecture
from vlm_pipeline.training.trainable import COMPONENTS, component_of

# The language model first (see the module's docstring), then the others in their usual order.
GROUP_ORDER = ("language_model", *(c for c in COMPONENTS if c != "language_model"))


def component_parameter_groups(
    model: nn.Module,
    architecture: Architecture,
    learning_rate: float,
    learning_rates: dict[str, float],
    weight_decay: float,
    decay_names: set[str],
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: per component, with and without weight decay; empty ones left out."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((component_of(name, architecture), name in decay_names), []).append(parameter)
    trained = {component for component, _ in groups}
    untrained = sorted(set(learning_rates) - trained)
    if untrained:
        raise ValueError(
            f"method.learning_rates names {', '.join(untrained)}, which has no trainable parameters in this run "
            f"(trained here: {', '.join(sorted(trained))}); LoRA adapts the language model unless "
            "lora.target_modules is a regex that reaches other components"
        )
    return [
        {
            "params": groups[component, decays],
            "weight_decay": weight_decay if decays else 0.0,
            "lr": learning_rates.get(component, learning_rate),
            "component": component,
        }
        for component in GROUP_ORDER
        for decays in (True, False)
        if (component, decays) in groups
    ]


def component_learning_rates(optimizer: Any) -> dict[str, float]:
    """Each component's current learning rate, read from the optimizer's own groups."""
    return {group["component"]: group["lr"] for group in optimizer.param_groups if "component" in group}


def optimizer_groups(optimizer: Any) -> list[dict[str, Any]]:
    """The optimizer's groups as plain values: component, peak and current learning rate, weight decay."""
    return [
        {
            "component": group.get("component"),
            "initial_lr": group.get("initial_lr"),
            "lr": group["lr"],
            "weight_decay": group.get("weight_decay"),
        }
        for group in optimizer.param_groups
    ]


class ComponentLearningRates:
    """Mixin for our transformers ``Trainer``: the optimizer's groups by component, with their own learning rates.

    Keyword argument: ``learning_rates`` (``method.learning_rates``). The trainer's ``architecture`` attribute names
    the components."""

    def __init__(self, *args: Any, learning_rates: dict[str, float], **kwargs: Any):
        self.component_rates = dict(learning_rates)
        self._step_learning_rates: dict[str, float] = {}
        super().__init__(*args, **kwargs)

    def get_optimizer_cls_and_kwargs(self, args, model=None):
        # transformers' create_optimizer takes the groups from a "params" entry here (its hook for optimizers that
        # build their own groups), and keeps everything else it does: the optimizer class, its arguments, and
        # bitsandbytes' 32-bit embedding override for 8-bit optimizers.
        optimizer_cls, optimizer_kwargs = super().get_optimizer_cls_and_kwargs(args, model)
        groups = component_parameter_groups(
            model,
            self.architecture,
            args.learning_rate,
            self.component_rates,
            args.weight_decay,
            set(self.get_decay_parameter_names(model)),
        )
        return optimizer_cls, {**optimizer_kwargs, "params": groups}

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the rates this optimizer step applies (the scheduler moves after it)
            self._step_learning_rates = component_learning_rates(self.optimizer)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log entry, beside transformers' own learning_rate
            logs.update({f"learning_rate/{c}": lr for c, lr in self._step_learning_rates.items()})
        super().log(logs, start_time)

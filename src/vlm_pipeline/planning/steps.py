"""The Trainer's step arithmetic, done ahead of time (transformers 5 ``Trainer.set_initial_training_values``,
``TrainerState.compute_steps``, ``DefaultFlowCallback`` and ``rotate_checkpoints``)."""

from __future__ import annotations

import math
from typing import Any


def plan_steps(
    records: int,
    world_size: int,
    sft: Any,
    vision_records: int | None = None,
    micro_batches: int | None = None,
) -> dict[str, Any]:
    """Steps, warm-up, evaluations and checkpoints for ``records`` training records on ``world_size`` processes.

    ``sft`` is the validated ``SFTParams``. Batches per epoch count the last, partial batch as the Trainer's
    dataloader does (``dataloader_drop_last`` false); an optimizer step takes ``gradient_accumulation_steps`` of
    them, the last one of an epoch possibly fewer.

    ``vision_records`` is how many of the records have an image or a video. A set that mixes them with text-only
    records is batched by modality (the trainer's ``ModalityGroupedSampler``): each micro-step of all processes
    together, ``per_device_train_batch_size × world_size`` rows, is one modality, and the last one of each modality
    is filled with repeated rows of that modality (``repeated_rows``, every epoch).

    ``micro_batches``: with ``sft.max_tokens_per_batch``, the micro-batches of all processes together that the
    token-budget partition (``token_budget.micro_batches``, the trainer's) cuts the records into, a multiple of
    ``world_size`` with no row repeated; the effective batch is then the mean rows an optimizer step takes.
    """
    per_device = sft.per_device_train_batch_size
    accumulation = sft.gradient_accumulation_steps
    global_batch = per_device * world_size
    effective_batch: float = per_device * world_size * accumulation
    if micro_batches is not None:
        batches = micro_batches // world_size
        repeated = 0
        effective_batch = round(records * accumulation / max(batches, 1), 1)
    elif vision_records is not None and 0 < vision_records < records:
        batches = math.ceil(vision_records / global_batch) + math.ceil((records - vision_records) / global_batch)
        repeated = batches * global_batch - records
    else:
        batches = math.ceil(records / global_batch)
        repeated = 0
    steps_per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    if sft.max_steps > 0:
        total = sft.max_steps
        epochs = total / steps_per_epoch
    else:
        total = math.ceil(sft.num_train_epochs * steps_per_epoch)
        epochs = sft.num_train_epochs
    warmup = int(sft.warmup_steps) if sft.warmup_steps >= 1 else math.ceil(total * sft.warmup_steps)
    # Without eval_steps, transformers evaluates every logging_steps.
    evals = _event_steps(sft.eval_strategy, sft.eval_steps or sft.logging_steps, total, steps_per_epoch)
    saves = _event_steps(sft.save_strategy, sft.save_steps, total, steps_per_epoch)
    return {
        "records": records,
        "world_size": world_size,
        "effective_batch": effective_batch,
        "batches_per_epoch": batches,
        "repeated_rows": repeated,
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "total_steps": total,
        "warmup_steps": warmup,
        "eval_steps": evals,
        "save_steps": saves,
        "checkpoints_kept": kept_checkpoints(saves, sft.save_total_limit, sft.load_best_model_at_end),
    }


def _event_steps(strategy: str, every: float, total: int, steps_per_epoch: int) -> list[int]:
    """Steps at which an evaluation or a save happens (``every`` < 1 is a fraction of the total, rounded up).

    ``save_strategy: best`` saves whenever the metric improves, which only the run knows: no steps are listed.
    """
    if strategy == "steps":
        interval = math.ceil(total * every) if every < 1 else int(every)
        steps = list(range(interval, total + 1, interval))
        # DefaultFlowCallback evaluates and saves once more at the last step when it is not on the interval.
        return steps + [total] if not steps or steps[-1] != total else steps
    if strategy == "epoch":
        steps = list(range(steps_per_epoch, total + 1, steps_per_epoch))
        # An epoch cut short by max_steps still ends (on_epoch_end), so the last step saves too.
        return steps + [total] if not steps or steps[-1] != total else steps
    return []


def kept_checkpoints(saves: list[int], limit: int | None, keeps_best: bool) -> dict[str, Any]:
    """Which ``checkpoint-N`` folders remain: the newest ``save_total_limit``; with ``load_best_model_at_end``
    the best one is kept as well (it is known only at run time, so it is reported as an extra)."""
    if not limit or limit <= 0 or len(saves) <= limit:
        return {"names": [f"checkpoint-{step}" for step in saves], "plus_best": False}
    return {"names": [f"checkpoint-{step}" for step in saves[-limit:]], "plus_best": keeps_best}

"""Text tables printed to the terminal and the log: the preflight plan and the trainable-parameter table."""

from __future__ import annotations

from typing import Any

from vlm_pipeline.planning.memory import GIB

MEMORY_PARTS = (
    "weights",
    "gradients",
    "optimizer_states",
    "activations",
    "logits_and_loss",
    "optimizer_step_temporaries",
    "peak_allocated",
    "framework_overhead",
    "total",
)


# Which of the plan's lines share one line in the log (``compact``): the model; the batch; the schedule; the data.
COMPACT_GROUPS = (
    ("model",),
    ("records", "world size", "effective batch"),
    ("steps", "warm-up", "evaluations at", "checkpoints at", "checkpoints kept"),
    ("tokens per step", "memory per GPU"),
)


def format_plan(plan: dict[str, Any], compact: bool = False) -> str:
    """The plan as the table ``vlm-pipeline plan`` prints; ``compact``: as the training node logs it, a few lines
    of ``label value; label value`` with the memory estimate in one (training_plan.json holds every figure).

    Memory is printed in GB (10^9 bytes), the unit of ``plan.gpu_memory_gb`` and of the verdict; the plan's own
    figures (``memory_gib``, ``total_gib``) stay in GiB, as torch reports allocations."""
    steps, model = plan["steps"], plan["model"]
    memory = {name: _gb(value) for name, value in plan["memory_gib"].items()}
    settings = plan["settings"]
    kept = steps["checkpoints_kept"]
    rows = {
        "model": f"{model['architecture']} from {model['config']}: {_count(model['total_parameters'])} "
        f"parameters, {_count(model['trainable_parameters'])} trainable",
        "records": f"{steps['records']:,} (training split, after the validation hold-out)",
        "world size": f"{steps['world_size']} ({settings['engine']})",
        "effective batch": f"{steps['effective_batch']} = {_micro_batch(plan)} × "
        f"{steps['world_size']} × {settings['gradient_accumulation_steps']} accumulation",
        "steps": f"{steps['steps_per_epoch']:,} per epoch × {steps['epochs']:g} epochs = {steps['total_steps']:,}",
        "warm-up": f"{steps['warmup_steps']:,} steps",
        "evaluations at": _steps_text(steps["eval_steps"]),
        "checkpoints at": _steps_text(steps["save_steps"]),
        "checkpoints kept": (", ".join(kept["names"]) or "none") + (" + the best one" if kept["plus_best"] else ""),
        "tokens per step": f"{plan['tokens_per_step']['mean']:,} (mean; {plan['tokens_per_step']['source']}), "
        f"longest row {plan['tokens_per_step']['longest_row']:,}",
        "memory per GPU": f"{memory['total']:.2f} GB (estimate: "
        + ", ".join(f"{name.replace('_', ' ')} {memory[name]:.2f}" for name in MEMORY_PARTS[:-1])
        + ")",
    }
    if compact:
        lines = ["; ".join(f"{label} {rows[label]}" for label in group) for group in COMPACT_GROUPS]
    else:
        lines = [f"{label:<17}{value}" for label, value in rows.items() if label != "memory per GPU"]
        lines.append("memory per GPU (GB, estimate)")
        lines += [f"  {name.replace('_', ' '):<28}{memory[name]:>10.2f}" for name in MEMORY_PARTS]
    budget = plan["gpu_memory_gb"]
    verdict, warning = ("verdict ", "WARNING ") if compact else ("verdict          ", "WARNING          ")
    if budget is None:
        lines.append(f"{verdict}no plan.gpu_memory_gb set: not checked")
    elif plan["fits"]:
        lines.append(f"{verdict}fits in {budget:g} GB ({memory['total']:.1f} GB estimated)")
    else:
        lines.append(f"{verdict}DOES NOT FIT in {budget:g} GB ({memory['total']:.1f} GB estimated)")
        steps = plan.get("alternatives", [])
        if steps:
            lines.append("  would fit with these changes together (estimate after each):")
        for option in steps:
            lines.append(f"    + {option['change']}: {_gb(option['total_gib']):.1f} GB")
        if not steps:
            lines.append("  no combination of the usual knobs fits: add GPUs or shorten the rows")
    lines += [f"{warning}{text}" for text in plan.get("warnings", [])]
    return "\n".join(lines)


def _micro_batch(plan: dict[str, Any]) -> str:
    """What one process's forward pass takes: rows, or (``sft.max_tokens_per_batch``) records up to a token budget."""
    budget = plan.get("token_budget")
    if not budget:
        return f"{plan['settings']['batch_size']} per device"
    return (
        f"micro-batches of at most {budget['max_tokens']:,} tokens ({budget['layout']}; {budget['mean_rows']:g} rows "
        f"on average, {budget['micro_batches']:,} an epoch)"
    )


def _gb(gib: float) -> float:
    return gib * GIB / 1e9


def format_parameter_table(table: dict[str, dict[str, int]]) -> str:
    """Trainable vs total parameters, as the trainer prints it: one line, the whole model first, then each
    component (``all 108,544 of 418,016 (25.97%); vision_tower 0 of 58,816; ...``)."""
    parts = [
        f"{component} {row['trainable']:,} of {row['total']:,}"
        + (f" ({row['trainable'] / row['total']:.2%})" if component == "all" and row["total"] else "")
        for component, row in table.items()
    ]
    return "; ".join(sorted(parts, key=lambda part: not part.startswith("all ")))


def _count(number: int) -> str:
    return f"{number / 1e9:.2f}B" if number >= 1e9 else f"{number / 1e6:,.2f}M"


def _steps_text(steps: list[int], shown: int = 6) -> str:
    if not steps:
        return "none"
    if len(steps) <= shown:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, …, {', '.join(map(str, steps[-2:]))} ({len(steps)} in all)"

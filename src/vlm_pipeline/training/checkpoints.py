"""Which checkpoint a restarted run resumes from: the newest *complete* one.

transformers writes ``checkpoint-N/`` in place: weights, then optimizer, scheduler and RNG state, and
``trainer_state.json`` last. A run killed mid-save leaves a folder without (or with a cut) trainer_state.json,
which ``get_last_checkpoint`` would still pick. Such folders are moved aside to ``incomplete/`` (kept for a
post-mortem, never resumed from), so both the resume and the Trainer's checkpoint rotation ignore them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import PreTrainedModel

from vlm_pipeline.model_files import check_loading_info

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def is_complete(checkpoint: Path) -> bool:
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return False
    return any(checkpoint.glob("*.safetensors"))


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``checkpoints``; incomplete ones are moved aside first."""
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (int(match.group(1)), path)
        for path in checkpoints.iterdir()
        if path.is_dir() and (match := CHECKPOINT.match(path.name))
    )
    complete = []
    for step, path in found:
        if is_complete(path):
            complete.append(path)
            continue
        aside = checkpoints / "incomplete" / path.name
        aside.parent.mkdir(exist_ok=True)
        if aside.exists():
            aside = aside.with_name(f"{path.name}-{len(list(aside.parent.iterdir()))}")
        path.rename(aside)
        logger.warning("checkpoint-%d was not completely written (killed mid-save?); moved to %s", step, aside)
    return complete[-1] if complete else None


def finished_run(checkpoint_dir: Path) -> Path | None:
    """The kept result of a run that already finished with this exact run config (``<checkpoint_dir>/final``)."""
    finished = checkpoint_dir / "final"
    return finished if (finished / "training_history.json").is_file() else None


def holds_full_model(checkpoint: Path) -> bool:
    """The checkpoint holds a whole model's weights (not a LoRA adapter's, nor an FSDP or DeepSpeed shard set)."""
    return (checkpoint / "model.safetensors").is_file() or (checkpoint / "model.safetensors.index.json").is_file()


def load_full_model_weights(model: PreTrainedModel, checkpoint: Path) -> None:
    """Load the model weights of ``checkpoint`` into ``model`` in place, under the model's own parameter names.

    transformers saves a checkpoint in the original checkpoint's key format (Qwen2.5-VL's ``visual.*`` and
    ``model.*``, not the module's ``model.visual.*`` and ``model.language_model.*``), but the Trainer resumes, and
    loads the best checkpoint, with a plain ``load_state_dict``: every renamed weight is "missing", one log line
    says so, and training silently continues from the base weights. ``from_pretrained`` maps the names back;
    anything still unmatched stops the run."""
    dtype = next(model.parameters()).dtype
    loaded, info = type(model).from_pretrained(checkpoint, dtype=dtype, config=model.config, output_loading_info=True)
    check_loading_info(checkpoint, info)  # a tensor the checkpoint lacks would be resumed from random values
    saved = loaded.state_dict()
    result = model.load_state_dict(saved, strict=False)
    unmatched = [*result.missing_keys, *result.unexpected_keys]
    if unmatched:
        raise RuntimeError(
            f"{checkpoint}: {len(unmatched)} weight(s) do not match the model, e.g. {unmatched[:3]}; the checkpoint "
            "was written by another model or configuration"
        )

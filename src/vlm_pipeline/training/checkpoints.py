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

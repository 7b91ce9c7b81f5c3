"""Node functions for evaluation. The measures live in ``vlm_pipeline.scoring``."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset

from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import EvaluationParams, PreprocessingParams
from vlm_pipeline.data.encoding import reference_answer
from vlm_pipeline.reporting.evaluation import (
    comparison_figure,
    format_table,
    loss_curve,
    loss_figure,
    report_markdown,
)
from vlm_pipeline.scoring import generate_answers, teacher_forced_loss, text_scores
from vlm_pipeline.training.collator import SFTCollator

logger = logging.getLogger(__name__)


def evaluate_model(
    model_dir: Path,
    context: RunContext,
    test_records: Iterable[dict],
    test_data: Dataset,
    preprocessing: PreprocessingParams,
    params: EvaluationParams,
) -> dict:
    """Loss, perplexity, exact match and ROUGE-L of one model, plus its answers (same image bounds, chat template
    and template variables as training; loaded as the run context's ``model`` parameter group says)."""
    architecture = architecture_for_model(model_dir)
    encoder = load_chat_encoder(model_dir, preprocessing, trust_remote_code=context.model.trust_remote_code)
    model = load_model(model_dir, **context.model.loading_kwargs()).eval()
    collator = SFTCollator(encoder.processor, architecture, context.image_root)
    scores = teacher_forced_loss(model, collator, list(test_data), params.batch_size)
    test_records = list(test_records)  # the evaluated set: its answers are held in memory anyway
    answers = generate_answers(
        model,
        encoder,
        architecture,
        test_records,
        context.image_root,
        max_new_tokens=params.max_new_tokens,
        batch_size=params.batch_size,
    )
    scores.update(text_scores(answers, [reference_answer(r) for r in test_records]))
    return {"scores": scores, "answers": answers}


def majority_baseline(train_records: Iterable[dict], test_records: Iterable[dict]) -> dict:
    """Exact match of always giving the most common training answer: the bar a model must clear."""
    answer, _ = Counter(reference_answer(r) for r in train_records).most_common(1)[0]
    test_records = list(test_records)
    return {"answer": answer, **text_scores([answer] * len(test_records), [reference_answer(r) for r in test_records])}


def compare(
    base: dict, tuned: dict, baseline: dict, merge_check: dict, test_records: Iterable[dict]
) -> tuple[dict, list[dict], dict]:
    """metrics.json, predictions rows, and flat MLflow metrics; logs the base-vs-tuned table."""
    metrics = {
        "base": base["scores"],
        "tuned": tuned["scores"],
        "majority_baseline": baseline,
        "merge_check": merge_check,
    }
    predictions = [
        {
            "line": record["source_line"],
            "prompt": record["messages"][-2]["content"],
            "images": record["images"],
            "reference": reference_answer(record),
            "base": base_answer,
            "tuned": tuned_answer,
        }
        for record, base_answer, tuned_answer in zip(test_records, base["answers"], tuned["answers"], strict=True)
    ]
    flat = {
        f"eval.{model}.{name}": {"step": 0, "value": float(value)}
        for model in ("base", "tuned")
        for name, value in metrics[model].items()
    }
    logger.info("\n%s", format_table(metrics))
    return metrics, predictions, flat


def build_report(metrics: dict, predictions: list[dict], history: list[dict]) -> tuple[str, list[dict], Any, Any]:
    """The Markdown report, the loss curve (points and figure) and the base-vs-tuned chart."""
    points = loss_curve(history)
    return report_markdown(metrics, predictions), points, loss_figure(points), comparison_figure(metrics)

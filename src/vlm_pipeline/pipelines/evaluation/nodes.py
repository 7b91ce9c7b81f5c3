"""Node functions for evaluation. The measures live in ``vlm_pipeline.scoring``.

The model, the collator and the measures import torch and transformers: they are imported in the functions that
use them, so loading the pipeline registry (every ``kedro run``) does not pay for them."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset

from vlm_pipeline.config.run import RunContext
from vlm_pipeline.config.schema import EvaluationParams, PreprocessingParams
from vlm_pipeline.data.encoding import reference_answer
from vlm_pipeline.data.formats import record_videos
from vlm_pipeline.reporting.evaluation import (
    comparison_figure,
    format_summary,
    format_verdict,
    loss_curve,
    loss_figure,
    report_markdown,
)
from vlm_pipeline.reporting.mistakes import most_common_answers

logger = logging.getLogger(__name__)


def evaluate_model(
    model_dir: Path,
    context: RunContext,
    test_records: Iterable[dict],
    test_data: Dataset,
    preprocessing: PreprocessingParams,
    params: EvaluationParams,
) -> dict:
    """Loss, perplexity, token accuracy and the text scores of one model, plus its answers (same image bounds, chat
    template and template variables as training; loaded as the run context's ``model`` parameter group says)."""
    from vlm_pipeline.architectures import architecture_for_model, load_chat_encoder, load_model
    from vlm_pipeline.scoring import generate_answers, teacher_forced_loss, text_scores
    from vlm_pipeline.training.collator import SFTCollator

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
        video_sampling=preprocessing.videos,
    )
    scores.update(text_scores(answers, [reference_answer(r) for r in test_records]))
    return {"scores": scores, "answers": answers}


def check_serving(
    model_dir: Path,
    tuned: dict,
    context: RunContext,
    test_records: Iterable[dict],
    preprocessing: PreprocessingParams,
    params: EvaluationParams,
) -> dict:
    """Serve the tuned model with ``transformers serve`` and ask it the first test prompts; the share of its answers
    equal to the evaluation's (``vlm_pipeline.serving``). Empty when ``evaluation.serving_check`` is off."""
    if not params.serving_check:
        return {}
    from vlm_pipeline.architectures import load_chat_encoder
    from vlm_pipeline.serving import ServedModel, agreement, served_answers

    # transformers serve takes images as data URLs but no video: video records are left out of the check.
    asked = [(i, r) for i, r in enumerate(test_records) if not record_videos(r)][: params.serving_check_records]
    if not asked:
        logger.info("serving check: skipped, every test record has video (the server is not given video)")
        return {}
    records = [record for _, record in asked]
    trust_remote_code = context.model.trust_remote_code
    template_kwargs = load_chat_encoder(model_dir, preprocessing, trust_remote_code=trust_remote_code).render_kwargs
    loading = context.model.loading_kwargs()
    with tempfile.TemporaryDirectory(prefix="vlm-pipeline-serve-") as folder:
        with open(Path(folder) / "server.log", "w+", encoding="utf-8") as log:
            with ServedModel(model_dir, loading, startup_timeout_s=params.serving_startup_timeout_s, log=log) as server:
                served = served_answers(
                    server.base_url,
                    str(model_dir),
                    records,
                    context.image_root,
                    max_new_tokens=params.max_new_tokens,
                    template_kwargs=template_kwargs,
                )
    result = agreement(served, [tuned["answers"][i] for i, _ in asked], records)
    judge_serving(result, params.serving_check_strict)
    return result


def judge_serving(result: dict, strict: bool) -> None:
    """The serving check's verdict, after its server has stopped: agreement is logged; a differing answer is a
    warning naming the first record, or with ``evaluation.serving_check_strict`` a ``ServingMismatchError``."""
    from vlm_pipeline.serving import ServingMismatchError, describe

    if result["first_difference"] is None:
        logger.info("serving check: %s", describe(result))
    elif strict:
        raise ServingMismatchError(f"serving check: {describe(result)}. The stage fails: serving_check_strict is on.")
    else:
        logger.warning("serving check: %s", describe(result))


def majority_baseline(train_records: Iterable[dict], test_records: Iterable[dict]) -> dict:
    """Exact match of always giving the most common training answer: the bar a model must clear. ``tied``: every
    answer tied for most common, with its count (the first is picked), so the report can say it was a tie."""
    from vlm_pipeline.scoring import text_scores

    tied = most_common_answers([reference_answer(r) for r in train_records])
    answer = tied[0][0]
    test_records = list(test_records)
    scores = text_scores([answer] * len(test_records), [reference_answer(r) for r in test_records])
    return {"answer": answer, "tied": [list(pair) for pair in tied] if len(tied) > 1 else [], **scores}


def compare(
    base: dict,
    tuned: dict,
    baseline: dict,
    merge_check: dict,
    serving: dict,
    test_records: Iterable[dict],
    params: EvaluationParams,
) -> tuple[dict, dict, list[dict], dict]:
    """metrics.json, evaluation_details.json, predictions rows, and flat MLflow metrics; logs a summary line.

    metrics.json is a DVC metric file, which ``dvc metrics diff`` compares number by number: it holds numbers
    only (booleans as 0/1). The strings beside them (the majority answer, the merge check's dtype and criterion,
    how the intervals were drawn) go to evaluation_details.json."""
    from vlm_pipeline.scoring import VERDICT_RULE, bootstrap_intervals, exact_matches, tuned_verdict

    test_records = list(test_records)
    references = [reference_answer(record) for record in test_records]
    metrics = {
        "test_records": len(test_records),
        "base": base["scores"],
        "tuned": tuned["scores"],
        "tuned_minus_base": {name: tuned["scores"][name] - value for name, value in base["scores"].items()},
        "exact_match_ci95": bootstrap_intervals(
            exact_matches(base["answers"], references),
            exact_matches(tuned["answers"], references),
            majority=exact_matches([baseline["answer"]] * len(references), references),
            resamples=params.bootstrap_resamples,
            seed=params.bootstrap_seed,
        ),
        "majority_baseline": numbers_only(baseline),
        "merge_check": numbers_only(merge_check),
    }
    if serving:  # the serving check ran (evaluation.serving_check)
        metrics["serving"] = numbers_only(serving)
    verdict = tuned_verdict(metrics)
    metrics["verdict"] = numbers_only(verdict)
    details = {
        "verdict": {**verdict, "rule": VERDICT_RULE},
        "majority_baseline": {"answer": baseline["answer"], "tied": baseline.get("tied", [])},
        "merge_check": merge_check,
        **({"serving": serving} if serving else {}),
        "exact_match_ci95": {
            "method": "percentile bootstrap over test records; the changes (tuned_minus_base, tuned_minus_majority) "
            "resample both sides together",
            "resamples": params.bootstrap_resamples,
            "seed": params.bootstrap_seed,
        },
    }
    with_video = any(record_videos(record) for record in test_records)  # the column only where a set has video
    predictions = [
        {
            "line": record["source_line"],
            "prompt": record["messages"][-2]["content"],
            "images": record["images"],
            **({"videos": record_videos(record)} if with_video else {}),
            "reference": reference,
            "base": base_answer,
            "tuned": tuned_answer,
        }
        for record, reference, base_answer, tuned_answer in zip(
            test_records, references, base["answers"], tuned["answers"], strict=True
        )
    ]
    flat = {f"eval.{name}": {"step": 0, "value": float(value)} for name, value in flatten(metrics).items()}
    logger.info("%s; the table: the report, or `vlm-pipeline metrics` on metrics.json", format_summary(metrics))
    if verdict["not_better"]:
        logger.warning("%s", format_verdict(verdict))
    return metrics, details, predictions, flat


def check_tuned_model(details: dict, params: EvaluationParams) -> None:
    """Fails the stage when the tuned model is flagged as not better and ``evaluation.fail_if_worse`` is on.
    metrics.json and evaluation_details.json, its input's siblings, are already written for the post-mortem."""
    verdict = details["verdict"]
    if params.fail_if_worse and verdict["not_better"]:
        raise TunedModelNotBetterError(f"{format_verdict(verdict)} The stage fails: evaluation.fail_if_worse is on.")


class TunedModelNotBetterError(RuntimeError):
    """The tuned model is not better than the base model or the majority answer, and the run asked to fail."""


def numbers_only(values: dict) -> dict:
    """The numeric entries of a nested dict, booleans as 0/1; strings, lists and None are left out."""
    kept: dict = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = numbers_only(value)
            if value:
                kept[key] = value
        elif isinstance(value, bool):
            kept[key] = int(value)
        elif isinstance(value, (int, float)):
            kept[key] = value
    return kept


def flatten(values: dict, prefix: str = "") -> dict[str, float]:
    """A nested dict of numbers as dotted keys (``base.exact_match``), as ``dvc metrics show`` names them."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def headline_metrics(metrics: dict, variant: str) -> dict:
    """metrics.json, the DVC metric: the tuned model's exact match (``em``) with its 95% interval and test loss,
    beside the base model's (``_base``), under the variant's name; every number is in detailed_metrics.json.

    Six short columns, so ``dvc exp show --only-changed`` has room for them at 120 columns; the tuned exact match
    sorts first, the column ``dvc exp show`` never folds. Under the variant's name because ``dvc exp show`` names a
    column that two metric files share by its file's path (``data/08_reporting/lora/metrics.json:em``)."""
    interval = metrics["exact_match_ci95"]["tuned"]
    return {
        variant: {
            "em": metrics["tuned"]["exact_match"],
            "em_base": metrics["base"]["exact_match"],
            "em_low": interval["low"],
            "em_high": interval["high"],
            "loss": metrics["tuned"]["loss"],
            "loss_base": metrics["base"]["loss"],
        }
    }


def build_report(
    metrics: dict,
    details: dict,
    predictions: list[dict],
    history: list[dict],
    context: RunContext,
    report_folder: Path,
    variant: str,
) -> tuple[str, list[dict], Any, Any]:
    """The Markdown report, the loss curve (points and figure) and the base-vs-tuned chart. The report links the
    images of wrong answers relative to its own folder (``report_folder``), where a Markdown viewer resolves them."""
    points = loss_curve(history)
    images_from = Path(os.path.relpath(context.image_root, report_folder)).as_posix()
    report = report_markdown(metrics, predictions, details, images_from=images_from)
    return report, points, loss_figure(points, variant), comparison_figure(metrics, variant)

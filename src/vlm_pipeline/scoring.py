"""Evaluation measures: teacher-forced loss/perplexity, batched greedy generation, text scores and their
bootstrap confidence intervals."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm  # disable=None: the bars show on a terminal, not in a log

from vlm_pipeline.config.schema import VideoSampling
from vlm_pipeline.data.encoding import IGNORE_INDEX, attach_images, load_images, prompt_messages
from vlm_pipeline.data.formats import record_videos
from vlm_pipeline.data.labels import ChatEncoder, chat_messages
from vlm_pipeline.data.video_sampling import SampledVideo, load_samples, record_samples

# torch, transformers and the text-score libraries are imported in the functions that use them: the answer
# normalisation here is also what the report and the pipeline registry import, which load no model.
if TYPE_CHECKING:
    from vlm_pipeline.architectures import Architecture
    from vlm_pipeline.training.collator import SFTCollator


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def teacher_forced_loss(model: Any, collator: SFTCollator, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Mean token-level cross-entropy over the label tokens of ``rows``, its perplexity, and token accuracy
    (the share of label tokens that are the model's top prediction)."""
    import torch

    with torch.no_grad():
        total_loss, total_tokens, total_correct = 0.0, 0, 0
        for chunk in tqdm(list(_batches(rows, batch_size)), desc="loss", unit="batch", disable=None):
            batch = collator(chunk)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            # Shift so that tokens < n predict n, as the models' own loss does.
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total_loss += losses.item()
            labelled = shift_labels != IGNORE_INDEX
            total_tokens += int(labelled.sum())
            total_correct += int(((shift_logits.argmax(-1) == shift_labels) & labelled).sum())
        loss = total_loss / max(total_tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": total_correct / max(total_tokens, 1),
        }


def generate_answers(
    model: Any,
    encoder: ChatEncoder,
    architecture: Architecture,
    records: list[dict],
    image_root: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
    video_sampling: VideoSampling | None = None,
) -> list[str]:
    """Greedy answers to each record's prompt (its conversation minus the final assistant turn), left-padded.

    The prompt is rendered as preprocessing rendered it (same template variables, the same frames of each video
    by ``video_sampling``, at their sampled rate); generation stops on any of the checkpoint's stop tokens (its
    generation_config.json ``eos_token_id`` list)."""
    import torch

    with torch.no_grad():
        processor, tokenizer = encoder.processor, encoder.tokenizer
        previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        answers: list[str] = []
        try:
            for chunk in tqdm(list(_batches(records, batch_size)), desc="generate", unit="batch", disable=None):
                conversations, videos = [], []
                for record in chunk:
                    images = load_images(record, image_root) if architecture.is_vision else []
                    clips = _sampled_videos(processor, record, image_root, video_sampling)
                    videos += clips
                    messages = prompt_messages(record)
                    media = images or clips
                    conversations.append(chat_messages(attach_images(messages, images, clips) if media else messages))
                inputs = processor.apply_chat_template(
                    conversations,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    **padding_kwargs(processor),
                    **encoder.render_kwargs,
                )
                if videos:  # the sampled rate, not the processor's assumed 24 fps (as the collator does)
                    temporal = processor.video_processor.temporal_patch_size
                    inputs["second_per_grid_ts"] = torch.tensor([temporal / video.sampled_fps for video in videos])
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = previous_side
        return answers


def _sampled_videos(
    processor: Any, record: dict, image_root: Path, sampling: VideoSampling | None
) -> list[SampledVideo]:
    """A record's videos as training saw them; a processor without a video processor never gets one (validation
    or preprocessing set such records aside), and says so if it does."""
    if not record_videos(record):
        return []
    if not hasattr(processor, "video_processor"):
        raise ValueError(
            f"record from line {record.get('source_line')} has video, which {type(processor).__name__} reads not"
        )
    return load_samples(record_samples(record, processor, sampling), image_root)


def padding_kwargs(processor: Any) -> dict[str, Any]:
    """Batch padding for ``apply_chat_template``. A transformers 5 processor takes its own ``__call__`` arguments
    in ``processor_kwargs`` (passed loose, they still reach the processor, with a warning on every call); a text
    model's tokenizer takes ``padding`` directly."""
    from transformers import ProcessorMixin

    if isinstance(processor, ProcessorMixin):
        return {"processor_kwargs": {"padding": True}}
    return {"padding": True}


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact match."""
    return " ".join(text.lower().split()).strip(" .")


NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
DIGITS = {word: str(number) for number, word in enumerate(NUMBER_WORDS)}
ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation.replace(chr(39), ''))}]")


def normalise_vqa(text: str) -> str:
    """The VQA v2 answer normalisation, simplified: lowercase, apostrophes dropped and other punctuation turned
    into spaces, articles (a, an, the) dropped, number words zero..ten written as digits, whitespace collapsed.

    Simplified against the official VQA evaluation script: no contraction table (``dont`` stays ``dont``), no
    special case for periods and commas inside numbers, and one reference answer per question instead of ten
    annotators, so the accuracy is a plain match rate rather than ``min(matches / 3, 1)``. It forgives "A red
    circle." against "red circle" and "two" against "2", which exact match does not."""
    words = _PUNCTUATION.sub(" ", text.lower().replace("'", "")).split()
    return " ".join(DIGITS.get(word, word) for word in words if word not in ARTICLES)


def exact_matches(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 per record whose answer equals its reference after ``normalise``, else 0.0 (the bootstrap's input)."""
    return [float(normalise(p) == normalise(r)) for p, r in zip(predictions, references, strict=True)]


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match, VQA accuracy (``normalise_vqa``), ROUGE-L F1 (Google's rouge_score) and corpus chrF
    (sacrebleu), each in [0, 1].

    chrF rather than BLEU: corpus BLEU multiplies 1- to 4-gram word precisions, so on one- or two-word answers
    it has no 3- and 4-grams and scores 0 however many answers are right; chrF's character n-grams exist in any
    non-empty string and still give partial credit for near misses ("triangles" for "triangle")."""
    import sacrebleu
    from rouge_score import rouge_scorer

    pairs = list(zip(predictions, references, strict=True))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    vqa = [normalise_vqa(p) == normalise_vqa(r) for p, r in pairs]
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
    return {
        "exact_match": _mean(exact_matches(predictions, references)),
        "vqa_accuracy": _mean(vqa),
        "rouge_l": _mean(rouge),
        "chrf": sacrebleu.CHRF().corpus_score(list(predictions), [list(references)]).score / 100,
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def bootstrap_intervals(
    base: Sequence[float],
    tuned: Sequence[float],
    *,
    resamples: int,
    seed: int,
    majority: Sequence[float] | None = None,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals of the mean of per-record scores for base, tuned and tuned − base, and
    tuned − majority when the majority answer's per-record scores are given.

    Every model is resampled with the same record indices (a paired bootstrap), so the interval of a difference
    reflects that both answered the same questions: it is narrower than the two intervals suggest when they get
    the same records right. The fixed ``seed`` makes a rerun give the same interval."""
    scores = {"base": np.asarray(base, dtype=float), "tuned": np.asarray(tuned, dtype=float)}
    if majority is not None:
        scores["majority"] = np.asarray(majority, dtype=float)
    if len({values.shape for values in scores.values()}) != 1 or not scores["base"].size:
        raise ValueError("bootstrap needs the same, non-empty set of records for every model")
    size = scores["base"].size
    indices = np.random.default_rng(seed).integers(0, size, size=(resamples, size))
    means = {name: values[indices].mean(axis=1) for name, values in scores.items()}
    means["tuned_minus_base"] = means["tuned"] - means["base"]
    if majority is not None:
        means["tuned_minus_majority"] = means["tuned"] - means.pop("majority")
    tail = (1 - confidence) / 2 * 100
    return {
        name: {"low": float(np.percentile(values, tail)), "high": float(np.percentile(values, 100 - tail))}
        for name, values in means.items()
    }


# The rule that flags a tuned model as not better, in words (report, evaluation_details.json, docs).
VERDICT_RULE = (
    "flagged when the tuned model's teacher-forced loss on the test set is not below the base model's, or when "
    "the 95% paired-bootstrap interval of its exact-match change against the base model or against always "
    "giving the majority answer lies wholly below zero (significantly worse on these test records)"
)


def tuned_verdict(metrics: dict) -> dict:
    """Whether the tuned model is not better than the base model or the majority-answer baseline (``VERDICT_RULE``),
    from metrics.json's numbers: ``status`` ("ok" or "not better"), each check (True: failed) and the reasons.

    Loss is compared as measured: teacher-forced loss averages thousands of label tokens, so its noise is far below
    what divergence or overfitting does to it, and a NaN counts as not lower. Exact match is compared by its paired
    interval, since on a few hundred records a few points either way are chance; a diverged model that answers
    nothing right against a majority answer right on 1 in 6 is well outside it at the demo's 96 records."""
    base, tuned = metrics["base"], metrics["tuned"]
    intervals = metrics["exact_match_ci95"]
    majority = metrics["majority_baseline"]["exact_match"]
    checks = {
        "loss_not_lower": not tuned["loss"] < base["loss"],
        "exact_match_below_base": intervals["tuned_minus_base"]["high"] < 0,
        "exact_match_below_majority": intervals["tuned_minus_majority"]["high"] < 0,
    }
    em = f"exact match {tuned['exact_match']:.3f}"
    reasons = {
        "loss_not_lower": f"test loss {tuned['loss']:.4g} is not below the base model's {base['loss']:.4g}",
        "exact_match_below_base": f"{em} is below the base model's {base['exact_match']:.3f} "
        f"(change 95% CI {_interval(intervals['tuned_minus_base'])})",
        "exact_match_below_majority": f"{em} is below always answering the majority answer ({majority:.3f}; "
        f"change 95% CI {_interval(intervals['tuned_minus_majority'])})",
    }
    flagged = [reasons[name] for name, failed in checks.items() if failed]
    return {"status": "not better" if flagged else "ok", "not_better": bool(flagged), **checks, "reasons": flagged}


def _interval(interval: dict) -> str:
    return f"[{interval['low']:+.3f}, {interval['high']:+.3f}]"

"""Evaluation measures: teacher-forced loss/perplexity, batched greedy generation, text scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import sacrebleu
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from vlm_pipeline.architectures import Architecture
from vlm_pipeline.data.encoding import IGNORE_INDEX, attach_images, load_images, prompt_messages
from vlm_pipeline.data.labels import ChatEncoder, chat_messages
from vlm_pipeline.training.collator import SFTCollator


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def teacher_forced_loss(model: Any, collator: SFTCollator, rows: list[dict], batch_size: int) -> dict[str, float]:
    """Mean token-level cross-entropy over the label tokens of ``rows``, its perplexity, and token accuracy
    (the share of label tokens that are the model's top prediction)."""
    total_loss, total_tokens, total_correct = 0.0, 0, 0
    for chunk in tqdm(list(_batches(rows, batch_size)), desc="loss", unit="batch"):
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


@torch.no_grad()
def generate_answers(
    model: Any,
    encoder: ChatEncoder,
    architecture: Architecture,
    records: list[dict],
    image_root: Path,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy answers to each record's prompt (its conversation minus the final assistant turn), left-padded.

    The prompt is rendered as preprocessing rendered it (same template variables); generation stops on any of
    the checkpoint's stop tokens (its generation_config.json ``eos_token_id`` list)."""
    processor, tokenizer = encoder.processor, encoder.tokenizer
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    try:
        for chunk in tqdm(list(_batches(records, batch_size)), desc="generate", unit="batch"):
            conversations = []
            for record in chunk:
                images = load_images(record, image_root) if architecture.is_vision else []
                messages = prompt_messages(record)
                conversations.append(chat_messages(attach_images(messages, images) if images else messages))
            inputs = processor.apply_chat_template(
                conversations,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                padding=True,
                **encoder.render_kwargs,
            )
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return answers


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form used for exact match."""
    return " ".join(text.lower().split()).strip(" .")


def text_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (normalised), ROUGE-L F1 (Google's rouge_score) and corpus BLEU (sacrebleu), in [0, 1]."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    exact = [normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)]
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score / 100
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge), "bleu": bleu}

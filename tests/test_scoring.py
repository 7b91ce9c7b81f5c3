"""The evaluation's measures and what the report says about them: the VQA normalisation, chrF on one-word
answers, the bootstrap intervals, numbers-only metrics, the loss-curve title, and the batched chat rendering."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from vlm_pipeline.config.schema import EvaluationParams
from vlm_pipeline.pipelines.evaluation.nodes import compare, flatten, numbers_only
from vlm_pipeline.reporting.evaluation import format_table, loss_figure, report_markdown
from vlm_pipeline.scoring import bootstrap_intervals, normalise_vqa, text_scores

SHAPES = ["circle", "square", "triangle", "star", "hexagon"]


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("A red circle.", "red circle"),
        ("The  Square", "square"),
        ("two", "2"),
        ("Ten triangles!", "10 triangles"),
        ("an apple, the pear", "apple pear"),
        ("it's blue-green", "its blue green"),
        ("  zero\t", "0"),
        ("Another theory", "another theory"),  # articles are whole words only
    ],
)
def test_vqa_normalisation(answer, normalised):
    assert normalise_vqa(answer) == normalised


def test_vqa_accuracy_forgives_what_exact_match_does_not():
    scores = text_scores(["A circle.", "two", "square"], ["circle", "2", "square"])
    assert scores["exact_match"] == pytest.approx(1 / 3)  # "a circle" != "circle"; "two" != "2"
    assert scores["vqa_accuracy"] == 1.0


def test_chrf_scores_one_word_answers_that_exact_match_calls_right():
    """Corpus BLEU was 0.0 here (no 3- or 4-grams in one-word answers); chrF follows exact match."""
    references = SHAPES * 4
    predictions = references[:15] + ["blue"] * 5  # 75% exact match
    scores = text_scores(predictions, references)
    assert scores["exact_match"] == 0.75
    assert "bleu" not in scores
    assert 0.6 < scores["chrf"] <= 1.0
    assert text_scores(references, references)["chrf"] == pytest.approx(1.0)


def correct(n: int, share: float) -> list[float]:
    right = round(n * share)
    return [1.0] * right + [0.0] * (n - right)


def test_bootstrap_is_deterministic_with_its_seed_and_contains_the_estimate():
    base, tuned = correct(40, 0.25), correct(40, 0.75)
    first = bootstrap_intervals(base, tuned, resamples=1000, seed=0)
    assert first == bootstrap_intervals(base, tuned, resamples=1000, seed=0)
    assert first != bootstrap_intervals(base, tuned, resamples=1000, seed=1)
    for name, estimate in (("base", 0.25), ("tuned", 0.75), ("tuned_minus_base", 0.5)):
        assert first[name]["low"] < estimate < first[name]["high"], (name, first[name])


def test_bootstrap_intervals_narrow_with_more_records():
    width = {}
    for n in (20, 2000):
        interval = bootstrap_intervals(correct(n, 0.3), correct(n, 0.7), resamples=1000, seed=0)
        width[n] = {name: bounds["high"] - bounds["low"] for name, bounds in interval.items()}
    for name in ("base", "tuned", "tuned_minus_base"):
        assert width[2000][name] < width[20][name] / 5, width


def test_the_paired_difference_is_narrower_when_models_agree():
    """Both models resampled on the same records: one that fixes exactly two answers has a tight difference."""
    base = correct(50, 0.5)  # right on the first 25 records
    tuned = [*base[:-2], 1.0, 1.0]
    interval = bootstrap_intervals(base, tuned, resamples=1000, seed=0)
    spread = interval["tuned_minus_base"]["high"] - interval["tuned_minus_base"]["low"]
    assert spread < interval["base"]["high"] - interval["base"]["low"]


def test_bootstrap_needs_paired_records():
    with pytest.raises(ValueError):
        bootstrap_intervals([1.0, 0.0], [1.0], resamples=10, seed=0)


def test_numbers_only_and_flatten():
    check = {
        "passed": True,
        "dtype": "float32",
        "records": 8,
        "modules_to_save": {"modules": ["lm_head"], "tensors": 1},
    }
    assert numbers_only(check) == {"passed": 1, "records": 8, "modules_to_save": {"tensors": 1}}
    assert numbers_only({"merged": False, "reason": "full fine-tuning"}) == {"merged": 0}
    assert flatten({"base": {"exact_match": 0.5}, "test_records": 4}) == {"base.exact_match": 0.5, "test_records": 4}


def evaluation(answers: list[str]) -> dict:
    scores = {"loss": 1.0, "perplexity": 2.7, "token_accuracy": 0.5, **text_scores(answers, SHAPES)}
    return {"scores": scores, "answers": answers}


def compared() -> tuple[dict, dict, list[dict], dict]:
    records = [
        {
            "source_line": i,
            "images": [],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Which shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": shape}]},
            ],
        }
        for i, shape in enumerate(SHAPES, 1)
    ]
    baseline = {"answer": "circle", **text_scores(["circle"] * 5, SHAPES)}
    merge_check = {
        "passed": True,
        "dtype": "float32",
        "criterion": "absolute",
        "records": 8,
        "max_abs_diff": 1e-6,
        "measured": 1e-6,
        "tolerance": 1e-4,
        "top1_agreement": 1.0,
    }
    base, tuned = evaluation(["blue"] * 5), evaluation([*SHAPES[:4], "blue"])
    return compare(base, tuned, baseline, merge_check, records, EvaluationParams(bootstrap_resamples=200))


def test_metrics_hold_numbers_and_the_strings_go_to_the_details():
    metrics, details, predictions, flat = compared()
    assert all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in flatten(metrics).values())
    keys = set(flatten(metrics))
    assert {
        "base.exact_match",
        "tuned.exact_match",
        "tuned_minus_base.exact_match",
        "majority_baseline.exact_match",
    } <= keys
    assert {"base.chrf", "tuned.vqa_accuracy", "exact_match_ci95.tuned_minus_base.low", "merge_check.passed"} <= keys
    assert metrics["tuned_minus_base"]["exact_match"] == pytest.approx(0.8)
    assert details["majority_baseline"] == {"answer": "circle"} and details["merge_check"]["dtype"] == "float32"
    assert details["exact_match_ci95"]["resamples"] == 200
    assert flat["eval.tuned.exact_match"] == {"step": 0, "value": 0.8}
    assert [row["reference"] for row in predictions] == SHAPES


def test_the_table_and_report_show_the_intervals_and_explain_chrf():
    metrics, details, predictions, _ = compared()
    table = format_table(metrics, details)
    assert "exact_match 95% CI" in table and "chrF" in table and "'circle'" in table and "in float32" in table
    assert "majority EM" in format_table(metrics)  # without the details file too
    report = report_markdown(metrics, predictions, details)
    interval = metrics["exact_match_ci95"]["tuned"]
    assert "| exact_match | 0.0000 [" in report and f"0.8000 [{interval['low']:.4f}, {interval['high']:.4f}]" in report
    assert "instead of BLEU" in report and "200 resamples, seed 0" in report


@pytest.mark.parametrize(
    ("points", "title", "labels"),
    [
        ([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}], "Training loss", ["training loss"]),
        (
            [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5, "eval_loss": 1.7}],
            "Training and validation loss",
            ["training loss", "validation loss"],
        ),
    ],
)
def test_the_loss_plot_names_validation_loss_only_when_there_is_some(points, title, labels):
    figure = loss_figure(points)
    axes = figure.axes[0]
    assert axes.get_title() == title
    assert [text.get_text() for text in axes.get_legend().get_texts()] == labels
    plt.close(figure)


def test_batched_chat_rendering_pads_without_the_processor_kwargs_warning(tmp_path):
    from transformers import AutoProcessor
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from vlm_pipeline.architectures import get_architecture
    from vlm_pipeline.scoring import padding_kwargs

    model_dir = get_architecture("qwen2_5_vl").build_tiny(tmp_path / "tiny", 0)
    processor = AutoProcessor.from_pretrained(model_dir)
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": question}]}]
        for question in ("What?", "What colour is the shape in the middle of the picture?")
    ]
    with CaptureLogger(logging.get_logger("transformers.processing_utils")) as captured:
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            **padding_kwargs(processor),
        )
    assert "processor_kwargs" not in captured.out
    assert inputs["input_ids"].shape[0] == 2 and (inputs["attention_mask"][0] == 0).any()  # padded to one length

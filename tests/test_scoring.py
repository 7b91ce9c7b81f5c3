"""The evaluation's measures and what the report says about them: the teacher-forced loss, ROUGE-L and chrF worked
by hand or by their reference libraries, the VQA normalisation, chrF on one-word answers, the bootstrap intervals,
numbers-only metrics, the loss-curve title, and the batched chat rendering."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from vlm_pipeline.architectures import get_architecture
from vlm_pipeline.config.schema import EvaluationParams
from vlm_pipeline.data.encoding import IGNORE_INDEX
from vlm_pipeline.pipelines.evaluation.nodes import (
    TunedModelNotBetterError,
    check_tuned_model,
    compare,
    flatten,
    headline_metrics,
    numbers_only,
)
from vlm_pipeline.reporting.evaluation import (
    comparison_figure,
    format_table,
    loss_curve,
    loss_figure,
    report_markdown,
)
from vlm_pipeline.scoring import bootstrap_intervals, normalise_vqa, teacher_forced_loss, text_scores
from vlm_pipeline.training.collator import SFTCollator

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


def evaluation(answers: list[str], loss: float = 1.0, references: list[str] = SHAPES) -> dict:
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "token_accuracy": 0.5}
    return {"scores": {**scores, **text_scores(answers, references)}, "answers": answers}


def shape_records(references: list[str]) -> list[dict]:
    """Test records as validation writes them, one per reference answer."""
    return [
        {
            "source_line": i,
            "images": [],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Which shape?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": reference}]},
            ],
        }
        for i, reference in enumerate(references, 1)
    ]


MERGE_CHECK = {
    "passed": True,
    "dtype": "float32",
    "criterion": "absolute",
    "records": 8,
    "max_abs_diff": 1e-6,
    "measured": 1e-6,
    "tolerance": 1e-4,
    "top1_agreement": 1.0,
}


def compared(
    base: dict | None = None,
    tuned: dict | None = None,
    references: list[str] = SHAPES,
    params: EvaluationParams | None = None,
    tied: list | None = None,
) -> tuple[dict, dict, list[dict], dict]:
    """The compare node on constructed evaluations; by default five shapes, the tuned model right on four.
    ``tied``: the training answers tied with the majority answer, as ``majority_baseline`` gives them."""
    base = base or evaluation(["blue"] * 5)
    tuned = tuned or evaluation([*SHAPES[:4], "blue"])
    baseline = {"answer": "circle", "tied": tied or [], **text_scores(["circle"] * len(references), references)}
    params = params or EvaluationParams(bootstrap_resamples=200)
    return compare(base, tuned, baseline, MERGE_CHECK, {}, shape_records(references), params)


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
    assert details["majority_baseline"] == {"answer": "circle", "tied": []}
    assert details["merge_check"]["dtype"] == "float32"
    assert "tied" not in metrics["majority_baseline"]  # metrics.json: numbers only
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


TRAINING_LOG = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


@pytest.mark.parametrize(
    ("history", "title", "labels"),
    [
        (TRAINING_LOG, "lora: training loss", ["training loss"]),
        (
            [*TRAINING_LOG, {"step": 2, "eval_loss": 1.7}, {"step": 3, "eval_loss": 1.6}],
            "lora: training and validation loss",
            ["training loss", "validation loss"],
        ),
    ],
)
def test_the_loss_plot_names_the_variant_and_validation_loss_only_when_there_is_some(history, title, labels):
    points = loss_curve(history)
    # A DVC plot: every row has the same keys (DVC plots no other list), null where a loss was not logged.
    assert all(set(point) == {"step", "train_loss", "eval_loss"} for point in points)
    figure = loss_figure(points, "lora")
    axes = figure.axes[0]
    assert axes.get_title() == title
    assert [text.get_text() for text in axes.get_legend().get_texts()] == labels
    plt.close(figure)


def test_the_comparison_chart_keeps_the_interval_clear_of_its_label_and_the_majority_line_on_exact_match():
    metrics, *_ = compared()
    figure = comparison_figure(metrics, "lora")
    axes = figure.axes[0]
    assert axes.get_title().startswith("lora: ")
    (majority,) = [line for line in axes.collections if line.get_label() == "majority answer's exact match"]
    (segment,) = majority.get_segments()
    assert segment[0][0] > -0.5 and segment[1][0] < 0.5  # over the exact-match bars (x = 0) only
    tuned, high = metrics["tuned"]["exact_match"], metrics["exact_match_ci95"]["tuned"]["high"]
    heights = {(round(text.xy[0], 2), text.get_text()): text.xy[1] for text in axes.texts}
    assert heights[(0.19, f"{tuned:.2f}")] == pytest.approx(high)  # the tuned bar's, above its upper whisker
    plt.close(figure)


def test_metrics_json_holds_the_headline_under_the_variant():
    metrics, *_ = compared()
    headline = headline_metrics(metrics, "lora")
    names = {"em", "em_base", "em_low", "em_high", "loss", "loss_base"}
    assert set(flatten(headline)) == {f"lora.{name}" for name in names}  # short: `dvc exp show` columns
    lora, interval = headline["lora"], metrics["exact_match_ci95"]["tuned"]
    assert (lora["em"], lora["em_low"], lora["em_base"]) == (0.8, interval["low"], 0.0)


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


# The verdict on the tuned model (issue 22), on constructed answers with the demo's shape: 96 test records over six
# answers, the majority answer ("circle") right on 16 of them (16.7%).
DEMO_ANSWERS = [*SHAPES, "cross"] * 16
VERDICT_PARAMS = EvaluationParams(bootstrap_resamples=1000)


def demo(answers: list[str], loss: float) -> dict:
    return evaluation(answers, loss, DEMO_ANSWERS)


def run_compare(
    base: dict, tuned: dict, references: list[str] = DEMO_ANSWERS, tied: list | None = None
) -> tuple[dict, dict, list[dict]]:
    metrics, details, predictions, _ = compared(base, tuned, references, VERDICT_PARAMS, tied)
    return metrics, details, predictions


def right_on(count: int, references: list[str] = DEMO_ANSWERS) -> list[str]:
    """Answers right on the first ``count`` records and wrong ("blue") on the rest."""
    return [*references[:count], *["blue"] * (len(references) - count)]


def test_the_diverged_demo_run_is_flagged_in_every_place_and_fails_when_asked(caplog):
    """The demo with lora.method.learning_rate=0.99, as measured on 2026-12-04 (unshortened, 360 steps): its test
    loss fell from the random base's 7.09 to 2.58, but it answered every record with an empty string, while always
    giving the most common training answer is right on 16 of 96."""
    base, tuned = demo(["blue"] * 96, loss=7.09), demo([""] * 96, loss=2.58)
    with caplog.at_level(logging.WARNING, logger="vlm_pipeline.pipelines.evaluation.nodes"):
        metrics, details, predictions = run_compare(base, tuned)

    assert metrics["majority_baseline"]["exact_match"] == pytest.approx(1 / 6)
    assert metrics["exact_match_ci95"]["tuned_minus_majority"]["high"] < 0
    assert metrics["verdict"] == {
        "not_better": 1,
        "loss_not_lower": 0,
        "exact_match_below_base": 0,
        "exact_match_below_majority": 1,
    }
    verdict = details["verdict"]
    assert verdict["status"] == "not better" and "majority answer (0.167" in verdict["reasons"][0]
    assert "wholly below zero" in verdict["rule"]
    (warning,) = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "NOT BETTER" in warning.getMessage() and "majority answer" in warning.getMessage()

    report = report_markdown(metrics, predictions, details).splitlines()
    assert report[2].startswith("**Verdict: the tuned model is NOT BETTER: exact match 0.000 is below always")
    assert "NOT BETTER" in format_table(metrics, details)
    assert "NOT BETTER: see metrics.json" in format_table(metrics)  # from the numbers alone

    check_tuned_model(details, EvaluationParams())  # the default: flagged, not failed
    failure = r"NOT BETTER: exact match 0\.000 .* The stage fails: evaluation\.fail_if_worse is on\.$"
    with pytest.raises(TunedModelNotBetterError, match=failure):
        check_tuned_model(details, EvaluationParams(fail_if_worse=True))


def test_the_demo_run_is_not_flagged():
    """The demo's own numbers (data/08_reporting/lora/metrics.json): 71 of 96 right, loss 7.09 -> 0.35, the
    majority answer a three-way tie in the training data. The report names the tie and shows the 25 mistakes."""
    tie = [["circle", 80], ["square", 80], ["triangle", 80]]
    metrics, details, predictions = run_compare(demo(["blue"] * 96, 7.09), demo(right_on(71), 0.35), tied=tie)
    assert metrics["verdict"]["not_better"] == 0 and details["verdict"]["status"] == "ok"
    report = report_markdown(metrics, predictions, details)
    assert report.splitlines()[2].startswith("**Verdict: ok.")
    assert "training answer (a three-way tie of circle/square/triangle at 80 each; 'circle' picked," in report
    assert "25 of 96 tuned answers are wrong" in report
    assert "| gold \\ tuned | circle | cross | hexagon | square | star | triangle | other | right |" in report
    assert "| cross |  | **11** |  |  |  |  | 5 | 11/16 |" in report  # records 72-96 answered "blue"
    assert "Most frequent mistakes: cross → blue ×5, circle → blue ×4, hexagon → blue ×4," in report
    check_tuned_model(details, EvaluationParams(fail_if_worse=True))


@pytest.mark.parametrize("tuned_loss", [0.9, 1.0, 1.3, float("nan")])
def test_a_test_loss_not_below_the_base_flags_even_with_better_answers(tuned_loss):
    base, tuned = demo(right_on(20), loss=1.0), demo(right_on(60), loss=tuned_loss)
    metrics, details, _ = run_compare(base, tuned)
    flagged = not tuned_loss < 1.0
    assert metrics["verdict"]["loss_not_lower"] == metrics["verdict"]["not_better"] == int(flagged)
    assert ("test loss" in " ".join(details["verdict"]["reasons"])) == flagged


def test_exact_match_significantly_below_the_base_flags_a_small_drop_does_not():
    base = demo(right_on(80), loss=1.0)
    metrics, details, _ = run_compare(base, demo(right_on(40), loss=0.9))
    assert metrics["verdict"]["exact_match_below_base"] == 1 and metrics["verdict"]["exact_match_below_majority"] == 0
    assert "below the base model's 0.833" in details["verdict"]["reasons"][0]
    metrics, _, _ = run_compare(base, demo(right_on(77), loss=0.9))  # 3 points down: within chance
    assert metrics["verdict"]["not_better"] == 0


def test_on_six_records_nothing_right_against_one_is_not_significant():
    """The rule is "significantly worse": 0 of 6 against the majority's 1 of 6 is within chance (a resample
    leaves out the one record about a third of the time), so only the much larger demo set flags it."""
    references = DEMO_ANSWERS[:6]
    metrics, _, _ = run_compare(
        evaluation(["blue"] * 6, 7.0, references), evaluation(["red"] * 6, 2.0, references), references
    )
    assert metrics["majority_baseline"]["exact_match"] == pytest.approx(1 / 6)
    assert metrics["exact_match_ci95"]["tuned_minus_majority"]["high"] == 0
    assert metrics["verdict"]["not_better"] == 0


# A model whose logits at each position depend only on the token there: each input token id picks a fixed row
# over a three-word vocabulary (id 3 is the padding, never predicted).
BIGRAM_LOGITS = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])


class BigramModel:
    """The input of ``teacher_forced_loss``, not what is tested: fixed logits, so the loss can be worked by hand."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=BIGRAM_LOGITS[input_ids])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_teacher_forced_loss_by_hand(batch_size):
    """Three label tokens, each predicted from the token before it; the prompt, a masked label and the padding are
    not scored."""
    rows = [
        # Token 0 predicts 1, token 1 predicts 2; the label after the second 2 is masked (an untrained end).
        {"input_ids": [0, 1, 2, 2], "labels": [IGNORE_INDEX, 1, 2, IGNORE_INDEX]},
        {"input_ids": [1, 0], "labels": [IGNORE_INDEX, 0]},  # token 1 predicts 0; padded to 4 in a batch of two
    ]
    collator = SFTCollator(SimpleNamespace(pad_token_id=3), get_architecture("llama"), image_root=Path("."))
    e = math.e
    # Cross-entropy: log(sum of exp(logits)) minus the label's logit.
    losses = [
        math.log(e**2 + 2) - 0,  # logits [2, 0, 0], label 1: predicted 0, wrong
        math.log(2 + e) - 1,  # logits [0, 0, 1], label 2: right
        math.log(2 + e) - 0,  # logits [0, 0, 1], label 0: predicted 2, wrong
    ]
    scores = teacher_forced_loss(BigramModel(), collator, rows, batch_size)
    assert scores["loss"] == pytest.approx(sum(losses) / 3)  # 1.4474
    assert scores["perplexity"] == pytest.approx(math.exp(sum(losses) / 3))
    assert scores["token_accuracy"] == pytest.approx(1 / 3)


def test_rouge_l_by_hand_and_as_rouge_score_gives_it():
    """ROUGE-L F1 of each answer against its reference, averaged over the answers."""
    pairs = [("red circle", "the red circle"), ("a big red circle", "red circle"), ("star", "square")]
    # Longest common word subsequence 2: precision 2/2, recall 2/3; then 2/4 and 2/2; then nothing.
    by_hand = [2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 0.5 * 1 / 1.5, 0.0]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    reference = [scorer.score(target, prediction)["rougeL"].fmeasure for prediction, target in pairs]
    assert reference == pytest.approx(by_hand)
    predictions, references = map(list, zip(*pairs, strict=True))
    assert text_scores(predictions, references)["rouge_l"] == pytest.approx(sum(by_hand) / 3)


def test_chrf_is_sacrebleus_corpus_chrf():
    """Corpus chrF (character n-gram statistics summed over all answers, recall weighted twice precision), not a
    mean of per-answer scores, with the answers as hypotheses, on a 0-1 scale."""
    predictions, references = ["triangles", "a red circle", "blue star"], ["triangle", "red circle", "star"]
    expected = sacrebleu.corpus_chrf(predictions, [references]).score / 100
    assert expected == pytest.approx(0.9377, abs=1e-4)  # swapped: 0.7283; the per-answer mean: 0.8907
    assert text_scores(predictions, references)["chrf"] == pytest.approx(expected)

"""What fine-tuning bought, for people: the loss curve, a base-vs-tuned chart and a short Markdown report."""

from __future__ import annotations

CHART_METRICS = ("exact_match", "vqa_accuracy", "rouge_l", "chrf", "token_accuracy")
CHRF_NOTE = (
    "chrf is sacrebleu's corpus chrF (character n-gram F-score), used instead of BLEU: corpus BLEU needs "
    "3- and 4-word n-grams and scores 0 on one- and two-word answers however many are right."
)
SERIES = (("train_loss", "-", "training loss"), ("eval_loss", "o--", "validation loss"))
INTERVAL_LABELS = (
    ("base", "base"),
    ("tuned", "tuned"),
    ("tuned-base", "tuned_minus_base"),
    ("tuned-majority", "tuned_minus_majority"),
)
MEASURES = ("loss", "perplexity", "token_accuracy", "exact_match", "vqa_accuracy", "rouge_l", "chrf")


def loss_curve(history: list[dict]) -> list[dict]:
    """Training loss, and validation loss where the trainer evaluated, per optimizer step from its log history: a
    DVC plot (dvc.yaml's ``plots``). Every point has both keys, null where that loss was not logged at its step:
    DVC plots a JSON list only when every row has the same keys, and Vega leaves the nulls out of the lines."""
    points: dict[int, dict] = {}
    for entry in history:
        for key, name in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if isinstance(entry.get(key), (int, float)):
                point = points.setdefault(entry["step"], {"step": entry["step"], "train_loss": None, "eval_loss": None})
                point[name] = float(entry[key])
    return [points[step] for step in sorted(points)]


def loss_figure(points: list[dict], variant: str):
    """The loss curve, titled with the variant; validation loss is named only when there is some, since a run
    without a validation split (``preprocessing.validation_fraction: 0``) has none to show."""
    import matplotlib.pyplot as plt  # here, not at the top: only the stages that draw pay pyplot's import

    figure, axes = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name, style, label in SERIES:
        logged = [p for p in points if p.get(name) is not None]
        if logged:
            axes.plot([p["step"] for p in logged], [p[name] for p in logged], style, label=label)
    validated = any(p.get("eval_loss") is not None for p in points)
    losses = "training and validation loss" if validated else "training loss"
    axes.set(xlabel="optimizer step", ylabel="loss", title=f"{variant}: {losses}")
    if points:
        axes.legend()
    return figure


def comparison_figure(metrics: dict, variant: str):
    """Base vs tuned bars, titled with the variant. The exact-match bars carry their 95% bootstrap interval (their
    value written above it, clear of the whisker) and the majority answer's exact match, a line over them only."""
    import matplotlib.pyplot as plt  # here, not at the top: only the stages that draw pay pyplot's import

    names = [name for name in CHART_METRICS if name in metrics["base"]]
    figure, axes = plt.subplots(figsize=(8, 4), constrained_layout=True)
    width = 0.38
    intervals = metrics.get("exact_match_ci95", {})
    em = names.index("exact_match") if "exact_match" in names else None
    for offset, model in ((-width / 2, "base"), (width / 2, "tuned")):
        values = [metrics[model][name] for name in names]
        bars = axes.bar([i + offset for i in range(len(names))], values, width, label=model)
        interval = intervals.get(model) if em is not None else None
        axes.bar_label(bars, labels=["" if i == em and interval else f"{v:.2f}" for i, v in enumerate(values)])
        if interval:
            _interval_bar(axes, em + offset, values[em], interval)
    if em is not None:
        axes.hlines(
            metrics["majority_baseline"]["exact_match"],
            em - width,
            em + width,
            color="grey",
            linestyle=":",
            label="majority answer's exact match",
        )
    axes.set_xticks(range(len(names)), [name.replace("_", " ") for name in names])
    axes.set(ylim=(0, 1.25), title=f"{variant}: base vs tuned on the test split (exact match: 95% bootstrap interval)")
    axes.legend(loc="upper right", ncols=3, fontsize="small")
    return figure


def _interval_bar(axes, x: float, value: float, interval: dict) -> None:
    below, above = max(value - interval["low"], 0.0), max(interval["high"] - value, 0.0)
    axes.errorbar([x], [value], yerr=[[below], [above]], fmt="none", ecolor="black", capsize=4)
    # The value above the upper whisker: written on the bar's top, the whisker would cross it.
    axes.annotate(
        f"{value:.2f}", (x, value + above), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom"
    )


def changed_most(predictions: list[dict], count: int = 10) -> list[dict]:
    """The records where tuning moved the answer most: largest change in ROUGE-L against the reference."""
    from rouge_score import rouge_scorer  # nltk and scikit-learn: only when a report is written

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def gain(row: dict) -> float:
        score = lambda answer: scorer.score(row["reference"], answer)["rougeL"].fmeasure  # noqa: E731
        return score(row["tuned"]) - score(row["base"])

    changed = [(gain(row), row) for row in predictions if row["tuned"] != row["base"]]
    return [dict(row, rouge_l_gain=round(delta, 4)) for delta, row in sorted(changed, key=lambda x: -abs(x[0]))][:count]


def report_markdown(
    metrics: dict,
    predictions: list[dict],
    details: dict | None = None,
    count: int = 10,
    images_from: str | None = None,
) -> str:
    """The report: the verdict (is the tuned model not better?), the base-vs-tuned table (exact match with its
    intervals), what the measures mean, the majority baseline (and its tie), the merge check, the verdict's rule,
    what the tuned model got wrong (``reporting.mistakes``; ``images_from``: the project folder as seen from the
    report's folder, for the images of wrong answers), and the answers tuning changed most. ``details`` is
    evaluation_details.json."""
    # Imported here: it scores with vlm_pipeline.scoring, which loads torch; `vlm-pipeline metrics` needs neither.
    from vlm_pipeline.reporting.mistakes import describe_tie, mistakes_markdown

    details = details or {}
    intervals = metrics.get("exact_match_ci95", {})
    verdict = _verdict(metrics, details)
    lines = [
        "# Evaluation report",
        "",
        *([f"**{format_verdict(verdict)}**", ""] if verdict else []),
        f"{len(predictions)} test records, same records and settings for both models.",
        "",
        "| metric | base | tuned | change |",
        "|---|---|---|---|",
    ]
    for name in _measures(metrics):
        base, tuned = metrics["base"][name], metrics["tuned"][name]
        cells = [f"{base:.4f}", f"{tuned:.4f}", f"{tuned - base:+.4f}"]
        if name == "exact_match" and intervals:
            cells = [
                f"{cell} {_interval_text(intervals[model])}"
                for cell, model in zip(cells, ("base", "tuned", "tuned_minus_base"), strict=True)
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    baseline = metrics["majority_baseline"]
    answer = details.get("majority_baseline", {}).get("answer")
    tie = describe_tie(answer, details.get("majority_baseline", {}).get("tied", []))
    lines += ["", *_measure_notes(details), ""]
    lines.append(
        "Always answering the most common training answer"
        + (f" ({tie or repr(answer)})" if answer is not None else "")
        + f" scores exact match {baseline['exact_match']:.4f}"
        + (
            f"; tuned minus it: {_interval_text(intervals['tuned_minus_majority'])}."
            if "tuned_minus_majority" in intervals
            else "."
        )
    )
    lines.append(f"Merge check: {describe_merge_check(_merge_check(metrics, details))}.")
    if details.get("serving"):
        from vlm_pipeline.serving import describe  # the data URLs' helpers: only for a run that served

        lines.append(f"Serving check (`transformers serve` on the tuned model): {describe(details['serving'])}.")
    if "rule" in verdict:
        lines.append(f"Verdict rule: {verdict['rule']}.")
    lines += mistakes_markdown(predictions, images_from)
    lines += [
        "",
        f"## The {count} answers tuning changed most (by ROUGE-L against the reference)",
        "",
        "| line | prompt | reference | base | tuned | ROUGE-L gain |",
        "|---|---|---|---|---|---|",
    ]
    for row in changed_most(predictions, count):
        prompt = _as_text(row["prompt"])
        cells = [str(row["line"]), prompt, row["reference"], row["base"], row["tuned"], f"{row['rouge_l_gain']:+.2f}"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ")[:120] for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _measure_notes(details: dict) -> list[str]:
    """What the table's less obvious rows and brackets mean, one line each."""
    bootstrap = details.get("exact_match_ci95", {})
    settings = f" ({bootstrap['resamples']} resamples, seed {bootstrap['seed']})" if "resamples" in bootstrap else ""
    return [
        "- exact_match compares answers lowercased, with spaces and a final period trimmed; vqa_accuracy compares "
        "them after the VQA v2 answer normalisation, simplified (punctuation, articles, number words).",
        f"- {CHRF_NOTE}",
        "- Brackets: 95% percentile bootstrap interval over the test records"
        f"{settings}; the change's interval resamples both models on the same records.",
    ]


def _measures(metrics: dict) -> list[str]:
    """The table's rows in reading order (metrics.json stores its keys sorted): the loss measures, then the
    answer measures, then any other a model has (an older metrics.json's bleu)."""
    known = [name for name in MEASURES if name in metrics["base"]]
    return known + sorted(set(metrics["base"]) - set(known))


def _interval_text(interval: dict) -> str:
    return f"[{interval['low']:.4f}, {interval['high']:.4f}]"


def _merge_check(metrics: dict, details: dict) -> dict:
    """The full merge check (with its dtype and criterion) from the details, else the numbers in metrics.json."""
    return details.get("merge_check") or metrics.get("merge_check", {})


def _as_text(content) -> str:
    """A chat message's content (a string, or a list of text and image parts) as one line of text."""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "[image]") if part.get("type") != "image" else "[image]" for part in content)


def format_table(metrics: dict, details: dict | None = None) -> str:
    """The base-vs-tuned table the evaluation logs and ``vlm-pipeline metrics`` prints (``details``:
    evaluation_details.json, for the majority answer and the merge check's wording; optional)."""
    details = details or {}
    lines = [f"{'metric':<20}{'base':>12}{'tuned':>12}{'tuned-base':>12}", "-" * 56]
    for name in _measures(metrics):
        base, tuned = metrics["base"][name], metrics["tuned"][name]
        lines.append(f"{name:<20}{base:>12.4f}{tuned:>12.4f}{tuned - base:>+12.4f}")
    intervals = metrics.get("exact_match_ci95")
    if intervals:
        cells = [f"{label} {_short_interval(intervals[m])}" for label, m in INTERVAL_LABELS if m in intervals]
        lines.append(f"{'exact_match 95% CI':<20}" + "  ".join(cells))
    answer = details.get("majority_baseline", {}).get("answer")
    lines.append(
        f"{'majority EM':<20}{metrics['majority_baseline']['exact_match']:>12.4f}"
        + (f"  (always {answer!r})" if answer is not None else "")
    )
    lines.append(f"merge check: {describe_merge_check(_merge_check(metrics, details))}")
    verdict = _verdict(metrics, details)
    if verdict:
        lines.append(format_verdict(verdict))
    if "chrf" in metrics["base"]:
        lines.append(CHRF_NOTE)
    return "\n".join(lines)


def format_summary(metrics: dict) -> str:
    """The evaluation in one line, as the node logs it (the table is in report.md and ``vlm-pipeline metrics``)."""
    base, tuned = metrics["base"], metrics["tuned"]
    parts = [f"exact match {base['exact_match']:.3f} -> {tuned['exact_match']:.3f}"]
    intervals = metrics.get("exact_match_ci95")
    if intervals:
        parts[0] += f" (tuned 95% CI {_short_interval(intervals['tuned'])})"
    if "chrf" in base:
        parts.append(f"chrF {base['chrf']:.3f} -> {tuned['chrf']:.3f}")
    parts.append(f"majority baseline {metrics['majority_baseline']['exact_match']:.3f}")
    parts.append(f"on {metrics['test_records']} test records")
    return ", ".join(parts)


def format_verdict(verdict: dict) -> str:
    """The verdict in one line: the report's first line, the logged warning and the fail_if_worse message."""
    if not verdict["not_better"]:
        return (
            "Verdict: ok. The tuned model's test loss is below the base model's, and its exact match is not "
            "significantly below the base model's or the majority answer's."
        )
    reasons = "; ".join(verdict.get("reasons", [])) or "see metrics.json's verdict"
    return f"Verdict: the tuned model is NOT BETTER: {reasons}."


def _verdict(metrics: dict, details: dict) -> dict:
    """The verdict with its reasons from the details, else its numbers from metrics.json; empty for a
    metrics.json written before there was one."""
    return details.get("verdict") or metrics.get("verdict", {})


def _short_interval(interval: dict) -> str:
    return f"[{interval['low']:.3f}, {interval['high']:.3f}]"


def describe_merge_check(check: dict) -> str:
    """One line on the merge check. Only a passed check reaches a report: a failed one stops the adapter stage
    (``MergeVerificationError``) before evaluation runs. metrics.json keeps its numbers only (``passed`` as 1), so
    without evaluation_details.json the dtype and criterion are left out."""
    if "passed" not in check:  # full fine-tuning: nothing was merged
        return check.get("reason", "not run")
    saved = check.get("modules_to_save") or {}
    dtype = f" in {check['dtype']}" if "dtype" in check else ""
    return (
        f"passed{dtype} on {check['records']} test records: "
        f"max |Δlogits| {check['max_abs_diff']:.3g} "
        f"({check.get('criterion', 'measured')} {check['measured']:.3g} ≤ {check['tolerance']:g}), "
        f"top-1 agreement {check['top1_agreement']:.3f}"
        + (f", {saved['tensors']} modules_to_save tensors reloaded identical" if saved.get("tensors") else "")
    )

"""What fine-tuning bought, for people: the loss curve, a base-vs-tuned chart and a short Markdown report."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # reports are written headless (CI, GPU hosts)
import matplotlib.pyplot as plt  # noqa: E402
from rouge_score import rouge_scorer  # noqa: E402

CHART_METRICS = ("exact_match", "rouge_l", "bleu", "token_accuracy")


def loss_curve(history: list[dict]) -> list[dict]:
    """Training and validation loss per optimizer step from the trainer's log history (a DVC plot)."""
    points: dict[int, dict] = {}
    for entry in history:
        for key, name in (("loss", "train_loss"), ("eval_loss", "eval_loss")):
            if isinstance(entry.get(key), (int, float)):
                points.setdefault(entry["step"], {"step": entry["step"]})[name] = float(entry[key])
    return [points[step] for step in sorted(points)]


def loss_figure(points: list[dict]):
    figure, axes = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for name, style in (("train_loss", "-"), ("eval_loss", "o--")):
        steps = [p["step"] for p in points if name in p]
        if steps:
            axes.plot(steps, [p[name] for p in points if name in p], style, label=name.replace("_", " "))
    axes.set(xlabel="optimizer step", ylabel="loss", title="Training and validation loss")
    axes.legend()
    return figure


def comparison_figure(metrics: dict):
    names = [name for name in CHART_METRICS if name in metrics["base"]]
    figure, axes = plt.subplots(figsize=(7, 4), constrained_layout=True)
    width = 0.38
    for offset, model in ((-width / 2, "base"), (width / 2, "tuned")):
        values = [metrics[model][name] for name in names]
        bars = axes.bar([i + offset for i in range(len(names))], values, width, label=model)
        axes.bar_label(bars, fmt="%.2f")
    axes.axhline(metrics["majority_baseline"]["exact_match"], color="grey", linestyle=":", label="majority EM")
    axes.set_xticks(range(len(names)), [name.replace("_", " ") for name in names])
    axes.set(ylim=(0, 1.1), title="Base vs tuned on the test split")
    axes.legend()
    return figure


def changed_most(predictions: list[dict], count: int = 10) -> list[dict]:
    """The records where tuning moved the answer most: largest change in ROUGE-L against the reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def gain(row: dict) -> float:
        score = lambda answer: scorer.score(row["reference"], answer)["rougeL"].fmeasure  # noqa: E731
        return score(row["tuned"]) - score(row["base"])

    changed = [(gain(row), row) for row in predictions if row["tuned"] != row["base"]]
    return [dict(row, rouge_l_gain=round(delta, 4)) for delta, row in sorted(changed, key=lambda x: -abs(x[0]))][:count]


def report_markdown(metrics: dict, predictions: list[dict], count: int = 10) -> str:
    names = list(metrics["base"])
    lines = [
        "# Evaluation report",
        "",
        f"{len(predictions)} test records, same records and settings for both models.",
        "",
        "| metric | base | tuned | change |",
        "|---|---|---|---|",
    ]
    for name in names:
        base, tuned = metrics["base"][name], metrics["tuned"][name]
        lines.append(f"| {name} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} |")
    baseline = metrics["majority_baseline"]
    lines += [
        "",
        f"Always answering the most common training answer ({baseline['answer']!r}) scores exact match "
        f"{baseline['exact_match']:.4f}.",
    ]
    lines.append(f"Merge check: {describe_merge_check(metrics.get('merge_check', {}))}.")
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


def _as_text(content) -> str:
    """A chat message's content (a string, or a list of text and image parts) as one line of text."""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "[image]") if part.get("type") != "image" else "[image]" for part in content)


def format_table(metrics: dict) -> str:
    """The base-vs-tuned table the evaluation logs and ``vlm-pipeline metrics`` prints."""
    names = list(metrics["base"])
    lines = [f"{'metric':<14}{'base':>12}{'tuned':>12}", "-" * 38]
    lines += [f"{name:<14}{metrics['base'][name]:>12.4f}{metrics['tuned'][name]:>12.4f}" for name in names]
    lines.append(f"{'majority EM':<14}{metrics['majority_baseline']['exact_match']:>24.4f}")
    lines.append(f"merge check: {describe_merge_check(metrics['merge_check'])}")
    return "\n".join(lines)


def describe_merge_check(check: dict) -> str:
    """One line on the merge check. Only a passed check reaches a report: a failed one stops the adapter stage
    (``MergeVerificationError``) before evaluation runs."""
    if "passed" not in check:  # full fine-tuning: nothing was merged
        return check.get("reason", "not run")
    saved = check.get("modules_to_save") or {}
    return (
        f"passed in {check['dtype']} on {check['records']} test records: "
        f"max |Δlogits| {check['max_abs_diff']:.3g} "
        f"({check['criterion']} {check['measured']:.3g} ≤ {check['tolerance']:g}), "
        f"top-1 agreement {check['top1_agreement']:.3f}"
        + (f", {saved['tensors']} modules_to_save tensors reloaded identical" if saved.get("tensors") else "")
    )

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
    check = metrics.get("merge_check", {})
    if "max_abs_diff" in check:
        lines.append(
            f"Merge check: max |logit difference| {check['max_abs_diff']:.2e} on {check['records']} records "
            f"(tolerance {check['tolerance']:.0e}, {'passed' if check['passed'] else 'FAILED'})."
        )
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

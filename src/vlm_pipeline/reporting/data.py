"""The data report: what validation and preprocessing kept, dropped and why, as Markdown and one figure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_pipeline.data.encoding import IGNORE_INDEX


def padding_share(lengths: list[int], batch_size: int, *, group_by_length: bool) -> float:
    """Share of pad tokens when ``lengths`` are batched in file order, or length-grouped.

    Length grouping follows transformers' LengthGroupedSampler: mega-batches of 50 batches, each sorted by
    length before being cut into batches (without its shuffling, so the figure is deterministic).
    """
    if not lengths:
        return 0.0
    order = list(range(len(lengths)))
    if group_by_length:
        mega = 50 * batch_size
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])]
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return (padded - real) / padded


MAX_SIZED_IMAGES = 10_000


def image_sizes(image_paths: Iterable[list[str]], image_root: Path) -> list[tuple[int, int]]:
    """(width, height) of the distinct images the records use, read from file headers only; at most
    ``MAX_SIZED_IMAGES`` (the first ones met), so a figure of a huge set stays cheap."""
    seen: set[str] = set()
    sizes = []
    for paths in image_paths:
        for relative in paths:
            if relative in seen:
                continue
            if len(seen) == MAX_SIZED_IMAGES:
                return sizes
            seen.add(relative)
            with Image.open(image_root / relative) as image:
                sizes.append(image.size)
    return sizes


def reason_counts(*reports: dict) -> Counter:
    counts: Counter = Counter()
    for report in reports:
        counts.update(report.get("reasons", {}))
    return counts


def data_figure(reasons: Counter, lengths: list[int], sizes: list[tuple[int, int]], max_length: int):
    """One PNG-able figure: quarantine reasons, token-length histogram, image sizes."""
    import matplotlib.pyplot as plt  # here, not at the top: only the stages that draw pay pyplot's import

    figure, (ax_reasons, ax_lengths, ax_sizes) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    if reasons:
        names, counts = zip(*reasons.most_common(), strict=True)
        ax_reasons.barh(names, counts, color="tab:red")
        ax_reasons.invert_yaxis()
    else:
        ax_reasons.text(0.5, 0.5, "no record quarantined", ha="center", va="center")
        ax_reasons.set_axis_off()
    ax_reasons.set_title("Quarantined records by reason")
    ax_lengths.hist(lengths, bins=40, color="tab:blue")
    # Draw the limit only when it is near the data; otherwise it would squash the histogram into one bar.
    if lengths and max_length <= 1.5 * max(lengths):
        ax_lengths.axvline(max_length, color="black", linestyle="--", label=f"max_length {max_length}")
        ax_lengths.legend()
    ax_lengths.set(
        title=f"Training record length (max_length {max_length})",
        xlabel="tokens, image tokens included",
        ylabel="records",
    )
    if sizes:
        widths, heights = zip(*sizes, strict=True)
        ax_sizes.scatter(widths, heights, s=8, alpha=0.5)
    else:
        ax_sizes.text(0.5, 0.5, "text-only data", ha="center", va="center")
        ax_sizes.set_axis_off()
    ax_sizes.set(title="Image sizes (training)", xlabel="width (px)", ylabel="height (px)")
    return figure


COLOUR = ("\x1b[1;30;42m", "\x1b[0m")  # trained tokens: black on green
BRACKETS = ("[[", "]]")


def marked_labels(tokenizer: Any, input_ids: list[int], labels: list[int], marks: tuple[str, str] = BRACKETS) -> str:
    """The rendered conversation with the trained tokens between ``marks``; runs of one repeated token (the
    expanded image placeholders) are shown once with their count."""
    pieces, run = [], []
    for index, (token, label) in enumerate(zip(input_ids, labels, strict=True)):
        run.append(token)
        trained = label != IGNORE_INDEX
        ends = index + 1 == len(input_ids) or (labels[index + 1] != IGNORE_INDEX) != trained
        if ends:
            text = _collapse_repeats(tokenizer, run)
            pieces.append(f"{marks[0]}{text}{marks[1]}" if trained else text)
            run = []
    return "".join(pieces)


def _collapse_repeats(tokenizer: Any, tokens: list[int]) -> str:
    added = set(tokenizer.get_added_vocab().values())  # special and control tokens, image placeholders included
    out, text = [], []
    start = 0
    while start < len(tokens):
        end = start
        while end < len(tokens) and tokens[end] == tokens[start]:
            end += 1
        if tokens[start] in added and end - start > 1:
            out += [tokenizer.decode(text), f"{tokenizer.decode([tokens[start]])}×{end - start}"]
            text = []
        else:
            text += tokens[start:end]  # decoded together: a character split across tokens stays whole
        start = end
    return "".join(out + [tokenizer.decode(text)])


def label_preview(tokenizer: Any, rows: list[dict], marks: tuple[str, str] = BRACKETS) -> list[str]:
    """One block per row: its source line, trained/total token counts, and the marked conversation."""
    blocks = []
    for row in rows:
        trained = sum(label != IGNORE_INDEX for label in row["labels"])
        header = f"line {row['source_line']}: {trained} of {len(row['input_ids'])} tokens trained"
        blocks.append(f"{header}\n{marked_labels(tokenizer, row['input_ids'], row['labels'], marks)}")
    return blocks


def data_source_lines(validation: dict[str, dict]) -> list[str]:
    """What each file was read as, its exact duplicates, and the test records that leak from train."""
    train, test = validation["train"], validation["test"]
    lines = [f"- train.jsonl read as {train.get('format')}"]
    if test.get("held_out_from"):
        lines.append(
            f"- no test.jsonl: {train['held_out_to_test']} records ({train['test_fraction']:.0%}, by record hash) "
            "held out of train.jsonl as the test split"
        )
    else:
        lines.append(f"- test.jsonl read as {test.get('format')}")
    for split, report in (("train", train), ("test", test)):
        duplicates = report.get("duplicates")
        if duplicates:
            action = "quarantined" if duplicates["policy"] == "reject" else "kept"
            count = duplicates["count"]
            lines.append(f"- exact duplicates in {split}: {count}" + (f" ({action})" if count else ""))
    overlap = test.get("overlap_with_train")
    if overlap:
        action = "quarantined" if overlap["policy"] == "reject" else "kept: their scores measure recall"
        lines.append(
            f"- **test records whose prompt and images are also in train: {overlap['count']}**"
            + (f" ({action})" if overlap["count"] else "")
        )
    return lines


def data_markdown(
    validation: dict[str, dict],
    preprocessing: dict,
    reasons: Counter,
    sizes: list[tuple[int, int]],
    previews: list[str] = (),
) -> str:
    """A short Markdown summary of the two stages."""
    lines = [
        "# Data report",
        "",
        "| split | lines | valid | quarantined | too long | kept | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("train", "test"):
        v, p = validation[split], preprocessing[split]
        lines.append(
            f"| {split} | {v['total']} | {v['valid']} | {v['quarantined']} | {p['too_long']} | {p['kept']} "
            f"| {p['truncated']['records']} ({p['truncated']['tokens_cut']} tokens) |"
        )
    lines += ["", *data_source_lines(validation)]
    held = preprocessing.get("validation", {}).get("records", 0)
    if held:
        lines += ["", f"Of the kept train records, {held} are held out as the validation split."]
    lines += ["", "## Quarantine reasons", ""]
    lines += [f"- `{reason}`: {count}" for reason, count in reasons.most_common()] or ["- none"]
    length = preprocessing["train"]["length"]
    padding = preprocessing["padding"]
    lines += [
        "",
        "## Lengths and batching (train)",
        "",
        f"- tokens per record: min {length['min']}, mean {length['mean']:.1f}, max {length['max']}",
        f"- pad share at batch size {padding['batch_size']}: {padding['pad_share_in_file_order']:.1%} in file order, "
        f"{padding['pad_share_length_grouped']:.1%} length-grouped"
        + ("; training uses padding-free batches (0 pad tokens)" if padding.get("padding_free") else ""),
    ]
    if sizes:
        widths, heights = zip(*sizes, strict=True)
        lines.append(
            f"- distinct images: {len(sizes)}, width {min(widths)}-{max(widths)} px, "
            f"height {min(heights)}-{max(heights)} px"
        )
    if previews:
        lines += [
            "",
            f"## What trains: the first {len(previews)} training records",
            "",
            f"Trained tokens (labels) are between {BRACKETS[0]} {BRACKETS[1]}; everything else is masked.",
            "",
        ]
        for preview in previews:
            header, text = preview.split("\n", 1)
            lines += [f"**{header}**", "", "```text", text, "```", ""]
    lines += [
        "",
        "Quarantined records, with line numbers and reasons: `data/02_intermediate/<split>/quarantine.jsonl`"
        " and `data/03_primary/<split>_set_aside.jsonl`.",
        "",
    ]
    return "\n".join(lines)

"""What the tuned model got wrong: per-answer confusion, a breakdown by question type, a sample of wrong answers
with their images, and the majority baseline's tie. Pure functions on predictions rows (``line``, ``prompt``,
``images``, ``reference``, ``base``, ``tuned``, as evaluation writes them), except the two that open images."""

from __future__ import annotations

import posixpath
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from vlm_pipeline.scoring import exact_matches, normalise

# A reference set is "closed" (a gold x answer table reads well) when it has at most this many distinct answers...
CLOSED_MAX_ANSWERS = 20
# ...each given on average at least this often: a set where most answers occur once is open, whatever its size.
CLOSED_MIN_REPEATS = 2
# A breakdown with more question types than this is a list of questions, not a breakdown.
MAX_QUESTION_TYPES = 12
# ...each with at least this many records on average.
MIN_TYPE_RECORDS = 2
# Words of the question that name its type when the answers do not (VQA's question types are such prefixes).
TYPE_PREFIX_WORDS = 2
THUMBNAIL_WIDTH = 64  # pixels, in the report's sample of wrong answers
GRID_TITLE = (("gold", "reference"), ("tuned", "tuned"), ("base", "base"))


def is_wrong(row: dict) -> bool:
    return normalise(row["tuned"]) != normalise(row["reference"])


def question_text(prompt) -> str:
    """The text of a user turn's content (a string, or a list of text and image parts), one line."""
    if isinstance(prompt, str):
        return " ".join(prompt.split())
    return " ".join(" ".join(part.get("text", "").split()) for part in prompt if part.get("type") == "text").strip()


def is_closed(references: Sequence[str]) -> bool:
    """Whether the gold answers are a small set every record picks from (a class label) rather than free text."""
    distinct = {normalise(reference) for reference in references}
    return len(distinct) <= CLOSED_MAX_ANSWERS and len(references) >= CLOSED_MIN_REPEATS * len(distinct)


def confusion(predictions: Sequence[dict]) -> tuple[list[str], dict[str, Counter]]:
    """The gold answers (most frequent first) and, per gold answer, how often the tuned model gave each answer
    (normalised as exact match compares them). Answers outside the gold set are counted under ``None``."""
    golds = Counter(normalise(row["reference"]) for row in predictions)
    order = sorted(golds, key=lambda answer: (-golds[answer], answer))
    table: dict[str, Counter] = {gold: Counter() for gold in order}
    for row in predictions:
        tuned = normalise(row["tuned"])
        table[normalise(row["reference"])][tuned if tuned in golds else None] += 1
    return order, table


def frequent_confusions(predictions: Sequence[dict]) -> list[tuple[str, str, int]]:
    """(gold, tuned answer, count) for every wrong pair, most frequent first (ties in alphabetical order)."""
    pairs = Counter((normalise(row["reference"]), normalise(row["tuned"])) for row in predictions if is_wrong(row))
    return [(gold, tuned, count) for (gold, tuned), count in sorted(pairs.items(), key=lambda x: (-x[1], x[0]))]


def frequent_wrong_answers(predictions: Sequence[dict], count: int = 10) -> list[tuple[str, int, list[str]]]:
    """For open answers: the wrong answers given most often, with how often and the gold answers they replaced
    (up to three)."""
    golds: dict[str, list[str]] = defaultdict(list)
    for row in predictions:
        if is_wrong(row):
            golds[normalise(row["tuned"])].append(row["reference"])
    ranked = sorted(golds.items(), key=lambda item: (-len(item[1]), item[0]))
    return [(answer, len(replaced), list(dict.fromkeys(replaced))[:3]) for answer, replaced in ranked[:count]]


def question_types(predictions: Sequence[dict]) -> dict[str, list[dict]] | None:
    """The records grouped by question type, named by its most frequent question, or None where the data has no
    types (one type, or nearly one per record).

    Questions that share a gold answer ask the same kind of thing ("What shape is this?" and "Which shape is shown?"
    are both answered "circle"), so types are the groups of question texts linked by shared answers. Where that
    gives one group or too many (free-text answers are rarely shared), the question's first words name its type,
    as VQA's question types do."""
    by_question: dict[str, list[dict]] = defaultdict(list)
    for row in predictions:
        by_question[question_text(row["prompt"])].append(row)
    groups = {_name(questions, by_question): questions for questions in _linked_by_answer(by_question)}
    if not _is_breakdown(groups, len(predictions)):
        groups = defaultdict(list)
        for question in by_question:
            groups[_prefix(question) + " …"].append(question)
        if not _is_breakdown(groups, len(predictions)):
            return None
    size = {name: sum(len(by_question[q]) for q in questions) for name, questions in groups.items()}
    return {
        name: sorted((row for q in groups[name] for row in by_question[q]), key=lambda row: row["line"])
        for name in sorted(groups, key=lambda name: (-size[name], name))
    }


def _is_breakdown(groups: dict, records: int) -> bool:
    """A handful of types, each with a few records on average (not one question per type)."""
    return 2 <= len(groups) <= MAX_QUESTION_TYPES and records >= MIN_TYPE_RECORDS * len(groups)


def _name(questions: list[str], by_question: dict[str, list[dict]]) -> str:
    """A type's most frequent question, and how many other phrasings it has."""
    named = max(questions, key=lambda q: (len(by_question[q]), q))
    others = len(questions) - 1
    return named + (f" (+{others} phrasing{'s' * (others > 1)})" if others else "")


def _linked_by_answer(by_question: dict[str, list[dict]]) -> list[list[str]]:
    """Question texts joined, transitively, when records of both have the same gold answer (union-find)."""
    parent = {question: question for question in by_question}

    def root(question: str) -> str:
        while parent[question] != question:
            parent[question] = parent[parent[question]]
            question = parent[question]
        return question

    first_asked: dict[str, str] = {}
    for question, rows in by_question.items():
        for row in rows:
            answer = normalise(row["reference"])
            parent[root(question)] = root(first_asked.setdefault(answer, question))
    groups: dict[str, list[str]] = defaultdict(list)
    for question in by_question:
        groups[root(question)].append(question)
    return list(groups.values())


def _prefix(question: str) -> str:
    words = [word.strip("?.,!:;\"'") for word in question.lower().split()]
    return " ".join([word for word in words if word][:TYPE_PREFIX_WORDS])


def type_scores(types: dict[str, list[dict]]) -> list[dict]:
    """Per question type: records, base and tuned exact match, and the tuned model's wrong answers."""
    rows = []
    for name, records in types.items():
        references = [row["reference"] for row in records]
        base = exact_matches([row["base"] for row in records], references)
        tuned = exact_matches([row["tuned"] for row in records], references)
        rows.append(
            {
                "type": name,
                "records": len(records),
                "answers": sorted({normalise(reference) for reference in references}),
                "base_exact_match": sum(base) / len(records),
                "tuned_exact_match": sum(tuned) / len(records),
                "wrong": len(records) - int(sum(tuned)),
            }
        )
    return rows


def wrong_answer_sample(predictions: Sequence[dict], count: int = 12) -> list[dict]:
    """Up to ``count`` wrong answers, spread over the mistakes: one of each (gold, answer) pair in turn, the most
    frequent pair first, each pair's records in line order. Deterministic, so the report is byte-identical."""
    by_pair: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in sorted(predictions, key=lambda row: row["line"]):
        if is_wrong(row):
            by_pair[(normalise(row["reference"]), normalise(row["tuned"]))].append(row)
    queues = [by_pair[(gold, tuned)] for gold, tuned, _ in frequent_confusions(predictions)]
    sample: list[dict] = []
    for turn in range(max((len(queue) for queue in queues), default=0)):
        sample += [queue[turn] for queue in queues if turn < len(queue)]
    return sample[:count]


def image_link(image: str, images_from: str) -> str:
    """A record's image path (relative to the project folder, or absolute) as a report links it: relative to the
    report's folder, ``images_from`` being the project folder as seen from there (``../..``)."""
    return image if posixpath.isabs(image) else posixpath.normpath(posixpath.join(images_from, image))


def most_common_answers(answers: Sequence[str]) -> list[tuple[str, int]]:
    """Every answer tied for the most frequent, with its count, in the order first given (Counter's order, so the
    first is the one ``Counter.most_common(1)`` picks)."""
    counts = Counter(answers).most_common()
    return [(answer, count) for answer, count in counts if count == counts[0][1]] if counts else []


def describe_tie(picked: str, tied: Sequence[Sequence]) -> str:
    """One clause on a tie for the most common answer (empty without one), e.g. "a three-way tie of
    circle/square/triangle at 80 each; 'triangle' picked, the first of them in the training data"."""
    if len(tied) < 2:
        return ""
    names = "/".join(sorted(answer for answer, _ in tied))
    ways = {2: "two", 3: "three", 4: "four", 5: "five"}.get(len(tied), str(len(tied)))
    first = "the first of them in the training data"
    return f"a {ways}-way tie of {names} at {tied[0][1]} each; {picked!r} picked, {first}"


def thumbnail(path: Path, size: int = 128):
    """The image at ``path`` shrunk to fit ``size`` pixels, as RGB (PIL)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    image.thumbnail((size, size))
    return image


def wrong_answer_table(predictions: Sequence[dict], image_root: Path, count: int = 24) -> dict[str, list]:
    """The wrong-answer sample as MLflow table columns, with each record's first image as a thumbnail where every
    sampled record has one (an MLflow image column may not mix images and other values)."""
    sample = wrong_answer_sample(predictions, count)
    columns: dict[str, list] = {
        "line": [row["line"] for row in sample],
        "question": [question_text(row["prompt"]) for row in sample],
        "reference": [row["reference"] for row in sample],
        "tuned": [row["tuned"] for row in sample],
        "base": [row["base"] for row in sample],
    }
    if sample and all(row["images"] for row in sample):
        columns["image"] = [thumbnail(Path(image_root) / row["images"][0]) for row in sample]
    return columns


def _short(text: str, length: int) -> str:
    """Printable characters only (an untrained model's answers hold control characters), cut to ``length``."""
    return "".join(character for character in text if character.isprintable())[:length]


def answer_grid(predictions: Sequence[dict], image_root: Path, count: int = 24, columns: int = 6):
    """A grid of test images titled with the base, tuned and gold answers, wrong answers first (titles in red)."""
    import matplotlib.pyplot as plt

    rows = sorted(predictions, key=lambda row: (not is_wrong(row), row["line"]))[:count]
    rows = [row for row in rows if row["images"]] or rows
    height = max(1, -(-len(rows) // columns))
    figure, axes_grid = plt.subplots(height, columns, figsize=(2.2 * columns, 2.6 * height), squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, row in zip(axes_grid.flat, rows, strict=False):
        if row["images"]:
            axes.imshow(thumbnail(Path(image_root) / row["images"][0], 256))
        title = "\n".join(f"{name}: {_short(row[key], 18)}" for name, key in GRID_TITLE)
        axes.set_title(title, fontsize=8, color="red" if is_wrong(row) else "black")
    figure.tight_layout()
    return figure


def mistakes_markdown(predictions: Sequence[dict], images_from: str | None = None, count: int = 12) -> list[str]:
    """The report's section on wrong answers: per-answer confusion (a gold x answer table for a closed answer set,
    the most frequent wrong answers for open ones), exact match per question type, and a sample of wrong answers
    with their images (linked through ``images_from``, the project folder as seen from the report; without it, no
    images)."""
    wrong = sum(is_wrong(row) for row in predictions)
    lines = ["", "## What the tuned model got wrong", ""]
    lines.append(f"{wrong} of {len(predictions)} tuned answers are wrong (exact match).")
    if not wrong:
        return lines
    references = [row["reference"] for row in predictions]
    if is_closed(references):
        lines += _confusion_table(predictions)
    else:
        lines += [
            "",
            "The gold answers are open (mostly distinct), so instead of a gold x answer table, the wrong answers "
            "given most often:",
            "",
            "| tuned answer | times | instead of |",
            "|---|---|---|",
        ]
        for answer, times, golds in frequent_wrong_answers(predictions):
            lines.append(_row([answer, str(times), "; ".join(golds)]))
    types = question_types(predictions)
    if types:
        lines += [
            "",
            "### By question type",
            "",
            "Questions that share gold answers are one type (or, where answers are rarely shared, questions with the "
            "same first words).",
            "",
            "| question type | gold answers | records | base exact match | tuned exact match | wrong |",
            "|---|---|---|---|---|---|",
        ]
        for score in type_scores(types):
            answers = ", ".join(score["answers"]) if len(score["answers"]) <= 6 else f"{len(score['answers'])} distinct"
            cells = [score["type"], answers, str(score["records"])]
            cells += [f"{score['base_exact_match']:.4f}", f"{score['tuned_exact_match']:.4f}", str(score["wrong"])]
            lines.append(_row(cells))
    sample = wrong_answer_sample(predictions, count)
    lines += [
        "",
        f"### {len(sample)} of the wrong answers",
        "",
        "One of each mistake (gold, answer) in turn, the most frequent first.",
        "",
        ("| image " if images_from is not None else "") + "| line | question | gold | tuned | base |",
        ("|---" if images_from is not None else "") + "|---|---|---|---|---|",
    ]
    for row in sample:
        cells = [str(row["line"]), question_text(row["prompt"]), row["reference"], row["tuned"]]
        cells.append(_short(row["base"], 60))
        images = "" if images_from is None else " ".join(_thumbnail_tag(image, images_from) for image in row["images"])
        lines.append((f"| {images} " if images_from is not None else "") + _row(cells))
    return lines


def _confusion_table(predictions: Sequence[dict]) -> list[str]:
    order, table = confusion(predictions)
    other = any(table[gold][None] for gold in order)
    columns = [*order, *([None] if other else [])]
    lines = [
        "",
        "### Per answer",
        "",
        f"The gold answers are a closed set ({len(order)} answers over {len(predictions)} records). Rows: the gold "
        "answer; columns: the tuned model's answer"
        + ("; other: an answer outside the set." if other else ".")
        + " The diagonal is right.",
        "",
        "| gold \\ tuned | " + " | ".join(gold if gold is not None else "other" for gold in columns) + " | right |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for gold in order:
        counts = table[gold]
        cells = [_count(counts[answer], bold=answer == gold) for answer in columns]
        lines.append(f"| {gold} | " + " | ".join(cells) + f" | {counts[gold]}/{sum(counts.values())} |")
    pairs = frequent_confusions(predictions)
    lines += ["", "Most frequent mistakes: " + ", ".join(f"{gold} → {tuned} ×{n}" for gold, tuned, n in pairs) + "."]
    return lines


def _count(value: int, bold: bool) -> str:
    if not value:
        return ""
    return f"**{value}**" if bold else str(value)


def _thumbnail_tag(image: str, images_from: str) -> str:
    return f'<img src="{image_link(image, images_from)}" width="{THUMBNAIL_WIDTH}">'


def _row(cells: Sequence[str], limit: int = 120) -> str:
    """A Markdown table row; each cell on one line, pipes escaped, cut to ``limit`` characters."""
    cut = [cell.replace("|", "\\|").replace("\n", " ")[:limit] for cell in cells]
    return "| " + " | ".join(cut) + " |"

"""What the report says about wrong answers (issue 23): per-answer confusion, closed vs open answers decided from the
data, question types, the wrong-answer sample with its images, the majority baseline's tie, and the MLflow table
and notebook grid that show the images. Hand-made prediction rows and images."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from vlm_pipeline.pipelines.evaluation.nodes import majority_baseline
from vlm_pipeline.reporting.mistakes import (
    answer_grid,
    confusion,
    describe_tie,
    frequent_wrong_answers,
    is_closed,
    mistakes_markdown,
    most_common_answers,
    question_types,
    type_scores,
    wrong_answer_sample,
    wrong_answer_table,
)

SHAPE_QUESTIONS = ("What shape is this?", "Which shape is shown?")
COLOUR_QUESTION = "What colour is it?"


def row(line: int, question: str, reference: str, tuned: str, base: str = "zzz", images=None) -> dict:
    """A predictions row as evaluation writes it."""
    prompt = [{"type": "image"}, {"type": "text", "text": question}]
    images = [f"data/01_raw/set/images/{line}.png"] if images is None else images
    return {"line": line, "prompt": prompt, "images": images, "reference": reference, "base": base, "tuned": tuned}


def shapes_and_colours() -> list[dict]:
    """12 records over five answers: circle -> square twice, square -> circle once, red -> "maroon" (outside the
    set) once; the base model right once."""
    answers = [
        (SHAPE_QUESTIONS[0], "circle", "square"),
        (SHAPE_QUESTIONS[1], "circle", "Square."),
        (SHAPE_QUESTIONS[0], "circle", "circle"),
        (SHAPE_QUESTIONS[1], "square", "circle"),
        (SHAPE_QUESTIONS[0], "square", "square"),
        (SHAPE_QUESTIONS[1], "triangle", "triangle"),
        (SHAPE_QUESTIONS[0], "triangle", "triangle"),
        (COLOUR_QUESTION, "red", "maroon"),
        (COLOUR_QUESTION, "red", "red"),
        (COLOUR_QUESTION, "blue", "blue"),
        (COLOUR_QUESTION, "blue", "blue"),
        (COLOUR_QUESTION, "red", "red"),
    ]
    rows = [row(i, question, gold, tuned) for i, (question, gold, tuned) in enumerate(answers, 1)]
    rows[2]["base"] = "circle"
    return rows


def test_the_confusion_counts_each_gold_answer_against_the_tuned_answers():
    rows = shapes_and_colours()
    assert is_closed([r["reference"] for r in rows])
    order, table = confusion(rows)
    assert order == ["circle", "red", "blue", "square", "triangle"]  # most frequent first, then by name
    assert table["circle"] == {"square": 2, "circle": 1}  # "Square." normalised as exact match does
    assert table["square"] == {"circle": 1, "square": 1}
    assert table["red"] == {None: 1, "red": 2}  # an answer outside the gold set


def test_closed_or_open_is_decided_from_the_answers():
    assert not is_closed(["screed", "rebar", "lintel", "joist"])  # every answer once: free text
    assert not is_closed(["a", "b", "c"] * 1 + ["a"])  # 4 records over 3 answers: too few repeats to tell
    assert is_closed(["yes", "no"] * 3)
    assert not is_closed([f"answer {i}" for i in range(30)] * 2)  # repeated, but too many for a table


def test_question_types_join_phrasings_that_share_answers():
    types = question_types(shapes_and_colours())
    assert list(types) == ["What shape is this? (+1 phrasing)", COLOUR_QUESTION]  # the larger type first
    scores = {score["type"]: score for score in type_scores(types)}
    shapes = scores["What shape is this? (+1 phrasing)"]
    assert shapes["records"] == 7 and shapes["wrong"] == 3 and shapes["answers"] == ["circle", "square", "triangle"]
    assert shapes["tuned_exact_match"] == pytest.approx(4 / 7) and shapes["base_exact_match"] == pytest.approx(1 / 7)
    assert scores[COLOUR_QUESTION]["wrong"] == 1


def test_open_answers_fall_back_to_the_first_words_and_one_type_is_no_breakdown():
    glossary = [
        row(1, "What is screed?", "a floor layer", "a wall"),
        row(2, "What is rebar?", "steel bar", "steel bar"),
        row(3, "Define the term: lintel", "a beam over an opening", "a wall"),
        row(4, "Define the term: joist", "a floor beam", "a floor beam"),
    ]
    types = question_types(glossary)
    assert {name: [r["line"] for r in records] for name, records in types.items()} == {
        "what is …": [1, 2],
        "define the …": [3, 4],
    }
    assert question_types([row(i, "What is it?", str(i), "x") for i in range(4)]) is None


def test_the_sample_takes_one_of_each_mistake_in_turn():
    rows = shapes_and_colours()
    assert [r["line"] for r in wrong_answer_sample(rows)] == [1, 8, 4, 2]  # circle->square, red->maroon, ...
    assert [r["line"] for r in wrong_answer_sample(rows, count=2)] == [1, 8]
    assert wrong_answer_sample([row(1, "Q?", "a", "a")]) == []


def test_the_report_section_has_the_table_the_types_and_the_images():
    text = "\n".join(mistakes_markdown(shapes_and_colours(), images_from="../../.."))
    assert "4 of 12 tuned answers are wrong" in text
    assert "| gold \\ tuned | circle | red | blue | square | triangle | other | right |" in text
    assert "| circle | **1** |  |  | 2 |  |  | 1/3 |" in text
    assert "| red |  | **2** |  |  |  | 1 | 2/3 |" in text
    assert "Most frequent mistakes: circle → square ×2, red → maroon ×1, square → circle ×1." in text
    assert "| What shape is this? (+1 phrasing) | circle, square, triangle | 7 | 0.1429 | 0.5714 | 3 |" in text
    assert '| <img src="../../../data/01_raw/set/images/1.png" width="64"> | 1 | What shape is this? |' in text
    absolute = row(1, "Q?", "a", "b", images=["/mnt/images/x.png"])
    assert '<img src="/mnt/images/x.png"' in "\n".join(mistakes_markdown([absolute], images_from="../.."))
    assert "<img" not in "\n".join(mistakes_markdown(shapes_and_colours()))  # no link base given: no images


def test_open_answers_list_the_most_frequent_wrong_ones():
    rows = [row(i, f"Term {i}?", f"meaning {i}", "a wall" if i % 2 else f"meaning {i}") for i in range(1, 8)]
    assert frequent_wrong_answers(rows) == [("a wall", 4, ["meaning 1", "meaning 3", "meaning 5"])]
    text = "\n".join(mistakes_markdown(rows))
    assert "| a wall | 4 | meaning 1; meaning 3; meaning 5 |" in text and "gold \\ tuned" not in text


def records(answers: list[str]) -> list[dict]:
    return [{"messages": [{"role": "assistant", "content": [{"type": "text", "text": a}]}]} for a in answers]


def test_the_majority_baseline_names_its_tie():
    train = records(["triangle", "square", "circle", "red"] * 2 + ["blue"])
    baseline = majority_baseline(train, records(["circle", "triangle", "triangle"]))
    assert baseline["answer"] == "triangle" and baseline["exact_match"] == pytest.approx(2 / 3)
    assert baseline["tied"] == [["triangle", 2], ["square", 2], ["circle", 2], ["red", 2]]
    assert describe_tie(baseline["answer"], baseline["tied"]) == (
        "a four-way tie of circle/red/square/triangle at 2 each; 'triangle' picked, the first of them in the "
        "training data"
    )
    assert majority_baseline(records(["a", "b", "a"]), records(["a"]))["tied"] == []
    assert most_common_answers(["b", "a", "a"]) == [("a", 2)] and describe_tie("a", [("a", 2)]) == ""


@pytest.fixture
def images(tmp_path):
    """The project folder with one image per record of shapes_and_colours()."""
    folder = tmp_path / "data/01_raw/set/images"
    folder.mkdir(parents=True)
    for line in range(1, 13):
        Image.new("RGB", (300, 200), (20 * line, 0, 0)).save(folder / f"{line}.png")
    return tmp_path


def test_the_mlflow_table_carries_thumbnails_only_where_every_row_has_an_image(images):
    """The columns ``log_predictions`` hands ``mlflow.log_table`` (test_notebook.py reads the logged table back)."""
    rows = shapes_and_colours()
    columns = wrong_answer_table(rows, images)
    assert list(columns) == ["line", "question", "reference", "tuned", "base", "image"]
    assert columns["line"] == [1, 8, 4, 2] and columns["question"][0] == "What shape is this?"
    assert [image.size for image in columns["image"]] == [(128, 85)] * 4  # thumbnails of the 300x200 images
    rows[7]["images"] = []  # MLflow refuses a column of images and other values
    assert "image" not in wrong_answer_table(rows, images)


def test_the_notebook_grid_puts_wrong_answers_first(images):
    figure = answer_grid(shapes_and_colours(), images, count=6, columns=3)
    titled = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title().split("\n")[0] for axes in titled] == [
        "gold: circle",
        "gold: circle",
        "gold: square",
        "gold: red",
        "gold: circle",
        "gold: square",
    ]
    assert [axes.title.get_color() for axes in titled].count("red") == 4 and len(titled[0].images) == 1
    plt.close(figure)

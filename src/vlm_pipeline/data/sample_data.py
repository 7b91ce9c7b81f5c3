"""Deterministic generators for the two committed sample data sets.

    python -m vlm_pipeline.data.sample_data --out data/01_raw

* ``shapes_vqa``: 56x56 PNGs of one large filled shape; each record asks its colour or its shape, so the answer
  depends on the image. Small enough for a tiny VLM to learn on CPU in minutes.
* ``alpaca_glossary``: construction terms and one-sentence definitions in alpaca format, for the text model.
  Test records ask with instruction wordings never seen in training, over the same terms.

Every random choice comes from a seeded ``random.Random``, so two runs write identical bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

SEED = 20240601
IMAGE_SIZE = 56
SHAPES_SPLITS = {"train": 480, "test": 96}
GLOSSARY_TEST_RECORDS = 30

# Saturated, well-separated RGB values so a 4-token image encoding still tells them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_QUESTIONS = ("What color is the shape?", "Which color is the shape in the image?", "What colour is this shape?")
SHAPE_QUESTIONS = ("What shape is this?", "Which shape is shown in the image?", "What is the shape in this picture?")

GLOSSARY: dict[str, str] = {
    "rebar": "Steel reinforcing bar placed in concrete to carry tensile forces.",
    "formwork": "Temporary moulds that hold wet concrete in shape until it has set.",
    "lintel": "A horizontal beam that spans an opening such as a door or window and carries the load above it.",
    "joist": "One of a series of parallel horizontal members that support a floor or ceiling.",
    "truss": "A rigid framework of members joined in triangles that spans a roof or a bridge.",
    "footing": "The widened base of a foundation that spreads the load of a wall or column into the soil.",
    "slab": "A flat horizontal plate of reinforced concrete that forms a floor or roof.",
    "beam": "A horizontal structural member that carries loads across a span by bending.",
    "column": "A vertical structural member that carries loads down to the foundation in compression.",
    "grout": "A fluid mortar used to fill gaps, joints and cavities, such as between tiles or around anchors.",
    "mortar": "A paste of cement, sand and water that binds bricks or blocks together.",
    "screed": "A thin level layer of cement and sand laid over a concrete slab to give a smooth floor surface.",
    "scaffolding": "A temporary structure of tubes and boards that gives workers safe access to work at height.",
    "cantilever": "A beam or slab fixed at one end only, projecting beyond its support.",
    "purlin": "A horizontal roof member running along the length of a roof that supports the rafters or sheeting.",
    "rafter": "A sloping beam that runs from the ridge to the eaves and supports the roof covering.",
    "soffit": "The exposed underside of a structural element such as a beam, arch or roof overhang.",
    "parapet": "A low protective wall along the edge of a roof, balcony or bridge.",
    "damp-proof course": "A horizontal barrier built into a wall to stop moisture rising from the ground.",
    "plinth": "The raised base on which a column, wall or building stands.",
    "stud": "One of the vertical framing members in a timber or steel framed wall.",
    "drywall": "Panels of gypsum plaster pressed between sheets of paper, used to line interior walls and ceilings.",
    "aggregate": "Granular material such as sand, gravel or crushed stone that is mixed with cement for concrete.",
    "curing": "Keeping freshly placed concrete moist and warm so that it gains its full strength.",
    "pile": "A long column driven or bored deep into the ground to carry loads down to firmer soil or rock.",
    "retaining wall": "A wall built to hold back soil where the ground level changes.",
    "shear wall": "A stiff wall designed to resist horizontal forces from wind or earthquakes.",
    "girder": "A large main beam that supports smaller beams or joists.",
    "corbel": "A bracket projecting from a wall to support a load above it.",
    "flashing": "Thin strips of metal or membrane fitted at joints to keep water out of a building.",
    "eaves": "The lower edge of a roof that overhangs the face of the wall.",
    "ridge": "The highest horizontal line of a pitched roof, where its two slopes meet.",
    "sill": "The horizontal member at the bottom of a window or door opening.",
    "header": "A horizontal framing member over an opening in a framed wall that carries the loads around it.",
    "expansion joint": "A gap built into a structure that lets its parts expand and contract without cracking.",
    "precast concrete": "Concrete elements cast and cured in a factory, then transported to the site and installed.",
    "post-tensioning": "Strengthening concrete by tensioning steel tendons inside it after the concrete has hardened.",
    "load-bearing wall": "A wall that carries the weight of the floors or roof above it.",
    "underpinning": "Strengthening or deepening the foundation of an existing building.",
    "bracing": "Diagonal members added to a frame to keep it stable against sideways loads.",
}
# (instruction template, whether the term goes in "input"); "{term}" is filled in when it goes in the instruction.
TRAIN_INSTRUCTIONS = (
    ("Define the construction term.", True),
    ("What does this construction term mean?", True),
    ("What is meant by '{term}' in construction?", False),
)
TEST_INSTRUCTIONS = (
    ("Explain the following building term in one sentence.", True),
    ("Briefly describe what '{term}' means on a building site.", False),
)


def write_sample_data(out_root: Path) -> dict[str, Path]:
    """Write ``shapes_vqa/`` and ``alpaca_glossary/`` under ``out_root``; return the two set folders."""
    out_root = Path(out_root)
    return {
        "shapes_vqa": write_shapes_vqa(out_root / "shapes_vqa"),
        "alpaca_glossary": write_alpaca_glossary(out_root / "alpaca_glossary"),
    }


def write_shapes_vqa(folder: Path) -> Path:
    """Images under ``folder/images`` and ``train.jsonl``/``test.jsonl`` in conversational format."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split_index, (split, count) in enumerate(SHAPES_SPLITS.items()):
        rng = random.Random(SEED + split_index)
        records = []
        for index, (colour, shape, asks_colour) in enumerate(shape_plan(count, rng)):
            relative = f"images/{split}_{index:04d}.png"
            draw_shape(colour, shape, rng).save(folder / relative, format="PNG", optimize=True)
            questions = COLOUR_QUESTIONS if asks_colour else SHAPE_QUESTIONS
            answer = colour if asks_colour else shape
            records.append(vqa_record(relative, rng.choice(questions), answer))
        write_jsonl(folder / f"{split}.jsonl", records)
    (folder / "README.md").write_text(SHAPES_README, encoding="utf-8")
    return folder


def shape_plan(count: int, rng: random.Random) -> list[tuple[str, str, bool]]:
    """(colour, shape, asks_colour) per record, with every answer equally frequent within its question kind.

    Half the records ask the shape (3 answers), half the colour (6 answers), so no answer exceeds 1/6 of a split.
    """
    shape_count = count // 2
    colour_count = count - shape_count
    plan = []
    for asks_colour, size in ((True, colour_count), (False, shape_count)):
        colours = _balanced(list(COLOURS), size, rng)
        shapes = _balanced(list(SHAPES), size, rng)
        plan.extend((colour, shape, asks_colour) for colour, shape in zip(colours, shapes, strict=True))
    rng.shuffle(plan)
    return plan


def draw_shape(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A white 56x56 RGB image with one filled shape spanning 55-75% of its side, jittered in size and place."""
    extent = rng.randint(round(IMAGE_SIZE * 0.55), round(IMAGE_SIZE * 0.75))
    margin = 2
    left = rng.randint(margin, IMAGE_SIZE - margin - extent)
    top = rng.randint(margin, IMAGE_SIZE - margin - extent)
    box = (left, top, left + extent - 1, top + extent - 1)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


def vqa_record(image_path: str, question: str, answer: str) -> dict:
    """One conversational record: the image and the question, then the one-word answer."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": [image_path],
    }


def write_alpaca_glossary(folder: Path) -> Path:
    """``train.jsonl`` (every term x every training wording) and ``test.jsonl`` (held-out wordings)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    train = [glossary_record(term, wording) for term in GLOSSARY for wording in TRAIN_INSTRUCTIONS]
    rng.shuffle(train)
    test_terms = rng.sample(sorted(GLOSSARY), GLOSSARY_TEST_RECORDS)
    test = [glossary_record(term, TEST_INSTRUCTIONS[index % 2]) for index, term in enumerate(test_terms)]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    (folder / "README.md").write_text(GLOSSARY_README, encoding="utf-8")
    return folder


def glossary_record(term: str, wording: tuple[str, bool]) -> dict:
    """An alpaca record asking for the definition of ``term`` with one instruction wording."""
    template, term_in_input = wording
    return {
        "instruction": template if term_in_input else template.format(term=term),
        "input": term if term_in_input else "",
        "output": GLOSSARY[term],
    }


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is, with a final newline."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path.write_text(text, encoding="utf-8", newline="\n")


def _balanced(values: list[str], size: int, rng: random.Random) -> list[str]:
    """``size`` items cycling through ``values`` (counts differ by at most one), in shuffled order."""
    items = list(_cycle(values, size))
    rng.shuffle(items)
    return items


def _cycle(values: list[str], size: int) -> Iterator[str]:
    for index in range(size):
        yield values[index % len(values)]


SHAPES_README = f"""# shapes_vqa

A small visual question-answering set whose answers depend on the image, sized for a tiny
vision-language model to learn on CPU in minutes.

- Images: {IMAGE_SIZE}x{IMAGE_SIZE} RGB PNG in `images/`, white background, one filled shape (circle,
  square or triangle) spanning 55-75% of the side, at a jittered size and position, in one of six
  colours ({", ".join(COLOURS)}).
- Records: conversational format, one question per record, either the shape's colour or its shape;
  the answer is one lowercase word. Image paths are relative to this folder.
- Splits: {SHAPES_SPLITS["train"]} train, {SHAPES_SPLITS["test"]} test, each record with its own image. Half of each
  split asks the colour and half the shape, with answers balanced inside each half, so the most common
  answer (each shape) is 1/6 of a split.

Generated deterministically (seeded `random.Random`) by:

    python -m vlm_pipeline.data.sample_data --out data/01_raw
"""

GLOSSARY_README = f"""# alpaca_glossary

A text-only instruction set in alpaca format (`instruction`, `input`, `output`): {len(GLOSSARY)}
construction terms, each with a one-sentence definition.

- train.jsonl: every term asked with each of {len(TRAIN_INSTRUCTIONS)} instruction wordings
  ({len(GLOSSARY) * len(TRAIN_INSTRUCTIONS)} records); the term is in `input`, or named in the instruction
  with an empty `input`.
- test.jsonl: {GLOSSARY_TEST_RECORDS} of the same terms asked with {len(TEST_INSTRUCTIONS)} wordings that never
  appear in training, so a tuned model has to generalise across phrasing to answer them.

Generated deterministically (seeded `random.Random`) by:

    python -m vlm_pipeline.data.sample_data --out data/01_raw
"""


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR`` (default ``data/01_raw``)."""
    parser = argparse.ArgumentParser(description="Write the sample data sets (deterministic).")
    parser.add_argument("--out", default="data/01_raw", help="folder that receives shapes_vqa/ and alpaca_glossary/")
    args = parser.parse_args(argv)
    for name, folder in write_sample_data(Path(args.out)).items():
        print(f"wrote {name} to {folder}")


if __name__ == "__main__":
    main()

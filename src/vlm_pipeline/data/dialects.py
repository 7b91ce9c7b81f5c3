"""Our records rewritten in the other accepted dialects: the shapes users bring, made from the sample sets so that
tests and ``bench/formats_learn.py`` can check each dialect trains exactly like ours.

    python -m vlm_pipeline.data.dialects data/01_raw/shapes_vqa OUT_DIR --dialect llava
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from vlm_pipeline.data.formats import IMAGE_PLACEHOLDER

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def _placeholder_text(content: list[dict]) -> str:
    return "".join(IMAGE_PLACEHOLDER if part["type"] == "image" else part["text"] for part in content)


def to_llava(record: dict, image_root: Path) -> dict:
    """LLaVA: ``conversations`` of from/value with ``<image>`` in place, one image as a string in ``image``."""
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": _placeholder_text(m["content"])} for m in record["messages"]]
    images = record["images"]
    return {"conversations": turns, **({"image": images[0] if len(images) == 1 else images} if images else {})}


def to_sharegpt(record: dict, image_root: Path) -> dict:
    """ShareGPT as LLaMA-Factory reads it: ``conversations`` plus an ``images`` list."""
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": _placeholder_text(m["content"])} for m in record["messages"]]
    return {"conversations": turns, "images": record["images"]}


def _to_openai(record: dict, image_root: Path, *, embed: bool) -> dict:
    """OpenAI chat: each image an ``image_url`` part, a relative path or (``embed``) a base64 data URI."""
    images = iter(record["images"])
    messages = []
    for message in record["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                path = next(images)
                url = f"data:image/png;base64,{base64.b64encode((image_root / path).read_bytes()).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url if embed else path}})
            else:
                parts.append(part)
        messages.append({"role": message["role"], "content": parts})
    return {"messages": messages}


def to_openai_path(record: dict, image_root: Path) -> dict:
    return _to_openai(record, image_root, embed=False)


def to_openai_base64(record: dict, image_root: Path) -> dict:
    return _to_openai(record, image_root, embed=True)


def to_trl_image(record: dict, image_root: Path) -> dict:
    """TRL's single-image datasets: ``messages`` with ``{"type": "image"}`` parts and one ``image`` path."""
    return {"messages": record["messages"], "image": record["images"][0]} if len(record["images"]) == 1 else record


def to_llava_mix(record: dict, image_root: Path) -> dict:
    """HuggingFaceH4/llava-instruct-mix-vsft, as a row: ``{index, text, type}`` content items and the images as
    ``{bytes, path}`` structs (what ``datasets`` stores for an Image feature in Parquet)."""
    counter = iter(range(len(record["images"])))
    messages = [
        {
            "role": message["role"],
            "content": [
                {"index": next(counter), "text": None, "type": "image"}
                if part["type"] == "image"
                else {"index": None, "text": part["text"], "type": "text"}
                for part in message["content"]
            ],
        }
        for message in record["messages"]
    ]
    images = [{"bytes": (image_root / path).read_bytes(), "path": None} for path in record["images"]]
    return {"messages": messages, "images": images}


JSONL_DIALECTS: dict[str, Callable[[dict, Path], dict]] = {
    "llava": to_llava,
    "sharegpt": to_sharegpt,
    "openai": to_openai_path,
    "openai_base64": to_openai_base64,
    "trl_image": to_trl_image,
}


def write_dialect(source: Path, dest: Path, dialect: str, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Rewrite ``source``'s split files (records in our format) into ``dest`` in ``dialect``; images are copied
    (the base64 dialect carries them inside the lines instead)."""
    convert = JSONL_DIALECTS[dialect]
    dest.mkdir(parents=True, exist_ok=True)
    if dialect != "openai_base64" and (source / "images").is_dir():
        shutil.copytree(source / "images", dest / "images", dirs_exist_ok=True)
    for split in splits:
        lines = (source / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows = [convert(json.loads(line), source) for line in lines if line.strip()]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (dest / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a folder with train.jsonl/test.jsonl in our format")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--dialect", required=True, choices=sorted(JSONL_DIALECTS))
    args = parser.parse_args(argv)
    print(write_dialect(args.source, args.dest, args.dialect))


if __name__ == "__main__":
    main()

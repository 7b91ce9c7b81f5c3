"""`vlm-pipeline import`: Hugging Face Parquet and save_to_disk folders to our JSONL + images, offline."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_pipeline.commands import main
from vlm_pipeline.data import importing
from vlm_pipeline.data.importing import ImportSourceError, Part, import_dataset, plan_splits

# HuggingFaceH4/llava-instruct-mix-vsft's schema.
PART = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
LLAVA = pa.schema([("messages", pa.list_(MESSAGE)), ("images", pa.list_(IMAGE))])


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


def stored(data: bytes) -> str:
    return f"images/{hashlib.sha256(data).hexdigest()}.png"


def messages(question: str, answer: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"index": 0, "text": None, "type": "image"}, {"index": None, "text": question, "type": "text"}],
        },
        {"role": "assistant", "content": [{"index": None, "text": answer, "type": "text"}]},
    ]


def rows(*colours: str) -> list[dict]:
    """One llava row per colour, asking for the shape's colour; equal colours share one image's bytes."""
    return [
        {"messages": messages(f"What color is shape {i}?", colour), "images": [{"bytes": png(colour), "path": None}]}
        for i, colour in enumerate(colours)
    ]


def expected(source: list[dict]) -> list[dict]:
    return [{**row, "images": [stored(image["bytes"]) for image in row["images"]]} for row in source]


def write_parquet(path: Path, source: list[dict], schema: pa.Schema = LLAVA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(source, schema=schema), path, row_group_size=2)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def outputs(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` but the report (it holds timings), by relative path."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "import_report.json")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_parquet_shards_become_train_and_test_with_each_image_stored_once(tmp_path):
    train_a, train_b, test = rows("red", "red", "blue"), rows("green"), rows("red")
    write_parquet(tmp_path / "src/data/train-00000-of-00002.parquet", train_a)
    write_parquet(tmp_path / "src/data/train-00001-of-00002.parquet", train_b)
    write_parquet(tmp_path / "src/data/test-00000-of-00001.parquet", test)
    write_parquet(tmp_path / "src/.cache/huggingface/stale.parquet", rows("black"))  # hidden: not data
    out = tmp_path / "out"

    report = import_dataset(tmp_path / "src", out)

    assert read_jsonl(out / "train.jsonl") == expected(train_a + train_b)
    assert read_jsonl(out / "test.jsonl") == expected(test)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        Path(stored(png(c))).name for c in ("red", "blue", "green")
    )
    assert (out / "import_quarantine.jsonl").read_bytes() == b""
    assert report["splits"]["train"]["rows"] == 4 and report["splits"]["train"]["distinct_images"] == 3
    assert report["splits"]["test"] | {"seconds": 0} == {
        "file": "test.jsonl",
        "rows": 1,
        "quarantined": 0,
        "distinct_images": 1,
        "seconds": 0,
        "from": ["test"],
    }
    assert json.loads((out / "import_report.json").read_text()) == report
    assert not list(out.glob(".*")), "no temp file is left behind"


def test_bad_rows_go_to_the_quarantine_and_other_columns_are_copied(tmp_path, monkeypatch):
    schema = LLAVA.append(pa.field("score", pa.float64())).append(pa.field("image", IMAGE))
    good = [{**row, "score": 0.5, "image": {"bytes": png("red"), "path": None}} for row in rows("red", "blue")]
    bad = [
        {**rows("red")[0], "score": 1.0, "image": {"bytes": b"not an image", "path": "x.png"}},
        {**rows("red")[0], "score": 1.0, "image": {"bytes": None, "path": "COCO_train2014_1.jpg"}},
        {**rows("red")[0], "score": float("nan"), "image": None},
    ]
    source = write_parquet(tmp_path / "llava.parquet", [good[0], *bad, good[1]], schema)
    out = tmp_path / "out"
    monkeypatch.setattr(importing, "BATCH_ROWS", 2)  # row numbers run on across batches

    report = import_dataset(source, out)

    assert read_jsonl(out / "train.jsonl") == [{**row, "image": stored(png("red"))} for row in expected(good)]
    quarantine = read_jsonl(out / "import_quarantine.jsonl")
    assert [(q["split"], q["file"], q["row"], q["reason"]) for q in quarantine] == [
        ("train", "llava.parquet", 1, "image_unreadable"),
        ("train", "llava.parquet", 2, "image_not_embedded"),
        ("train", "llava.parquet", 3, "not_json"),
    ]
    assert "COCO_train2014_1.jpg" in quarantine[1]["detail"]
    assert report["splits"]["train"]["rows"] == 2 and report["splits"]["train"]["quarantined"] == 3
    assert not (out / "test.jsonl").exists()


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict, Features, List, Value
    from datasets import Image as ImageFeature

    part = {"index": Value("int64"), "text": Value("string"), "type": Value("string")}
    features = Features(
        {"messages": List({"role": Value("string"), "content": List(part)}), "images": List(ImageFeature())}
    )
    train, test, validation = rows("red", "red", "blue"), rows("green"), rows("blue")

    def dataset(source: list[dict]) -> Dataset:
        return Dataset.from_dict({key: [row[key] for row in source] for key in ("messages", "images")}, features)

    dataset(train).save_to_disk(tmp_path / "one")
    report = import_dataset(tmp_path / "one", tmp_path / "out_one")
    assert read_jsonl(tmp_path / "out_one/train.jsonl") == expected(train)
    assert list(report["splits"]) == ["train"] and report["splits"]["train"]["distinct_images"] == 2

    DatasetDict(train=dataset(train), test=dataset(test), validation=dataset(validation)).save_to_disk(tmp_path / "dd")
    report = import_dataset(tmp_path / "dd", tmp_path / "out_dd")
    assert read_jsonl(tmp_path / "out_dd/train.jsonl") == expected(train)
    assert read_jsonl(tmp_path / "out_dd/test.jsonl") == expected(test)
    assert report["skipped_splits"] == {"validation": {"rows": 1}}, "validation is reported, not silently dropped"
    assert len(list((tmp_path / "out_dd/images").iterdir())) == 3

    DatasetDict(train=dataset(train), validation=dataset(validation)).save_to_disk(tmp_path / "no_test")
    report = import_dataset(tmp_path / "no_test", tmp_path / "out_no_test")
    assert read_jsonl(tmp_path / "out_no_test/test.jsonl") == expected(validation)
    assert report["splits"]["test"]["from"] == ["validation"] and report["skipped_splits"] == {}


def test_split_names_of_parquet_files(tmp_path):
    def split_of(relative: str) -> str:
        return importing._parquet_split(tmp_path / relative, tmp_path)

    assert split_of("data/train-00000-of-00002.parquet") == "train"
    assert split_of("test-00000-of-00001.parquet") == "test"
    assert split_of("default/validation/0000.parquet") == "validation"
    assert split_of("train_gen-00000-of-00001.parquet") == "train_gen"
    assert split_of("llava.parquet") == "train"

    def parts(*splits: str) -> list[Part]:
        return [Part(split, tmp_path / f"{split}.parquet", "parquet", 1) for split in splits]

    outputs, skipped = plan_splits(parts("train", "validation", "test", "train_gen"))
    assert {k: [p.split for p in v] for k, v in outputs.items()} == {"train": ["train"], "test": ["test"]}
    assert list(skipped) == ["validation", "train_gen"]
    outputs, skipped = plan_splits(parts("dev", "train"))
    assert [p.split for p in outputs["test"]] == ["dev"] and not skipped


def test_an_interrupted_import_leaves_no_output_and_a_rerun_gives_the_same_bytes(tmp_path, monkeypatch):
    source = write_parquet(tmp_path / "src/train-00000-of-00001.parquet", rows(*["red", "blue", "green"] * 3))
    import_dataset(source.parent, tmp_path / "clean")
    out = tmp_path / "out"
    calls = []

    def failing_store(data: bytes, root: Path) -> str:
        calls.append(1)
        if len(calls) == 6:  # mid-way: two batches of 2 rows already written
            raise RuntimeError("disk on fire")
        return real_store(data, root)

    real_store = importing.store_image
    monkeypatch.setattr(importing, "BATCH_ROWS", 2)
    monkeypatch.setattr(importing, "store_image", failing_store)
    with pytest.raises(RuntimeError, match="disk on fire"):
        import_dataset(source.parent, out)
    assert sorted(p.name for p in out.iterdir()) == ["images"], "no JSONL, report or temp file"

    monkeypatch.setattr(importing, "store_image", real_store)
    import_dataset(source.parent, out)
    assert outputs(out) == outputs(tmp_path / "clean")

    # Interrupting a later run keeps the previous complete output as it was.
    calls.clear()
    monkeypatch.setattr(importing, "store_image", failing_store)
    with pytest.raises(RuntimeError):
        import_dataset(source.parent, out)
    assert outputs(out) == outputs(tmp_path / "clean")


@pytest.mark.parametrize("name", ["notes.txt", "empty_folder", "missing", "broken.parquet"])
def test_a_bad_source_is_one_line_naming_it(tmp_path, capsys, name):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(tmp_path / name), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / name) in error and "expected a .parquet file" in error
    assert not (tmp_path / "out").exists()


def test_no_importable_split(tmp_path):
    write_parquet(tmp_path / "src/train_gen-00000-of-00001.parquet", rows("red"))
    with pytest.raises(ImportSourceError, match="found: train_gen"):
        import_dataset(tmp_path / "src", tmp_path / "out")


@pytest.mark.slow
def test_cli_subprocess(tmp_path):
    write_parquet(tmp_path / "src/train-00000-of-00001.parquet", rows("red", "red"))
    command = [sys.executable, "-m", "vlm_pipeline", "import"]
    done = subprocess.run([*command, str(tmp_path / "src"), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("train: 2 rows written, 0 quarantined, 1 distinct images")
    assert "rows/s" in done.stderr  # the progress bar
    bad = subprocess.run([*command, str(tmp_path / "nowhere"), str(tmp_path / "out2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"error: {tmp_path / 'nowhere'}: does not exist")

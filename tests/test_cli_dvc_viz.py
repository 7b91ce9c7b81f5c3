"""The command lines a user types: `kedro run --params raw_data=DIR` (and with a typo), `kedro viz build`,
`vlm-pipeline recipe`, `vlm-pipeline validate`. Each runs as a real subprocess in a throw-away copy of the project.
`dvc repro` and `dvc exp run` are in tests/test_dvc.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, copy_project

from vlm_pipeline.pipeline_registry import VARIANTS

pytestmark = pytest.mark.slow  # Kedro sessions, subprocesses or training runs: `make test` only

BIN = Path(sys.executable).parent


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    result = subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def subset(src: Path, dest: Path, train: int, test: int) -> Path:
    """A smaller data folder elsewhere: the first records of each split and their images."""
    dest.mkdir(parents=True)
    for split, count in (("train", train), ("test", test)):
        lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (dest / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for line in lines:
            for image in json.loads(line).get("images", []):
                (dest / image).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / image, dest / image)
    return dest


def test_kedro_run_on_another_raw_data_folder(tmp_path, tiny_models):
    project = copy_project(tmp_path / "project")
    shutil.copytree(tiny_models["qwen2_5_vl"], project / "data/00_base_models/tiny-qwen2_5_vl")
    other = subset(PROJECT_ROOT / "data/01_raw/shapes_vqa", tmp_path / "elsewhere", train=24, test=8)
    long_question = " ".join(["Is the shape red or blue or green?"] * 100)
    too_long = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": long_question}]},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["images/train_0000.png"],
    }
    with (other / "train.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(too_long) + "\n")
    run(
        # The serving check is test_chain's claim; here the data folder is.
        [str(BIN / "kedro"), "run", "--params", f"raw_data={other},sft.max_steps=4,evaluation.serving_check=false"],
        project,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    report = json.loads((project / "data/02_intermediate/train/report.json").read_text())
    assert report["total"] == report["valid"] == 25
    # The over-long record (line 25) is set aside by preprocessing with its reason; nothing is lost.
    set_aside = [
        json.loads(row) for row in (project / "data/03_primary/train_set_aside.jsonl").read_text().splitlines()
    ]
    assert [(row["line"], row["reason"]) for row in set_aside] == [(25, "too_long")]
    preprocessing = json.loads((project / "data/03_primary/preprocessing_report.json").read_text())
    assert preprocessing["train"]["kept"] + preprocessing["train"]["too_long"] == 25
    markdown = (project / "data/08_reporting/data_report.md").read_text()
    assert "`too_long`: 1" in markdown and (project / "data/08_reporting/data_report.png").stat().st_size > 10_000
    predictions = (project / "data/07_model_output/lora/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8


def boxes(tree: dict, parent: str) -> set[str]:
    """The modular pipelines Kedro-Viz draws directly inside ``parent`` of a built site's tree."""
    return {child["id"] for child in tree[parent]["children"] if child["type"] == "modularPipeline"}


def test_kedro_viz_build(tmp_path):
    project = copy_project(tmp_path / "project")
    run([str(BIN / "kedro"), "viz", "build"], project)
    built = project / "build"
    assert (built / "index.html").is_file()
    graph = json.loads((built / "api/main").read_text())
    names = {node["name"] for node in graph["nodes"]}
    assert {"validate_raw_data", "tokenize_train", "train_model", "merge_adapter", "compare_base_and_tuned"} <= names
    assert graph["selected_pipeline"] == "__default__"  # the view the site opens on: lora's chain
    # The five stages are modular pipelines, one box each while collapsed (Kedro-Viz's default): the two data
    # stages beside the variant, the three model stages inside it.
    for variant in VARIANTS:
        tree = json.loads((built / "api/pipelines" / variant).read_text())["modular_pipelines"]
        model_stages = {f"{variant}.{stage}" for stage in ("training", "adapter", "evaluation")}
        assert set(tree) == {"__root__", "data_validation", "preprocessing", variant, *model_stages}
        assert boxes(tree, "__root__") == {"data_validation", "preprocessing", variant}
        assert boxes(tree, variant) == model_stages


def test_validate_cli_measures_length_with_the_model(tmp_path, tiny_models):
    raw = PROJECT_ROOT / "data/01_raw/shapes_vqa"
    lines = (raw / "test.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    long_record = json.loads(lines[0])
    long_record["messages"][0]["content"][1]["text"] = "Which colour? " * 200
    source = tmp_path / "with_long.jsonl"
    source.write_text("\n".join([*lines, json.dumps(long_record)]) + "\n", encoding="utf-8")
    cmd = [
        str(BIN / "vlm-pipeline"),
        "validate",
        str(source),
        "--image-root",
        str(raw),
        "--output-dir",
        str(tmp_path / "out"),
        "--model",
        str(tiny_models["qwen2_5_vl"]),
        "--max-length",
        "512",
        "--max-invalid-fraction",
        "0.1",
    ]
    result = run(cmd, tmp_path)
    assert f"{source}:21: too_long:" in result.stderr and "20 valid, 1 quarantined of 21" in result.stdout
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["reasons"] == {"too_long": 1} and report["valid"] + report["quarantined"] == report["total"] == 21


def test_validate_cli_exit_status(tmp_path):
    raw = PROJECT_ROOT / "data/01_raw/shapes_vqa"
    ok = run(
        [
            str(BIN / "vlm-pipeline"),
            "validate",
            str(raw / "test.jsonl"),
            "--image-root",
            str(raw),
            "--output-dir",
            str(tmp_path / "ok"),
        ],
        tmp_path,
    )
    assert "96 valid, 0 quarantined" in ok.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": null}\nnot json\n{"instruction": "Define", "output": "A word."}\n')
    result = subprocess.run(
        [
            str(BIN / "vlm-pipeline"),
            "validate",
            str(bad),
            "--image-root",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "2 of 3 records" in result.stderr and "missing_field" in result.stderr
    assert f"{bad}:1: missing_field:" in result.stderr and f"{bad}:2: not_json:" in result.stderr
    quarantine = [json.loads(line) for line in (tmp_path / "bad/quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in quarantine] == [(1, "missing_field"), (2, "not_json")]


def test_a_typo_stops_kedro_run_naming_the_key(tmp_path):
    project = copy_project(tmp_path / "project")
    result = subprocess.run(
        [str(BIN / "kedro"), "run", "--params", "sft.optimm=adamw_torch"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"},
        timeout=300,
    )
    assert result.returncode != 0
    assert "unknown key sft.optimm; did you mean sft.optim?" in result.stdout + result.stderr
    assert not (project / "data/02_intermediate").exists()


def test_recipe_cli_prints_the_kedro_command(tmp_path):
    result = run([str(BIN / "vlm-pipeline"), "recipe", "c"], cwd=copy_project(tmp_path / "project"))
    assert "kedro run --pipelines full_ft --env qwen_vl_fsdp" in result.stdout

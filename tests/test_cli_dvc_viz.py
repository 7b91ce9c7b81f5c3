"""The command lines a user types: `kedro run --params raw_data=DIR` (and with a typo), `dvc repro` (twice, then
`dvc push` to a remote and `dvc pull` in a fresh clone), `kedro viz build`, `vlm-pipeline recipe`,
`vlm-pipeline validate`. Each runs as a real subprocess in a throw-away copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, copy_project
from PIL import Image, ImageOps

from vlm_pipeline.config.run import dataset_sha256
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
        [str(BIN / "kedro"), "run", "--params", f"raw_data={other},sft.max_steps=4"],
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


# What `dvc repro` reads besides copy_project's files: its parameters, what it ignores, and the committed DVC config
# (the linked cache) with its .gitignore; .gitignore keeps outputs and checkpoints out of the copy's git commits.
DVC_FILES = ("params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")


def dvc_project(dest: Path, max_steps: int = 6) -> Path:
    """A project copy that is a git + DVC repository with the project's own DVC config (no `dvc init`), and
    training shortened to ``max_steps``."""
    project = copy_project(dest)
    for name in DVC_FILES:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, project / name)
    (project / ".venv").symlink_to(BIN.parent)
    params = project / "conf/base/parameters_training.yml"
    params.write_text(params.read_text().replace("max_steps: -1", f"max_steps: {max_steps}"))
    run(["git", "init", "-q"], project)
    return project


def commit_all(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], project)


def unique_bytes(*roots: Path) -> int:
    """Bytes of the regular files under ``roots``, a hard-linked file counted once (the disk they take)."""
    sizes = {}
    for root in roots:
        for path in root.rglob("*"):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values())


def test_dvc_repro_runs_the_chain_then_nothing(tmp_path):
    project = dvc_project(tmp_path / "project")
    # The chain's wiring is the claim, not the model: fewer records keep each of the ten stages short.
    shapes = project / "data/01_raw/shapes_vqa"
    shutil.rmtree(shapes)
    subset(PROJECT_ROOT / "data/01_raw/shapes_vqa", shapes, train=48, test=16)
    # A chat template file of our own (the twin's template, so the tokens are the checkpoint's): edited at the end.
    template = project / "conf/base/chat_template.jinja"
    shutil.copyfile(PROJECT_ROOT / "conf/model_configs/qwen2.5-vl-7b-instruct/chat_template.jinja", template)
    preprocessing = project / "conf/base/parameters_preprocessing.yml"
    preprocessing.write_text(
        preprocessing.read_text().replace("chat_template: null", "chat_template: conf/base/chat_template.jinja")
    )
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    first = run([str(BIN / "dvc"), "repro"], project, **env)
    assert "Running stage 'evaluation@lora'" in first.stdout
    # The log a person reads (a pipe, as in CI): no progress-bar redraws, no printer dicts, no warning, short.
    log = first.stdout + first.stderr
    assert "\r" not in log and "%|" not in log and "{'loss':" not in log, log[-3000:]
    assert "Warning" not in log and "Traceback" not in log, log[-3000:]
    progress = [line for line in log.splitlines() if "vlm-pipeline: training step" in line]
    assert len(progress) == len(set(progress)) == 12, progress  # 6 steps of each variant, each once
    assert len(log.splitlines()) < 150, log
    metrics = json.loads((project / "data/08_reporting/lora/detailed_metrics.json").read_text())
    assert metrics["merge_check"]["passed"]
    assert (project / "data/08_reporting/full_ft/metrics.json").is_file()

    # The cache is linked, not copied (.dvc/config): outputs plus cache measure 1.0x the outputs' own disk. All
    # the cache adds is DVC's own records (directory listings, .dir, and the run cache's entries).
    merged = project / "data/06_models/lora/merged/model.safetensors"
    assert merged.is_symlink() or merged.stat().st_nlink > 1, "DVC copied the model into its cache"
    outputs = [folder for folder in (project / "data").iterdir() if folder.name != "01_raw"]
    cache = project / ".dvc/cache"
    own, used = unique_bytes(*outputs), unique_bytes(*outputs, cache)
    records = [path for path in cache.rglob("*") if path.suffix == ".dir" or path.is_relative_to(cache / "runs")]
    listed = sum(path.lstat().st_size for path in records if path.is_file())
    assert used - own <= listed and f"{used / own:.1f}" == "1.0", f"outputs {own} B, with the cache {used} B"

    second = run([str(BIN / "dvc"), "repro"], project, **env)
    assert "Running stage" not in second.stdout, second.stdout
    shown = run([str(BIN / "dvc"), "metrics", "show", "--json"], project, **env)
    assert "data/08_reporting/lora/metrics.json" in shown.stdout
    plots = run([str(BIN / "dvc"), "plots", "show", "--json"], project, **env)
    rendered = json.loads(plots.stdout)
    assert not rendered.get("errors"), rendered["errors"]
    assert {"data/08_reporting/lora/loss_curve.png", "data/08_reporting/lora/base_vs_tuned.png"} <= set(
        rendered["data"]
    )
    # The PNGs are images, which the HTML embeds (offline); the loss curve is also a Vega plot of both losses.
    kinds = {name: {entry["type"] for entry in entries} for name, entries in rendered["data"].items()}
    assert kinds["data/08_reporting/lora/loss_curve.png"] == {"image"} and kinds["lora loss"] == {"vega"}, kinds
    (loss_plot,) = rendered["data"]["lora loss"]
    assert {point["field"] for point in loss_plot["content"]["data"]["values"]} == {"train_loss", "eval_loss"}

    # A remote (a folder here; S3, GCS or SSH the same way) carries every output to a fresh clone.
    run([str(BIN / "dvc"), "remote", "add", "-d", "store", str(tmp_path / "remote")], project)
    commit_all(project, "pipeline run")
    run([str(BIN / "dvc"), "push"], project)
    run(["git", "clone", "-q", str(project), str(tmp_path / "clone")], tmp_path)
    clone = tmp_path / "clone"
    run([str(BIN / "dvc"), "pull"], clone)
    status = run([str(BIN / "dvc"), "status"], clone)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout
    again = run([str(BIN / "dvc"), "metrics", "show", "--json"], clone)
    assert json.loads(again.stdout)[""]["data"] == json.loads(shown.stdout)[""]["data"]

    # An image edited in place (same name) reruns exactly the stages that read images. The validated records and
    # the Arrow rows carry its content hash, so the training split changes, and with it the trainer's run identity.
    dvc = str(BIN / "dvc")
    train_digest = dataset_sha256(project / "data/03_primary/train")
    image = shapes / "images/train_0000.png"
    ImageOps.invert(Image.open(image).convert("RGB")).save(image)
    assert set(json.loads(run([dvc, "status", "--json"], project, **env).stdout)) == {"data_validation"}
    run([dvc, "repro", "preprocessing"], project, **env)
    stale = json.loads(run([dvc, "status", "--json"], project, **env).stdout)
    # The test split was preprocessed again from the same records: byte-identical (no random fingerprint in
    # state.json), so the merge, which reads only it and the trained model, is not stale.
    assert set(stale) == {"training@lora", "training@full_ft", "evaluation@lora", "evaluation@full_ft"}, stale
    assert dataset_sha256(project / "data/03_primary/train") != train_digest

    # One line of the chat template file edited: the parameters stage records its new digest, and every stage that
    # renders the template goes stale, preprocessing first.
    template.write_text(template.read_text().replace("You are a helpful assistant.", "You are a careful assistant."))
    run([dvc, "repro", "parameters"], project, **env)
    stale = json.loads(run([dvc, "status", "--json"], project, **env).stdout)
    assert {"changed deps": {"data/08_reporting/parameters.yml": {"preprocessing": "modified"}}} in stale.get(
        "preprocessing", []
    ), stale


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

"""DVC drives the chain: `dvc repro` runs every stage once and then nothing; the cache is linked, a remote carries
every output to a fresh clone; an experiment on another conf environment, model and data (`dvc exp run -S ...`)
shows its numbers beside main's; and an edit reruns exactly the stages that read what changed.

One project, reproduced once, serves every claim: each `dvc repro` of the chain is ten Kedro processes, the
longest thing the suite does."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, copy_project
from PIL import Image, ImageOps
from test_cli_dvc_viz import BIN, run, subset

from vlm_pipeline.config.run import dataset_sha256

pytestmark = pytest.mark.slow  # kedro subprocesses and training runs: `make test` only

DVC = str(BIN / "dvc")
# What `dvc repro` reads besides copy_project's files: its parameters, what it ignores, and the committed DVC config
# (the linked cache) with its .gitignore; .gitignore keeps outputs and checkpoints out of the copy's git commits.
DVC_FILES = ("params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")
# `dvc exp run` commits the experiment.
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}
LORA_METRICS = "data/08_reporting/lora/metrics.json"


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
    run(["git", "commit", "-qm", message], project, **GIT_IDENTITY)


def unique_bytes(*roots: Path) -> int:
    """Bytes of the regular files under ``roots``, a hard-linked file counted once (the disk they take)."""
    sizes = {}
    for root in roots:
        for path in root.rglob("*"):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                sizes[(info.st_dev, info.st_ino)] = info.st_size
    return sum(sizes.values())


def status(project: Path, *targets: str, **env) -> dict:
    return json.loads(run([DVC, "status", "--json", *targets], project, **env).stdout)


def test_dvc_repro_runs_the_chain_then_nothing_and_an_experiment_on_another_environment(tmp_path, tiny_models):
    project = dvc_project(tmp_path / "project")
    # The chain's wiring is the claim, not the model: fewer records keep each of the ten stages short.
    shapes = project / "data/01_raw/shapes_vqa"
    shutil.rmtree(shapes)
    subset(PROJECT_ROOT / "data/01_raw/shapes_vqa", shapes, train=48, test=16)
    # The experiment's data, committed with main as a user's second data folder would be.
    glossary = subset(
        PROJECT_ROOT / "data/01_raw/alpaca_glossary", project / "data/01_raw/glossary_24", train=24, test=8
    )
    # A chat template file of our own (the twin's template, so the tokens are the checkpoint's): edited at the end.
    template = project / "conf/base/chat_template.jinja"
    shutil.copyfile(PROJECT_ROOT / "conf/model_configs/qwen2.5-vl-7b-instruct/chat_template.jinja", template)
    preprocessing = project / "conf/base/parameters_preprocessing.yml"
    preprocessing.write_text(
        preprocessing.read_text().replace("chat_template: null", "chat_template: conf/base/chat_template.jinja")
    )
    # The serving check is the chain tests' claim (every family, lora and full FT, on the whole demo): a server
    # start is about 9 s of each of the three evaluation stages here, and DVC's wiring does not change it.
    evaluation = project / "conf/base/parameters_evaluation.yml"
    evaluation.write_text(evaluation.read_text().replace("serving_check: true", "serving_check: false"))
    # That file is Qwen's: the experiment's environment (the tiny Llama) renders its checkpoint's own template.
    (project / "conf/tiny_llama/parameters_preprocessing.yml").write_text("preprocessing:\n  chat_template: null\n")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **GIT_IDENTITY}

    first = run([DVC, "repro"], project, **env)
    check_first_repro(project, first)
    check_linked_cache(project)
    second = run([DVC, "repro"], project, **env)
    assert "Running stage" not in second.stdout, second.stdout
    shown = check_metrics_and_plots(project, env)
    # main, reproduced: metrics.json and the plots are committed with it, as DVC intends.
    commit_all(project, "pipeline run")
    tracked = run(["git", "ls-files", "data/08_reporting"], project).stdout.split()
    assert {LORA_METRICS, "data/08_reporting/lora/loss_curve.png"} <= set(tracked)
    check_remote_round_trip(project, tmp_path, shown)

    check_experiment(project, glossary, tiny_models["llama"], env)
    # Back to main's workspace: its parameters and lock from git, its outputs from the cache.
    run(["git", "checkout", "--", "."], project)
    run([DVC, "checkout", "--force"], project, **env)
    assert status(project, **env) == {}

    check_an_edited_image_reruns_what_reads_images(project, shapes, env)
    check_an_edited_template_line_reruns_preprocessing(project, template, env)


def check_first_repro(project: Path, first) -> None:
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


def check_linked_cache(project: Path) -> None:
    """The cache is linked, not copied (.dvc/config): outputs plus cache measure 1.0x the outputs' own disk. All
    the cache adds is DVC's own records (directory listings, .dir, and the run cache's entries)."""
    merged = project / "data/06_models/lora/merged/model.safetensors"
    assert merged.is_symlink() or merged.stat().st_nlink > 1, "DVC copied the model into its cache"
    outputs = [folder for folder in (project / "data").iterdir() if folder.name != "01_raw"]
    cache = project / ".dvc/cache"
    own, used = unique_bytes(*outputs), unique_bytes(*outputs, cache)
    records = [path for path in cache.rglob("*") if path.suffix == ".dir" or path.is_relative_to(cache / "runs")]
    listed = sum(path.lstat().st_size for path in records if path.is_file())
    assert used - own <= listed and f"{used / own:.1f}" == "1.0", f"outputs {own} B, with the cache {used} B"


def check_metrics_and_plots(project: Path, env: dict) -> str:
    shown = run([DVC, "metrics", "show", "--json"], project, **env)
    assert LORA_METRICS in shown.stdout
    rendered = json.loads(run([DVC, "plots", "show", "--json"], project, **env).stdout)
    assert not rendered.get("errors"), rendered["errors"]
    assert {"data/08_reporting/lora/loss_curve.png", "data/08_reporting/lora/base_vs_tuned.png"} <= set(
        rendered["data"]
    )
    # The PNGs are images, which the HTML embeds (offline); the loss curve is also a Vega plot of both losses.
    kinds = {name: {entry["type"] for entry in entries} for name, entries in rendered["data"].items()}
    assert kinds["data/08_reporting/lora/loss_curve.png"] == {"image"} and kinds["lora loss"] == {"vega"}, kinds
    (loss_plot,) = rendered["data"]["lora loss"]
    assert {point["field"] for point in loss_plot["content"]["data"]["values"]} == {"train_loss", "eval_loss"}
    return shown.stdout


def check_remote_round_trip(project: Path, tmp_path: Path, shown: str) -> None:
    """A remote (a folder here; S3, GCS or SSH the same way) carries every output to a fresh clone."""
    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], project)
    commit_all(project, "the remote")
    run([DVC, "push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run([DVC, "pull"], clone)
    assert "Data and pipelines are up to date." in run([DVC, "status"], clone).stdout
    again = run([DVC, "metrics", "show", "--json"], clone)
    assert json.loads(again.stdout)[""]["data"] == json.loads(shown)[""]["data"]


def check_experiment(project: Path, data: Path, model: Path, env: dict) -> None:
    """`dvc exp run -S env=... -S base_model=... -S raw_data=...` on main's commit: any conf environment, model
    and data through DVC without editing dvc.yaml, its numbers beside main's in `dvc exp show`, `dvc metrics diff`
    and `dvc plots diff`, and DVC tracking the parameters that environment really gives each stage."""
    main_metrics = json.loads((project / LORA_METRICS).read_text())
    settings = ["env=tiny_llama", f"base_model={model}", f"raw_data={data.relative_to(project)}"]
    result = run([DVC, "exp", "run", *[arg for s in settings for arg in ("-S", s)], "evaluation@lora"], project, **env)
    assert "Running stage 'tiny_model'" not in result.stdout  # another base_model: the tiny default is not built
    # conf/tiny_llama/globals.yml names data/00_base_models/tiny-llama; params.yaml's base_model wins, and says so.
    assert f"conf/tiny_llama/globals.yml has base_model: data/00_base_models/tiny-llama; this run uses {model}" in (
        result.stderr
    )
    merged = json.loads((project / "data/06_models/lora/merged/config.json").read_text())
    assert merged["model_type"] == "llama"
    references = {json.loads(line)["output"] for line in (data / "test.jsonl").read_text().splitlines()}
    predictions = [json.loads(line) for line in (project / "data/07_model_output/lora/predictions.jsonl").open()]
    assert len(predictions) == 8 and {row["reference"] for row in predictions} == references
    metrics = json.loads((project / LORA_METRICS).read_text())
    details = json.loads((project / "data/08_reporting/lora/detailed_metrics.json").read_text())
    assert metrics["lora"]["em"] == details["tuned"]["exact_match"] and details["merge_check"]["passed"] == 1
    # The environment's own override (conf/tiny_llama/parameters_training.yml) is what the stages ran with.
    resolved = (project / "data/08_reporting/parameters.yml").read_text()
    assert "padding_free: true" in resolved and f"base_model: {model}" in resolved

    shown = json.loads(run([DVC, "exp", "show", "--json"], project, **env).stdout)
    (baseline,) = [commit for commit in shown if commit.get("experiments")]
    assert baseline["data"]["metrics"][LORA_METRICS]["data"]["lora"]["em"] == main_metrics["lora"]["em"]
    experiment = next(exp for exp in baseline["experiments"] if exp.get("revs"))["revs"][0]["data"]
    assert experiment["params"]["params.yaml"]["data"]["raw_data"] == "data/01_raw/glossary_24"
    assert experiment["params"]["params.yaml"]["data"]["env"] == "tiny_llama"
    assert experiment["metrics"][LORA_METRICS]["data"] == metrics
    assert all(isinstance(value, int | float) for value in flat_values(experiment["metrics"][LORA_METRICS]["data"]))
    # The headline reads in a 120-column terminal after a one-parameter experiment (docs/dvc.md): its changed
    # columns come whole, none folded into "…". This one changed three parameters (and the parameter file's
    # chat_template); dropping the two it would not have changed leaves that table. (Without dropping conf and
    # data/, the changed dependencies' 32-character hashes take most of the width.)
    table = run(
        [DVC, "exp", "show", "--only-changed", "--no-pager", "--drop", "conf|data/|env|base_model|preprocessing"],
        project,
        COLUMNS="120",
        **env,
    ).stdout
    assert max(map(len, table.splitlines())) <= 120 and "lora.loss " in table and "raw_data" in table, table
    assert f"{metrics['lora']['loss']:.5g}" in table and "…" not in table, table
    # The workspace holds the experiment: both diffs against the main commit read its files from git.
    diff = json.loads(run([DVC, "metrics", "diff", "HEAD", "--all", "--json"], project, **env).stdout)
    old, new = main_metrics["lora"]["loss"], metrics["lora"]["loss"]
    assert diff[LORA_METRICS]["lora.loss"] == {"old": old, "new": new, "diff": pytest.approx(new - old)}
    run([DVC, "plots", "diff", "HEAD", "--json"], project, **env)

    # Editing one key of the environment's parameter files reruns exactly the stages that read it.
    overrides = project / "conf/tiny_llama/parameters_training.yml"
    overrides.write_text(overrides.read_text() + "  logging_steps: 2\n")
    run([DVC, "repro", "parameters"], project, **env)
    assert set(status(project, "evaluation@lora", "--with-deps", **env)) == {"training@lora"}


def check_an_edited_image_reruns_what_reads_images(project: Path, shapes: Path, env: dict) -> None:
    """An image edited in place (same name) reruns exactly the stages that read images. The validated records and
    the Arrow rows carry its content hash, so the training split changes, and with it the trainer's run identity."""
    train_digest = dataset_sha256(project / "data/03_primary/train")
    image = shapes / "images/train_0000.png"
    ImageOps.invert(Image.open(image).convert("RGB")).save(image)
    assert set(status(project, **env)) == {"data_validation"}
    run([DVC, "repro", "preprocessing"], project, **env)
    stale = status(project, **env)
    # The test split was preprocessed again from the same records: byte-identical (no random fingerprint in
    # state.json), so the merge, which reads only it and the trained model, is not stale.
    assert set(stale) == {"training@lora", "training@full_ft", "evaluation@lora", "evaluation@full_ft"}, stale
    assert dataset_sha256(project / "data/03_primary/train") != train_digest


def check_an_edited_template_line_reruns_preprocessing(project: Path, template: Path, env: dict) -> None:
    """One line of the chat template file edited: the parameters stage records its new digest, and every stage that
    renders the template goes stale, preprocessing first."""
    template.write_text(template.read_text().replace("You are a helpful assistant.", "You are a careful assistant."))
    run([DVC, "repro", "parameters"], project, **env)
    stale = status(project, **env)
    assert {"changed deps": {"data/08_reporting/parameters.yml": {"preprocessing": "modified"}}} in stale.get(
        "preprocessing", []
    ), stale


def flat_values(tree):
    """Every leaf of a nested metrics dict."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from flat_values(value)
    else:
        yield tree

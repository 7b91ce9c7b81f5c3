"""The report datasets (JSON, text, figure) replace a file instead of writing into it: DVC links outputs to its cache
(hard links, read-only), so writing in place would change the cache entry or fail. A crash keeps the old file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import PROJECT_ROOT
from kedro.io import DatasetError
from kedro_mlflow.io.artifacts import MlflowArtifactDataset
from matplotlib import pyplot as plt

from vlm_pipeline.datasets import FigureDataset, JSONDataset, TextDataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OLD = b"old bytes, as the DVC cache holds them\n"


def figure():
    fig, axes = plt.subplots(figsize=(2, 1))
    axes.plot([0, 1], [1, 0])
    return fig


# kind: (dataset class, file name, save_args, a fresh value to save, check that the file holds that value)
KINDS = {
    "json": (JSONDataset, "table.json", None, lambda: {"b": 1, "a": [1, 2]}, lambda p: json.loads(p.read_text())),
    "text": (TextDataset, "report.md", None, lambda: "# Report\n\nnaïve ✓\n", lambda p: p.read_text("utf-8")),
    "figure": (FigureDataset, "curve.png", {"dpi": 20}, figure, lambda p: p.read_bytes()[:8]),
}
EXPECTED = {"json": {"b": 1, "a": [1, 2]}, "text": "# Report\n\nnaïve ✓\n", "figure": PNG_SIGNATURE}


def make(kind: str, folder: Path):
    cls, name, save_args, value, read = KINDS[kind]
    path = folder / name
    dataset = cls(str(path), save_args=save_args) if save_args else cls(str(path))
    return dataset, path, value, read


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("link", ["hardlink", "symlink", "readonly"])
def test_save_replaces_a_linked_read_only_file_and_leaves_the_cache_entry_alone(tmp_path, kind, link):
    dataset, path, value, read = make(kind, tmp_path / "out")
    path.parent.mkdir()
    cache = tmp_path / "cache" / "ab" / "cdef"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(OLD)
    if link == "hardlink":
        os.link(cache, path)
    elif link == "symlink":
        path.symlink_to(cache)
    else:
        path.write_bytes(OLD)
    for file in (cache, path):
        file.chmod(0o444)  # DVC makes linked outputs read-only

    dataset.save(value())

    assert read(path) == EXPECTED[kind]
    assert cache.read_bytes() == OLD
    assert stat.S_IMODE(cache.stat().st_mode) == 0o444
    assert not path.is_symlink() and path.stat().st_ino != cache.stat().st_ino
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left beside it


@pytest.mark.parametrize("kind", KINDS)
def test_a_crash_mid_save_leaves_the_old_file_intact(tmp_path, kind, monkeypatch):
    dataset, path, value, _ = make(kind, tmp_path)
    path.write_bytes(OLD)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vlm_pipeline.atomic.os.fsync", crash)  # the temp file is written, not yet renamed
    with pytest.raises(DatasetError, match="disk full"):
        dataset.save(value())

    assert path.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_figure_that_fails_to_render_leaves_the_old_file_and_is_closed(tmp_path):
    dataset, path, _, _ = make("figure", tmp_path)
    path.write_bytes(OLD)
    fig = figure()

    def broken_savefig(*args, **kwargs):
        raise ValueError("cannot render")

    fig.savefig = broken_savefig
    with pytest.raises(DatasetError, match="cannot render"):
        dataset.save(fig)

    assert path.read_bytes() == OLD
    assert not plt.fignum_exists(fig.number)


def test_a_figure_is_closed_once_saved_and_its_format_follows_the_suffix(tmp_path):
    fig = figure()
    FigureDataset(str(tmp_path / "curve.svg")).save(fig)
    assert not plt.fignum_exists(fig.number)
    assert b"<svg" in (tmp_path / "curve.svg").read_bytes()
    with pytest.raises(DatasetError, match="write-only"):
        FigureDataset(str(tmp_path / "curve.svg")).load()
    with pytest.raises(DatasetError, match="no suffix"):
        FigureDataset(str(tmp_path / "curve"))


def test_json_and_text_load_what_they_saved(tmp_path):
    for kind in ("json", "text"):
        dataset, path, value, _ = make(kind, tmp_path)
        assert not dataset.exists()
        dataset.save(value())
        assert dataset.exists() and dataset.load() == EXPECTED[kind]


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A throw-away MLflow store (sqlite) with the artifacts in the temp dir; the global URI is reset after."""
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # restored by monkeypatch after the reset below
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("datasets", artifact_location=(tmp_path / "artifacts").as_uri())
    yield experiment
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_mlflow_artifact_dataset_logs_the_saved_file_of_each_type(tmp_path, mlflow_store):
    out = tmp_path / "out"
    out.mkdir()
    cache = tmp_path / "cache"
    cache.write_bytes(OLD)
    wrapped = {}
    for kind, (cls, name, save_args, value, _) in KINDS.items():
        os.link(cache, out / name)  # a DVC-linked output, as after `dvc repro`
        (out / name).chmod(0o444)
        config = {"type": f"vlm_pipeline.datasets.{cls.__name__}", "filepath": str(out / name)}
        if save_args:
            config["save_args"] = save_args
        wrapped[kind] = (MlflowArtifactDataset(dataset=config, artifact_path="reports"), value)

    with mlflow.start_run(experiment_id=mlflow_store) as run:
        for dataset, value in wrapped.values():
            dataset.save(value())

    logged = {a.path for a in mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="reports")}
    assert logged == {f"reports/{name}" for _, name, *_ in KINDS.values()}
    uri = f"runs:/{run.info.run_id}/reports"
    assert mlflow.artifacts.load_text(f"{uri}/report.md") == EXPECTED["text"]
    assert json.loads(mlflow.artifacts.load_text(f"{uri}/table.json")) == EXPECTED["json"]
    assert cache.read_bytes() == OLD


def test_every_file_the_catalog_writes_goes_through_a_project_dataset():
    """Stock kedro-datasets write in place (through DVC's hard links); the project's datasets rename."""
    catalog = yaml.safe_load((PROJECT_ROOT / "conf/base/catalog.yml").read_text())
    offenders = []
    for name, entry in catalog.items():
        if name.startswith("_") or not isinstance(entry, dict):
            continue
        inner = entry.get("dataset", entry)
        if isinstance(inner, dict) and ("filepath" in inner or "path" in inner):
            if not inner["type"].startswith("vlm_pipeline.datasets."):
                offenders.append(f"{name}: {inner['type']}")
    assert not offenders, offenders


def test_linking_a_model_folder_again_keeps_it_and_refreshes_a_changed_file(tmp_path):
    """A relaunched finished run links the same files into a folder that already holds them."""
    from vlm_pipeline.atomic import link_tree

    source = tmp_path / "finished"
    source.mkdir()
    (source / "model.safetensors").write_text("weights")
    (source / "config.json").write_text("{}")
    elsewhere = tmp_path / "cache_entry"
    elsewhere.write_text("stale")
    target = link_tree(source, tmp_path / "final")
    (target / "config.json").unlink()
    os.link(elsewhere, target / "config.json")  # a different file under the same name, linked from elsewhere
    link_tree(source, target)
    assert (target / "model.safetensors").samefile(source / "model.safetensors")
    assert (target / "config.json").read_text() == "{}"
    assert elsewhere.read_text() == "stale"  # replaced, not written through


def test_an_arrow_dataset_saves_the_same_bytes_for_the_same_data(tmp_path):
    """A ``map`` whose function datasets cannot hash gives a random fingerprint, which ``save_to_disk`` writes to
    state.json: DVC then saw a changed preprocessing output after every rerun, and reran training for nothing."""
    from datasets import Dataset

    from vlm_pipeline.datasets import ArrowDataset

    unhashable = iter(range(10**6))  # a generator in the closure: datasets falls back to a random fingerprint

    def saved(name: str, values: list[int]) -> dict[str, bytes]:
        mapped = Dataset.from_dict({"x": values}).map(lambda row: {"y": row["x"] + 0 * next(unhashable)})
        ArrowDataset(str(tmp_path / name)).save(mapped)
        return {path.name: path.read_bytes() for path in sorted((tmp_path / name).iterdir())}

    first, second, other = saved("first", [1, 2, 3]), saved("second", [1, 2, 3]), saved("other", [1, 2, 4])
    assert set(first) == {"data-00000-of-00001.arrow", "dataset_info.json", "state.json"}
    assert first == second
    assert json.loads(other["state.json"])["_fingerprint"] != json.loads(first["state.json"])["_fingerprint"]
    assert ArrowDataset(str(tmp_path / "second")).load()["y"] == [1, 2, 3]

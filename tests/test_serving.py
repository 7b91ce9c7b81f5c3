"""The tuned model behind `transformers serve`: `vlm-pipeline serve` answers the README's client as evaluation did,
the image bounds training used travel with the merged folder, and no server process outlives a failed start-up or
the command. The serving check's agreement on every family and variant, and its failure on another generation
setting, are asserted on the chains' own runs (tests/test_chain.py)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, live_servers, run_kedro
from datasets import load_from_disk
from test_chain import read_jsonl

from vlm_pipeline.architectures import load_processor
from vlm_pipeline.serving import ServedModel, ServingError, agreement, describe, free_port, openai_messages

MERGED = "data/06_models/lora/merged"


def test_openai_messages_carry_images_as_data_urls_in_place_and_text_as_strings(tmp_path):
    (tmp_path / "a.png").write_bytes(b"first")
    (tmp_path / "b.jpg").write_bytes(b"second")
    record = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The same."}]},
        ],
        "images": ["a.png", "b.jpg"],
    }
    system, user = openai_messages(record, tmp_path)
    assert system == {"role": "system", "content": "Be brief."}  # the Llama templates trim a string
    first, second = (part["image_url"]["url"] for part in user["content"][1:])
    assert first == "data:image/png;base64," + base64.b64encode(b"first").decode()
    assert second == "data:image/jpeg;base64," + base64.b64encode(b"second").decode()
    assert user["content"][0] == {"type": "text", "text": "Compare "}


def test_agreement_names_the_first_record_that_differs():
    records = [{"source_line": line} for line in (3, 5, 9)]
    result = agreement(["red", "blue", "green"], ["red", "blue!", "grey"], records)
    assert result["agreement"] == pytest.approx(1 / 3) and result["records"] == 3
    assert result["first_difference"] == {"line": 5, "served": "blue", "evaluated": "blue!"}
    assert describe(result) == (
        '33% of 3 served answers agree with the evaluation\'s; the first that differs is line 5: served "blue", '
        'evaluated "blue!"'
    )


@pytest.mark.slow
def test_a_server_that_does_not_answer_in_time_is_stopped_with_its_log(short_lora_run, tmp_path):
    model = short_lora_run / MERGED
    loading = {"dtype": "float32", "attn_implementation": "sdpa", "trust_remote_code": False}
    with open(tmp_path / "server.log", "w+", encoding="utf-8") as log:
        served = ServedModel(model, loading, startup_timeout_s=0.05, log=log)
        with pytest.raises(ServingError, match=r"did not answer on http://127\.0\.0\.1:\d+ within 0\.05 s"):
            with served:
                pytest.fail("the block ran without a server")
    assert served.process.returncode is not None and live_servers(model) == []


def readme_client() -> str:
    """The README's client example, as a user copies it."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "OpenAI(" in block]
    return code


@pytest.mark.slow
def test_vlm_pipeline_serve_answers_the_readme_client_as_evaluation_did(short_lora_run, tmp_path):
    model = short_lora_run / MERGED
    port = free_port()
    command = [str(Path(sys.executable).with_name("vlm-pipeline")), "serve", "--model", str(model)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        client = readme_client()
        client = client.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(f'"{MERGED}"', f'"{model}"')
        client = client.replace('"data/01_raw/', f'"{short_lora_run}/data/01_raw/')
        script = tmp_path / "client.py"
        script.write_text(client)
        deadline = time.monotonic() + 120
        while True:  # the command returns at once; the server takes a few seconds to listen
            done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
            if done.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stderr[-2000:] + log.read_text()[-2000:]
        predictions = read_jsonl(short_lora_run / "data/07_model_output/lora/predictions.jsonl")
        first = next(row for row in predictions if row["images"] == ["data/01_raw/shapes_vqa/images/test_0000.png"])
        assert done.stdout.strip() == first["tuned"]
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl+C, as the command says
        server.wait(timeout=30)
    assert live_servers(model) == []


@pytest.mark.slow
def test_image_bounds_used_in_training_travel_with_the_merged_folder_and_serve_alike(project, tiny_models):
    """Images of 56x56 raised to 112x112 (min_pixels): 16 image tokens each instead of the default 4."""
    shutil.copytree(tiny_models["qwen2_5_vl"], project / "data/00_base_models/tiny-qwen2_5_vl")
    run_kedro(project, "lora", preprocessing={"images": {"min_pixels": 112 * 112}})
    processor = json.loads((project / MERGED / "processor_config.json").read_text())
    assert processor["image_processor"]["size"]["shortest_edge"] == 112 * 112
    # The server was given only the folder; the evaluation applied the parameters: they answered alike.
    metrics = json.loads((project / "data/08_reporting/lora/detailed_metrics.json").read_text())
    assert metrics["serving"] == {"records": 8, "agreement": 1.0}
    row = load_from_disk(str(project / "data/03_primary/test"))[0]
    assert row["input_ids"].count(load_processor(project / MERGED).image_token_id) == 16

"""The tuned model behind the standard OpenAI-compatible server, and the check that it answers as evaluation did.

We run no server of our own: ``transformers serve`` (transformers' ``serving`` extra) on CPU or one GPU here, and
``vllm serve`` or SGLang on a GPU host, all from the same merged folder, which holds the chat template, processor
(with the training's image bounds) and generation config. ``ServedModel`` starts the server on a free localhost
port in a process group of its own and always stops that group; ``served_answers`` asks it through the ``openai``
client as any user's code would: images as data URLs, greedy, the evaluation's ``max_new_tokens``.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from vlm_pipeline.data.encoding import prompt_messages
from vlm_pipeline.data.labels import chat_messages

HOST = "127.0.0.1"
# transformers serve loads the model on the first request for it, not at start-up: /health answers before that.
HEALTH_PATH = "/health"
STOP_GRACE_S = 10


class ServingError(RuntimeError):
    """The server did not start, or stopped, or answered with an error; the message has its last log lines."""


class ServingMismatchError(RuntimeError):
    """A served answer differs from the evaluation's and ``evaluation.serving_check_strict`` is on."""


def serve_command(model_dir: Path, port: int, loading: dict[str, Any], host: str = HOST) -> list[str]:
    """``transformers serve`` on ``model_dir`` from this environment's own executable, loading the model as
    ``loading`` (the ``model`` parameter group: dtype, attention kernel, trust_remote_code) says, as evaluation did."""
    executable = Path(sys.executable).with_name("transformers")
    command = [str(executable), "serve", str(model_dir), "--host", host, "--port", str(port)]
    command += ["--dtype", loading["dtype"], "--attn-implementation", loading["attn_implementation"]]
    return command + (["--trust-remote-code"] if loading["trust_remote_code"] else [])


def gpu_host_commands(model_dir: Path, port: int) -> list[str]:
    """The commands that serve the same folder with the same API on a GPU host (vLLM, SGLang)."""
    return [
        f"vllm serve {model_dir} --port {port} --served-model-name {model_dir}",
        f"python -m sglang.launch_server --model-path {model_dir} --port {port}",
    ]


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ServedModel:
    """``transformers serve`` on ``model_dir`` for the length of a ``with`` block: a free port, start-up bounded by
    ``startup_timeout_s``, and its whole process group stopped on leaving, on success or failure."""

    def __init__(self, model_dir: Path, loading: dict[str, Any], *, startup_timeout_s: float, log: IO[str]) -> None:
        self.model_dir, self.loading = Path(model_dir), loading
        self.startup_timeout_s, self.log = startup_timeout_s, log
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServedModel:
        self.process = subprocess.Popen(
            serve_command(self.model_dir, self.port, self.loading),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped whole, never left behind
        )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"transformers serve exited with code {self.process.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.base_url + HEALTH_PATH, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise ServingError(
            f"transformers serve did not answer on {self.base_url} within {self.startup_timeout_s:g} s "
            f"(evaluation.serving_startup_timeout_s): {self.tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after a grace period; returns once it is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sent)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=STOP_GRACE_S)
                return
            except subprocess.TimeoutExpired:
                continue

    def tail(self, lines: int = 8) -> str:
        """The server log's last lines, for an error message."""
        name = getattr(self.log, "name", None)
        if not isinstance(name, str) or not Path(name).is_file():
            return "(no log)"
        self.log.flush()
        return " | ".join(Path(name).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:])


def image_url(path: Path) -> dict[str, Any]:
    """An OpenAI ``image_url`` part holding the image file's bytes as a data URL."""
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def openai_messages(record: dict, image_root: Path) -> list[dict]:
    """The record's prompt (its conversation minus the final answer) as OpenAI chat messages: text-only content as
    one string (what the templates take), each image part an ``image_url`` with the next of the record's images."""
    images = iter(record["images"])
    messages = []
    for message in chat_messages(prompt_messages(record)):
        content = message["content"]
        if not isinstance(content, str):
            content = [
                image_url(image_root / next(images)) if part.get("type") == "image" else part for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


def served_answers(
    base_url: str,
    model: str,
    records: Iterable[dict],
    image_root: Path,
    *,
    max_new_tokens: int,
    template_kwargs: dict[str, Any],
) -> list[str]:
    """The server's greedy answer to each record's prompt, stripped as evaluation strips its own."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="local")  # transformers serve checks no key
    answers = []
    for record in records:
        response = client.chat.completions.create(
            model=model,
            messages=openai_messages(record, image_root),
            temperature=0,
            max_tokens=max_new_tokens,
            # The template variables evaluation rendered with (Llama's pinned date_string).
            extra_body={"chat_template_kwargs": template_kwargs} if template_kwargs else None,
        )
        answers.append((response.choices[0].message.content or "").strip())
    return answers


def agreement(served: list[str], evaluated: list[str], records: list[dict]) -> dict[str, Any]:
    """The share of served answers equal to the evaluation's, and the first record that differs (its line)."""
    differing = [i for i, (a, b) in enumerate(zip(served, evaluated, strict=True)) if a != b]
    first = None
    if differing:
        i = differing[0]
        first = {"line": records[i]["source_line"], "served": served[i], "evaluated": evaluated[i]}
    return {"records": len(served), "agreement": 1 - len(differing) / len(served), "first_difference": first}


def describe(result: dict[str, Any]) -> str:
    """One line for the log and the report."""
    share = f"{result['agreement']:.0%} of {result['records']} served answers agree with the evaluation's"
    first = result["first_difference"]
    if first is None:
        return share
    return f"{share}; the first that differs is line {first['line']}: served {json.dumps(first['served'])}, " + (
        f"evaluated {json.dumps(first['evaluated'])}"
    )

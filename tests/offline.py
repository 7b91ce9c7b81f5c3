"""A test-only network block: in the test process and in every Python process it starts, a connection, name lookup
or datagram to any host but this machine's loopback raises `NetworkBlocked` at once, and is recorded.

It is a Python audit hook (PEP 578), not a patched `socket`: the interpreter calls it before each `socket.connect`,
`connect_ex`, `getaddrinfo`, `sendto`..., whoever calls them (requests, httpx, urllib3, MLflow, huggingface_hub).
Children get it from a `sitecustomize.py` put first on their PYTHONPATH; Python imports that module at start-up.
Loopback stays open (accelerate and torch.distributed rendezvous on localhost TCP), and so do Unix sockets.
Not covered: native code that opens sockets itself (a C++ or Rust HTTP client).

A blocked attempt is also written to a log, because a library may catch the error and carry on (huggingface_hub
falls back to its cache on a connection error): the fixture fails a test whose processes tried at all, except for
the hosts in TOLERATED, which are blocked all the same.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import traceback
from pathlib import Path

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# Events whose arguments name a remote host: (event, index of the host or address in the arguments).
HOST_EVENTS = {
    "socket.getaddrinfo": 0,  # (host, port, family, type, protocol)
    "socket.gethostbyname": 0,  # (hostname,)
    "socket.gethostbyaddr": 0,  # (ip_address,)
    "socket.connect": 1,  # (socket, address): connect and connect_ex
    "socket.sendto": 1,  # (socket, address)
    "socket.sendmsg": 1,  # (socket, address)
}
# Children read the same rules from this file; the log path is written into their sitecustomize.py.
SITECUSTOMIZE = """import importlib.util
spec = importlib.util.spec_from_file_location("_network_block", {module!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.block(module.Path({log!r}))
"""
# What the children's environment says besides: the hub libraries' own offline switches, and an empty hub cache, so
# that a model or data set cached from an earlier download cannot stand in for one fetched at run time.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Attempts that are blocked and do not fail the test: nothing the run needs, and each fails silently offline.
TOLERATED = {
    # MLflow 3's usage telemetry: a background thread fetches its configuration when MLflow first records an event,
    # unless MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK is set, or a CI or pytest variable was set at MLflow's import.
    "config.mlflow-telemetry.io": "MLflow usage telemetry",
}


class NetworkBlocked(ConnectionRefusedError):
    """A connection or lookup to a host other than loopback, while the network is blocked for a test."""


_log: Path | None = None  # where attempts are recorded while blocked; None: the hook lets everything through
_hook_installed = False


def is_local(host: object) -> bool:
    """Loopback, the unspecified address (a bind or passive lookup), or a name for loopback."""
    if host is None or host in ("", b""):
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 literal may carry a %scope
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def remote_host(event: str, args: tuple) -> object | None:
    """The host a socket event reaches, or None when it stays on this machine."""
    if event not in HOST_EVENTS:
        return None
    target = args[HOST_EVENTS[event]]
    if event.startswith(("socket.connect", "socket.send")):
        if args[0].family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(target, tuple):
            return None  # Unix and netlink sockets, or sendmsg without an address
        target = target[0]
    return None if is_local(target) else target


def audit(event: str, args: tuple) -> None:
    if _log is None or not event.startswith("socket."):
        return
    host = remote_host(event, args)
    if host is None:
        return
    attempt = {"event": event, "host": str(host), "pid": os.getpid(), "argv": sys.argv[:3]}
    with _log.open("a", encoding="utf-8") as log:
        log.write(json.dumps({**attempt, "stack": traceback.format_stack(limit=30)[:-1]}) + "\n")
    raise NetworkBlocked(f"network blocked for this test: {event} to {host!r} (pid {os.getpid()})")


def block(log: Path) -> None:
    """Block the network in this process from now on, recording each attempt in ``log``."""
    global _log, _hook_installed
    if not _hook_installed:  # an audit hook cannot be removed: one, switched by _log
        sys.addaudithook(audit)
        _hook_installed = True
    _log = log


def unblock() -> None:
    global _log
    _log = None


def attempts(log: Path) -> list[dict]:
    """The attempts recorded so far: event, host, pid, the process's first arguments, and the stack."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return [json.loads(line) for line in lines]


def untolerated(log: Path) -> list[dict]:
    """The attempts that fail a test: all but those to the TOLERATED hosts."""
    return [attempt for attempt in attempts(log) if attempt["host"] not in TOLERATED]


def describe(attempt: dict) -> str:
    return f"{attempt['event']} to {attempt['host']} from pid {attempt['pid']} {attempt['argv']}:\n" + "".join(
        attempt["stack"][-12:]
    )


def child_environment(folder: Path, log: Path) -> dict[str, str]:
    """The variables that block the network for every Python process started with them: a sitecustomize.py in
    ``folder`` first on PYTHONPATH, the hub's offline switches, and an empty hub cache in ``folder``."""
    site = folder / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(module=__file__, log=str(log)), encoding="utf-8")
    path = os.pathsep.join(part for part in (str(site), os.environ.get("PYTHONPATH")) if part)
    return {"PYTHONPATH": path, "HF_HOME": str(folder / "hf_home"), **dict.fromkeys(OFFLINE_VARIABLES, "1")}

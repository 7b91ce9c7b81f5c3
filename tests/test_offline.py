"""The network block the chain test runs under (`tests/offline.py`, the `network_blocked` fixture) blocks what it
claims, at once, in this process and in a child, records each attempt even when the caller swallows the error, and
leaves loopback open."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from offline import OFFLINE_VARIABLES, TOLERATED, NetworkBlocked, attempts, untolerated

pytestmark = pytest.mark.slow  # a subprocess: `make test` only

# Each attempt's outcome (the exception's class name, or "connected") and its seconds; every error is swallowed,
# as a library falling back to a cache would.
CHILD = """
import json, os, socket, sys, time
port = int(sys.argv[1])
def by_name():
    socket.create_connection(("example.com", 80), timeout=3).close()
def by_address():
    with socket.socket() as sock:
        sock.settimeout(3)
        sock.connect(("10.255.255.1", 80))
def datagram():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"?", ("192.0.2.1", 53))
def loopback():
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
def localhost():
    socket.create_connection(("localhost", port), timeout=3).close()
outcomes = {}
for attempt in (by_name, by_address, datagram, loopback, localhost):
    start = time.monotonic()
    try:
        attempt()
        outcome = "connected"
    except Exception as error:
        outcome = type(error).__name__
    outcomes[attempt.__name__] = [outcome, time.monotonic() - start]
environment = {name: os.environ.get(name) for name in sys.argv[2:]}
print(json.dumps({"pid": os.getpid(), "outcomes": outcomes, "environment": environment}))
"""


def test_the_network_is_blocked_in_this_process_and_its_children(network_blocked):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(NetworkBlocked, match="example.com"):
            socket.create_connection(("example.com", 80), timeout=3)
        assert time.monotonic() - start < 0.5, "no name lookup before the block"
        (tolerated,) = TOLERATED
        with pytest.raises(NetworkBlocked):  # tolerated: blocked all the same
            socket.create_connection((tolerated, 443), timeout=3)
        socket.create_connection(("127.0.0.1", port), timeout=3).close()

        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(port), *OFFLINE_VARIABLES, "HF_HOME"],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ,
        )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    child_pid = report["pid"]
    outcomes = report["outcomes"]
    for name in ("by_name", "by_address", "datagram"):
        outcome, seconds = outcomes[name]
        assert outcome == "NetworkBlocked" and seconds < 0.5, (name, outcomes)
    assert outcomes["loopback"][0] == outcomes["localhost"][0] == "connected", outcomes
    environment = report["environment"]
    assert all(environment[name] == "1" for name in OFFLINE_VARIABLES), environment
    hub_home = environment["HF_HOME"]
    assert not os.path.exists(hub_home) or not os.listdir(hub_home), "the children's hub cache starts empty"

    # Every attempt is in the log, the swallowed ones too; then cleared, as they were this test's own.
    log = attempts(network_blocked)
    assert [(attempt["event"], attempt["host"]) for attempt in log] == [
        ("socket.getaddrinfo", "example.com"),
        ("socket.getaddrinfo", tolerated),
        ("socket.getaddrinfo", "example.com"),
        ("socket.connect", "10.255.255.1"),
        ("socket.sendto", "192.0.2.1"),
    ], log
    assert {attempt["pid"] for attempt in log[:2]} == {os.getpid()} and {a["pid"] for a in log[2:]} == {child_pid}, log
    assert untolerated(network_blocked) == [log[0], *log[2:]]  # what fails a test under the fixture
    network_blocked.unlink()

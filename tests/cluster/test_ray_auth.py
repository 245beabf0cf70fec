"""Ray's token authentication, as `cluster.yaml` turns it on: a node started with a token refuses a client
without it (or with another one) and accepts the client that has it.

The head is a real `ray start --head --block` of this test's own (its own temporary folder, port, HOME and
token), stopped by killing its process group — never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
CONNECT = ("import ray; ray.init(address='{address}'); "
           "print('connected', int(ray.cluster_resources().get('CPU', 0))); ray.shutdown()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CONNECT.format(address=address)], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def token_head(tmp_path):
    """A one-node Ray started with token authentication; yields (address, token, base environment)."""
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    # Short temp dir: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
    temp = Path("/tmp") / f"lgmauth{port}"
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats", "--log-color=false"],
        env={**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:  # Ray replaces 127.0.0.1 by the node's own address: read it from its output
            line = re.sub(r"\x1b\[[0-9;]*m", "", head.stdout.readline())  # no colour codes, whatever the terminal
            if not line and head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head did not come up")
            if "ray start --address=" in line:
                address = line.split("--address=")[1].split()[0].strip("'\"")
        yield address, token, base
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_client_without_the_token_is_refused(token_head):
    address, token, base = token_head
    no_token = _client(address, {**base, "RAY_AUTH_MODE": "token"})
    assert no_token.returncode != 0 and "connected" not in no_token.stdout
    assert "no authentication token was found" in no_token.stderr

    wrong = _client(address, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    assert wrong.returncode != 0 and "connected" not in wrong.stdout

    unauthenticated = _client(address, {**base, "RAY_AUTH_MODE": "disabled"})
    assert unauthenticated.returncode != 0 and "connected" not in unauthenticated.stdout

    right = _client(address, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    assert right.returncode == 0, right.stderr[-2000:]
    assert "connected 1" in right.stdout

"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """What the tests need of the environment, set here for the test process and every process it starts,
    whatever the machine's (or CI's) environment holds, and undone at the end of the session:

    - Ray's token: one of this session's own in a temporary file (``RAY_AUTH_TOKEN_PATH``), so that a local
      Ray started with token authentication (Ray's default when ``RAY_AUTH_MODE`` is unset) neither reads
      nor writes ``~/.ray/auth_token``; with ``RAY_AUTH_MODE=disabled`` the token is unused. Either mode
      works; ``RAY_AUTH_MODE`` itself is left as the caller set it.
    - no ``RAY_ADDRESS`` or ``RAY_AUTH_TOKEN`` inherited: each test starts (or joins) the Ray it names,
      never one already running on the machine;
    - Ray's usage statistics off (``RAY_USAGE_STATS_ENABLED=0``): nothing reported, no prompt;
    - no ``MLFLOW_TRACKING_URI`` inherited; the feature cache is the session's own (``LGM_RAY_CACHE``).
    """
    folder = tmp_path_factory.mktemp("environment")
    token = folder / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("LGM_RAY_CACHE", str(folder / "feature_cache"))
        yield


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """The digits shards (default build: 32 px PNG), built once per test session."""
    from lgm_ray.shards.__main__ import main as shards_main

    out = tmp_path_factory.mktemp("digits_shards") / "digits"
    assert shards_main(["build", "digits", "--out", str(out)]) == 0
    return str(out)


@pytest.fixture(scope="module")
def shards(digits_shards):
    from lgm_ray.shards.reader import ShardSet

    return ShardSet(digits_shards)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback with its own SQLite store and artifact root; yields its URL
    (it answers /health after about 30 s on a 2-core machine)."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    with open(folder / "server.log", "w") as log:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the session this fixture started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of this test module's own (4 logical CPUs), never one already running on the machine
    (:func:`lgm_ray.common.ray_start.start_ray` with no address: ``ray.init(address="local")``).

    Tests that need another shape (``ray.cluster_utils.Cluster``) shut it down first; the fixture then
    leaves Ray down at the module's end."""
    import ray

    from lgm_ray.common.ray_start import start_ray

    os.environ.pop("RAY_ADDRESS", None)
    started = start_ray(num_cpus=4, log_to_driver=False)
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()

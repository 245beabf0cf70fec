"""scripts/cluster_setup.sh, the one copy of a cluster node's set-up: valid bash, the same pins as the rest of
the repository, bad input refused before anything is done, and (slow) MLflow started on loopback only.

cluster.yaml's own set-up lines are run through the script in test_cluster_yaml.py."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster_setup.sh"


def _script(*args: str, home: Path, python: str = "false", timeout: float = 60) -> subprocess.CompletedProcess:
    """The script with ``HOME=home``; PYTHON=false by default, so that any install it began would fail (exit 1)."""
    env = {**os.environ, "HOME": str(home), "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port`` (/proc/net/tcp and tcp6: what `ss -ltn` reads)."""
    found = set()
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                found.add(socket.inet_ntop(family, raw))
    return found


def test_the_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_script_pins_what_the_repository_pins():
    text = SCRIPT.read_text()
    (ray_spec,) = re.findall(r'^RAY_SPEC="([^"]+)"$', text, flags=re.M)
    assert ray_spec == "ray[default,tune]==2.60.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.findall(r'^\s*"(ray\W[^"]*)"', pyproject, flags=re.M) == [ray_spec]  # the driver's Ray: the nodes'
    (torch_pins,) = re.findall(r"^TORCH_PINS=\(([^)]+)\)$", text, flags=re.M)
    assert "pip install -q " + torch_pins in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize("args, message", [
    ((), "the first argument is the node's role, node or head, not ''"),
    (("worker",), "the first argument is the node's role, node or head, not 'worker'"),
    (("node", "--efs"), "--efs needs a file system id"),
    (("node", "--mlflow-port", "5000"), "--mlflow-port belongs to 'head'"),
    (("node", "--frobnicate"), "unknown option '--frobnicate'"),
    (("head", "--efs", "fs-1"), "--efs and --no-weights belong to 'node'"),
    (("head", "--mlflow-port", "http"), "--mlflow-port needs a port number"),
    (("node",), "no Ray token at"),  # HOME holds no ~/.ray/auth_token
])
def test_bad_input_is_refused_before_anything_is_done(tmp_path, args, message):
    done = _script(*args, home=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {message}") and len(done.stderr.splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written (no ~/.bashrc line, no folder)


def test_a_node_with_the_token_plans_every_step(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a-token")
    steps = _script("node", "--shared", str(tmp_path / "shared"), "--no-weights", "--dry-run", home=tmp_path)
    assert steps.returncode == 0, steps.stderr
    assert f"chmod 600 {tmp_path}/.ray/auth_token" in steps.stdout
    assert "sudo mount" not in steps.stdout  # no --efs: the folder is shared already
    assert "create_backbone" not in steps.stdout  # --no-weights
    assert "ray[default,tune]==2.60.0" in steps.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ray"]  # a dry run changes nothing


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_the_head_starts_mlflow_on_loopback_only(tmp_path):
    port = _free_port()
    shared = tmp_path / "shared"
    started = _script("head", "--shared", str(shared), "--mlflow-port", str(port), home=tmp_path,
                      python=sys.executable, timeout=300)
    pid = int((tmp_path / "mlflow.pid").read_text()) if (tmp_path / "mlflow.pid").exists() else None
    try:
        assert started.returncode == 0, started.stderr + (tmp_path / "mlflow.log").read_text()[-3000:]
        assert os.getpgid(pid) == pid  # its own process group: stopped below as a whole
        assert _listening_addresses(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        assert (shared / "mlflow" / "mlflow.db").exists() and (shared / "sweeps").is_dir()
        again = _script("head", "--shared", str(shared), "--mlflow-port", str(port), home=tmp_path,
                        python=sys.executable)
        assert again.returncode == 0 and "already answers" in again.stdout
    finally:
        if pid is not None:
            _stop_group(pid)


def _stop_group(pid: int) -> None:
    """SIGTERM the process group the script started (not our child: poll it), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)

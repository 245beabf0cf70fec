"""cluster.yaml is a valid Ray cluster-launcher file (Ray's own schema) with lgm_ray's set-up: token
authentication on every node, the dashboard and MLflow on the head's loopback, and every set-up step in
scripts/cluster_setup.sh (its own checks: test_cluster_setup.py)."""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "cluster_setup.sh"
SETUP_LISTS = ("setup_commands", "head_setup_commands", "worker_setup_commands")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    """Ray's own check: merge the provider's defaults as `ray up` does, then validate against the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _home(cluster: dict) -> str:
    return f"/home/{cluster['auth']['ssh_user']}"


def _ray_starts(commands: list[str]) -> list[list[str]]:
    """Each `ray start` in ``commands``, as the words of its shell command (environment assignments first)."""
    found = []
    for command in commands:
        for part in re.split(r"&&|\|\||;", command):
            words = shlex.split(part)
            if any(words[i:i + 2] == ["ray", "start"] for i in range(len(words))):
                found.append(words)
    return found


def _dry_run(cluster: dict, line: str, home: Path) -> str:
    """Run one set-up line of cluster.yaml with this checkout's script and ``--dry-run``: the steps it takes."""
    words = shlex.split(line)
    repo = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    assert words[:2] == ["bash", f"{repo}/scripts/cluster_setup.sh".replace(_home(cluster), "~")], line
    env = {**os.environ, "HOME": str(home), "PYTHON": "python"}
    done = subprocess.run(["bash", str(SCRIPT), *words[2:], "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def plans(cluster, tmp_path_factory) -> dict[str, str]:
    """The steps of each set-up list on a node that holds the token (as file_mounts leave it)."""
    home = tmp_path_factory.mktemp("node_home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a-token")
    return {name: "".join(_dry_run(cluster, line, home) for line in cluster[name]) for name in SETUP_LISTS}


def test_cluster_yaml_passes_rays_schema(cluster):
    prepared = _validate(cluster)
    assert prepared["provider"]["type"] in ("aws", "gcp")
    head = prepared["head_node_type"]
    gpu_types = [
        t
        for name, t in prepared["available_node_types"].items()
        if name != head and t.get("resources", {}).get("GPU", 0) > 0
    ]
    assert gpu_types, "a GPU worker node type"
    assert all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types), "the GPU workers autoscale"


def test_rays_schema_rejects_a_broken_file(cluster):
    import jsonschema

    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        _validate(broken)


def test_the_token_reaches_every_node(cluster):
    # file_mounts go to the head (`ray up`) and from the head to every worker (the autoscaler), before the
    # set-up and start commands run; Ray reads the token from ~/.ray/auth_token of the ssh user.
    assert cluster["file_mounts"].get(f"{_home(cluster)}/.ray/auth_token") == "~/.ray/auth_token"
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN" not in text and "RAY_AUTH_MODE=disabled" not in text  # no token in the file


def test_every_ray_start_runs_with_token_auth(cluster):
    head = _ray_starts(cluster["head_start_ray_commands"])
    workers = _ray_starts(cluster["worker_start_ray_commands"])
    assert len(head) == 1 and "--head" in head[0] and len(workers) == 1 and "--head" not in workers[0]
    for words in head + workers:
        env = words[:words.index("ray")]
        assert "RAY_AUTH_MODE=token" in env, " ".join(words)
    assert not _ray_starts(cluster["setup_commands"] + cluster["head_setup_commands"])


def test_the_dashboard_and_mlflow_bind_the_heads_loopback(cluster, plans):
    (head,) = _ray_starts(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    mlflow = [line for line in plans["head_setup_commands"].splitlines() if "mlflow server" in line]
    assert len(mlflow) == 1 and "--host 127.0.0.1 --port 5000" in mlflow[0]
    assert "mlflow" not in plans["setup_commands"] + plans["worker_setup_commands"]  # on the head only
    for text in ((ROOT / "cluster.yaml").read_text(), SCRIPT.read_text()):
        assert "0.0.0.0" not in text


def test_the_set_up_is_the_repositorys_script(cluster, plans):
    assert cluster["setup_commands"] and cluster["head_setup_commands"]
    for name in SETUP_LISTS:
        for line in cluster[name]:
            assert shlex.split(line)[2] == ("head" if name == "head_setup_commands" else "node"), line
    node = plans["setup_commands"]
    assert "sudo mount -t efs -o tls fs-" in node and "/mnt/lgm_ray" in node
    assert "pip install -q torch==2.14.1 torchvision==0.29.1" in node
    assert f"pip install -q -e {ROOT} s3fs boto3 ray[default,tune]==2.60.0" in node
    assert "create_backbone" in node  # weights downloaded at set-up, not by the first trial
    assert "export RAY_AUTH_MODE=token" in node  # every login shell of a node uses the token
    mounted = cluster["file_mounts"]
    assert any(src == "." for src in mounted.values()), "the repository is copied to every node"


def test_the_paper_specs_use_the_clusters_shared_storage_and_object_storage(cluster, plans):
    from lgm_ray.sweep.parse import load_spec

    for name in ("cross_model", "ablation"):
        spec = load_spec(ROOT / "sweeps" / f"{name}.yaml", cwd=ROOT, check_paths=False)
        assert spec.storage.startswith("/mnt/lgm_ray") and "/mnt/lgm_ray" in plans["setup_commands"]
        assert all(d.shards.startswith("s3://") for d in spec.datasets)
        assert spec.mlflow.tracking_uri == "http://127.0.0.1:5000"
        assert "--backend-store-uri sqlite:////mnt/lgm_ray/mlflow/" in plans["head_setup_commands"]
        assert spec.resources.gpus_per_worker >= 1

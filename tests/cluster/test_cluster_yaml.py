"""cluster.yaml is a valid Ray cluster-launcher file (Ray's own schema) with lgm_ray's set-up."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(config: dict) -> dict:
    """Ray's own check: merge the provider's defaults as `ray up` does, then validate against the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


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


def test_setup_installs_lgm_ray_pinned_torch_and_fills_the_weight_caches(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "torch==2.14.1" in setup
    assert "pip install" in setup and "lgm_ray" in setup
    assert "create_backbone" in setup  # weights downloaded at set-up, not by the first trial
    assert "s3fs" in setup  # shards are read from object storage
    mounted = cluster["file_mounts"]
    assert any(src == "." for src in mounted.values()), "the repository is copied to every node"


def test_nothing_listens_on_a_public_address(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "mlflow server --host 127.0.0.1" in head
    everything = yaml.safe_dump(cluster)
    assert "0.0.0.0" not in everything


def test_the_paper_specs_use_the_clusters_shared_storage_and_object_storage(cluster):
    from lgm_ray.sweep.parse import load_spec

    setup = " ".join(cluster["setup_commands"] + cluster["head_setup_commands"])
    for name in ("cross_model", "ablation"):
        spec = load_spec(ROOT / "sweeps" / f"{name}.yaml", cwd=ROOT, check_paths=False)
        assert spec.storage.startswith("/mnt/lgm_ray") and "/mnt/lgm_ray" in setup
        assert all(d.shards.startswith("s3://") for d in spec.datasets)
        assert spec.mlflow.tracking_uri == "http://127.0.0.1:5000"
        assert spec.resources.gpus_per_worker >= 1

"""MLflow tracking of sweeps (a SQLite store in a temporary folder; no Ray)."""

from __future__ import annotations

import pytest

from lgm_ray.results.tracking import (
    KEY_TAG,
    KIND_TAG,
    PARENT_TAG,
    Tracker,
    resolve_tracking_uri,
    ui_hint,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    tracker = Tracker(f"sqlite:///{folder / 'mlflow.db'}")
    exp = tracker.experiment("sweep-test")
    return tracker, exp, folder


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert resolve_tracking_uri(None, "http://spec:5000", tmp_path) == "http://spec:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, "http://spec:5000", tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://flag:5000", "http://spec:5000", tmp_path) == "http://flag:5000"
    assert "mlflow ui --backend-store-uri sqlite:///" in ui_hint(
        resolve_tracking_uri("sqlite:///x/mlflow.db")
    )


def test_experiment_parent_and_children_found_again_on_resume(store):
    tracker, exp, folder = store
    assert tracker.experiment("sweep-test") == exp  # one experiment per spec, created once
    run = tracker.client.get_experiment(exp)
    assert run.artifact_location.startswith("file://") and str(folder) in run.artifact_location
    parent = tracker.start_parent(exp, "sweep")
    assert tracker.start_parent(exp, "sweep", run_id=parent) == parent  # --resume reopens it
    child = tracker.child(exp, parent, "point-a", tags={"dataset": "digits"})
    assert tracker.child(exp, parent, "point-a") == child  # no duplicate on resume
    other = tracker.child(exp, parent, "point-b")
    got = tracker.client.get_run(child)
    assert got.data.tags[PARENT_TAG] == parent and got.data.tags[KEY_TAG] == "point-a"
    assert got.data.tags[KIND_TAG] == "trial" and got.data.tags["dataset"] == "digits"
    assert {r.info.run_id for r in tracker.children(exp, parent)} == {child, other}

    tracker.log_params(child, {"steps": 4, "eval": {"epochs": 3}})
    tracker.log_params(child, {"steps": 4})  # the same value again (a resumed trial) is fine
    assert tracker.client.get_run(child).data.params == {"steps": "4", "eval.epochs": "3"}
    tracker.log_series(child, "meta_loss", [0.9, 0.7, float("nan"), 0.5])
    history = tracker.client.get_metric_history(child, "meta_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.7), (4, 0.5)]
    tracker.log_metrics(child, {"digits/top1_mean": 80.0, "flag": True, "text": "x"})
    assert tracker.client.get_run(child).data.metrics["digits/top1_mean"] == 80.0
    assert "flag" not in tracker.client.get_run(child).data.metrics
    tracker.finish(child)

    tracker.fail(other, "Traceback …\nShardError: shard train-000001.tar: sha256 mismatch")
    failed = tracker.client.get_run(other)
    assert failed.info.status == "FAILED"
    assert "sha256 mismatch" in failed.data.tags["error"]
    assert "error.txt" in [a.path for a in tracker.client.list_artifacts(other)]
    assert tracker.client.get_run(child).info.status == "FINISHED"

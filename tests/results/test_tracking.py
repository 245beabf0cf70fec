"""MLflow tracking of sweeps (a SQLite store in a temporary folder; no Ray)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from lgm_ray.results.tracking import (
    HTTP_LIMITS,
    KEY_TAG,
    KIND_TAG,
    PARENT_TAG,
    Tracker,
    TrackingError,
    absolute_uri,
    check_tracking,
    http_limits,
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
    # a relative SQLite path is the working directory's, made absolute once
    assert resolve_tracking_uri("sqlite:///x/m.db", None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'x/m.db'}"
    assert absolute_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert absolute_uri("http://h:5000", tmp_path) == "http://h:5000"


def test_check_tracking_answers_fast_and_creates_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once released
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port} does not answer \(.*refused"):
        check_tracking(f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    check_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == [], "the check wrote nothing"


def test_http_limits_bound_mlflow_retries_unless_the_user_set_them(monkeypatch):
    for k in HTTP_LIMITS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with http_limits():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's value wins
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


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


def test_a_stop_closes_the_open_children(store):
    tracker, exp, _ = store
    parent = tracker.start_parent(exp, "stopped")
    done = tracker.child(exp, parent, "done")
    tracker.finish(done)
    running = tracker.child(exp, parent, "running")
    baseline = tracker.child(exp, parent, "baseline-x", kind="baseline")
    assert sorted(tracker.close_children(exp, parent, "KILLED")) == sorted([running, baseline])
    status = {r.info.run_id: r.info.status for r in tracker.children(exp, parent)}
    assert status == {done: "FINISHED", running: "KILLED", baseline: "KILLED"}

"""The sweep folder (SweepFolder): its paths, its small files, and each grid point's run folder."""

from __future__ import annotations

from lgm_ray.distill.run_folder import RunFolder
from lgm_ray.results.folder import SweepFolder


def test_paths_and_small_files_round_trip(tmp_path):
    folder = SweepFolder(tmp_path / "sweep")
    assert folder.is_empty() and not folder.is_sweep()
    assert folder.read_spec() == {} and folder.read_points() == {} and folder.read_state() == {}
    assert folder.read_timing() == {} and folder.read_baselines() == []

    folder.write_spec({"name": "sweep", "eval": {"epochs": 5}})
    assert folder.is_sweep() and not folder.is_empty()
    assert folder.read_spec() == {"name": "sweep", "eval": {"epochs": 5}}
    points = {"d-b-seed0": {"key": "d-b-seed0"}, "d-b-seed1": {"key": "d-b-seed1"}}
    folder.write_points(points)
    assert folder.read_points() == points
    folder.write_state({"tracking_uri": "sqlite:///x.db", "parent_run_id": "p"})
    assert folder.read_state()["parent_run_id"] == "p"
    folder.write_timing({"baselines_s": 1.5})
    assert folder.read_timing() == {"baselines_s": 1.5}
    for path in (folder.spec, folder.points, folder.state, folder.timing):
        assert path.parent == folder.root and path.is_file()
    assert folder.write_driver_error("Traceback …") == folder.driver_error and folder.driver_error.parent == folder.root
    assert {folder.baselines, folder.feature_cache, folder.tables, folder.report} <= {
        folder.root / n for n in ("baselines", "feature_cache", "tables", "report")}


def test_run_folders_and_baselines(tmp_path):
    folder = SweepFolder(tmp_path)
    folder.write_points({"a": {}, "b": {}, "c": {}})
    runs = folder.runs()
    assert list(runs) == ["a", "b", "c"] and all(isinstance(r, RunFolder) for r in runs.values())
    assert runs["a"].root == folder.trial_dir("a") / SweepFolder.RUN == folder.run("a").root
    runs["a"].write_result({"key": "a"})
    runs["b"].write_error("Traceback …\nShardError: sha256 mismatch\n\n")
    again = folder.runs()
    assert again["a"].read_result() == {"key": "a"} and again["b"].read_result() is None
    assert again["b"].last_error_line() == "ShardError: sha256 mismatch"
    assert again["c"].read_result() is None and again["c"].last_error_line() is None

    assert folder.read_baseline("d", "b", "full") is None
    path = folder.write_baseline("d", "b", "full", {"top1_mean": 90.0})
    assert path == folder.baseline_file("d", "b", "full") and path.parent == folder.baselines
    assert folder.read_baseline("d", "b", "full") == {"top1_mean": 90.0}
    folder.write_baseline("d", "b", "random", {"top1_mean": 40.0})
    assert [r["top1_mean"] for r in folder.read_baselines()] == [90.0, 40.0]  # file-name order


def test_a_sweep_is_started_once_more_than_its_spec_and_grid_are_written(tmp_path):
    folder = SweepFolder(tmp_path / "sweep")
    assert not folder.is_started()
    folder.write_spec({"name": "sweep"})
    folder.write_points({"a": {}})
    folder.write_driver_error("Traceback …")  # a driver stopped before its MLflow run opened
    assert not folder.is_started() and not folder.is_empty()
    folder.write_state({"parent_run_id": "p"})
    assert folder.is_started()
    other = SweepFolder(tmp_path / "other")
    other.run("a").root.mkdir(parents=True)
    assert other.is_started()

"""Sweeps end to end on Ray Tune, results read back through the MLflow client.

Tiny runs (4 steps, a 5-epoch probe): what is tested is the machinery — the grid as Tune trials,
MLflow runs, artifacts and tables, a two-node cluster, resume after an interruption, a failing trial —
not the quality of the sets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lgm_ray.results.folder import SweepFolder
from lgm_ray.sweep.__main__ import main

pytestmark = pytest.mark.slow
BACKBONE = "digits_simclr_cnn"
TINY = {
    "steps": 4,
    "lr": 0.03,
    "augs_per_batch": 2,
    "syn_res": 32,
    "real_res": 32,
    "crop_res": 32,
    "pyramid_extent": 2,
    "color": False,
    "aug_noise_p": 0.0,
    "ckpt_every": 2,
    "log_every": 2,
}


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    """No Ray token under $HOME, no tracking URI from the caller, a feature cache of our own."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "LGM_RAY_CACHE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["LGM_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def write_spec(folder: Path, name: str, datasets: dict, **fields) -> Path:
    data = {
        "name": name,
        "datasets": datasets,
        "backbones": [BACKBONE],
        "config": dict(TINY),
        "eval": {"epochs": 5, "seeds": 2},
        "baselines": ["random", "centroids", "neighbors", "full"],
        "storage": str(folder / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    for k, v in fields.items():
        if k == "config":
            data["config"].update(v)
        else:
            data[k] = v
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def corrupt_copy(shards: str, dest: Path) -> str:
    """A copy of the shards whose train tars keep their size but not their bytes (sha256 fails on read)."""
    shutil.copytree(shards, dest)
    for tar in dest.glob("train-*.tar"):
        data = bytearray(tar.read_bytes())
        mid = len(data) // 2
        data[mid : mid + 4096] = bytes(4096)
        tar.write_bytes(bytes(data))
    return str(dest)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def sweep_runs(uri: str, experiment: str):
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lgm_ray.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return c, parent, children


# ---------------------------------------------------------------- two nodes first (its own Ray)


@pytest.mark.timeout(900)
def test_two_node_cluster_sweep_with_ray_train_workers_in_every_trial(tmp_path, digits_shards):
    """Two nodes of two CPUs, trials of two Ray Train workers spread over both nodes.

    The cluster holds exactly two such trials at once; a trial asking a CPU for itself on top of its
    workers would starve them (docs/design.md §5), so finishing at all is part of the test.
    """
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        spec = write_spec(
            tmp_path,
            "two_nodes",
            {"digits": digits_shards},
            baselines=["centroids"],
            ablations={"param": ["pyramid", "pixel"]},
            config={"placement": "STRICT_SPREAD"},
            resources={"workers": 2, "cpus_per_worker": 1},
        )
        assert main([str(spec), "--address", cluster.address]) == 0
        nodes = {n["NodeID"] for n in ray.nodes()} if ray.is_initialized() else None
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    runs = SweepFolder(tmp_path / "runs" / "two_nodes").runs()
    results = [run.read_result() for run in runs.values()]
    assert len(results) == 2 and None not in results
    for r in results:
        workers = r["summary"]["per_worker"]
        assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, "one worker on each node"
        assert nodes is None or {w["node_id"] for w in workers} <= nodes
    _, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "two_nodes")
    trials = [r for r in children if r.data.tags["lgm_ray.kind"] == "trial"]
    assert sorted(r.data.params["param"] for r in trials) == ["pixel", "pyramid"]
    assert all(r.info.status == "FINISHED" and f"{BACKBONE}/top1_mean" in r.data.metrics for r in trials)
    assert all(r.data.params["workers"] == "2" for r in trials)
    assert parent.info.status == "FINISHED"


# ---------------------------------------------------------------- one local Ray for the rest (conftest's local_ray)


@pytest.mark.timeout(900)
def test_sweep_against_an_mlflow_server_with_a_failing_dataset(
    tmp_path, digits_shards, local_ray, mlflow_server, capsys
):
    broken = corrupt_copy(digits_shards, tmp_path / "broken")
    spec = write_spec(
        tmp_path,
        "e2e",
        {"digits": digits_shards, "broken": broken},
        ablations={"param": ["pyramid", "pixel"]},
        mlflow={"experiment": "lgm-e2e"},
    )
    assert main([str(spec), "--tracking-uri", mlflow_server]) == 1  # some trials failed
    captured = capsys.readouterr()
    out = captured.out
    assert "cross-model" in out and "FAILED broken-" in out and "2 trials finished, 2 failed" in out
    error = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "2 of 4 trials" in error[0] and "--resume" in error[0]

    c, parent, children = sweep_runs(mlflow_server, "lgm-e2e")
    trials = {r.data.tags["lgm_ray.trial_key"]: r for r in children if r.data.tags["lgm_ray.kind"] == "trial"}
    assert len(trials) == 4
    good = [r for k, r in trials.items() if k.startswith("digits-")]
    bad = [r for k, r in trials.items() if k.startswith("broken-")]
    assert [r.info.status for r in good] == ["FINISHED"] * 2
    assert [r.info.status for r in bad] == ["FAILED"] * 2
    assert all("ShardError" in r.data.tags["error"] or "sha256" in r.data.tags["error"] for r in bad)

    run = good[0]
    assert run.data.params["steps"] == "4" and run.data.params["backbone"] == BACKBONE
    assert run.data.params["dataset"] == "digits" and run.data.params["eval.epochs"] == "5"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "meta_loss")] == [1, 2, 3, 4]
    for m in ("top1_mean", "top1_std", "top5_mean", "top5_std"):
        assert 0 <= run.data.metrics[f"{BACKBONE}/{m}"] <= 100
    assert run.data.metrics["images_per_s"] > 0
    assert f"neighbors/{BACKBONE}/top1_mean" in run.data.metrics
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"synset.pt", "grid.png", "config.yaml", "grids"} <= artifacts
    assert c.list_artifacts(run.info.run_id, "grids"), "grids saved along the way"

    baselines = [r for r in children if r.data.tags["lgm_ray.kind"] == "baseline"]
    assert sorted(
        r.data.tags["baseline"]
        for r in baselines
        if r.data.tags["dataset"] == "digits" and r.info.status == "FINISHED"
    ) == ["centroids", "full", "random"]
    assert any(r.info.status == "FAILED" for r in baselines if r.data.tags["dataset"] == "broken")

    assert parent.info.status == "FAILED"  # trials failed
    assert set(parent.data.tags["lgm_ray.failed_trials"].split(",")) >= set(
        k for k in trials if k.startswith("broken-"))
    tables = {a.path for a in c.list_artifacts(parent.info.run_id, "tables")}
    assert {
        "tables/cross_model_digits.md",
        "tables/cross_model_digits.parquet",
        "tables/cross_model_digits.png",
        "tables/ablation_digits.md",
        "tables/ablation_digits.parquet",
        "tables/results.parquet",
    } <= tables
    import mlflow
    import pandas as pd

    local = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id,
        artifact_path="tables",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server,
    )
    wide = pd.read_parquet(Path(local) / "cross_model_digits.parquet").set_index("training set")
    assert {
        f"distilled: {BACKBONE} [param=pyramid]",
        f"distilled: {BACKBONE} [param=pixel]",
        "centroids",
        "neighbors [param=pyramid]",
        "random",
        "full",
    } <= set(wide.index)
    pyramid = trials[f"digits-{BACKBONE}-param=pyramid-seed0"]
    assert wide.loc[f"distilled: {BACKBONE} [param=pyramid]", f"{BACKBONE}_mean"] == pytest.approx(
        pyramid.data.metrics[f"{BACKBONE}/top1_mean"]
    )
    assert wide.loc["full", f"{BACKBONE}_mean"] > 50  # the full-data probe on digits


def start_sweep(spec: Path, *args: str) -> subprocess.Popen:
    """The sweep command as a process of its own, with a Ray of its own, slowed by the loop's test knob
    (the environment variable reaches its trials because its Ray starts in that environment)."""
    env = {**os.environ, "LGM_RAY_TEST_STEP_DELAY": "0.4"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "lgm_ray.sweep", str(spec), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def stop_when(proc: subprocess.Popen, folder: SweepFolder, sig: signal.Signals,
              after: set[str]) -> tuple[str, str, int, str]:
    """Wait until a trial not in ``after`` has finished and another has a checkpoint but no result (a known
    point, read from the run folders), then send ``sig``; returns the finished key, the interrupted key,
    the command's exit status and its output."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        runs = folder.runs()
        finished = [k for k, run in runs.items() if run.result.exists() and k not in after]
        mid_way = [k for k, run in runs.items() if not run.result.exists() and run.latest_checkpoint() is not None]
        if finished and mid_way:
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=180)
            return finished[0], mid_way[0], proc.returncode, out
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no trial finished in time: {proc.communicate()[0][-3000:]}")


def trial_statuses(uri: str, experiment: str) -> tuple[str, dict[str, str]]:
    _, parent, children = sweep_runs(uri, experiment)
    trials = {r.data.tags["lgm_ray.trial_key"]: r.info.status for r in children
              if r.data.tags["lgm_ray.kind"] == "trial"}
    return parent.info.status, trials


@pytest.mark.timeout(1200)
def test_sigterm_and_sigint_stop_a_sweep_that_resumes_without_redoing_finished_trials(
    tmp_path, digits_shards, local_ray
):
    """SIGTERM (a scheduler, a spot reclaim) stops the first run as Ctrl-C does; SIGINT stops the resumed
    one; each at a known point (a trial finished, the next one past a checkpoint). The last resume runs
    here, on this module's Ray."""
    spec = write_spec(
        tmp_path,
        "resume",
        {"digits": digits_shards},
        baselines=["full"],
        seeds=[0, 1, 2],
        resources={"max_concurrent_trials": 1},
        config={"steps": 8},
    )
    folder = SweepFolder(tmp_path / "runs" / "resume")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    done, started, code, out = stop_when(start_sweep(spec), folder, signal.SIGTERM, set())
    assert code == 130, out[-3000:]
    assert "Stack trace" not in out and "SIGABRT" not in out  # no C++ dump: a clean stop
    error = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "interrupted" in error[0] and "--resume" in error[0], out[-3000:]
    parent, trials = trial_statuses(uri, "resume")
    assert parent == "KILLED"
    assert trials[done] == "FINISHED" and trials[started] == "KILLED"
    assert "RUNNING" not in trials.values()
    before = folder.run(done).result
    first = before.read_text(), before.stat().st_mtime_ns

    assert main([str(spec)]) == 2  # an existing sweep is never overwritten without --resume
    done2, started2, code, out = stop_when(start_sweep(spec, "--resume"), folder, signal.SIGINT, {done})
    assert code == 130, out[-3000:]
    assert done2 == started, "the interrupted trial finished first on resume"
    parent, trials = trial_statuses(uri, "resume")
    assert parent == "KILLED" and trials[started2] == "KILLED" and "RUNNING" not in trials.values()

    assert main([str(spec), "--resume"]) == 0
    assert (before.read_text(), before.stat().st_mtime_ns) == first, "a finished trial was run again"
    results = {key: run.read_result() for key, run in folder.runs().items()}
    assert len(results) == 3 and None not in results.values()
    for key in (started, started2):
        assert results[key]["resumed_from_step"] >= 2, "an interrupted trial continued its checkpoint"
        assert len(results[key]["summary"]["losses"]) == 8
    parent, trials = trial_statuses(uri, "resume")
    assert len(trials) == 3 and set(trials.values()) == {"FINISHED"}  # no duplicate runs
    assert parent == "FINISHED"
    _, parent_run, _ = sweep_runs(uri, "resume")
    assert folder.read_state()["parent_run_id"] == parent_run.info.run_id


@pytest.mark.timeout(900)
def test_a_failed_trial_fails_the_parent_and_relative_paths_are_the_working_directorys(
    tmp_path, digits_shards, local_ray, monkeypatch, capsys
):
    """The spec lies in specs/, the command runs in work/ with every path relative to work/: a missing
    weights file fails the preflight (nothing written); once it is there the same command runs, the
    broken dataset's trial fails, the other finishes, and the parent ends FAILED with exit 1."""
    specs, work = tmp_path / "specs", tmp_path / "work"
    specs.mkdir()
    work.mkdir()
    broken = corrupt_copy(digits_shards, work / "broken")
    shutil.copytree(digits_shards, work / "digits")
    path = write_spec(specs, "fails", {"good": "digits", "broken": os.path.relpath(broken, work)},
                      baselines=["random"], config={"weights": "w/cnn.pt"}, storage="runs",
                      mlflow={"tracking_uri": "sqlite:///mlflow.db"})
    monkeypatch.chdir(work)
    assert main([str(path)]) == 2
    assert "w/cnn.pt" in capsys.readouterr().err and not (work / "runs").exists() and not (work / "mlflow.db").exists()
    (work / "w").mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "lgm_ray/backbones/weights/digits_simclr_cnn.pt",
                work / "w" / "cnn.pt")

    assert main([str(path)]) == 1  # the same command, once fixed
    error = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1 and "1 of 2 trials" in error[0] and "broken-" in error[0] and "--resume" in error[0]
    folder = SweepFolder(work / "runs" / "fails")
    for point in folder.read_points().values():  # what the trials read: absolute paths only
        assert Path(point["config"]["shards"]).is_absolute() and point["config"]["weights"] == str(work / "w" / "cnn.pt")
    good = next(run for key, run in folder.runs().items() if key.startswith("good-"))
    assert good.read_result() is not None
    assert yaml.safe_load(good.config.read_text())["weights"] == str(work / "w" / "cnn.pt")
    _, parent, children = sweep_runs(f"sqlite:///{work / 'mlflow.db'}", "fails")
    trials = {r.data.tags["lgm_ray.trial_key"]: r for r in children if r.data.tags["lgm_ray.kind"] == "trial"}
    assert sorted(r.info.status for r in trials.values()) == ["FAILED", "FINISHED"]
    bad = next(k for k in trials if k.startswith("broken-"))
    assert parent.info.status == "FAILED" and bad in parent.data.tags["lgm_ray.failed_trials"].split(",")


def test_bad_specs_fail_before_any_trial(tmp_path, digits_shards, local_ray, capsys):
    bad = write_spec(tmp_path, "bad", {"digits": digits_shards}, ablations={"parma": ["pixel"]})
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1  # one line, the common form
    assert "did you mean 'param'" in err
    gpu = write_spec(
        tmp_path, "gpu", {"digits": digits_shards}, resources={"workers": 0, "gpus_per_worker": 1}
    )
    assert main([str(gpu)]) == 2
    assert "resources:" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "gpu").exists(), "nothing was written, no trial started"
    missing = write_spec(tmp_path, "missing", {"digits": str(tmp_path / "nowhere")})
    assert main([str(missing)]) == 2
    assert "no shard set" in capsys.readouterr().err

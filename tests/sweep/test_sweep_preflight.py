"""The sweep's preflight and stops, without running a trial: what fails before Ray starts and before
anything is written (tracking server, weights, shards), SIGTERM handled as SIGINT, a stopped trial left
unfinished, the exit-status rules."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lgm_ray.results.folder import SweepFolder
from lgm_ray.sweep.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
CNN_WEIGHTS = ROOT / "lgm_ray" / "backbones" / "weights" / "digits_simclr_cnn.pt"


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def write_spec(folder: Path, shards: str, name: str = "pre", **fields) -> Path:
    data = {
        "name": name,
        "datasets": {"digits": shards},
        "backbones": ["digits_simclr_cnn"],
        "config": {"steps": 4, "syn_res": 32, "real_res": 32, "crop_res": 32},
        "baselines": ["centroids"],
        "storage": str(folder / "runs"),
        "mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"},
    }
    data.update(fields)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_nothing_written(tmp_path: Path, name: str = "pre") -> None:
    assert not (tmp_path / "runs" / name).exists(), "no sweep folder"
    assert not (tmp_path / "mlflow.db").exists(), "no MLflow store"
    assert not (tmp_path / "mlartifacts").exists()


def one_error_line(err: str) -> str:
    """Before anything runs, stderr is the error line alone."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def last_error_line(err: str) -> str:
    """Once a sweep ran (MLflow and Ray print their own lines), one error line, the last."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], err[-3000:]
    return lines[-1]


def test_an_unreachable_tracking_server_fails_fast_before_anything_is_written(tmp_path, digits_shards, capsys):
    spec = write_spec(tmp_path, digits_shards)
    uri = f"http://127.0.0.1:{closed_port()}"
    t0 = time.monotonic()
    assert main([str(spec), "--tracking-uri", uri]) == 2
    elapsed = time.monotonic() - t0
    line = one_error_line(capsys.readouterr().err)
    assert uri in line and "does not answer" in line and "--tracking-uri" in line
    assert "--resume" not in line  # nothing was kept, so nothing to resume
    assert elapsed < 10, f"the preflight took {elapsed:.1f} s (MLflow's own retries take minutes)"
    assert_nothing_written(tmp_path)


def test_a_server_that_never_answers_is_given_up_after_the_preflight_timeout(tmp_path, digits_shards, capsys):
    """A socket that accepts connections into its backlog and never replies: MLflow's read times out."""
    from lgm_ray.results.tracking import PREFLIGHT_TIMEOUT_S

    spec = write_spec(tmp_path, digits_shards)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        assert main([str(spec), "--tracking-uri", uri]) == 2
        elapsed = time.monotonic() - t0
    line = one_error_line(capsys.readouterr().err)
    assert uri in line and "timed out" in line
    assert PREFLIGHT_TIMEOUT_S - 1 <= elapsed < PREFLIGHT_TIMEOUT_S + 10
    assert_nothing_written(tmp_path)


def test_a_missing_weights_file_fails_at_preflight_and_the_same_command_runs_once_fixed(
    tmp_path, digits_shards, capsys, monkeypatch
):
    """The weights path is relative, resolved against the working directory (not the spec's folder)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    spec = write_spec(tmp_path, digits_shards, config={"steps": 4, "weights": "w/cnn.pt"})
    assert main([str(spec)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "'digits_simclr_cnn'" in line and str(work / "w" / "cnn.pt") in line and "does not exist" in line
    assert_nothing_written(tmp_path)
    # once the file is there the preflight passes (stopped here, before Ray, by the next check)
    (work / "w").mkdir()
    shutil.copy(CNN_WEIGHTS, work / "w" / "cnn.pt")
    from lgm_ray.sweep import driver
    from lgm_ray.sweep.parse import load_spec

    driver.preflight(load_spec(spec), f"sqlite:///{tmp_path / 'mlflow.db'}", resume=False)
    assert_nothing_written(tmp_path)


def test_a_weights_file_of_another_backbone_fails_at_preflight(tmp_path, digits_shards, capsys):
    wrong = tmp_path / "vit.pt"
    shutil.copy(ROOT / "lgm_ray" / "backbones" / "weights" / "digits_simclr_vit.pt", wrong)
    spec = write_spec(tmp_path, digits_shards, config={"steps": 4, "weights": str(wrong)})
    assert main([str(spec)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "digits_simclr_cnn" in line and "config.weights" in line
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_a_pretrained_backbone_without_weights_offline_fails_at_preflight(tmp_path, digits_shards):
    """An empty hub cache, offline: the evaluation backbone's weights are missing before any trial."""
    spec = write_spec(tmp_path, digits_shards, eval_backbones=["digits_simclr_cnn", "dinov2_vits14"])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th"),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-m", "lgm_ray.sweep", str(spec)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "eval_backbones" in line[0] and "'dinov2_vits14'" in line[0], out.stderr[-2000:]
    assert_nothing_written(tmp_path)


def test_a_sqlite_store_in_a_missing_folder_fails_at_preflight(tmp_path, digits_shards, capsys):
    spec = write_spec(tmp_path, digits_shards, mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'no' / 'm.db'}"})
    assert main([str(spec)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "no") in line and "does not exist" in line
    assert not (tmp_path / "runs" / "pre").exists()


def test_a_folder_holding_only_the_spec_is_not_a_started_sweep(tmp_path, digits_shards, capsys):
    """A driver that stopped before its MLflow run opened leaves spec.yaml and trials.json: the same
    command (no --resume) may start there; a folder with a state file is refused without --resume."""
    from lgm_ray.sweep.driver import check_folder
    from lgm_ray.sweep.parse import load_spec

    spec = load_spec(write_spec(tmp_path, digits_shards))
    folder = spec.folder
    folder.write_spec({"name": "old"})
    folder.write_points({})
    folder.write_driver_error("Traceback …")
    check_folder(spec, resume=False)
    folder.write_state({"parent_run_id": "p"})
    with pytest.raises(Exception, match="holds a sweep already: pass --resume"):
        check_folder(spec, resume=False)
    with pytest.raises(Exception, match="the spec changed"):
        check_folder(spec, resume=True)


# ---------------------------------------------------------------- stops


def test_sigterm_is_handled_as_sigint():
    from lgm_ray.sweep.driver import sigterm_as_sigint

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever an earlier Tune run left
    with sigterm_as_sigint():
        with pytest.raises(KeyboardInterrupt):  # the default SIGINT handler's answer
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; the sleep is never waited out
        seen = []
        previous = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))  # e.g. Tune's, during fit
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                if seen:
                    break
                time.sleep(0.01)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert seen == [signal.SIGINT]
        signal.signal(signal.SIGINT, lambda s, f: None)  # e.g. Tune's, left installed after fit
    assert signal.getsignal(signal.SIGTERM) == before[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    signal.signal(signal.SIGINT, before[1])


@pytest.mark.parametrize(("stop", "error_file"), [(KeyboardInterrupt, False), (SystemExit, False),
                                                   (RuntimeError, True)])
def test_a_stopped_trial_is_unfinished_a_failed_one_failed(tmp_path, monkeypatch, stop, error_file):
    from lgm_ray.sweep import trial

    folder = SweepFolder(tmp_path)
    point = {"key": "k", "dataset": "d", "backbone": "digits_simclr_cnn", "seed": 0, "ablation": {},
             "config": {"backbone": "digits_simclr_cnn", "shards": "digits", "steps": 2}}
    folder.write_points({"k": point})

    def stopped(cfg, **_):
        raise stop("stop")

    monkeypatch.setattr(trial, "distill", stopped)
    with pytest.raises(stop):
        trial.run_trial({"trial": "k", "sweep_dir": str(tmp_path), "use_gpu": False})
    assert folder.run("k").error.is_file() is error_file


def test_exit_status_and_advice_follow_the_state(tmp_path):
    from lgm_ray.sweep.driver import EXIT_STATUS, parent_status, resume_command
    from lgm_ray.sweep.parse import parse_spec

    assert set(EXIT_STATUS) == {0, 1, 2, 130}
    assert main.__module__ == "lgm_ray.sweep.__main__"
    doc = sys.modules["lgm_ray.sweep.__main__"].__doc__
    assert all(f"  {code} " in doc for code in (0, 1, 2, 130))
    assert parent_status([], []) == "FINISHED"
    assert parent_status([("k", "error")], []) == "FAILED"
    assert parent_status([("k", "error")], ["j"]) == "KILLED"
    spec = parse_spec({"name": "t", "datasets": {"d": "x"}, "backbones": ["digits_simclr_cnn"]},
                      source="sweeps/t.yaml", overrides=["config.steps=20", "storage=/tmp/a b"],
                      check_paths=False, cwd=tmp_path)
    assert resume_command(spec, "http://h:5000") == (
        "python -m lgm_ray.sweep sweeps/t.yaml --set config.steps=20 --set 'storage=/tmp/a b' "
        "--tracking-uri http://h:5000 --resume")


# ---------------------------------------------------------------- one line for every stop


@pytest.fixture
def no_ray(monkeypatch):
    """The driver past its preflight without a Ray: no cluster to start, one trial at a time."""
    from lgm_ray.sweep import driver

    monkeypatch.setattr(driver, "start_ray", lambda *a, **k: False)
    monkeypatch.setattr(driver, "max_concurrent_trials", lambda spec: 1)
    return driver


def test_an_error_after_the_sweep_started_is_one_line_with_the_resume_command(
    tmp_path, digits_shards, capsys, no_ray, monkeypatch
):
    def broken(*a, **k):
        raise RuntimeError("the shared baselines broke")

    monkeypatch.setattr(no_ray, "run_baselines", broken)
    spec = write_spec(tmp_path, digits_shards)
    assert main([str(spec), "--set", "eval.epochs=3"]) == 1
    line = last_error_line(capsys.readouterr().err)
    folder = SweepFolder(tmp_path / "runs" / "pre")
    assert "RuntimeError: the shared baselines broke" in line and str(folder.driver_error) in line
    assert line.endswith(f"continue with: python -m lgm_ray.sweep {spec} --set eval.epochs=3 --resume")
    assert "Traceback" in folder.driver_error.read_text() and folder.is_started()
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = c.search_runs([c.get_experiment_by_name("pre").experiment_id])
    assert parent.info.status == "FAILED" and parent.data.tags["lgm_ray.overrides"] == "eval.epochs=3"


def test_an_error_before_anything_was_computed_says_run_the_same_command(
    tmp_path, digits_shards, capsys, no_ray, monkeypatch
):
    def broken(*a, **k):
        raise ConnectionError("the store went away")

    monkeypatch.setattr(no_ray, "start_tracking", broken)
    spec = write_spec(tmp_path, digits_shards)
    assert main([str(spec)]) == 1
    line = last_error_line(capsys.readouterr().err)
    assert "ConnectionError: the store went away" in line and "run the same command again" in line
    assert "--resume" not in line
    from lgm_ray.sweep.parse import load_spec

    no_ray.check_folder(load_spec(spec), resume=False)  # the same command is not told to pass --resume


def test_a_ray_that_does_not_start_is_one_line(tmp_path, digits_shards, capsys, monkeypatch):
    from lgm_ray.sweep import driver

    def refused(*a, **k):
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(driver, "start_ray", refused)
    assert main([str(write_spec(tmp_path, digits_shards)), "--address", "10.0.0.1:6379"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "10.0.0.1:6379" in line and "--address" in line
    assert_nothing_written(tmp_path)

"""``python -m lgm_ray.distill``: outputs, config handling, ablations and bit-identical resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lgm_ray.distill import main

FAST = ["--shards", "digits", "--syn-res", "16", "--real-res", "16", "--crop-res", "16",
        "--augs-per-batch", "2", "--pyramid-extent", "4", "--log-every", "5"]


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lgm_ray.distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_run_writes_synset_grid_config_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "run"
    summary = main([*FAST, "--steps", "6", "--ckpt-every", "3", "--out", str(out), "--ipc", "2"])
    printed = capsys.readouterr()
    last = printed.out.strip().splitlines()[-1]
    assert json.loads(last) == summary
    assert summary["steps"] == 6 and summary["images_per_s"] > 0 and 0 <= summary["final_loss"] <= 2
    assert "step 5/6" in printed.err and "it/s" in printed.err  # progress
    payload = torch.load(out / "synset.pt", weights_only=False)
    assert payload["images"].shape == (20, 3, 16, 16) and payload["images"].dtype == torch.float32
    assert 0 <= float(payload["images"].min()) and float(payload["images"].max()) <= 1
    assert payload["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert payload["class_names"] == [str(i) for i in range(10)]
    assert (out / "grid.png").stat().st_size > 0
    assert "augs_per_batch: 2" in (out / "config.yaml").read_text()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 6 and ckpt["synset_config"]["n_levels"] == 2  # grew at step 4


def test_loss_goes_down_on_digits(tmp_path):
    summary = main([*FAST, "--steps", "40", "--out", str(tmp_path / "r"), "--lr", "0.01",
                    "--augs-per-batch", "4"])
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    losses = ckpt["losses"]
    assert summary["steps"] == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 2\nipc: 3\nsyn_res: 8\nreal_res: 8\ncrop_res: 8\naugs_per_batch: 1\n")
    out = tmp_path / "o"
    main(["--config", str(cfg), "--ipc", "1", "--out", str(out)])
    resolved = (out / "config.yaml").read_text()
    assert "ipc: 1" in resolved and "steps: 2" in resolved and "syn_res: 8" in resolved
    cfg.write_text("stepz: 2\n")
    with pytest.raises(SystemExit, match="unknown field.*stepz.*valid fields"):
        main(["--config", str(cfg), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match="'param'.*'pyramid' or 'pixel'"):
        main(["--param", "wavelet", "--out", str(tmp_path / "o3")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--config", str(tmp_path / "missing.yaml")])


def test_existing_checkpoint_is_never_overwritten_without_resume(tmp_path):
    out = tmp_path / "o"
    main([*FAST, "--steps", "2", "--out", str(out)])
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="--resume"):
        main([*FAST, "--steps", "4", "--out", str(out)])
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="different.*ipc"):
        main([*FAST, "--steps", "4", "--out", str(out), "--ipc", "2", "--resume"])


@pytest.mark.parametrize("ablation", [["--param", "pixel"], ["--aug", "none"], ["--no-color"],
                                      ["--micro-batch", "7"], ["--amp", "bf16"]])
def test_every_ablation_runs(tmp_path, ablation):
    summary = main([*FAST, "--steps", "3", "--out", str(tmp_path / "a"), *ablation])
    assert summary["steps"] == 3 and summary["final_loss"] == summary["final_loss"]  # not NaN
    payload = torch.load(tmp_path / "a" / "synset.pt", weights_only=False)
    assert torch.isfinite(payload["images"]).all()


def test_killed_run_resumes_bit_identically(tmp_path):
    args = [*FAST, "--steps", "20", "--ckpt-every", "10", "--ipc", "2", "--seed", "7"]
    straight = _run_cli([*args, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    out = tmp_path / "killed"
    victim = _run_cli([*args, "--out", str(out), "--step-delay", "0.3"])
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL  # it really died mid-run
    assert torch.load(ckpt, weights_only=False)["step"] == 10
    assert not (out / "synset.pt").exists()

    resumed = _run_cli([*args, "--out", str(out), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resumed from step 10" in resumed.stderr.read()
    a = torch.load(tmp_path / "straight" / "synset.pt", weights_only=False)
    b = torch.load(out / "synset.pt", weights_only=False)
    assert torch.equal(a["images"], b["images"])
    for k in a["synset_state"]:
        assert torch.equal(a["synset_state"][k], b["synset_state"][k])


def test_missing_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["--device", "cuda", "--out", str(Path(tmp_path) / "c")])


def test_distills_from_webdataset_shards(tmp_path):
    from lgm_ray.shards import main as shards_main

    root = tmp_path / "shards"
    assert shards_main(["build", "digits", "--out", str(root), "--real-res", "16", "--shard-size", "400"]) == 0
    summary = main([*FAST, "--shards", str(root), "--steps", "3", "--ckpt-every", "2", "--out", str(tmp_path / "o")])
    payload = torch.load(tmp_path / "o" / "synset.pt", weights_only=False)
    assert summary["steps"] == 3
    assert payload["class_names"] == [str(i) for i in range(10)]


def test_grey_images_for_grey_datasets(tmp_path):
    main([*FAST, "--steps", "2", "--grey", "--out", str(tmp_path / "g")])
    images = torch.load(tmp_path / "g" / "synset.pt", weights_only=False)["images"]
    assert images.shape[1] == 3
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])

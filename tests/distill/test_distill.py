"""``python -m lgm_ray.distill``: outputs, config handling, ablations, exact resume, non-finite steps, errors."""

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
import torch.nn.functional as F
from overflow import Amplify
from torch import nn

from lgm_ray import backbones
from lgm_ray.backbones import registry
from lgm_ray.distill.__main__ import main
from lgm_ray.distill.checkpoints import class_file, read_checkpoint
from lgm_ray.distill.config import REFERENCE_PRESET, DistillConfig
from lgm_ray.distill.config import load_yaml as load_config
from lgm_ray.distill.loop import TEST_STEP_DELAY
from lgm_ray.distill.run_folder import RunFolder

FAST = ["--shards", "digits", "--syn-res", "16", "--real-res", "16", "--crop-res", "16",
        "--augs-per-batch", "2", "--pyramid-extent", "4", "--log-every", "5"]


def _run_cli(args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "lgm_ray.distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _payload(out: Path) -> dict:
    return RunFolder(out).load_synset()


def _images(out: Path) -> torch.Tensor:
    return _payload(out)["images"]


def _state(out: Path) -> dict:
    return _payload(out)["synset_state"]


def _latest_step(out: Path) -> int | None:
    ckpt = RunFolder(out).latest_checkpoint()
    return None if ckpt is None else ckpt.step


def test_the_run_folder_layout_is_the_documented_one(tmp_path):
    """The names the README and the module docs promise (every other test goes through RunFolder)."""
    f = RunFolder(tmp_path)
    assert (f.synset.name, f.grid.name, f.config.name, f.result.name, f.error.name) == (
        "synset.pt", "grid.png", "config.yaml", "result.json", "error.txt")
    assert f.grid_at(3) == tmp_path / "grids" / "step_0000003.png" and f.step_of(f.grid_at(3)) == 3
    assert f.checkpoint_at(6) == tmp_path / "checkpoints" / "step_0000006"
    assert f.checkpoint_roots() == [tmp_path / "checkpoints", tmp_path / "ray"]
    assert f.resumed_config(10).name == "config.resumed_at_10.yaml"
    assert RunFolder.next_attempt(tmp_path) == "attempt-0"
    (tmp_path / "attempt-0").mkdir()
    assert RunFolder.next_attempt(tmp_path) == "attempt-1"


def test_run_writes_synset_grids_config_checkpoints_and_a_json_summary(tmp_path, capsys):
    out = tmp_path / "run"
    summary = main([*FAST, "--steps", "6", "--ckpt-every", "3", "--out", str(out), "--ipc", "2"])
    printed = capsys.readouterr()
    last = json.loads(printed.out.strip().splitlines()[-1])
    assert last == {k: v for k, v in summary.items() if k != "losses"}
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and summary["images_per_s"] > 0
    assert len(summary["losses"]) == 6 and summary["final_loss"] == summary["losses"][-1]
    assert "step 5/6" in printed.err and "it/s" in printed.err and "img/s" in printed.err
    folder = RunFolder(out)
    payload = folder.load_synset()
    assert payload["images"].shape == (20, 3, 16, 16) and payload["images"].dtype == torch.float32
    assert payload["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert payload["class_names"] == [str(i) for i in range(10)]
    assert sorted(folder.grids.iterdir()) == folder.grid_paths() == [folder.grid_at(3), folder.grid_at(6)]
    assert folder.grid.stat().st_size > 0
    assert DistillConfig.from_dict(load_config(folder.config)).ipc == 2
    ckpt = folder.latest_checkpoint()
    assert ckpt.path == folder.checkpoint_at(6)
    assert ckpt.step == 6 and ckpt.meta["n_levels"] == 2  # grew before step 4 (0-based)
    assert sorted(folder.checkpoints.iterdir()) == [folder.checkpoint_at(3), folder.checkpoint_at(6)]


def test_loss_goes_down_on_digits(tmp_path):
    summary = main([*FAST, "--steps", "40", "--out", str(tmp_path / "r"), "--lr", "0.01", "--augs-per-batch", "4"])
    losses = summary["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 2\nipc: 3\nsyn_res: 8\nreal_res: 8\ncrop_res: 8\naugs_per_batch: 1\nlr: 1e-2\n")
    out = tmp_path / "o"
    main(["--config", str(cfg), "--ipc", "1", "--out", str(out)])
    resolved = DistillConfig.from_dict(load_config(RunFolder(out).config))
    assert (resolved.ipc, resolved.steps, resolved.syn_res, resolved.lr) == (1, 2, 8, 0.01)


@pytest.mark.parametrize("args,message", [
    (["--param", "wavelet"], "'param'.*'pyramid' or 'pixel'"),
    (["--steps", "ten"], "'steps' = 'ten' must be an int"),
    (["--backbone", "dinov9"], "unknown backbone 'dinov9'.*known backbones"),
    (["--shards", "/nonexistent/shards"], "manifest"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main([*FAST, "--out", str(tmp_path / "o"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not RunFolder(tmp_path / "o").checkpoints.exists()


def test_unknown_config_key_suggests_the_nearest(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stepz: 2\n")
    with pytest.raises(SystemExit):
        main(["--config", str(cfg), "--out", str(tmp_path / "o")])
    assert "'stepz' (did you mean 'steps'?)" in capsys.readouterr().err


def test_corrupt_shards_is_a_clear_error_from_the_command_line(tmp_path, digits_shards):
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(digits_shards, root)
    shard = sorted(root.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    proc = _run_cli([*FAST, "--shards", str(root), "--steps", "2", "--out", str(tmp_path / "o")])
    assert proc.wait(timeout=300) == 2
    err = proc.stderr.read()
    assert "Traceback" not in err and err.startswith("error: ") and shard.name in err


def test_existing_run_is_never_overwritten_and_changed_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "o"
    main([*FAST, "--steps", "2", "--out", str(out)])
    before = _images(out)
    for extra, key in [([], "--resume"), (["--ipc", "2", "--resume"], "ipc"),
                       (["--normalization", "imagenet", "--resume"], "normalization"),
                       (["--weights", str(tmp_path / "w.pt"), "--resume"], "weights")]:
        if key == "weights":
            (tmp_path / "w.pt").write_bytes(b"")
        with pytest.raises(SystemExit):
            main([*FAST, "--steps", "4", "--out", str(out), *extra])
        assert key in capsys.readouterr().err
    assert torch.equal(_images(out), before)
    assert _latest_step(out) == 2


@pytest.mark.parametrize("ablation", [["--param", "pixel"], ["--aug", "none"], ["--no-color"], ["--no-aug-real"],
                                      ["--preset", "reference", "--steps", "3"]])
def test_every_ablation_runs_and_changes_the_images(tmp_path, ablation):
    base = tmp_path / "base"
    main([*FAST, "--steps", "3", "--out", str(base)])
    summary = main([*FAST, "--steps", "3", "--out", str(tmp_path / "a"), *ablation])
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    images = _images(tmp_path / "a")
    assert torch.isfinite(images).all()
    assert float((images - _images(base)).abs().max()) > 1e-5  # an ignored flag gives exactly 0


@pytest.mark.parametrize("variant", [["--micro-batch", "7"], ["--amp", "bf16"]])
def test_micro_batching_and_bf16_run_close_to_the_plain_step(tmp_path, variant):
    main([*FAST, "--steps", "3", "--out", str(tmp_path / "base")])
    main([*FAST, "--steps", "3", "--out", str(tmp_path / "v"), *variant])
    diff = float((_images(tmp_path / "v") - _images(tmp_path / "base")).abs().max())
    assert diff < (1e-4 if variant[0] == "--micro-batch" else 0.05)


def test_reference_preset_turns_on_every_reference_setting_and_explicit_fields_win():
    cfg = DistillConfig.from_dict({"preset": "reference"})
    assert all(getattr(cfg, k) == v for k, v in REFERENCE_PRESET.items())
    assert DistillConfig.from_dict({"preset": "reference", "steps": 7}).steps == 7
    assert DistillConfig().aug_padding == "reflection" and DistillConfig().steps == 5000


def test_reference_preset_grows_the_pyramid_one_step_later(tmp_path):
    def levels(out, step):
        return read_checkpoint(RunFolder(out).checkpoint_at(step)).meta["n_levels"]

    main([*FAST, "--steps", "6", "--ckpt-every", "5", "--out", str(tmp_path / "l")])
    main([*FAST, "--steps", "6", "--ckpt-every", "5", "--out", str(tmp_path / "r"), "--pyramid-offset", "1"])
    # extent 4: lgm grows before 0-based step 4, the reference's offset 1 before step 5.
    assert (levels(tmp_path / "l", 5), levels(tmp_path / "r", 5), levels(tmp_path / "r", 6)) == (2, 1, 2)


ARGS = [*FAST, "--ipc", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def straight20(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    main([*ARGS, "--steps", "20", "--ckpt-every", "10", "--out", str(out)])
    return out


def test_killed_run_resumes_bit_identically_from_a_step_ckpt_every_does_not_divide(tmp_path, straight20):
    out = tmp_path / "killed"
    # The test hook slows the victim to 0.3 s a step; the resumed run goes at full speed.
    victim = _run_cli([*ARGS, "--steps", "20", "--ckpt-every", "7", "--out", str(out)], env={TEST_STEP_DELAY: "0.3"})
    deadline = time.time() + 300
    while _latest_step(out) is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)  # a few steps past the checkpoint at 7
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL  # it really died mid-run
    assert _latest_step(out) == 7
    assert not RunFolder(out).synset.exists()
    resumed = _run_cli([*ARGS, "--steps", "20", "--ckpt-every", "7", "--out", str(out), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert "resumed from step 7" in resumed.stderr.read()
    assert torch.equal(_images(straight20), _images(out))
    for k, v in _state(straight20).items():
        assert torch.equal(v, _state(out)[k])


def test_extending_a_finished_run_equals_a_straight_run(tmp_path, straight20):
    out = tmp_path / "ext"
    main([*ARGS, "--steps", "10", "--ckpt-every", "10", "--out", str(out)])
    folder = RunFolder(out)
    first_config = folder.config.read_text()
    main([*ARGS, "--steps", "20", "--ckpt-every", "10", "--out", str(out), "--resume"])
    assert torch.equal(_images(straight20), _images(out))
    # The first half's config stays; the resumed settings are written beside it.
    assert folder.config.read_text() == first_config
    assert load_config(folder.resumed_config(10))["steps"] == 20


def test_checkpoint_interval_does_not_change_the_images(tmp_path, straight20):
    main([*ARGS, "--steps", "20", "--ckpt-every", "3", "--out", str(tmp_path / "c3")])
    assert torch.equal(_images(straight20), _images(tmp_path / "c3"))


class _OverflowCNN(nn.Module):
    """A backbone whose fp16 backward overflows by ``factor``; its LayerNorm runs in fp32 (as on CUDA)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.factor = factor

    def forward(self, x):
        h = Amplify.apply(self.fc(F.gelu(self.conv(x)).mean((2, 3))), self.factor)
        with torch.autocast("cpu", enabled=False):
            return self.norm(h.float())


@pytest.fixture
def overflow_backbones():
    names = {"test_overflow_once": 1e6, "test_overflow_always": 1e15}
    for name, factor in names.items():
        backbones.register_backbone(backbones.BackboneSpec(
            name=name, feature_dim=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resolution=16,
            source="lgm_ray", weights_id="none (test)", ends_in_norm=True,
            build=lambda pretrained, weights, img_size, f=factor: _OverflowCNN(f)))
    yield names
    for name in names:
        registry._REGISTRY.pop(name)


def test_fp16_overflow_backs_off_and_the_images_stay_finite(tmp_path, overflow_backbones):
    summary = main([*FAST, "--backbone", "test_overflow_once", "--amp", "fp16", "--steps", "4",
                    "--out", str(tmp_path / "o")])
    assert summary["skipped_steps"] == 0
    images = _images(tmp_path / "o")
    assert torch.isfinite(images).all() and float(images.std()) > 0


def test_steps_that_stay_non_finite_are_skipped_counted_and_stop_the_run(tmp_path, overflow_backbones, capsys):
    out = tmp_path / "o"
    summary = main([*FAST, "--backbone", "test_overflow_always", "--amp", "fp16", "--steps", "3",
                    "--max-skipped-steps", "5", "--out", str(out)])
    assert summary["skipped_steps"] == 3
    state = _state(out)
    ref = torch.load(RunFolder(out).latest_checkpoint().path / class_file(0), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())
    assert ref["adam_step"] == 0  # no optimiser step was ever applied
    assert "non-finite gradient" in capsys.readouterr().err

    out2 = tmp_path / "o2"
    with pytest.raises(SystemExit) as exc:
        main([*FAST, "--backbone", "test_overflow_always", "--amp", "fp16", "--steps", "20",
              "--ckpt-every", "2", "--max-skipped-steps", "3", "--out", str(out2)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "4 steps had non-finite gradients" in err
    assert _latest_step(out2) == 2  # the last good checkpoint is kept
    assert RunFolder(out2).checkpoint_name(2) in err


def test_distills_from_webdataset_shards(tmp_path):
    from lgm_ray.shards.__main__ import main as shards_main

    root = tmp_path / "shards"
    assert shards_main(["build", "digits", "--out", str(root), "--real-res", "16", "--shard-size", "400"]) == 0
    summary = main([*FAST, "--shards", str(root), "--steps", "3", "--ckpt-every", "2", "--out", str(tmp_path / "o")])
    payload = _payload(tmp_path / "o")
    assert summary["steps"] == 3
    assert payload["class_names"] == [str(i) for i in range(10)]


def test_grey_images_for_grey_datasets(tmp_path):
    main([*FAST, "--steps", "2", "--grey", "--out", str(tmp_path / "g")])
    images = _images(tmp_path / "g")
    assert images.shape[1] == 3
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
    assert float(images.std()) > 0


@pytest.mark.parametrize("param", ["pixel", "pyramid"])
def test_real_init_starts_from_one_real_train_image_per_class(tmp_path, param):
    from lgm_ray.core.synset import REAL_INIT_EPS
    from lgm_ray.distill.loop import real_start
    from lgm_ray.distill.real_batches import DigitsSource
    from lgm_ray.shards.digits import load_digits_split

    # lr ≈ 0: the saved set is its start. Every row must be a real digits train image of its class.
    main([*FAST, "--steps", "1", "--grey", "--param", param, "--init", "real", "--lr", "1e-12",
          "--out", str(tmp_path / "r")])
    payload = _payload(tmp_path / "r")
    images, labels = payload["images"], payload["labels"]
    train_x, train_y = load_digits_split("train", res=16)
    real = train_x.clamp(REAL_INIT_EPS, 1 - REAL_INIT_EPS).mean(dim=1)
    dist = (images[:, 0].flatten(1)[:, None] - real.flatten(1)[None]).abs().amax(dim=2)  # sets × train
    nearest = dist.argmin(dim=1)
    assert float(dist.min(dim=1).values.max()) < 1e-4
    assert torch.equal(train_y[nearest], labels)
    assert len(set(nearest.tolist())) == 10
    # Any split of the classes starts alike, and another seed picks other images.
    cfg = DistillConfig(shards="digits", syn_res=16, real_res=16, ipc=1)
    whole = real_start(DigitsSource(16), cfg, list(range(10)))
    parts = torch.cat([real_start(DigitsSource(16), cfg, part) for part in ([0, 1, 2, 3], [4, 5, 6], [7, 8, 9])])
    assert torch.equal(whole, parts)
    other = real_start(DigitsSource(16), DistillConfig(shards="digits", syn_res=16, real_res=16, seed=1), list(range(10)))
    assert not torch.equal(whole, other)


def test_real_init_changes_the_resume_key(tmp_path, capsys):
    out = tmp_path / "k"
    main([*FAST, "--steps", "2", "--ckpt-every", "1", "--out", str(out)])
    with pytest.raises(SystemExit) as info:
        main([*FAST, "--steps", "4", "--init", "real", "--out", str(out), "--resume"])
    assert info.value.code != 0
    assert "init" in capsys.readouterr().err


def test_choices_and_image_sides_are_core_s_and_the_test_hook_is_no_flag(tmp_path, monkeypatch, capsys):
    from lgm_ray.backbones.frozen import NORMALIZATIONS
    from lgm_ray.core import augment, defaults, matching, synset
    from lgm_ray.distill.config import CHOICES

    assert CHOICES["param"] is synset.PARAMETERISATIONS and CHOICES["init"] is synset.INITS
    assert CHOICES["aug"] is augment.MODES and CHOICES["aug_padding"] is augment.PADDINGS
    assert CHOICES["normalization"] is NORMALIZATIONS and CHOICES["amp"] == tuple(matching.AMP_DTYPES)
    cfg = DistillConfig()
    assert (cfg.real_res, cfg.crop_res, cfg.syn_res) == (defaults.REAL_RES, defaults.CROP_RES, defaults.SYN_RES)
    assert "step_delay" not in DistillConfig.field_names()
    with pytest.raises(SystemExit):
        main([*FAST, "--steps", "1", "--step-delay", "0.1", "--out", str(tmp_path / "flag")])
    assert "unrecognized arguments: --step-delay" in capsys.readouterr().err
    # The hook, from the environment: 3 steps of at least 0.3 s each.
    monkeypatch.setenv(TEST_STEP_DELAY, "0.3")
    summary = main([*FAST, "--steps", "3", "--out", str(tmp_path / "slow")])
    assert summary["steps"] == 3 and summary["seconds"] >= 0.9

"""The evaluation command (python -m lgm_ray.evaluate, lgm_ray.evaluate.__main__): its numbers are the protocol's,
a set's own settings and the flags that override them, flags derived from EvalConfig, one-line input errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_helpers import BACKBONE, cli, notes, scores_by_hand, summary

import lgm_ray.evaluate.feature_cache as fc
from lgm_ray.core.synset import synset_payload
from lgm_ray.evaluate import probe as probe
from lgm_ray.evaluate import protocol as ev
from lgm_ray.evaluate.__main__ import build_parser, main
from lgm_ray.evaluate.config import EvalConfig

# ---------------------------------------------------------------- the protocol's numbers


def test_cli_numbers_are_the_protocols(digits_shards, shards, synset_file, real_set, cache_dir, capsys):
    out, stdout, err = cli(capsys, "--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards,
                           "--epochs", "10", "--seeds", "2", "--cache-dir", cache_dir)
    assert stdout.splitlines()[0].split()[:4] == ["backbone", "training", "set", "split"]
    assert out["seeds"] == [3407, 3408] and out["n_train"] == 10 and out["n_eval"] == shards.count("test")
    assert out["lr"] == pytest.approx(1e-3 * 10 / 256)  # lr = 1e-3 × batch / 256, batch = min(100, n)
    t1 = torch.tensor(out["top1_per_seed"], dtype=torch.float64)
    assert out["top1_mean"] == pytest.approx(float(t1.mean()))
    assert out["top1_std"] == pytest.approx(float(((t1 - t1.mean()) ** 2).mean().sqrt()))  # population std
    # Each seed's numbers, recomputed outside lgm_ray.evaluate.protocol (seed 3407 + k, the test split, the set):
    images, labels, _ = real_set
    for k, seed in enumerate((3407, 3408)):
        by_hand = scores_by_hand(images, labels, shards, seed, epochs=10)
        assert (out["top1_per_seed"][k], out["top5_per_seed"][k]) == (by_hand["top1"], by_hand["top5"])
    assert notes(err) == []  # the set's own settings, no flag overriding them


def test_full_fast_baseline_learns_and_says_its_mode(digits_shards, cache_dir, capsys):
    r, stdout, _ = cli(capsys, "--baseline", "full", "--backbone", BACKBONE, "--shards", digits_shards,
                       "--real-res", "32", "--crop-res", "32", "--epochs", "10", "--seeds", "2",
                       "--cache-dir", cache_dir)
    assert "full (fast)" in stdout
    assert r["full_mode"] == "fast" and r["n_train"] == 1437 and r["batch"] == 128
    assert r["lr"] == pytest.approx(5e-4)
    assert r["top1_mean"] > 70.0  # frozen SimCLR features of all digits: far above chance (10 %)


# ---------------------------------------------------------------- the set's own settings


def test_cli_evaluates_with_the_sets_own_settings(digits_shards, shards, odd_set_file, cache_dir, capsys,
                                                  built_backbones, monkeypatch):
    preprocess: list[tuple[str, int, int]] = []
    real = fc.split_features
    monkeypatch.setattr(fc, "split_features", lambda cache, bb, sh, split, **kw: (
        preprocess.append((split, kw["resize"], kw["crop"])), real(cache, bb, sh, split, **kw))[1])
    out, _, err = cli(capsys, "--synset", odd_set_file, "--backbone", BACKBONE, "--shards", digits_shards,
                      "--epochs", "3", "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "imagenet", 28)]  # the set's normalisation and crop side
    assert preprocess == [("test", 32, 28)]  # test images: resize to the set's real_res, centre-crop crop_res
    assert (out["normalization"], out["real_res"], out["crop_res"], out["syn_res"]) == ("imagenet", 32, 28, 24)
    assert notes(err) == []
    payload = torch.load(odd_set_file, weights_only=True)
    cfg = EvalConfig(epochs=3, seeds=1).replace(**ev.synset_settings(payload, BACKBONE))
    explicit = ev.evaluate_synset(payload["images"], payload["labels"], BACKBONE, digits_shards, cfg,
                                  cache_dir=cache_dir)
    assert (cfg.normalization, cfg.real_res, cfg.crop_res) == ("imagenet", 32, 28)
    assert summary(out) == summary(explicit)


def test_a_flag_that_overrides_the_set_says_so(digits_shards, odd_set_file, cache_dir, capsys, built_backbones):
    out, _, err = cli(capsys, "--synset", odd_set_file, "--backbone", BACKBONE, "--shards", digits_shards,
                      "--crop-res", "32", "--real-res", "32", "--normalization", "native", "--epochs", "1",
                      "--seeds", "1", "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "native", 32)]
    assert out["crop_res"] == 32 and out["normalization"] == "native"
    said = notes(err)
    assert len(said) == 2  # --real-res 32 equals the set's: no note
    assert f"--normalization native overrides normalization=imagenet of {odd_set_file}" in said[0]
    assert said[0].endswith("using native")
    assert f"--crop-res 32 overrides crop_res=28 of {odd_set_file}" in said[1] and said[1].endswith("using 32")


def test_reference_format_set_uses_flags_or_defaults_and_says_so(digits_shards, real_set, tmp_path, cache_dir,
                                                                 capsys, built_backbones):
    images, labels, _ = real_set
    path = tmp_path / "reference.pt"
    torch.save({"images": images, "labels": labels}, path)
    out, _, err = cli(capsys, "--synset", str(path), "--backbone", BACKBONE, "--shards", digits_shards,
                      "--real-res", "32", "--crop-res", "32", "--epochs", "1", "--seeds", "1",
                      "--cache-dir", cache_dir)
    assert built_backbones == [(BACKBONE, "native", 32)]
    assert [n.split(": note: ")[1] for n in notes(err)] == [
        f"{path} holds no distillation config (reference format): evaluating with real_res/crop_res/"
        "normalization from flags or the defaults 256/224/native"]


# ---------------------------------------------------------------- flags from EvalConfig


def test_every_setting_is_a_flag_with_its_type_choices_and_default():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for name, default in EvalConfig.defaults().items():
        action = by_dest[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")  # (and --no-raw-output)
        assert action.default is None  # not given: the set's own, else EvalConfig's default
        shown = "none" if default is None else default
        assert EvalConfig.help(name) in action.help and f"{shown})" in action.help
        if name in EvalConfig.CHOICES:
            assert action.metavar == "{" + ",".join(EvalConfig.CHOICES[name]) + "}"
    args = parser.parse_args(["--backbone", BACKBONE, "--shards", "s", "--no-raw-output", "--epochs", "7"])
    assert (args.raw_output, args.epochs, args.seeds) == (False, "7", None)


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--full-mode {fast,reference}" in text and "--crop-res N " in text and "--raw-output" in text
    assert "--epochs N|none" in text and "(default: the set's, else 224)" in " ".join(text.split())


# ---------------------------------------------------------------- clear errors


def _bad_synset(tmp_path: Path, labels, **extra) -> str:
    path = tmp_path / "bad.pt"
    torch.save(synset_payload(torch.rand(len(labels), 3, 32, 32), torch.tensor(labels), **extra), path)
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_synset", "does not exist; pass the synset.pt written by `python -m lgm_ray.distill`"),
        ("not_a_synset", "is not a synthetic set: expected a dict with 'images'"),
        ("missing_shards", "does not exist; build it first, e.g. `python -m lgm_ray.shards build digits"),
        ("damaged_shards", "does not match its manifest"),
        ("unknown_backbone", "unknown backbone 'vit_nope'; use one of the known backbones: "),
        ("split_missing", "have no 'val' split (non-empty splits: train, test); hold one out of train with "
                          "`python -m lgm_ray.shards build SOURCE --out DIR --val-fraction 0.1`"),
        ("neighbors_without_synset", "--baseline neighbors needs --synset"),
        ("labels_outside", "labels [10, 11] outside the shards' classes 0…9; evaluate it against the shards"),
        ("class_names", "class_names differ from the shards manifest's"),
        ("nothing", "nothing to evaluate: give a synthetic set (--synset) or --baseline"),
        ("weights_missing", "weights file"),
        ("bad_split", "--split: 'vall' is not one of val, test (did you mean 'val'?)"),
        ("bad_epochs", "--epochs: expected an integer, got 'ten'"),
        ("zero_seeds", "--seeds: expected a positive integer, got 0"),
        ("bad_normalization", "--normalization: 'imagenett' is not one of native, imagenet"),
        ("unknown_flag", "unrecognized arguments: --epoch-count"),
        ("bad_baseline", "argument --baseline: invalid choice: 'randm'"),
        ("no_backbone", "the following arguments are required: --backbone"),
    ],
)
def test_bad_inputs_fail_with_one_clear_line(case, expected, digits_shards, tmp_path, capsys):
    args = {"--backbone": BACKBONE, "--shards": digits_shards, "--real-res": "32", "--crop-res": "32"}
    extra: list[str] = []
    if case == "missing_synset":
        args["--synset"] = str(tmp_path / "nope.pt")
    elif case == "not_a_synset":
        torch.save({"pixels": torch.zeros(2)}, tmp_path / "odd.pt")
        args["--synset"] = str(tmp_path / "odd.pt")
    elif case == "missing_shards":
        args["--baseline"], args["--shards"] = "random", str(tmp_path / "no_shards")
    elif case == "damaged_shards":
        copy = tmp_path / "damaged"
        shutil.copytree(digits_shards, copy)
        tar = copy / "test-000000.tar"
        tar.write_bytes(tar.read_bytes()[:1000])
        args["--baseline"], args["--shards"] = "random", str(copy)
    elif case == "unknown_backbone":
        args["--baseline"], args["--backbone"] = "random", f"{BACKBONE},vit_nope"
    elif case == "split_missing":
        args["--baseline"], args["--split"] = "random", "val"
    elif case == "neighbors_without_synset":
        args["--baseline"] = "neighbors"
    elif case == "labels_outside":
        args["--synset"] = _bad_synset(tmp_path, [0, 10, 11])
    elif case == "class_names":
        args["--synset"] = _bad_synset(tmp_path, list(range(10)), class_names=list("abcdefghij"))
    elif case == "weights_missing":
        args["--baseline"], args["--weights"] = "random", str(tmp_path / "nope_weights.pt")
    elif case == "bad_split":
        args["--baseline"], args["--split"] = "random", "vall"
    elif case == "bad_epochs":
        args["--baseline"], args["--epochs"] = "random", "ten"
    elif case == "zero_seeds":
        args["--baseline"], args["--seeds"] = "random", "0"
    elif case == "bad_normalization":
        args["--baseline"], args["--normalization"] = "random", "imagenett"
    elif case == "unknown_flag":
        args["--baseline"], extra = "random", ["--epoch-count", "3"]
    elif case == "bad_baseline":
        args["--baseline"] = "randm"
    elif case == "no_backbone":
        del args["--backbone"]
    argv = [x for kv in args.items() for x in kv] + extra
    argv += [] if case in ("bad_epochs", "zero_seeds") else ["--epochs", "1", "--seeds", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("error: ") and expected in line
    if case == "unknown_backbone":
        assert BACKBONE in line  # the known ones are listed


def test_internal_errors_are_not_dressed_up_as_usage_errors(digits_shards, synset_file, cache_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(probe, "train_probe_on_images", broken)
    with pytest.raises(ValueError, match="an internal bug"):  # a traceback, not exit status 2
        main(["--synset", synset_file, "--backbone", BACKBONE, "--shards", digits_shards, "--epochs", "1",
              "--seeds", "1", "--cache-dir", cache_dir])


def test_the_module_runs_as_a_command_and_exits_2_on_a_bad_value(digits_shards):
    done = subprocess.run([sys.executable, "-m", "lgm_ray.evaluate", "--baseline", "random", "--backbone",
                           BACKBONE, "--shards", digits_shards, "--full-mode", "quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "error: --full-mode: 'quick' is not one of fast, reference"

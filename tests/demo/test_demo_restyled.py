"""The digits-only stand-in for other handwriting (``benchmarks/demo_table.py --data restyled``).

It must look like another set's digits — pen-sharp strokes inside a black margin at 28 px — and keep
the digits' split: the backbones held ``val`` out of pre-training, so it is the stand-in's test split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import demo_table  # noqa: E402

from lgm_ray.shards.digits import load_digits_split  # noqa: E402


def _grey_share(x: torch.Tensor) -> float:
    """Of the inked pixels, the share that is neither near-black nor near-white (soft edges)."""
    ink = x[x > 0.05]
    return float(((ink > 0.1) & (ink < 0.9)).float().mean())


def test_restyle_draws_sharp_strokes_inside_a_margin() -> None:
    x8, _ = load_digits_split("val", res=8, val_fraction=0.2)
    x8 = x8[:, :1]
    r = demo_table.restyle(x8)
    assert r.shape == (len(x8), 1, 28, 28)
    assert r.min() >= 0 and r.max() <= 1
    assert r[..., :3, :].abs().max() < 0.02 and r[..., -3:, :].abs().max() < 0.02  # a black margin
    assert r[..., :, :3].abs().max() < 0.02 and r[..., :, -3:].abs().max() < 0.02
    smooth = F.interpolate(x8, size=(28, 28), mode="bilinear", align_corners=False)
    assert _grey_share(r) < 0.7 * _grey_share(smooth)  # inked: fewer soft grey pixels than the upsampling
    # still the same digit: back on the 8×8 grid (the digit's box, 3.5–24.5 px, read at 8×8), each
    # restyled image is nearer its own original than any other image of the batch is
    back = F.adaptive_avg_pool2d(r[..., 3:25, 3:25], 8).flatten(1)
    orig = x8.flatten(1)
    back, orig = back - back.mean(1, keepdim=True), orig - orig.mean(1, keepdim=True)
    corr = F.normalize(back, dim=1) @ F.normalize(orig, dim=1).T
    assert float((corr.argmax(1) == torch.arange(len(x8))).float().mean()) > 0.9


def test_restyled_folder_keeps_the_digits_split(tmp_path) -> None:
    folder = demo_table.restyled_folder(tmp_path / "restyled", 0.2)
    n_train = len(load_digits_split("train", res=8, val_fraction=0.2)[1])
    n_val = len(load_digits_split("val", res=8, val_fraction=0.2)[1])
    assert sorted(p.name for p in (folder / "train").iterdir()) == [str(c) for c in range(10)]
    assert len(list((folder / "train").glob("*/*.png"))) == n_train
    assert len(list((folder / "test").glob("*/*.png"))) == n_val  # digits val: held out of pre-training
    assert (folder / ".complete").is_file()

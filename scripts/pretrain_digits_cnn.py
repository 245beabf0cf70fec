"""Pre-train the shipped ``DigitsCNN`` backbone with SimCLR on the digits train split.

SimCLR (Chen et al., ICML 2020): two random augmentations of each image, a projection MLP on the
backbone's features, and the NT-Xent loss pulling the two views of an image together against every
other view in the batch. Labels are never used in training; they only score the frozen features
with a linear probe at the end. The projection head is discarded; the backbone's ``state_dict`` is
written to ``--out``.

    python scripts/pretrain_digits_cnn.py --epochs 40 --seed 0

Augmentations cover what the distillation and the probes apply downstream: random resized crops
(area 0.08–1, the paper's range),
horizontal flips, small rotations and translations, brightness/contrast jitter and Gaussian noise.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.digits import load_digits_split
from lgm_ray.models.digits_cnn import DIGITS_CNN_MEAN, DIGITS_CNN_STD, DIGITS_CNN_WEIGHTS, DigitsCNN

RES = 32


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    # 0.08 is the crop range of the paper's augmentation, which both the distillation and the probe
    # apply: with 0.3 the features of small crops were off-distribution and the distilled demo set
    # only tied the centroid baseline (README, "Demo").
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest crop area fraction of the views")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=DIGITS_CNN_WEIGHTS)
    return p.parse_args(argv)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the input range ``DigitsCNN`` expects."""
    mean = torch.tensor(DIGITS_CNN_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_CNN_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.08) -> torch.Tensor:
    """One random SimCLR view per image, batched.

    Crop, aspect ratio, flip, rotation and translation are composed into a single affine sampling
    grid per image, so the whole batch is resampled with one ``grid_sample`` call.

    Args:
        x: float N×3×H×W images in [0, 1].
        gen: the random generator (keeps runs reproducible).

    Returns:
        float N×3×H×W augmented images, normalised for ``DigitsCNN``.
    """
    n = x.shape[0]
    area = _uniform(n, min_scale, 1.0, gen)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)
    sy = (area / ratio).sqrt().clamp(max=1.0)
    # The crop stays inside the image; a small extra shift then translates the content itself.
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx) + _uniform(n, -0.1, 0.1, gen)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy) + _uniform(n, -0.1, 0.1, gen)
    angle = _uniform(n, -15.0, 15.0, gen) * math.pi / 180
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [
            torch.stack([sx * cos * flip, -sx * sin, cx], dim=1),
            torch.stack([sy * sin * flip, sy * cos, cy], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Zero padding is the digits' own black background.
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    contrast = _uniform(n, 0.6, 1.4, gen).view(n, 1, 1, 1)
    brightness = _uniform(n, -0.2, 0.2, gen).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean + brightness).clamp(0.0, 1.0)
    noise_std = _uniform(n, 0.0, 0.1, gen).view(n, 1, 1, 1)
    out = out + noise_std * torch.randn(out.shape, generator=gen)
    return normalize(out)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of SimCLR: each view must pick its partner among the other 2N - 1 views.

    Args:
        z1: N×D projections of the first views.
        z2: N×D projections of the second views, row i paired with row i of ``z1``.
        temperature: softmax temperature of the cosine similarities.

    Returns:
        The mean loss, a scalar.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Frozen features of un-augmented images in [0, 1]."""
    model.eval()
    return torch.cat(
        [model(normalize(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    )


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> tuple[float, float]:
    """Fit a logistic-regression probe on frozen features.

    Returns:
        ``(train top-1, test top-1)``.
    """
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=5000)
    clf.fit(train_x.numpy(), train_y.numpy())
    train_acc = clf.score(train_x.numpy(), train_y.numpy())
    test_acc = clf.score(test_x.numpy(), test_y.numpy())
    return float(train_acc), float(test_acc)


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up for ``warmup`` steps, then a cosine decay to 0 at ``total``."""
    warmup = max(1, min(warmup, total // 2))
    decay = max(1, total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))

    return factor


def main(argv: Sequence[str] | None = None) -> float:
    """Pre-train, save the backbone weights, and report the linear-probe accuracy.

    Args:
        argv: command-line arguments without the program name.

    Returns:
        The linear probe's test top-1.
    """
    args = parse_args(argv)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    images, _ = load_digits_split("train", res=RES)  # labels are not touched while training
    if not 2 <= args.batch_size <= len(images):
        raise SystemExit(f"--batch-size must be in [2, {len(images)}]")
    model = DigitsCNN()
    head = nn.Sequential(
        nn.Linear(model.feature_dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Linear(256, 64)
    )
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(images) // args.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total=args.epochs * steps_per_epoch, warmup=steps_per_epoch)
    )

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        head.train()
        perm = torch.randperm(len(images), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = images[perm[step * args.batch_size : (step + 1) * args.batch_size]]
            v1, v2 = augment(batch, gen, args.min_scale), augment(batch, gen, args.min_scale)
            z = head(model(torch.cat([v1, v2])))
            loss = nt_xent(z[: len(batch)], z[len(batch) :], args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        print(
            f"epoch {epoch + 1:3d}/{args.epochs}  loss {running / steps_per_epoch:.4f}  "
            f"{time.perf_counter() - start:6.1f} s",
            flush=True,
        )
    train_time = time.perf_counter() - start

    model.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)

    test_images, test_labels = load_digits_split("test", res=RES)
    _, train_labels = load_digits_split("train", res=RES)
    train_acc, test_acc = linear_probe(
        embed(model, images), train_labels, embed(model, test_images), test_labels
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining: {train_time:.1f} s, {n_params:,} backbone parameters")
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print(f"linear probe top-1: train {train_acc:.4f}  test {test_acc:.4f}")
    return test_acc


if __name__ == "__main__":
    main()

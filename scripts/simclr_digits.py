"""SimCLR pre-training of a demo backbone on the digits train split: the loop the scripts share.

``scripts/pretrain_digits_vit.py`` and ``scripts/pretrain_digits_mixer.py`` call :func:`main` with
their architecture; the augmentation, the NT-Xent loss, the schedule and the probe are those of
``scripts/pretrain_digits_cnn.py`` (imported, not copied), so every demo backbone is trained the
same way: two random views of each image (random resized crops of 8–100 % of the area — the paper's
range, which the distillation and the probe apply downstream — flips, small rotations and shifts,
contrast/brightness jitter, Gaussian noise), a projection MLP, and the NT-Xent loss. The CNN and the
ViT also see zoomed-out views (``--max-scale 2``: up to twice the area, the digit shrunk inside a
black frame): chosen on the val split, where it raised the distilled sets' margins
(``benchmarks/results/demo_settings_val.txt``); the mixer kept 100 %, which scored better there.
The NT-Xent temperature is 0.2 for the ViT, 0.1 for the mixer and 0.05 for the CNN (80 epochs):
also chosen on val, where a lower temperature took the centroid images further from the full-data
probe than the distilled sets, and widened distilled − centroids (the demo config, un-augmented real
views: CNN +1.5 → +9.6, mixer +3.1 → +5.6). ``--stroke P`` (thicker or thinner strokes in a share
``P`` of the views) is off in the shipped recipes: with 0.5 the features carried better to digits
drawn otherwise (``benchmarks/style_shift.py``), but the distilled sets' margins over centroids
shrank on digits and those over random on MNIST-5k did not grow (the fourth search in that file).

Labels are never used in training. The images are the digits *train* split with the validation
images held out (``--val-fraction``, the carve of ``lgm_ray.shards.digits.load_digits_split``), so the
``val`` split stays unseen by the backbones as well as by the settings tuned on it. At the end the
projection head is dropped, the backbone's ``state_dict`` is written to ``--out``, and a
logistic-regression probe on frozen features (fit on the full train split, 1,437 images, scored on
test) reports the features' quality.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.backbones.shipped import DIGITS_MEAN, DIGITS_STD
from lgm_ray.shards.digits import load_digits_split

RES = 32


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Map images in [0, 1] to the input range ``DigitsCNN`` expects."""
    mean = torch.tensor(DIGITS_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def vary_stroke(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Thicker or thinner strokes, as other pens and writers draw them.

    Each image is dilated (3×3 grey max filter: bright strokes one pixel wider each side) with
    probability ``p / 2``, eroded (3×3 min filter: one pixel narrower) with probability ``p / 2``,
    and kept otherwise. ``p == 0`` returns ``x`` without drawing from ``gen``, so runs without it
    reproduce those made before it existed.
    """
    if p <= 0:
        return x
    n = x.shape[0]
    u = torch.rand(n, generator=gen).view(n, 1, 1, 1)
    thick = F.max_pool2d(x, 3, stride=1, padding=1)
    thin = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(u < p / 2, thick, torch.where(u < p, thin, x))


def augment(x: torch.Tensor, gen: torch.Generator, min_scale: float = 0.08, jitter: float = 0.2,
            max_scale: float = 1.0, stroke: float = 0.0) -> torch.Tensor:
    """One random SimCLR view per image, batched.

    Crop, aspect ratio, flip, rotation and translation are composed into a single affine sampling
    grid per image, so the whole batch is resampled with one ``grid_sample`` call.

    Args:
        x: float N×3×H×W images in [0, 1].
        gen: the random generator (keeps runs reproducible).
        min_scale: smallest crop area fraction.
        max_scale: largest crop area fraction; above 1 the view zooms out (the digit shrinks inside a
            larger black frame, as MNIST-style digits sit in theirs).
        stroke: probability that a view's strokes are made thicker or thinner before the crop
            (:func:`vary_stroke`).
        jitter: brightness shift ±``jitter`` and contrast factor 1 ± 2·``jitter`` (0: none). Without it
            the features were worse (ViT probe 85.6 % instead of 94.4 %) and the CNN's distilled set
            no more legible (``benchmarks/results/demo_settings_val.txt``).

    Returns:
        float N×3×H×W augmented images, normalised for ``DigitsCNN``.
    """
    n = x.shape[0]
    x = vary_stroke(x, gen, stroke)
    area = _uniform(n, min_scale, max_scale, gen)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), gen)
    ratio = log_ratio.exp()
    side = max(1.0, max_scale ** 0.5)
    sx = (area * ratio).sqrt().clamp(max=side)
    sy = (area / ratio).sqrt().clamp(max=side)
    # A crop stays inside the image (a zoomed-out view around it, the image inside the view); a small
    # extra shift then translates the content itself.
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

    if jitter > 0:
        contrast = _uniform(n, 1 - 2 * jitter, 1 + 2 * jitter, gen).view(n, 1, 1, 1)
        brightness = _uniform(n, -jitter, jitter, gen).view(n, 1, 1, 1)
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


def parse_args(argv: Sequence[str] | None, *, description: str, out: Path, epochs: int, lr: float,
               batch_size: int = 256, temperature: float = 0.3, weight_decay: float = 0.05,
               warmup_epochs: int = 10, clip: float = 3.0, max_scale: float = 1.0,
               stroke: float = 0.0) -> argparse.Namespace:
    """The shared command line; each script passes its own defaults.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.
        description: the script's one-line description.
        out, epochs, lr, batch_size, temperature, weight_decay, warmup_epochs, clip, max_scale, stroke: the
            script's defaults.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=warmup_epochs)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=clip, help="gradient-norm clip (0: none)")
    p.add_argument("--min-scale", type=float, default=0.08, help="smallest crop area fraction of the views")
    p.add_argument("--max-scale", type=float, default=max_scale,
                   help="largest crop area fraction; > 1 zooms out (the digit shrinks in its frame)")
    p.add_argument("--stroke", type=float, default=stroke,
                   help="probability of a thicker or thinner stroke in a view (0: none)")
    p.add_argument("--jitter", type=float, default=0.2,
                   help="brightness ±J and contrast 1 ± 2J jitter of the views (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="fraction of every class held out of train as the val split, never trained on")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--out", type=Path, default=out)
    return p.parse_args(argv)


def train(model: nn.Module, images: torch.Tensor, args: argparse.Namespace) -> nn.Module:
    """SimCLR on ``images`` (N×3×32×32 in [0, 1], no labels); returns the trained backbone in eval mode."""
    gen = torch.Generator().manual_seed(args.seed)
    head = nn.Sequential(nn.Linear(model.feature_dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
                         nn.Linear(256, 64))
    params = [*model.parameters(), *head.parameters()]
    # No weight decay on norms, biases and position embeddings (the usual ViT recipe).
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != 1]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != 1)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(images) // args.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total=args.epochs * steps_per_epoch, warmup=args.warmup_epochs * steps_per_epoch))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        head.train()
        perm = torch.randperm(len(images), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = images[perm[step * args.batch_size : (step + 1) * args.batch_size]]
            v1, v2 = (augment(batch, gen, args.min_scale, args.jitter, args.max_scale, args.stroke)
                      for _ in range(2))
            z = head(model(torch.cat([v1, v2])))
            loss = nt_xent(z[: len(batch)], z[len(batch) :], args.temperature)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"non-finite loss at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                nn.utils.clip_grad_norm_(params, args.clip)
            opt.step()
            sched.step()
            running += loss.item()
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {running / steps_per_epoch:.4f}  "
              f"{time.perf_counter() - start:6.1f} s", flush=True)
    return model.eval()


def main(argv: Sequence[str] | None, build: Callable[[], nn.Module], **defaults: object) -> float:
    """Pre-train ``build()``, save its weights, and report the linear-probe accuracy.

    Args:
        argv: command-line arguments without the program name.
        build: returns the untrained backbone (with a ``feature_dim`` attribute).
        **defaults: :func:`parse_args`'s keyword defaults (``description``, ``out``, ``epochs``, ``lr``, …).

    Returns:
        The linear probe's test top-1 (a fraction).
    """
    args = parse_args(argv, **defaults)
    if args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, _ = load_digits_split("train", res=RES, val_fraction=args.val_fraction)  # labels unused
    if not 2 <= args.batch_size <= len(images):
        raise SystemExit(f"--batch-size must be in [2, {len(images)}]")
    model = build()
    t0, c0 = time.perf_counter(), time.process_time()
    train(model, images, args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    full_x, full_y = load_digits_split("train", res=RES)
    test_x, test_y = load_digits_split("test", res=RES)
    train_acc, test_acc = linear_probe(embed(model, full_x), full_y, embed(model, test_x), test_y)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining: {wall:.1f} s wall, {cpu:.1f} s CPU ({args.threads} threads, {platform.processor() or '?'}), "
          f"{len(images)} train images (val_fraction {args.val_fraction}), seed {args.seed}, "
          f"{n_params:,} backbone parameters")
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    print(f"linear probe (sklearn logistic regression, full train split → test) top-1: "
          f"train {train_acc:.4f}  test {test_acc:.4f}")
    return test_acc

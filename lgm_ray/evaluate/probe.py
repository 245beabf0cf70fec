"""The linear probe of the evaluation protocol, in pure torch (no Ray, no file I/O).

The paper and its reference implementation evaluate a training set (distilled or real) by training a
fresh linear head on a frozen backbone's features and testing it on the held-out split (docs/design.md §1):

* head ``W`` (classes × features) ~ N(0, 0.01²), ``b`` = 0 (:func:`lgm_ray.core.matching.draw_head`);
* Adam, lr ``1e-3 × batch / 256``, no weight decay, cosine schedule over every step
  (epochs × batches per epoch), one scheduler step per optimiser step;
* batch ``min(100, n)``, reshuffled every epoch; 1,000 epochs;
* every epoch the training images are augmented afresh (flip + random resized crop, no noise) and
  their features recomputed through the frozen backbone;
* test: top-1 and top-k accuracy (k = ``min(5, classes)``) in percent; seeds ``3407 + k``; mean ±
  **population** std over the seeds.

The reference divides its learning rate by the number of GPUs, so its numbers depend on the machine;
here the learning rate is a function of the batch alone (:func:`probe_lr`).

Every random choice of one probe run (head init, shuffling, augmentation) comes from one
``torch.Generator`` seeded with the run's seed, used in a fixed order, so the same inputs give the
same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.core.augment import AugSpec, augment
from lgm_ray.core.defaults import CROP_RES
from lgm_ray.core.matching import draw_head

BASE_LR = 1e-3
LR_REFERENCE_BATCH = 256
MAX_BATCH = 100
EVAL_SEED_BASE = 3407
DEFAULT_EPOCHS = 1000
INIT_STD = 0.01

FeatureBatches = Callable[[int, torch.Generator], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def probe_lr(batch: int, base_lr: float = BASE_LR) -> float:
    """The probe's peak learning rate, ``base_lr × batch / 256`` (the linear scaling rule).

    Deliberately a function of the batch only: the reference also divides by the number of GPUs,
    which makes its results depend on the machine (docs/design.md §1, faults).
    """
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    return base_lr * batch / LR_REFERENCE_BATCH


def default_batch(n: int) -> int:
    """The reference's probe batch: ``min(100, n)``."""
    return max(1, min(MAX_BATCH, n))


def eval_seeds(count: int) -> list[int]:
    """The probe seeds of the reference: ``3407 + k`` for ``k < count``."""
    return [EVAL_SEED_BASE + k for k in range(count)]


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 at step 0 to 0 at step ``total`` (the lr multiplier of ``step``)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def summarize(values: Iterable[float]) -> tuple[float, float]:
    """Mean and **population** standard deviation (ddof 0), as the reference reports them."""
    v = torch.tensor(list(values), dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("no values to summarise")
    return float(v.mean()), float(v.std(correction=0))


def init_head(feature_dim: int, num_classes: int, generator: torch.Generator, std: float = INIT_STD) -> nn.Linear:
    """A fresh linear head drawn from ``generator``: ``W ~ N(0, std²)``, ``b = 0``."""
    w, b = draw_head(num_classes, feature_dim, generator, std)
    head = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int]) -> dict[int, float]:
    """Top-k accuracy in percent for each k (k larger than the number of classes is clamped)."""
    out = {}
    num_classes = logits.shape[1]
    for k in ks:
        kk = min(k, num_classes)
        pred = logits.topk(kk, dim=1).indices
        out[k] = 100.0 * int((pred == labels.view(-1, 1)).any(dim=1).sum()) / max(len(labels), 1)
    return out


def shuffled_batches(
    n: int, batch: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches of one epoch: a fresh permutation from ``generator``, the last batch partial."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, batch):
        yield perm[i : i + batch]


def train_head(
    feature_batches: FeatureBatches,
    *,
    feature_dim: int,
    num_classes: int,
    epochs: int,
    steps_per_epoch: int,
    batch: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
    lr_log: list[float] | None = None,
) -> nn.Linear:
    """Train a fresh linear head with the protocol's optimiser and schedule.

    Args:
        feature_batches: ``(epoch, generator) → iterable of (features B×D, labels B)``; it draws its
            shuffling and augmentation from ``generator`` (the head's own, after the init).
        feature_dim, num_classes: head shape.
        epochs, steps_per_epoch: the cosine schedule spans ``epochs × steps_per_epoch`` steps.
        batch: the nominal batch, which sets the learning rate (:func:`probe_lr`).
        generator: seeded generator; draws the head first, then is handed to ``feature_batches``.
        device: where the head trains.
        lr_log: if given, the learning rate of every step is appended (for tests and logs).

    Returns:
        The trained head (on ``device``).
    """
    head = init_head(feature_dim, num_classes, generator).to(device)
    lr = probe_lr(batch)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=0.0)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cosine_factor(step, total))
    head.train()
    for epoch in range(epochs):
        for z, y in feature_batches(epoch, generator):
            if lr_log is not None:
                lr_log.append(opt.param_groups[0]["lr"])
            loss = F.cross_entropy(head(z.to(device).float()), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def train_probe_on_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    backbone: nn.Module,
    *,
    feature_dim: int,
    num_classes: int,
    seed: int,
    epochs: int = DEFAULT_EPOCHS,
    batch: int | None = None,
    crop_res: int = CROP_RES,
    device: str | torch.device = "cpu",
    lr_log: list[float] | None = None,
) -> nn.Linear:
    """The reference protocol on a small image set: augment every epoch, features through the backbone.

    Args:
        images: float N×3×H×W in [0, 1] (any H, W: the random resized crop resamples to ``crop_res``).
        labels: long N.
        backbone: frozen feature extractor (images in [0, 1] → N×D).
        feature_dim, num_classes: head shape.
        seed: the probe seed (``3407 + k``).
        epochs: default 1,000.
        batch: default ``min(100, n)``.
        crop_res: side of the augmented crops fed to the backbone.
        device: where the backbone lives and the head trains.
        lr_log: see :func:`train_head`.
    """
    n = images.shape[0]
    batch = batch or default_batch(n)
    spec = AugSpec(mode="standard", crop_res=crop_res, noise_p=0.0)  # flip + random resized crop only
    x_all = images.to(device).float()
    y_all = labels.to(device).long()

    def feature_batches(epoch: int, g: torch.Generator):
        for idx in shuffled_batches(n, batch, g):
            x = augment(x_all[idx.to(x_all.device)], spec, g)
            with torch.no_grad():
                z = backbone(x)
            yield z, y_all[idx.to(y_all.device)]

    gen = torch.Generator().manual_seed(seed)
    return train_head(
        feature_batches, feature_dim=feature_dim, num_classes=num_classes, epochs=epochs,
        steps_per_epoch=math.ceil(n / batch), batch=batch, generator=gen, device=device, lr_log=lr_log,
    )


def train_probe_on_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    seed: int,
    epochs: int,
    batch: int,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """Train a head on fixed (cached) features: no augmentation, same optimiser and schedule.

    The ``full`` baseline's fast mode: the reference augments the whole training split for 100
    epochs at batch 128, which costs hours; training on cached centre-crop features costs minutes.
    """
    n = features.shape[0]
    z_all = features.to(device).float()
    y_all = labels.to(device).long()

    def feature_batches(epoch: int, g: torch.Generator):
        for idx in shuffled_batches(n, batch, g):
            idx = idx.to(z_all.device)
            yield z_all[idx], y_all[idx]

    gen = torch.Generator().manual_seed(seed)
    return train_head(
        feature_batches, feature_dim=features.shape[1], num_classes=num_classes, epochs=epochs,
        steps_per_epoch=math.ceil(n / batch), batch=batch, generator=gen, device=device,
    )


@torch.no_grad()
def score_head(
    head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, *, chunk: int = 8192
) -> dict[str, float]:
    """Top-1 and top-k (k = ``min(5, classes)``) accuracy in percent of ``head`` on test features."""
    device = head.weight.device
    logits = torch.cat([
        head(features[i : i + chunk].to(device).float()).cpu() for i in range(0, features.shape[0], chunk)
    ])
    acc = topk_accuracy(logits, labels.cpu().long(), (1, 5))
    return {"top1": acc[1], "top5": acc[5], "topk": min(5, logits.shape[1])}


def block_shuffled_batches(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], batch: int, generator: torch.Generator, block: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Re-batch an ordered stream of ``(x, y)`` chunks, shuffled within blocks of ≥ ``block`` samples.

    A split too large to hold in memory (the ``full`` baseline's reference mode) cannot be permuted
    whole; shuffling each block of ``block`` samples (the whole split when it is smaller) is the
    WebDataset-style compromise. Only the last batch of the stream is partial, so an epoch has
    ``ceil(n / batch)`` batches.
    """
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0

    def shuffled() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.cat(xs), torch.cat(ys)
        perm = torch.randperm(len(y), generator=generator)
        return x[perm.to(x.device)], y[perm.to(y.device)]

    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        held += len(y)
        if held >= block:
            x, y = shuffled()
            n_full = len(y) // batch * batch
            for i in range(0, n_full, batch):
                yield x[i : i + batch], y[i : i + batch]
            xs, ys, held = [x[n_full:]], [y[n_full:]], len(y) - n_full
    if held:
        x, y = shuffled()
        for i in range(0, len(y), batch):
            yield x[i : i + batch], y[i : i + batch]


def train_probe_on_stream(
    make_chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    n: int,
    backbone: nn.Module,
    *,
    feature_dim: int,
    num_classes: int,
    seed: int,
    epochs: int,
    batch: int,
    crop_res: int = CROP_RES,
    block: int = 4096,
    device: str | torch.device = "cpu",
) -> nn.Linear:
    """The reference protocol on a streamed split (``n`` images): augmented, features recomputed.

    ``make_chunks()`` opens a fresh ordered pass over the images; each epoch block-shuffles it
    (:func:`block_shuffled_batches`). This is the ``full`` baseline's reference mode (100 epochs,
    batch 128).
    """
    spec = AugSpec(mode="standard", crop_res=crop_res, noise_p=0.0)

    def feature_batches(epoch: int, g: torch.Generator):
        for x, y in block_shuffled_batches(make_chunks(), batch, g, block):
            x = augment(x.to(device).float(), spec, g)
            with torch.no_grad():
                z = backbone(x)
            yield z, y

    gen = torch.Generator().manual_seed(seed)
    return train_head(
        feature_batches, feature_dim=feature_dim, num_classes=num_classes, epochs=epochs,
        steps_per_epoch=math.ceil(n / batch), batch=batch, generator=gen, device=device,
    )

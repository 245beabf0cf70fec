"""The linear-probe protocol's pieces (lgm_ray.probe), on tiny tensors: no shards, no files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lgm_ray import probe


class CountingNet(nn.Module):
    """A frozen tiny feature extractor that records every batch it sees."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.requires_grad_(False)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.conv(x).mean(dim=(2, 3))


def _features(n: int = 30, dim: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    z = torch.randn(n, dim, generator=g) + 3.0 * nn.functional.one_hot(y, dim).float()
    return z, y


def test_lr_is_linear_in_batch_and_only_batch():
    assert probe.probe_lr(256) == pytest.approx(1e-3)
    assert probe.probe_lr(100) == pytest.approx(1e-3 * 100 / 256)
    assert probe.probe_lr(128) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="batch"):
        probe.probe_lr(0)


def test_lr_does_not_depend_on_device_count(monkeypatch):
    """The reference divides the lr by the GPU count; ours must not notice how many devices exist."""
    z, y = _features()

    def run():
        log: list[float] = []
        gen = torch.Generator().manual_seed(3407)
        head = probe.train_head(
            lambda e, g: ((z[i], y[i]) for i in probe.shuffled_batches(len(y), 10, g)),
            feature_dim=4, num_classes=3, epochs=3, steps_per_epoch=3, batch=10, generator=gen, lr_log=log)
        return log, head.weight.detach().clone()

    lr_one, w_one = run()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    lr_eight, w_eight = run()
    assert lr_one[0] == pytest.approx(probe.probe_lr(10))
    assert lr_one == lr_eight
    assert torch.equal(w_one, w_eight)


def test_eval_seeds_and_default_batch():
    assert probe.eval_seeds(5) == [3407, 3408, 3409, 3410, 3411]
    assert probe.default_batch(10) == 10
    assert probe.default_batch(1000) == 100


def test_std_is_population_std():
    mean, std = probe.summarize([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert std == pytest.approx(math.sqrt(1.25))  # the sample std would be sqrt(5/3)
    assert probe.summarize([7.0]) == (7.0, 0.0)


def test_topk_with_fewer_classes_than_five_is_top_all():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [5.0, 0.0, 1.0], [0.0, 9.0, 1.0]])
    labels = torch.tensor([0, 0, 2, 2])
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    scores = probe.score_head(head, logits, labels)
    assert scores["top1"] == pytest.approx(25.0)
    assert scores["topk"] == 3
    assert scores["top5"] == pytest.approx(100.0)
    acc = probe.topk_accuracy(logits, labels, (1, 2))
    assert acc[2] == pytest.approx(75.0)


def test_cosine_schedule_spans_all_steps_and_ends_near_zero():
    z, y = _features(n=25)
    log: list[float] = []
    gen = torch.Generator().manual_seed(0)
    probe.train_head(lambda e, g: ((z[i], y[i]) for i in probe.shuffled_batches(25, 10, g)),
                     feature_dim=4, num_classes=3, epochs=40, steps_per_epoch=3, batch=10, generator=gen,
                     lr_log=log)
    base = probe.probe_lr(10)
    assert len(log) == 40 * math.ceil(25 / 10)
    assert log[0] == pytest.approx(base)
    assert log[len(log) // 2] == pytest.approx(base / 2, rel=0.05)
    assert log[-1] < 1e-3 * base
    assert all(a >= b for a, b in zip(log, log[1:], strict=False))


def test_head_init_is_small_gaussian_and_zero_bias():
    head = probe.init_head(512, 100, torch.Generator().manual_seed(0))
    assert torch.all(head.bias == 0)
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.05)
    again = probe.init_head(512, 100, torch.Generator().manual_seed(0))
    assert torch.equal(head.weight, again.weight)


def test_probe_on_images_augments_every_epoch_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(6, 3, 12, 12, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])

    def run(seed: int):
        net = CountingNet()
        head = probe.train_probe_on_images(images, labels, net, feature_dim=6, num_classes=3, seed=seed,
                                           epochs=4, batch=4, crop_res=8)
        return net, head.weight.detach().clone()

    net, w = run(3407)
    assert len(net.inputs) == 4 * 2  # features recomputed for every batch of every epoch
    assert net.inputs[0].shape[-1] == 8  # random resized crop to crop_res
    assert not torch.equal(net.inputs[0], net.inputs[2])  # fresh augmentation (and order) each epoch
    net2, w2 = run(3407)
    assert torch.equal(w, w2)
    assert all(torch.equal(a, b) for a, b in zip(net.inputs, net2.inputs, strict=True))
    _, w3 = run(3408)
    assert not torch.equal(w, w3)


def test_probe_on_features_learns_separable_data():
    z, y = _features(n=60)
    head = probe.train_probe_on_features(z, y, num_classes=3, seed=3407, epochs=200, batch=16)
    assert probe.score_head(head, z, y)["top1"] > 90.0


def test_block_shuffled_batches_cover_everything_once():
    x = torch.arange(23).float().view(-1, 1)
    chunks = [(x[i : i + 5], x[i : i + 5, 0].long()) for i in range(0, 23, 5)]
    out = list(probe.block_shuffled_batches(chunks, 4, torch.Generator().manual_seed(0), block=8))
    assert len(out) == math.ceil(23 / 4)
    assert [len(b[1]) for b in out[:-1]] == [4] * (len(out) - 1)
    seen = torch.cat([b[1] for b in out])
    assert sorted(seen.tolist()) == list(range(23))
    assert seen.tolist() != list(range(23))
    again = list(probe.block_shuffled_batches(chunks, 4, torch.Generator().manual_seed(0), block=8))
    assert torch.equal(seen, torch.cat([b[1] for b in again]))

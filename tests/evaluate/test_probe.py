"""The linear-probe protocol's pieces (lgm_ray.evaluate.probe), on tiny tensors: no shards, no files."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lgm_ray.evaluate import probe as probe


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


def test_lr_is_linear_in_batch_and_only_batch():
    assert probe.probe_lr(256) == pytest.approx(1e-3)
    assert probe.probe_lr(100) == pytest.approx(1e-3 * 100 / 256)
    assert probe.probe_lr(128) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="batch"):
        probe.probe_lr(0)


def test_lr_follows_the_batch_rule_and_the_cosine_at_every_step():
    """lr of step t = 1e-3 × batch / 256 × ½(1 + cos(π t / T)), T = epochs × ceil(n / batch), by hand."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(25, 3, 8, 8, generator=g), torch.arange(25) % 3
    for batch, epochs in ((10, 4), (25, 3)):
        log: list[float] = []
        probe.train_probe_on_images(images, labels, CountingNet(), feature_dim=6, num_classes=3, seed=3407,
                                    epochs=epochs, batch=batch, crop_res=8, lr_log=log)
        total = epochs * math.ceil(25 / batch)
        expected = [1e-3 * batch / 256 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
        assert log == pytest.approx(expected, rel=1e-12, abs=1e-18)


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


def _toy(n: int, seed: int, classes: int = 10, dim: int = 16):
    """Features of a known-separable problem: class c sits at 8·e_c, plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return torch.randn(n, dim, generator=g) + 8.0 * nn.functional.one_hot(y, dim).float(), y


def test_probe_separates_a_separable_problem_and_is_at_chance_without_signal():
    z_train, y_train = _toy(400, seed=0)
    z_test, y_test = _toy(1000, seed=1)  # held out: drawn apart from the training features
    kw = {"num_classes": 10, "seed": 3407, "epochs": 100, "batch": 50}
    head = probe.train_probe_on_features(z_train, y_train, **kw)
    assert probe.score_head(head, z_test, y_test)["top1"] == pytest.approx(100.0, abs=0.5)
    # Labels shuffled on both sides: they say nothing about the features, so any head scores chance
    # (10 %, binomial std 0.95 % over 1,000 test samples).
    g = torch.Generator().manual_seed(5)
    head = probe.train_probe_on_features(z_train, y_train[torch.randperm(400, generator=g)], **kw)
    assert probe.score_head(head, z_test, y_test[torch.randperm(1000, generator=g)])["top1"] == pytest.approx(
        10.0, abs=4.0)


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

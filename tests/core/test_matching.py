"""The first-order step equals the reference second-order formulation, sharded or not."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from overflow import Amplify
from torch import nn

from lgm_ray.core.augment import AugSpec, sample_params
from lgm_ray.core.matching import (
    SynPass,
    derive_seed,
    draw_head,
    head_grad,
    lgm_step,
    meta_loss_and_grad,
    real_grad,
    shard_views,
    view_layout,
)
from lgm_ray.core.reference import reference_step
from lgm_ray.core.synset import SyntheticSet


class TinyNet(nn.Module):
    """A small conv net ending in a LayerNorm, like the real backbones."""

    def __init__(self, dim: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, dim)
        self.norm = nn.LayerNorm(dim)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.norm(self.fc(x.mean((2, 3))))


SPEC = AugSpec(mode="standard", crop_res=12)


def _setup(num_classes: int, ipc: int, augs: int, seed: int = 0):
    torch.manual_seed(seed)
    net = TinyNet()
    g = torch.Generator().manual_seed(seed)
    syn = SyntheticSet(num_classes, ipc, res=16, param="pyramid", start_levels=3, seed=seed)
    n_real = 2 * num_classes * ipc
    x_real = torch.rand(n_real, 3, 16, 16, generator=g)
    y_real = torch.randint(0, num_classes, (n_real,), generator=g)
    w, b = draw_head(num_classes, 24, g)
    b = b + 0.01 * torch.randn(num_classes, generator=g)  # a non-zero bias exercises its column too
    real_params = sample_params(n_real, SPEC, g)
    syn_params = sample_params(syn.num_images * augs, SPEC, g)
    return net, syn, x_real, y_real, w, b, real_params, syn_params


def _reference_grads(net, syn, x_real, y_real, w, b, real_params, syn_params, augs):
    """docs/design.md §1: autograd through the whole batch with create_graph=True (second order)."""
    syn.zero_grad()
    loss = reference_step(net, syn.render(), syn.labels, augs, syn_params, x_real, y_real, real_params, SPEC, w, b)
    return loss, [p.grad.clone() for p in syn.parameters()]


def _lgm_grads(net, syn, x_real, y_real, w, b, real_params, syn_params, augs, micro_batch=None, shards=None):
    syn.zero_grad()
    total = syn.num_images * augs
    g_real = real_grad(net, x_real, y_real, w, b, len(y_real), SPEC, real_params, micro_batch=micro_batch)
    shards = shards or [list(range(syn.num_classes))]
    passes = []
    g_syn = 0
    for classes in shards:
        owned = torch.tensor([c * syn.ipc + k for c in classes for k in range(syn.ipc)])
        rows, local = shard_views(owned, syn.num_images, augs)
        images = syn.render()[owned]
        p = SynPass(net, images, syn.labels[owned], local, syn_params.select(rows), SPEC, micro_batch=micro_batch)
        g_syn = g_syn + p.forward(w, b, total)
        passes.append(p)
    loss, g = meta_loss_and_grad(g_real, g_syn)
    for p in passes:
        p.backward(w, b, total, g)
    return loss, [p.grad.clone() for p in syn.parameters()]


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).norm() ** 2) for x, y in zip(a, b, strict=True)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in b) ** 0.5
    return num / den


@pytest.mark.parametrize("num_classes,ipc", [(2, 1), (3, 2), (5, 1), (4, 2)])
@pytest.mark.parametrize("micro_batch", [None, 3])
def test_step_matches_reference_formulation(num_classes, ipc, micro_batch):
    augs = 3
    args = _setup(num_classes, ipc, augs)
    ref_loss, ref = _reference_grads(*args, augs)
    loss, ours = _lgm_grads(*args, augs, micro_batch=micro_batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert all(float(r.norm()) > 0 for r in ref)
    assert _rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("shards", [[[0], [1, 2, 3, 4]], [[0, 2], [1, 3], [4]], [[4], [3], [2], [1], [0]]])
def test_class_shards_sum_to_the_same_step(shards):
    augs = 2
    args = _setup(5, 2, augs, seed=1)
    _, whole = _lgm_grads(*args, augs)
    _, split = _lgm_grads(*args, augs, shards=shards)
    _, split_mb = _lgm_grads(*args, augs, micro_batch=2, shards=shards)
    assert _rel_err(split, whole) < 1e-5
    assert _rel_err(split_mb, whole) < 1e-5


def test_head_grad_partial_sums_equal_batch_gradient():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(10, 7, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    w, b = draw_head(4, 7, g)
    full = head_grad(z, y, w, b, 10)
    parts = head_grad(z[:3], y[:3], w, b, 10) + head_grad(z[3:], y[3:], w, b, 10)
    w_ = w.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    gw, gb = torch.autograd.grad(F.cross_entropy(z @ w_.t() + b_, y), [w_, b_])
    assert torch.allclose(full, torch.cat([gw, gb[:, None]], 1), atol=1e-6)
    assert torch.allclose(parts, full, atol=1e-7)


def test_draw_head_is_the_papers_initialisation():
    w, b = draw_head(100, 500, torch.Generator().manual_seed(0))
    assert abs(float(w.std()) - 0.01) < 5e-4
    assert float(b.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_runs_under_autocast_without_nans(dtype):
    augs = 2
    net, syn, x_real, y_real, w, b, real_params, syn_params = _setup(4, 1, augs)
    _, ref = _reference_grads(net, syn, x_real, y_real, w, b, real_params, syn_params, augs)
    syn.zero_grad()
    total = syn.num_images * augs
    g_real = real_grad(net, x_real, y_real, w, b, len(y_real), SPEC, real_params, amp_dtype=dtype)
    p = SynPass(net, syn.render(), syn.labels, view_layout(syn.num_images, augs), syn_params, SPEC,
                micro_batch=3, amp_dtype=dtype)
    loss, g = meta_loss_and_grad(g_real, p.forward(w, b, total))
    p.backward(w, b, total, g)
    grads = [q.grad for q in syn.parameters()]
    assert torch.isfinite(loss)
    assert all(torch.isfinite(q).all() for q in grads)
    # Low precision changes the numbers but not the direction of the step.
    flat = torch.cat([q.flatten() for q in grads])
    flat_ref = torch.cat([q.flatten() for q in ref])
    assert float(F.cosine_similarity(flat, flat_ref, dim=0)) > 0.9


class ThreadReduce:
    """An all-reduce (sum) among K threads: what Ray workers do with gloo, without processes."""

    def __init__(self, k: int) -> None:
        self.k, self.parts, self.out = k, [], None
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(k)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.parts.append(t.clone())
        if self.barrier.wait() == 0:
            self.out = torch.stack(self.parts).sum(0)
            self.parts = []
        self.barrier.wait()
        out = self.out.clone()
        self.barrier.wait()
        return out


def _step_kwargs(num_classes, ipc, augs, n_real, step=3):
    return dict(num_classes=num_classes, feature_dim=24, num_images=num_classes * ipc, real_total=n_real, ipc=ipc,
                augs=augs, seed=11, step=step, spec=SPEC)


@pytest.mark.parametrize("plain_real", [False, True])
def test_lgm_step_equals_the_reference_with_the_same_draws(plain_real):
    """With ``plain_real`` (``aug_real: false``) the real views are only resized; every draw stays the same."""
    num_classes, ipc, augs = 4, 2, 3
    net = TinyNet()
    syn = SyntheticSet(num_classes, ipc, res=16, start_levels=3, seed=5)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (16,), generator=g)
    kw = _step_kwargs(num_classes, ipc, augs, len(y))
    real_spec = AugSpec(mode="none", crop_res=12) if plain_real else None
    res = lgm_step(net, syn.render(), torch.arange(8), x, y, torch.arange(16), real_spec=real_spec, **kw)
    ours = [p.grad.clone() for p in syn.parameters()]
    # The draws lgm_step documents: head, then synthetic views, then real samples, from (seed, "step", step).
    gen = torch.Generator().manual_seed(derive_seed(11, "step", 3))
    w, b = draw_head(num_classes, 24, gen)
    syn_params = sample_params(8 * augs, SPEC, gen)
    real_params = sample_params(16, SPEC, gen)
    syn.zero_grad()
    # Un-augmented real views by hand: each real image bilinearly resized to 12 px, nothing else.
    x_ref = F.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False) if plain_real else x
    ref_loss = reference_step(net, syn.render(), syn.labels, augs, syn_params, x_ref, y, real_params, SPEC, w, b,
                              real_spec=real_spec)
    assert res.finite and abs(res.loss - float(ref_loss)) < 1e-6
    assert _rel_err(ours, [p.grad for p in syn.parameters()]) < 1e-4
    if plain_real:
        augmented = lgm_step(net, syn.render(), torch.arange(8), x, y, torch.arange(16), **kw)
        assert abs(augmented.loss - res.loss) > 1e-4  # the real views' augmentation did change the target


def test_lgm_step_on_three_uneven_workers_equals_one_process():
    """Classes {0,1}, {2}, {3,4}; real samples dealt unevenly and out of order; one all-reduce."""
    num_classes, ipc, augs = 5, 2, 2
    net = TinyNet()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(20, 3, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (20,), generator=g)
    kw = _step_kwargs(num_classes, ipc, augs, len(y))
    whole = SyntheticSet(num_classes, ipc, res=16, start_levels=2, seed=4)
    single = lgm_step(net, whole.render(), torch.arange(10), x, y, torch.arange(20), **kw)
    single_grad = torch.cat([p.grad.flatten() for p in whole.parameters()])

    shards = [[0, 1], [2], [3, 4]]
    real_parts = [torch.tensor([19, 0, 5, 7, 11, 3]), torch.tensor([1, 2, 4, 6]),
                  torch.tensor([8, 9, 10, 12, 13, 14, 15, 16, 17, 18])]
    reduce = ThreadReduce(3)
    results, sets = [None] * 3, [None] * 3

    def work(r):
        part = SyntheticSet(num_classes, ipc, res=16, start_levels=2, seed=4, classes=shards[r])
        owned = torch.tensor([c * ipc + k for c in shards[r] for k in range(ipc)])
        pos = real_parts[r]
        results[r] = lgm_step(net, part.render(), owned, x[pos], y[pos], pos, reduce=reduce, **kw)
        sets[r] = part

    threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(abs(r.loss - single.loss) < 1e-6 and r.finite for r in results)
    # Reassemble the per-class gradients in global row order.
    grads = []
    for level in range(2):
        rows = torch.cat([sets[r].levels[level].grad for r in range(3)])
        grads.append(rows.flatten())
    split_grad = torch.cat(grads)
    assert float(single_grad.norm()) > 0
    assert float((split_grad - single_grad).norm() / single_grad.norm()) < 1e-5


class OverflowNet(TinyNet):
    """Half-precision layers whose backward overflows fp16 by ``factor``; the final LayerNorm in fp32."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        h = Amplify.apply(self.fc(x.mean((2, 3))), self.factor)
        with torch.autocast("cpu", enabled=False):
            return self.norm(h.float())


@pytest.mark.parametrize("factor,applied", [(1e6, True), (1e15, False)])
def test_fp16_overflow_backs_off_or_skips_but_never_applies_non_finite(factor, applied):
    num_classes, ipc, augs = 3, 1, 2
    torch.manual_seed(0)
    net = OverflowNet(factor)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g)
    y = torch.arange(6) % 3
    kw = _step_kwargs(num_classes, ipc, augs, len(y))
    syn = SyntheticSet(num_classes, ipc, res=16, start_levels=2, seed=0)
    res = lgm_step(net, syn.render(), torch.arange(3), x, y, torch.arange(6), amp_dtype=torch.float16, **kw)
    # The overflow happens in fp16 inside the backbone although the features it returns are fp32.
    assert net(torch.rand(1, 3, 12, 12)).dtype == torch.float32
    assert res.finite is applied
    if applied:
        grads = [p.grad for p in syn.parameters()]
        assert all(torch.isfinite(q).all() and float(q.abs().max()) > 0 for q in grads)
        syn32 = SyntheticSet(num_classes, ipc, res=16, start_levels=2, seed=0)
        lgm_step(net, syn32.render(), torch.arange(3), x, y, torch.arange(6), **kw)
        flat = torch.cat([q.flatten() for q in grads])
        flat32 = torch.cat([q.grad.flatten() for q in syn32.parameters()])
        assert float(F.cosine_similarity(flat, flat32, dim=0)) > 0.9
    else:
        assert all(p.grad is None for p in syn.parameters())  # nothing reached the parameters
        assert not torch.isfinite(res.image_grad).all()

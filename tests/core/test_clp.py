"""The CLP-DD step (lgm_ray/core/clp.py): its closed form, its gradient, its split over processes, its draws."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lgm_ray.core.clp as clp
import lgm_ray.core.matching as matching
from lgm_ray.core.augment import AugSpec, apply, sample_params
from lgm_ray.core.clp import (
    closed_form_probe,
    clp_step,
    probe_features,
    probe_loss_and_grad,
    ridge_probe,
    step_draws,
)
from lgm_ray.core.matching import derive_seed, draw_head, lgm_step, view_layout
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the closed form ------------------------------------------------------------------------------


def _features(n: int, d: int, c: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    y = F.one_hot(torch.arange(n) % c, c).to(dtype)
    return phi, y


@pytest.mark.parametrize("n,d", [(12, 40), (60, 9)])  # fewer samples than features, and more
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_closed_form_equals_the_primal_ridge_and_lstsq(n, d, dtype):
    """To 1e-10 in float64; in float32 to rounding: 4 × the machine epsilon × the condition number of K + λ'I."""
    c, lam = 5, 1e-2
    phi, y = _features(n, d, c, dtype)
    w = ridge_probe(phi, y, lam)
    lam_abs = lam * float((phi * phi).sum(1).mean())  # relative to the kernel's mean diagonal
    assert w.shape == (d, c) and w.dtype == dtype
    # independent solves, in float64 whatever ``dtype`` (the truth the float32 solve is measured against)
    p64, y64 = phi.double(), y.double()
    primal = torch.linalg.solve(p64.T @ p64 + lam_abs * torch.eye(d, dtype=torch.float64), p64.T @ y64)
    stacked = torch.cat([p64, math.sqrt(lam_abs) * torch.eye(d, dtype=torch.float64)])
    lstsq = torch.linalg.lstsq(stacked, torch.cat([y64, torch.zeros(d, c, dtype=torch.float64)])).solution
    assert _rel(primal, lstsq) < 1e-12
    k = p64 @ p64.T
    cond = float(torch.linalg.cond(k + lam_abs * torch.eye(n, dtype=torch.float64)))
    tol = 1e-10 if dtype == torch.float64 else 4 * torch.finfo(torch.float32).eps * cond
    assert _rel(w.double(), primal) < tol


@pytest.mark.parametrize("n,d", [(7, 5), (4, 9)])
@pytest.mark.parametrize("normalize,bias", [(False, 0.0), (True, 1.0)])
def test_the_closed_forms_backward_passes_gradcheck(n, d, normalize, bias):
    """The written-out backward of the ridge solve (λ' following Φ included) against finite differences."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.arange(n) % 3
    assert torch.autograd.gradcheck(lambda t: closed_form_probe(t, y, 3, lam=0.3, normalize=normalize, bias=bias),
                                    (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_lam_to_zero_interpolates_or_gives_least_squares():
    """λ → 0: fewer samples than features → ΦW = Y exactly; more → the unregularised least squares.

    (With more samples than features the kernel is singular and λ' sets its condition number, so the
    second limit is taken at lam 1e-7: a ridge bias and a float64 rounding both near 1e-8.)
    """
    phi, y = _features(12, 40, 5, torch.float64)
    w = ridge_probe(phi, y, 1e-13)
    assert float((phi @ w - y).abs().max()) < 1e-9
    assert float((phi @ ridge_probe(phi, y, 1.0) - y).abs().max()) > 0.1  # λ does shrink
    phi, y = _features(60, 9, 5, torch.float64)
    w = ridge_probe(phi, y, 1e-7)
    assert _rel(w, torch.linalg.lstsq(phi, y).solution) < 1e-6
    assert _rel(ridge_probe(phi, y, 1e-2), torch.linalg.lstsq(phi, y).solution) > 1e-4


def test_one_sample_by_hand():
    """One view: ``W = φ yᵀ / (‖φ‖²(1 + lam))`` — a transposed or unscaled formula fails this."""
    phi = torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    expected = phi.T @ y / (25.0 * 1.5)
    assert float((ridge_probe(phi, y, 0.5) - expected).abs().max()) < 1e-15


def test_relative_lambda_makes_the_probe_scale_free():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(15, 8, generator=g, dtype=torch.float64)
    y = torch.arange(15) % 3
    kw = dict(normalize=False, bias=0.0)
    w = closed_form_probe(z, y, 3, **kw)
    assert _rel(closed_form_probe(7.0 * z, y, 3, **kw), w / 7.0) < 1e-12
    # with normalised features the scale of z does not matter at all
    assert _rel(closed_form_probe(7.0 * z, y, 3), closed_form_probe(z, y, 3)) < 1e-12


def test_probe_features_normalise_then_append_the_bias():
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(probe_features(z, normalize=True, bias=0.5), torch.tensor([[0.6, 0.8, 0.5], [0.0, 1.0, 0.5]]))
    assert torch.equal(probe_features(z, normalize=False, bias=0.0), z)


def test_tau_divides_the_logits_and_the_gradient_is_autograds():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(20, 6, generator=g)
    y = torch.randint(0, 4, (20,), generator=g)
    w = torch.randn(7, 4, generator=g)
    phi = probe_features(z)
    for tau in (1.0, 0.25, 0.05):
        loss, dw = probe_loss_and_grad(z, y, w, tau=tau)
        w_ = w.clone().requires_grad_(True)
        ref = F.cross_entropy(phi @ w_ * (1.0 / tau), y, reduction="sum")
        (ref_dw,) = torch.autograd.grad(ref, w_)
        assert abs(float(loss) - float(ref.detach())) < 1e-4 * float(ref.detach())
        assert _rel(dw, ref_dw) < 1e-5
    # τ → ∞: the softmax is uniform, the loss per sample log C
    loss, _ = probe_loss_and_grad(z, y, w, tau=1e8)
    assert abs(float(loss) / 20 - math.log(4)) < 1e-5


# --- the step against one graph -------------------------------------------------------------------


def _naive_loss(backbone, images, labels, augs, syn_params, x_real, y_real, real_params, spec, num_classes,
                lam=clp.LAM, tau=clp.TAU, bias=clp.BIAS):
    """render → augment → backbone → ridge → CE in one graph, written out without lgm_ray.core.clp."""
    views = apply(images[view_layout(images.shape[0], augs)], syn_params, spec)
    phi = F.normalize(backbone(views).double(), dim=1)
    phi = torch.cat([phi, torch.full((phi.shape[0], 1), bias, dtype=phi.dtype)], 1)
    k = phi @ phi.T
    lam_abs = lam * torch.trace(k) / k.shape[0]
    w = phi.T @ torch.linalg.inv(k + lam_abs * torch.eye(k.shape[0], dtype=k.dtype)) @ F.one_hot(
        labels.repeat(augs), num_classes).double()
    with torch.no_grad():
        phi_r = F.normalize(backbone(apply(x_real, real_params, spec)).double(), dim=1)
    phi_r = torch.cat([phi_r, torch.full((phi_r.shape[0], 1), bias, dtype=phi_r.dtype)], 1)
    return F.cross_entropy(phi_r @ w / tau, y_real)


def _draws_by_hand(num_classes, dim, n_views, n_real, spec, seed, step):
    """What lgm_step documents: head, then synthetic views, then real samples, from (seed, "step", step)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "step", step))
    draw_head(num_classes, dim, gen)
    return sample_params(n_views, spec, gen), sample_params(n_real, spec, gen)


def _demo_cnn():
    from lgm_ray.backbones import create_backbone

    return create_backbone("digits_simclr_cnn", img_size=32), 128, AugSpec(crop_res=32), 32


@pytest.mark.parametrize("micro_batch", [None, 3])
@pytest.mark.parametrize("which", ["tiny", "digits_simclr_cnn"])
def test_step_equals_autograd_through_one_graph(which, micro_batch):
    net, dim, spec, res = (TinyNet(), 24, SPEC, 16) if which == "tiny" else _demo_cnn()
    num_classes, ipc, augs, seed, step = 4, 2, 3, 11, 5
    syn = SyntheticSet(num_classes, ipc, res=res, start_levels=3, seed=5)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(14, 3, res, res, generator=g)
    y = torch.randint(0, num_classes, (14,), generator=g)
    kw = dict(num_classes=num_classes, feature_dim=dim, num_images=8, real_total=14, ipc=ipc, augs=augs, seed=seed,
              step=step, spec=spec)
    res_ = clp_step(net, syn.render(), torch.arange(8), x, y, torch.arange(14), micro_batch=micro_batch, **kw)
    ours = [p.grad.clone() for p in syn.parameters()]

    syn_params, real_params = _draws_by_hand(num_classes, dim, 8 * augs, 14, spec, seed, step)
    images = syn.render().detach().requires_grad_(True)
    loss = _naive_loss(net, images, syn.labels, augs, syn_params, x, y, real_params, spec, num_classes)
    (img_grad,) = torch.autograd.grad(loss, images)
    syn.zero_grad()
    _naive_loss(net, syn.render(), syn.labels, augs, syn_params, x, y, real_params, spec, num_classes).backward()
    assert res_.finite
    assert abs(res_.loss - float(loss.detach())) < 1e-5 * max(1.0, float(loss.detach()))
    assert float(img_grad.norm()) > 0
    assert _rel(res_.image_grad.double(), img_grad.double()) < 2e-5
    assert all(_rel(a, p.grad) < 2e-5 for a, p in zip(ours, syn.parameters(), strict=True))


def test_centered_targets_change_nothing_but_tau_and_lam_do():
    net = TinyNet()
    syn = SyntheticSet(3, 2, res=16, start_levels=2, seed=0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(9, 3, 16, 16, generator=g), torch.arange(9) % 3
    kw = dict(num_classes=3, feature_dim=24, num_images=6, real_total=9, ipc=2, augs=2, seed=0, step=0, spec=SPEC)

    def run(**extra):
        return clp_step(net, syn.render().detach(), torch.arange(6), x, y, torch.arange(9), **kw, **extra)

    base, centred = run(), run(targets="centered")
    assert abs(base.loss - centred.loss) < 1e-6
    assert _rel(centred.image_grad, base.image_grad) < 1e-5
    assert abs(run(tau=0.5).loss - base.loss) > 1e-3
    assert abs(run(lam=1.0).loss - base.loss) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_runs_under_autocast_in_the_same_direction(dtype):
    net = TinyNet()
    syn = SyntheticSet(4, 1, res=16, start_levels=2, seed=0)
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(12, 3, 16, 16, generator=g), torch.arange(12) % 4
    kw = dict(num_classes=4, feature_dim=24, num_images=4, real_total=12, ipc=1, augs=2, seed=0, step=0, spec=SPEC,
              micro_batch=3)
    low = clp_step(net, syn.render().detach(), torch.arange(4), x, y, torch.arange(12), amp_dtype=dtype, **kw)
    full = clp_step(net, syn.render().detach(), torch.arange(4), x, y, torch.arange(12), **kw)
    assert low.finite and torch.isfinite(low.image_grad).all()
    assert float(F.cosine_similarity(low.image_grad.flatten(), full.image_grad.flatten(), dim=0)) > 0.9


@pytest.mark.parametrize("bad", [dict(lam=0.0), dict(tau=-1.0), dict(bias=-1.0), dict(targets="soft")])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        clp_step(TinyNet(), torch.rand(2, 3, 16, 16), torch.arange(2), torch.rand(2, 3, 16, 16), torch.arange(2),
                 torch.arange(2), num_classes=2, feature_dim=24, num_images=2, real_total=2, ipc=1, augs=1, seed=0,
                 step=0, spec=SPEC, **bad)


def test_a_non_finite_step_is_not_applied():
    syn = SyntheticSet(2, 1, res=16, start_levels=2, seed=0)
    images = syn.render() * float("nan")
    res = clp_step(TinyNet(), images, torch.arange(2), torch.rand(4, 3, 16, 16), torch.arange(4) % 2,
                   torch.arange(4), num_classes=2, feature_dim=24, num_images=2, real_total=4, ipc=1, augs=2, seed=0,
                   step=0, spec=SPEC)
    assert not res.finite
    assert all(p.grad is None for p in syn.parameters())


# --- distributed exactness --------------------------------------------------------------------------


class RankReduce:
    """A sum over K threads in rank order (the same rounding every time), counting its calls."""

    def __init__(self, k: int) -> None:
        self.k, self.parts, self.out, self.shapes = k, [None] * k, None, []
        self.barrier = threading.Barrier(k)

    def for_rank(self, r: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[r] = t.clone()
            if self.barrier.wait() == 0:
                self.out = torch.stack(self.parts).sum(0)
                self.shapes.append(tuple(t.shape))
            self.barrier.wait()
            out = self.out.clone()
            self.barrier.wait()
            return out

        return reduce


def _split_run(net, kw, x, y, shards, real_parts, micro_batch):
    """One clp_step per shard in K threads; returns each shard's result and the reduce's record."""
    reduce, results, errors = RankReduce(len(shards)), [None] * len(shards), []
    ipc = kw["ipc"]

    def work(r):
        try:
            part = SyntheticSet(kw["num_classes"], ipc, res=16, start_levels=2, seed=4, classes=shards[r])
            owned = torch.tensor([c * ipc + k for c in shards[r] for k in range(ipc)])
            pos = real_parts[r]
            results[r] = (owned, clp_step(net, part.render(), owned, x[pos], y[pos], pos, micro_batch=micro_batch,
                                          reduce=reduce.for_rank(r), **kw))
        except BaseException as e:  # noqa: BLE001 — surfaced below, never lost in a thread
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, reduce.shapes


@pytest.mark.parametrize("micro_batch", [None, 2])
@pytest.mark.parametrize("shards,real_parts", [
    ([[0], [1, 2, 3, 4]], [[19, 0, 5, 7, 11, 3], [i for i in range(20) if i not in (19, 0, 5, 7, 11, 3)]]),
    ([[0, 1], [2], [3, 4]], [[19, 0, 5, 7, 11, 3], [], [i for i in range(20) if i not in (19, 0, 5, 7, 11, 3)]]),
])
def test_split_over_processes_equals_one_process(shards, real_parts, micro_batch):
    """K = 2 and 3 uneven class shards, real samples dealt out of order (one shard gets none)."""
    num_classes, ipc, augs = 5, 2, 2
    net = TinyNet()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(20, 3, 16, 16, generator=g)
    y = torch.randint(0, num_classes, (20,), generator=g)
    kw = dict(num_classes=num_classes, feature_dim=24, num_images=10, real_total=20, ipc=ipc, augs=augs, seed=11,
              step=3, spec=SPEC)
    whole = SyntheticSet(num_classes, ipc, res=16, start_levels=2, seed=4)
    single = clp_step(net, whole.render(), torch.arange(10), x, y, torch.arange(20), **kw)
    results, shapes = _split_run(net, kw, x, y, shards, [torch.tensor(p, dtype=torch.long) for p in real_parts],
                                 micro_batch)
    # three reductions: Φ_s, [∂L/∂W, L], the finite flag
    assert shapes == [(10 * augs, 24), ((24 + 1) * num_classes + 1,), (1,)]
    assert float(single.image_grad.norm()) > 0
    for owned, res in results:
        assert res.finite and abs(res.loss - single.loss) < 1e-5
        assert _rel(res.image_grad, single.image_grad[owned]) < 1e-4


# --- the draws -------------------------------------------------------------------------------------


def test_the_same_seed_and_step_give_lgm_steps_views(monkeypatch):
    """Record every augmentation draw of lgm_step and of clp_step: the same parameters, in the same order."""
    drawn = {"lgm": [], "clp": []}
    current = []

    def recording(n, spec, gen):
        params = sample_params(n, spec, gen)
        drawn[current[0]].append(params)
        return params

    monkeypatch.setattr(matching, "sample_params", recording)
    monkeypatch.setattr(clp, "sample_params", recording)
    net = TinyNet()
    syn = SyntheticSet(3, 2, res=16, start_levels=2, seed=0)
    x, y = torch.rand(9, 3, 16, 16), torch.arange(9) % 3
    kw = dict(num_classes=3, feature_dim=24, num_images=6, real_total=9, ipc=2, augs=2, seed=7, spec=SPEC)
    for name, fn in (("lgm", lgm_step), ("clp", clp_step)):
        current[:] = [name]
        fn(net, syn.render().detach(), torch.arange(6), x, y, torch.arange(9), step=4, **kw)
    assert [len(p) for p in drawn["lgm"]] == [12, 9]  # synthetic views, then real samples
    for a, b in zip(drawn["lgm"], drawn["clp"], strict=True):
        assert torch.equal(a.theta, b.theta) and torch.equal(a.noise_on, b.noise_on)
        assert torch.equal(a.noise_seed, b.noise_seed)
    other = step_draws(3, 24, 6, 2, 9, 7, 5, SPEC)[0]  # another step: other views
    assert not torch.equal(other.theta, drawn["lgm"][0].theta)

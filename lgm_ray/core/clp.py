"""The Closed-Form Linear-Probe step (CLP-DD), as tensors in and tensors out, beside the LGM step.

Peng, Li, Liu, Ogawa and Haseyama, *Closed-Form Linear-Probe Dataset Distillation for Pre-trained
Vision Models* (arXiv 2605.07194, 2026). The linear probe induced by the synthetic set is solved in
closed form, in sample space, on the synthetic views' frozen features (no inner loop, no random
head), and the images are moved so that this probe classifies the real samples::

    Φ_s = g(z_s)                    (N_syn × d: the synthetic views' features, see ``g`` below)
    W   = Φ_sᵀ (Φ_s Φ_sᵀ + λ' I)⁻¹ Y_s                           (d × C, kernel ridge regression)
    L   = (1/M) Σ_i CE(g(z_r,i) W / τ, y_i)    (the step's M real samples; W's columns: class anchors)

Every synthetic image is seen as ``augs`` views per step, laid out and augmented exactly as by
:func:`lgm_ray.core.matching.lgm_step`, and each view carries its image's class.

**Choices where the paper is silent** — keyword arguments of :func:`clp_step`, declared once below,
to be settled on a validation split, not on the test split:

- ``lam`` (:data:`LAM` = 1e-2) is *relative*: ``λ' = lam · mean(diag Φ_s Φ_sᵀ)``, so the
  regularisation follows the features' scale (with unnormalised features, scaling them by ``s``
  divides ``W`` by ``s`` and leaves the logits unchanged). ``λ'`` is a function of ``Φ_s`` and is
  differentiated with it (with the default ``g`` the mean diagonal is the constant 1 + bias²).
- ``tau`` (:data:`TAU` = 0.1): the softmax temperature; the ridge targets are 0/1, so the probe's
  margins are of order 1 and τ = 0.1 makes them logits of order 10.
- ``g`` — ``normalize`` (:data:`NORMALIZE` = True) L2-normalises every feature vector, so the
  kernel is the cosine kernel, then ``bias`` (:data:`BIAS` = 1.0) appends a constant column of that
  value, the probe's bias (regularised like the weights, as in kernel ridge; 0 = no bias). The real
  features go through the same ``g``.
- ``targets`` (:data:`TARGETS_DEFAULT` = ``"onehot"``): ``Y_s`` one-hot, or ``"centered"``
  (one-hot − 1/C). Centring subtracts the same amount ``g(z_r) Φ_sᵀ (K + λ'I)⁻¹ 1 / C`` from all
  of a real sample's logits, which the softmax ignores, so the loss and every gradient are identical
  (up to rounding); the option exists to make that visible, not as a tuning knob.
- ``solve_dtype`` (float64): the kernel, the solve and their backward run in float64 — the kernel of
  ImageNet-1k's 3,000 views has a condition number up to ~N/lam (3·10⁵), too many digits for
  float32; it is one N × N system (3,000²) per step, cheap beside the backbone's passes.
- The generator: every process draws, from ``(seed, "step", step)`` and in lgm_step's order, LGM's
  head (drawn and discarded — the probe needs none), then the synthetic views' and the real samples'
  augmentation parameters, so that CLP and LGM see the same views and the same real batch at every
  step. ``head_std`` is accepted for a drop-in swap and ignored (it changes no draw).
- No MSE outer loss (the paper reports that it underperforms).

**Distributed, exactly** (the contract of ``lgm_step``: ``reduce`` sums a tensor over processes,
the identity on one process): class shards on K processes. Each computes the features of the views
of the images it owns (:class:`lgm_ray.core.views.ViewPass`: micro-batched two passes, pass 1
without a graph), writes them into its rows of a zero ``N_syn × feature_dim`` tensor, and
**reduce 1** (a sum of zero-padded rows: an all-gather, exact) gives every process all of them.
Every process solves the same ridge system with them as a leaf, computes its own real samples'
partial loss sum and partial ``∂L/∂W`` (no graph; divided by the global M), and **reduce 2** sums
``[vec ∂L/∂W, L]`` (``d·C + 1`` floats, d = feature_dim + 1 with the bias). Every process
back-propagates ``∂L/∂W`` through the closed form (autograd, with the ridge solve's backward written
out: :class:`_KernelRidge`) and ``g`` to the raw features, takes its own views' rows and
back-propagates them through its backbone into its images (pass 2). **Reduce 3** is lgm_step's
finite flag: a step whose loss or image gradient is not finite anywhere is applied nowhere.

No Ray, no MLflow, no I/O.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lgm_ray.core.augment import AugParams, AugSpec, apply, sample_params
from lgm_ray.core.matching import Reduce, StepResult, _identity, draw_head, shard_views, view_layout
from lgm_ray.core.seeds import derive_seed
from lgm_ray.core.views import Backbone, ViewPass, _autocast, _chunks

# The choices the paper leaves open (module docstring), declared once.
LAM = 1e-2  # relative to the kernel's mean diagonal
TAU = 0.1
NORMALIZE = True
BIAS = 1.0
TARGETS = ("onehot", "centered")
TARGETS_DEFAULT = "onehot"
SOLVE_DTYPE = torch.float64


def check_options(lam: float, tau: float, bias: float, targets: str) -> None:
    """Refuse settings that make no probe: ``lam`` and ``tau`` > 0, ``bias`` ≥ 0, ``targets`` known."""
    if not lam > 0:
        raise ValueError(f"lam (relative ridge strength) must be > 0, got {lam!r}")
    if not tau > 0:
        raise ValueError(f"tau (softmax temperature) must be > 0, got {tau!r}")
    if not bias >= 0:
        raise ValueError(f"bias (the appended constant feature; 0 = none) must be ≥ 0, got {bias!r}")
    if targets not in TARGETS:
        raise ValueError(f"unknown ridge targets {targets!r}; choose one of {TARGETS}")


def probe_features(z: torch.Tensor, *, normalize: bool = NORMALIZE, bias: float = BIAS) -> torch.Tensor:
    """``g(z)``: each row L2-normalised (with ``normalize``), then a constant column ``bias`` (if > 0)."""
    if normalize:
        z = F.normalize(z, dim=1, eps=1e-12)
    if bias:
        z = torch.cat([z, torch.full((z.shape[0], 1), float(bias), dtype=z.dtype, device=z.device)], dim=1)
    return z


def probe_targets(y: torch.Tensor, num_classes: int, kind: str = TARGETS_DEFAULT,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y_s`` (N × C): one-hot, or one-hot − 1/C (``"centered"``)."""
    t = F.one_hot(y.long(), num_classes).to(dtype)
    return t - 1.0 / num_classes if kind == "centered" else t


class _KernelRidge(torch.autograd.Function):
    """``W = Φᵀ A``, ``A = M⁻¹ Y``, ``M = Φ Φᵀ + λ' I``, ``λ' = lam · tr(Φ Φᵀ) / N``, with its backward in closed form.

    Given ``G = ∂L/∂W`` and ``B = M⁻¹ Φ G``::

        ∂L/∂Φ = A Gᵀ − B (Aᵀ Φ) − A (Bᵀ Φ) − (2 lam / N) ⟨A, B⟩ Φ

    (the last term: λ' follows Φ). Forward and backward share one Cholesky factor of ``M``, and no
    other N × N matrix is kept; autograd through ``torch.linalg.solve`` holds several (its LU, ``M``,
    ``∂L/∂M``). At ImageNet-1k's shape (N 3,000, d 193, C 1,000, float64, 2 CPU cores) forward and
    backward took 4.9 s and 219 MB here against 13.1 s and 475 MB, and the gap grows as N² (ipc 10:
    30,000 views, 7.2 GB per N × N matrix). A factorisation that fails (a non-finite Φ) gives a NaN
    ``W``, so the step is not applied.
    """

    @staticmethod
    def forward(ctx, phi: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
        m = phi @ phi.mT
        m.diagonal().add_(lam * m.diagonal().mean())
        chol, info = torch.linalg.cholesky_ex(m)
        del m
        if int(info) != 0:
            chol = torch.full_like(chol, float("nan"))
        a = torch.cholesky_solve(targets.to(phi.dtype), chol)
        ctx.save_for_backward(phi, chol, a)
        ctx.lam = lam
        return phi.mT @ a

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        phi, chol, a = ctx.saved_tensors
        b = torch.cholesky_solve(phi @ g, chol)
        dphi = a @ g.mT - b @ (a.mT @ phi) - a @ (b.mT @ phi)
        dphi -= (2.0 * ctx.lam / phi.shape[0]) * (a * b).sum() * phi
        return dphi, None, None


def ridge_probe(phi: torch.Tensor, targets: torch.Tensor, lam: float = LAM) -> torch.Tensor:
    """``W = Φᵀ (Φ Φᵀ + λ' I)⁻¹ Y`` (d × C), ``λ' = lam · mean(diag Φ Φᵀ)``; differentiable in ``Φ`` (once)."""
    return _KernelRidge.apply(phi, targets, lam)


def closed_form_probe(
    z_syn: torch.Tensor, y_syn: torch.Tensor, num_classes: int, *, lam: float = LAM, normalize: bool = NORMALIZE,
    bias: float = BIAS, targets: str = TARGETS_DEFAULT, solve_dtype: torch.dtype = SOLVE_DTYPE,
) -> torch.Tensor:
    """The probe the synthetic views induce, from their raw features ``z_syn`` (differentiable in them)."""
    phi = probe_features(z_syn.to(solve_dtype), normalize=normalize, bias=bias)
    return ridge_probe(phi, probe_targets(y_syn, num_classes, targets, solve_dtype), lam)


def probe_loss_and_grad(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, *, tau: float = TAU, normalize: bool = NORMALIZE,
    bias: float = BIAS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_i CE(g(z_i) W / τ, y_i)`` and its gradient w.r.t. ``W`` (closed form: ``g(z)ᵀ (softmax − onehot) / τ``)."""
    phi = probe_features(z.to(w.dtype), normalize=normalize, bias=bias)
    logits = phi @ w / tau
    loss = F.cross_entropy(logits, y.long(), reduction="sum")
    e = (torch.softmax(logits, dim=1) - F.one_hot(y.long(), w.shape[1]).to(logits.dtype)) / tau
    return loss, phi.mT @ e


def real_probe_grad(
    backbone: Backbone, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, total: int, spec: AugSpec,
    params: AugParams, *, tau: float = TAU, normalize: bool = NORMALIZE, bias: float = BIAS,
    micro_batch: int | None = None, amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """This process's share of ``[vec ∂L/∂W, L]`` (``d·C + 1`` floats, float32), divided by the global ``total``.

    Each real sample is augmented once and passed through the backbone without a graph, a
    micro-batch at a time; shares of any partition of the batch sum to the batch's.
    """
    w = w.detach().float().to(x.device)
    out = torch.zeros(w.numel() + 1, device=x.device)
    with torch.no_grad():
        for sl in _chunks(x.shape[0], micro_batch) if x.shape[0] else []:
            with _autocast(x.device, amp_dtype):
                z = backbone(apply(x[sl], params.select(sl), spec))
            loss, dw = probe_loss_and_grad(z.float(), y[sl].to(x.device), w, tau=tau, normalize=normalize,
                                           bias=bias)
            out[:-1] += dw.flatten()
            out[-1] += loss
    return out / total


def step_draws(num_classes: int, feature_dim: int, num_images: int, augs: int, real_total: int, seed: int,
               step: int, spec: AugSpec) -> tuple[AugParams, AugParams]:
    """The step's augmentation parameters ``(synthetic views, real samples)``, exactly lgm_step's.

    LGM's head is drawn first and discarded, so the generator stands where lgm_step's does.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "step", step))
    draw_head(num_classes, feature_dim, gen)
    syn_params = sample_params(num_images * augs, spec, gen)
    return syn_params, sample_params(real_total, spec, gen)


def _gather_features(views: ViewPass, rows: torch.Tensor, total_syn: int, feature_dim: int,
                     reduce: Reduce) -> torch.Tensor:
    """Reduce 1: every process's view features in their global rows, summed with zeros elsewhere (exact)."""
    z = views.forward()
    if z.shape[1] != feature_dim:
        raise ValueError(f"the backbone gives {z.shape[1]}-d features but feature_dim is {feature_dim}")
    phi = torch.zeros(total_syn, feature_dim, device=z.device)
    phi[rows.to(z.device)] = z
    return reduce(phi)


def clp_step(
    backbone: Backbone,
    images: torch.Tensor,
    owned: torch.Tensor,
    x_real: torch.Tensor,
    y_real: torch.Tensor,
    real_positions: torch.Tensor,
    *,
    num_classes: int,
    feature_dim: int,
    num_images: int,
    real_total: int,
    ipc: int,
    augs: int,
    seed: int,
    step: int,
    spec: AugSpec,
    head_std: float = 0.01,
    real_spec: AugSpec | None = None,
    micro_batch: int | None = None,
    amp_dtype: torch.dtype | None = None,
    reduce: Reduce = _identity,
    lam: float = LAM,
    tau: float = TAU,
    normalize: bool = NORMALIZE,
    bias: float = BIAS,
    targets: str = TARGETS_DEFAULT,
    solve_dtype: torch.dtype = SOLVE_DTYPE,
) -> StepResult:
    """One CLP-DD step on this process's share of the work (module docstring).

    The arguments up to ``reduce`` are :func:`lgm_ray.core.matching.lgm_step`'s, with the same meaning
    (``head_std`` is accepted and ignored: no head is used); ``lam``, ``tau``, ``normalize``,
    ``bias``, ``targets`` and ``solve_dtype`` are the choices the paper leaves open. Three
    ``reduce`` calls: the synthetic features (``N_syn × feature_dim``), ``[∂L/∂W, L]``
    (``(feature_dim + [bias > 0]) · num_classes + 1``) and the finite flag. Returns the loss (the
    same on every process), whether the step is applied (every process agrees) and ``∂L/∂images`` of
    the local images, back-propagated into ``images``' graph when finite.
    """
    check_options(lam, tau, bias, targets)
    dev = images.device
    syn_params, real_params = step_draws(num_classes, feature_dim, num_images, augs, real_total, seed, step, spec)
    rows, local = shard_views(owned, num_images, augs)
    views = ViewPass(backbone, images, local, syn_params.select(rows), spec, micro_batch=micro_batch,
                     amp_dtype=amp_dtype)
    phi = _gather_features(views, rows, num_images * augs, feature_dim, reduce)
    leaf = phi.detach().to(solve_dtype).requires_grad_(True)
    y_syn = (view_layout(num_images, augs) // ipc).to(dev)
    with torch.enable_grad():
        w = closed_form_probe(leaf, y_syn, num_classes, lam=lam, normalize=normalize, bias=bias, targets=targets,
                              solve_dtype=solve_dtype)
    part = real_probe_grad(backbone, x_real.to(dev), y_real.to(dev), w, real_total, real_spec or spec,
                           real_params.select(real_positions.long().cpu()), tau=tau, normalize=normalize,
                           bias=bias, micro_batch=micro_batch, amp_dtype=amp_dtype)
    summed = reduce(part)
    loss, dw = summed[-1], summed[:-1].view(w.shape)
    (dphi,) = torch.autograd.grad(w, leaf, grad_outputs=dw.to(w.dtype))
    grad = views.backward(dphi[rows.to(dev)].float(), apply=False)
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()) else 1.0],
                       device=dev)
    finite = float(reduce(bad)[0]) == 0.0
    if finite and images.requires_grad:
        images.backward(grad)
    return StepResult(float(loss), finite, grad)

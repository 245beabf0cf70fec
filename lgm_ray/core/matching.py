"""The exact Linear Gradient Matching step, first order, as tensors in and tensors out (docs/design.md §2).

For a linear head ``s = W z + b`` and cross-entropy averaged over a global count ``M``, the head's
gradient is a sum over samples::

    e_i = (softmax(s_i) - onehot(y_i)) / M,    ∂L/∂W = Σ_i e_i z_iᵀ,    ∂L/∂b = Σ_i e_i

so ``G_real`` and ``G_syn`` can be computed in pieces anywhere and summed. The meta loss
``1 - cos(vec G_real, vec G_syn)`` depends on the synthetic images only through their features, so
``∂loss/∂z`` needs the head alone, and the backbone is differentiated once, first order: a plain
backward from ``∂loss/∂z``. :class:`SynPass` does that, optionally in micro-batches (pass 1
computes features without a graph, pass 2 recomputes each micro-batch with a graph and
back-propagates its share), which keeps memory constant in the number of views.

No Ray, no MLflow, no I/O: the distributed context (which views are local, the global count) comes
in as arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgm_ray.core.augment import AugParams, AugSpec, apply, sample_params
from lgm_ray.core.seeds import derive_seed  # noqa: F401  (re-exported: the step's seeds)
from lgm_ray.core.views import Backbone, ViewPass, _autocast, _chunks


def draw_head(
    num_classes: int, dim: int, generator: torch.Generator, std: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh linear head: ``W ~ N(0, std²)`` (classes × features), ``b = 0`` (the paper's init)."""
    w = torch.randn(num_classes, dim, generator=generator) * std
    return w, torch.zeros(num_classes)


def head_grad(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, total: int) -> torch.Tensor:
    """Partial cross-entropy gradient w.r.t. ``[W, b]`` of the samples ``(z, y)``, divided by ``total``.

    Returns a ``classes × (features + 1)`` float32 tensor (last column: the bias). Summing the
    results over any partition of a batch gives the gradient of the batch's mean loss. Differentiable
    in ``z``.
    """
    z = z.float()
    logits = z @ w.t() + b
    e = (torch.softmax(logits, dim=1) - F.one_hot(y, w.shape[0]).to(logits.dtype)) / total
    return torch.cat([e.t() @ z, e.sum(0, keepdim=True).t()], dim=1)


def meta_loss(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """``1 - cos(vec G_real, vec G_syn)``."""
    return 1.0 - F.cosine_similarity(g_real.flatten(), g_syn.flatten(), dim=0, eps=1e-12)


def meta_loss_and_grad(g_real: torch.Tensor, g_syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta loss and ``∂loss/∂G_syn`` (every worker computes the same from the summed G)."""
    g_syn = g_syn.detach().float().requires_grad_(True)
    with torch.enable_grad():
        loss = meta_loss(g_real.detach().float(), g_syn)
        (grad,) = torch.autograd.grad(loss, g_syn)
    return loss.detach(), grad


def feature_grad(
    z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, total: int, g: torch.Tensor
) -> torch.Tensor:
    """``∂loss/∂z`` for local views, given ``g = ∂loss/∂G_syn``: the head alone, by autograd."""
    z = z.detach().float().requires_grad_(True)
    with torch.enable_grad():
        part = head_grad(z, y, w, b, total)
        (dz,) = torch.autograd.grad(part, z, grad_outputs=g)
    return dz


AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a config's ``amp`` name (``none`` → None: full precision)."""
    return AMP_DTYPES[name]


def real_grad(
    backbone: Backbone,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    total: int,
    spec: AugSpec,
    params: AugParams,
    *,
    micro_batch: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Partial ``G_real`` of a slice of the real batch (each image augmented once), no graph kept."""
    w, b = w.to(x.device), b.to(x.device)
    g = torch.zeros(w.shape[0], w.shape[1] + 1, device=x.device)
    if x.shape[0] == 0:  # a worker whose streams give no sample this step
        return g
    with torch.no_grad():
        for sl in _chunks(x.shape[0], micro_batch):
            with _autocast(x.device, amp_dtype):
                z = backbone(apply(x[sl], params.select(sl), spec))
            g += head_grad(z, y[sl].to(x.device), w, b, total)
    return g


def view_layout(num_images: int, augs: int) -> torch.Tensor:
    """Image index of every view: ``augs`` stacked copies of the set, view ``a·N + i`` = copy a of i."""
    return torch.arange(num_images).repeat(augs)


def shard_views(owned: torch.Tensor, num_images: int, augs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global views a shard owns, and for each the local row of its image.

    Args:
        owned: global indices of the images this shard holds, in its local row order.
        num_images: images in the whole synthetic set.
        augs: augmented copies of each image per step.

    Returns:
        ``(rows, local)``: global view ids (to select augmentation parameters drawn for all views)
        and the local image row of each.
    """
    layout = view_layout(num_images, augs)
    pos = torch.full((num_images,), -1, dtype=torch.long)
    pos[owned.long().cpu()] = torch.arange(len(owned))
    rows = torch.nonzero(pos[layout] >= 0).flatten()
    return rows, pos[layout[rows]]


class SynPass(ViewPass):
    """The synthetic side of one LGM step for the views this process owns: :class:`ViewPass` plus the head.

    Args:
        backbone, images, view_images, params, spec, micro_batch, amp_dtype: :class:`ViewPass`'s.
        labels: the images' labels (N_local).
    """

    def __init__(
        self,
        backbone: Backbone,
        images: torch.Tensor,
        labels: torch.Tensor,
        view_images: torch.Tensor,
        params: AugParams,
        spec: AugSpec,
        *,
        micro_batch: int | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(backbone, images, view_images, params, spec, micro_batch=micro_batch, amp_dtype=amp_dtype)
        self.view_labels = labels.to(images.device)[self.view_images]

    def forward(self, w: torch.Tensor, b: torch.Tensor, total: int) -> torch.Tensor:  # type: ignore[override]
        """Partial ``G_syn`` of the local views (normalised by the global view count ``total``)."""
        dev = self.leaf.device
        return head_grad(super().forward(), self.view_labels, w.to(dev), b.to(dev), total)

    def backward(  # type: ignore[override]
        self, w: torch.Tensor, b: torch.Tensor, total: int, g: torch.Tensor, *, apply: bool = True
    ) -> torch.Tensor:
        """``∂loss/∂images`` from ``g = ∂loss/∂G_syn``; with ``apply``, also back-propagated into the parameters."""
        if self.z is None:
            raise RuntimeError("SynPass.backward called before forward")
        dev = self.leaf.device
        dz = feature_grad(self.z, self.view_labels, w.to(dev), b.to(dev), total, g.to(dev))
        return super().backward(dz, apply=apply)


Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class StepResult:
    """What one step gives back: the meta loss (the same on every worker), whether the step was applied
    (every worker agrees), and ``∂loss/∂images`` of the local images."""

    loss: float
    finite: bool
    image_grad: torch.Tensor


def lgm_step(
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
) -> StepResult:
    """One Linear Gradient Matching step on this process's share of the work (docs/design.md §2).

    Every process draws the same head ``(W, b)`` and the same augmentation parameters for all
    ``num_images · augs`` synthetic views and all ``real_total`` real samples, from a generator
    seeded by (seed, step); it then computes the partial head gradients of its own real samples and
    of the views of the images it owns, sums them over processes with **one** ``reduce`` of the
    concatenated ``[G_real; G_syn]``, computes the same meta loss everywhere, and back-propagates
    ``∂loss/∂z`` of its own views through its backbone into ``images``. One more ``reduce`` of a
    single flag makes every process agree whether the step is finite; a non-finite step is not
    back-propagated into the parameters (the caller then skips its optimiser step).

    Args:
        backbone: the frozen feature extractor.
        images: the rendered images this process owns (N_local×3×R×R), with their graph to the
            parameters; their rows are the images ``owned`` (global indices, class-major:
            image ``c·ipc + k`` is class c's k-th image).
        owned: global indices of the local images.
        x_real, y_real: this process's real samples of the step's batch, and ``real_positions``
            their positions (0 … real_total−1) in the global batch (they pick the augmentation).
        num_classes, feature_dim: the head's shape.
        num_images, real_total: global counts of synthetic images and real samples.
        ipc, augs: images per class; augmented copies of every synthetic image per step.
        seed, step: the run seed and the step index (0-based): all of the step's randomness.
        spec: the augmentation; ``head_std`` the head's initialisation; ``micro_batch`` and
            ``amp_dtype`` how the backbone runs.
        real_spec: the real views' augmentation when it differs from ``spec`` (``aug_real: false``:
            ``mode="none"``, only resized); the real samples' parameters are drawn from ``spec`` all
            the same, so the step's other draws do not change with it.
        reduce: sums a tensor over processes (identity on one process; an all-reduce on workers).
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, "step", step))
    w, b = draw_head(num_classes, feature_dim, gen, head_std)
    dev = images.device
    w, b = w.to(dev), b.to(dev)
    total_syn = num_images * augs
    syn_params = sample_params(total_syn, spec, gen)
    real_params = sample_params(real_total, spec, gen)
    g_real = real_grad(backbone, x_real.to(dev), y_real.to(dev), w, b, real_total, real_spec or spec,
                       real_params.select(real_positions.long().cpu()), micro_batch=micro_batch,
                       amp_dtype=amp_dtype)
    rows, local = shard_views(owned, num_images, augs)
    labels = owned.to(dev).long() // ipc
    syn = SynPass(backbone, images, labels, local, syn_params.select(rows), spec,
                  micro_batch=micro_batch, amp_dtype=amp_dtype)
    g_syn = syn.forward(w, b, total_syn)
    summed = reduce(torch.cat([g_real, g_syn]))
    loss, g = meta_loss_and_grad(summed[:num_classes], summed[num_classes:])
    grad = syn.backward(w, b, total_syn, g, apply=False)
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()) else 1.0],
                       device=dev)
    finite = float(reduce(bad)[0]) == 0.0
    if finite and images.requires_grad:
        images.backward(grad)
    return StepResult(float(loss), finite, grad)

"""The exact Linear Gradient Matching step, first order, as tensors in and tensors out (DESIGN §2).

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

import hashlib
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lgm_ray.augment import AugParams, AugSpec, apply

Backbone = Callable[[torch.Tensor], torch.Tensor]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, step, tag, …), identical on every process and machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


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


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if not size or size >= n else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


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


def _scaled_input_grad(z: torch.Tensor, src: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """``∂(z·dz)/∂src`` with ``dz`` scaled to unit max before the backward and unscaled after.

    ``dz`` carries a ``1/M`` factor and is tiny; in fp16 the backward through the backbone would
    underflow. Scaling by a power of two is exact; on overflow the scale backs off and retries.
    """
    peak = dz.abs().max()
    if not torch.isfinite(peak) or peak == 0:
        return torch.zeros_like(src)
    scale = 2.0 ** float(torch.floor(-torch.log2(peak)))
    # Only fp16 can overflow and need a second try; keeping the graph otherwise would hold a
    # micro-batch's activations alive into the next one and double the peak memory.
    retry = z.dtype == torch.float16
    for _ in range(4 if retry else 1):
        (grad,) = torch.autograd.grad(z, src, grad_outputs=(dz * scale).to(z.dtype), retain_graph=retry)
        if not retry or torch.isfinite(grad).all():
            return grad.float() / scale
        scale /= 2.0**8
    raise FloatingPointError("non-finite image gradients even after reducing the loss scale")


class SynPass:
    """The synthetic side of one step for the views this process owns.

    Args:
        backbone: frozen feature extractor (inputs in [0, 1] at ``spec.crop_res``).
        images: rendered synthetic images this process owns (N_local×3×R×R), with their graph to
            the parameters; :meth:`backward` back-propagates into it.
        labels: their labels (N_local).
        view_images: for each local view, the row of ``images`` it augments.
        params: the local views' augmentation parameters (same order as ``view_images``).
        spec: the augmentation.
        micro_batch: views per forward in the two-pass form; ``None`` = one pass with the graph kept.
        amp_dtype: ``torch.bfloat16`` / ``torch.float16`` to run the backbone under autocast.
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
        self.backbone = backbone
        self.images = images
        self.leaf = images.detach().requires_grad_(True)
        self.view_images = view_images.to(images.device)
        self.view_labels = labels.to(images.device)[self.view_images]
        self.params = params
        self.spec = spec
        self.micro_batch = micro_batch
        self.amp_dtype = amp_dtype
        self.z: torch.Tensor | None = None
        self._z_graph: torch.Tensor | None = None
        self._src: torch.Tensor | None = None

    def _features(self, sl: slice, src: torch.Tensor) -> torch.Tensor:
        with _autocast(src.device, self.amp_dtype):
            return self.backbone(apply(src, self.params.select(sl), self.spec))

    def forward(self, w: torch.Tensor, b: torch.Tensor, total: int) -> torch.Tensor:
        """Partial ``G_syn`` of the local views (normalised by the global view count ``total``)."""
        dev = self.leaf.device
        w, b = w.to(dev), b.to(dev)
        n = len(self.view_images)
        if self.micro_batch is None or self.micro_batch >= n:
            src = self.leaf[self.view_images].detach().requires_grad_(True)
            with torch.enable_grad():
                self._z_graph = self._features(slice(0, n), src)
            self._src = src
            self.z = self._z_graph.detach().float()
        else:
            with torch.no_grad():
                zs = [self._features(sl, self.leaf[self.view_images[sl]]) for sl in _chunks(n, self.micro_batch)]
            self.z = torch.cat(zs).float()
        return head_grad(self.z, self.view_labels, w, b, total)

    def backward(self, w: torch.Tensor, b: torch.Tensor, total: int, g: torch.Tensor) -> torch.Tensor:
        """Back-propagate ``g = ∂loss/∂G_syn`` into the images' parameters; returns ``∂loss/∂images``."""
        if self.z is None:
            raise RuntimeError("SynPass.backward called before forward")
        dev = self.leaf.device
        w, b, g = w.to(dev), b.to(dev), g.to(dev)
        dz = feature_grad(self.z, self.view_labels, w, b, total, g)
        grad = torch.zeros_like(self.leaf)
        if self._z_graph is not None:
            grad.index_add_(0, self.view_images, _scaled_input_grad(self._z_graph, self._src, dz))
            self._z_graph = self._src = None
        else:
            for sl in _chunks(len(self.view_images), self.micro_batch):
                src = self.leaf[self.view_images[sl]].detach().requires_grad_(True)
                with torch.enable_grad():
                    z = self._features(sl, src)
                grad.index_add_(0, self.view_images[sl], _scaled_input_grad(z, src, dz[sl]))
                del z, src  # free this micro-batch's graph before the next forward
        if self.images.requires_grad:
            self.images.backward(grad)
        return grad

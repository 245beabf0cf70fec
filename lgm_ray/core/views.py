"""The synthetic views of one step, method-agnostic: their features, and the backward from a feature gradient.

:class:`ViewPass` is the part of :class:`lgm_ray.core.matching.SynPass` that does not know the
objective: it augments the images this process owns into their views, computes the views' features
through the frozen backbone, and back-propagates a given ``∂loss/∂z`` of those features into the
images. With ``micro_batch`` it runs the two-pass form of docs/design.md §1 (pass 1: features of
all views in micro-batches without a graph; pass 2: each micro-batch recomputed with a graph — the
same augmentation parameters, so the same views — and back-propagated, its graph freed before the
next), which keeps memory constant in the number of views; with ``micro_batch=None`` one pass keeps
the graph. Mixed precision and the fp16 loss scaling: :func:`_scaled_input_grad`.

Any step whose objective reaches the synthetic images only through their features (LGM's meta
loss, the closed-form probe of :mod:`lgm_ray.core.clp`) is "features → objective → ∂loss/∂z →
:meth:`ViewPass.backward`". The numbers are those of ``SynPass``: the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from lgm_ray.core.augment import AugParams, AugSpec, apply

Backbone = Callable[[torch.Tensor], torch.Tensor]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _chunks(n: int, size: int | None) -> list[slice]:
    size = n if not size or size >= n else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _scaled_input_grad(
    z: torch.Tensor, src: torch.Tensor, dz: torch.Tensor, amp_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``∂(z·dz)/∂src`` with ``dz`` scaled to unit max before the backward and unscaled after.

    ``dz`` carries a ``1/M`` factor and is tiny; in fp16 the backward through the backbone would
    underflow. Scaling by a power of two is exact. Under fp16 autocast an overflow can happen in any
    half-precision layer inside the backbone even when ``z`` itself is fp32 (every backbone ends in a
    LayerNorm, which autocast runs in fp32), so the check is on the input gradient and the retry
    follows the autocast dtype: the scale backs off by 2⁸ up to three times. A gradient that stays
    non-finite is returned as it is; the step sees it and is skipped (never applied).
    """
    peak = dz.abs().max()
    if not torch.isfinite(peak):
        return torch.full_like(src, float("nan"))
    if peak == 0:
        return torch.zeros_like(src)
    scale = 2.0 ** float(torch.floor(-torch.log2(peak)))
    # Only fp16 can overflow and need a second try; keeping the graph otherwise would hold a
    # micro-batch's activations alive into the next one and double the peak memory.
    retry = amp_dtype == torch.float16
    for attempt in range(4 if retry else 1):
        last = attempt == (3 if retry else 0)
        (grad,) = torch.autograd.grad(z, src, grad_outputs=(dz * scale).to(z.dtype), retain_graph=retry and not last)
        if torch.isfinite(grad).all() or last:
            return grad.float() / scale
        scale /= 2.0**8
    raise AssertionError("unreachable")


class ViewPass:
    """Features of the views this process owns, and ``∂loss/∂images`` from ``∂loss/∂features``.

    Args:
        backbone: frozen feature extractor (inputs in [0, 1] at ``spec.crop_res``).
        images: rendered synthetic images this process owns (N_local×3×R×R), with their graph to
            the parameters; :meth:`backward` can back-propagate into it.
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

    def forward(self) -> torch.Tensor:
        """The local views' features, float32 (N_views × features), detached."""
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
        return self.z

    def backward(self, dz: torch.Tensor, *, apply: bool = True) -> torch.Tensor:
        """``∂loss/∂images`` from ``dz = ∂loss/∂z`` of the local views; with ``apply``, also into the parameters."""
        if self.z is None:
            raise RuntimeError("ViewPass.backward called before forward")
        dz = dz.to(self.leaf.device).float()
        grad = torch.zeros_like(self.leaf)
        if self._z_graph is not None:
            grad.index_add_(0, self.view_images, _scaled_input_grad(self._z_graph, self._src, dz, self.amp_dtype))
            self._z_graph = self._src = None
        else:
            for sl in _chunks(len(self.view_images), self.micro_batch):
                src = self.leaf[self.view_images[sl]].detach().requires_grad_(True)
                with torch.enable_grad():
                    z = self._features(sl, src)
                grad.index_add_(0, self.view_images[sl], _scaled_input_grad(z, src, dz[sl], self.amp_dtype))
                del z, src  # free this micro-batch's graph before the next forward
        if apply and self.images.requires_grad:
            self.images.backward(grad)
        return grad

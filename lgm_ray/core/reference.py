"""The reference formulation of one LGM step: second order, the whole batch in one graph.

This is how the paper's public implementation computes the step (docs/design.md §1): ``G_syn`` is taken
with ``create_graph=True`` and the meta loss is back-propagated through it, i.e. through the
backbone twice. lgm_ray never trains with it; it is the oracle that :mod:`lgm_ray.core.matching` is
tested against and the baseline that ``benchmarks/step.py`` times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lgm_ray.core.augment import AugParams, AugSpec, apply
from lgm_ray.core.matching import Backbone, meta_loss, view_layout


def reference_step(
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    augs: int,
    syn_params: AugParams,
    x_real: torch.Tensor,
    y_real: torch.Tensor,
    real_params: AugParams,
    spec: AugSpec,
    w: torch.Tensor,
    b: torch.Tensor,
    real_spec: AugSpec | None = None,
) -> torch.Tensor:
    """Back-propagate the meta loss into ``images``' graph; returns the loss.

    Args:
        images: rendered synthetic images (N×3×R×R) with their graph to the parameters.
        labels: their labels.
        augs: augmented copies per image (views ``a·N + i``, as :func:`lgm_ray.core.matching.view_layout`).
        syn_params / real_params: augmentation parameters of the synthetic views and real images.
        w, b: the step's linear head.
        real_spec: the real images' augmentation, if not ``spec`` (``aug_real: false``).
    """
    views = apply(images[view_layout(images.shape[0], augs).to(images.device)], syn_params, spec)
    y_views = labels.repeat(augs)
    w_ = w.detach().clone().requires_grad_(True)
    b_ = b.detach().clone().requires_grad_(True)
    z_syn = backbone(views).float()
    gw_s, gb_s = torch.autograd.grad(F.cross_entropy(z_syn @ w_.t() + b_, y_views), [w_, b_], create_graph=True)
    with torch.no_grad():
        z_real = backbone(apply(x_real, real_params, real_spec or spec)).float()
    with torch.enable_grad():
        gw_r, gb_r = torch.autograd.grad(F.cross_entropy(z_real @ w_.t() + b_, y_real), [w_, b_])
    loss = meta_loss(torch.cat([gw_r, gb_r[:, None]], 1), torch.cat([gw_s, gb_s[:, None]], 1))
    loss.backward()
    return loss.detach()

"""A backbone part that overflows fp16 in its backward: shared by the matching and distill tests."""

from __future__ import annotations

import torch


class Amplify(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``factor`` in its own dtype (fp16 under
    autocast), so it overflows inside the backbone while the features it returns stay fp32."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None

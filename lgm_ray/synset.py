"""The synthetic set: image parameterisations, colour decorrelation, rendering, save / load.

Pure torch (no file formats beyond ``torch.save``-able dicts, no Ray, no MLflow). Follows the
paper's parameterisation (DESIGN §1):

* **pyramid** (default): levels 1×1, 2×2, 4×4 … up to ``res``; a run starts with the coarsest
  level(s) and adds the next finer level every ``pyramid_extent_it`` steps. Rendering sums the
  levels, each bilinearly resized to ``res``.
* **pixel** (ablation): one ``res``×``res`` tensor.

Either way the sum goes through the optional fixed colour decorrelation and ``sigmoid(2·x)``.

A set may hold only some classes (``classes=``): the distributed runner shards the synthetic set
by class, each worker owning its classes' parameters and optimiser state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# The fixed colour-correlation matrix of the paper (Lucid's ImageNet colour decorrelation),
# normalised by its largest column norm so the rendered colours keep a comparable range.
_COLOR_CORRELATION = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
COLOR_MATRIX = (_COLOR_CORRELATION / _COLOR_CORRELATION.norm(dim=0).max()).float()

PARAMETERISATIONS = ("pyramid", "pixel")


def pyramid_resolutions(res: int) -> list[int]:
    """Level sides from coarsest to finest: 1, 2, 4, … and ``res`` itself last.

    A ``res`` that is not a power of two ends with ``res`` (e.g. 224 → …, 64, 128, 224).
    """
    if res < 1:
        raise ValueError(f"synthetic resolution must be ≥ 1, got {res}")
    sides = [1]
    while sides[-1] < res:
        sides.append(min(sides[-1] * 2, res))
    return sides


def decorrelate_color(x: torch.Tensor) -> torch.Tensor:
    """Apply the fixed colour matrix to every pixel's colour vector: ``out_i = Σ_j M_ij x_j``."""
    m = COLOR_MATRIX.to(device=x.device, dtype=x.dtype)
    return torch.einsum("ij,njhw->nihw", m, x)


class SyntheticSet(nn.Module):
    """``ipc`` learnable images for each of a set of classes.

    Args:
        num_classes: classes of the whole task (labels range over ``0 … num_classes-1``).
        ipc: images per class.
        res: side of the rendered images.
        param: ``"pyramid"`` or ``"pixel"``.
        decorrelate: apply the fixed colour decorrelation before the sigmoid.
        channels: 3 (colour, the paper) or 1 — grey images rendered as three equal channels, for
            grey datasets whose backbone never saw colour (decorrelation does not apply).
        classes: the classes this set owns (default: all), in increasing order.
        start_levels: pyramid levels present at the start (the reference's ``pyramid_start_res``
            of 1 means one level).
        generator: draws the initial noise; a seeded generator makes the set reproducible.
        init: ``"noise"`` (standard normal) or ``"zero"``.
    """

    def __init__(
        self,
        num_classes: int,
        ipc: int = 1,
        res: int = 256,
        *,
        param: str = "pyramid",
        decorrelate: bool = True,
        channels: int = 3,
        classes: Sequence[int] | None = None,
        start_levels: int = 1,
        generator: torch.Generator | None = None,
        init: str = "noise",
    ) -> None:
        super().__init__()
        if param not in PARAMETERISATIONS:
            raise ValueError(f"unknown parameterisation {param!r}; choose one of {PARAMETERISATIONS}")
        if ipc < 1:
            raise ValueError(f"ipc (images per class) must be ≥ 1, got {ipc}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 3 (colour) or 1 (grey), got {channels}")
        if init not in ("noise", "zero"):
            raise ValueError(f"init must be 'noise' or 'zero', got {init!r}")
        classes = list(range(num_classes)) if classes is None else sorted(int(c) for c in classes)
        if any(c < 0 or c >= num_classes for c in classes):
            raise ValueError(f"classes {classes} fall outside 0…{num_classes - 1}")
        self.num_classes = num_classes
        self.ipc = ipc
        self.res = res
        self.param = param
        self.decorrelate = decorrelate and channels == 3
        self.channels = channels
        self.init = init
        self.classes = classes
        self.register_buffer("labels", torch.tensor(classes, dtype=torch.long).repeat_interleave(ipc))
        self._generator = generator
        n = len(self.labels)
        if param == "pixel":
            self.levels = nn.ParameterList([nn.Parameter(self._noise((n, channels, res, res)))])
        else:
            sides = pyramid_resolutions(res)[: max(1, start_levels)]
            self.levels = nn.ParameterList(
                [nn.Parameter(self._noise((n, channels, s, s)) / len(sides)) for s in sides]
            )

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        if self.init == "zero":
            return torch.zeros(shape)
        return torch.randn(shape, generator=generator or self._generator)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def max_levels(self) -> int:
        return 1 if self.param == "pixel" else len(pyramid_resolutions(self.res))

    @property
    def can_grow(self) -> bool:
        return self.param == "pyramid" and len(self.levels) < self.max_levels

    @torch.no_grad()
    def grow(self, generator: torch.Generator | None = None) -> bool:
        """Add the next finer pyramid level; returns False when already at full resolution.

        As in the paper, the new level is ``randn / n_new`` and the existing levels are scaled by
        ``n_old / n_new``. The caller must re-create its optimiser (the parameter list changed).
        A run passes a generator seeded from (run seed, level) so a resumed run grows identically.
        """
        if not self.can_grow:
            return False
        n_old = len(self.levels)
        n_new = n_old + 1
        side = pyramid_resolutions(self.res)[n_old]
        device = self.levels[0].device
        for p in self.levels:
            p.mul_(n_old / n_new)
        new = self._noise((self.num_images, self.channels, side, side), generator).to(device) / n_new
        self.levels.append(nn.Parameter(new))
        return True

    def grow_to(self, n_levels: int) -> None:
        """Grow until ``n_levels`` levels exist (used when restoring a checkpoint)."""
        while len(self.levels) < n_levels:
            if not self.grow(torch.Generator()):
                raise ValueError(f"cannot grow a {self.param} set of res {self.res} to {n_levels} levels")

    def forward(self) -> torch.Tensor:
        return self.render()

    def render(self) -> torch.Tensor:
        """Images N×3×res×res in (0, 1), differentiable w.r.t. the parameters."""
        x = None
        for p in self.levels:
            up = p if p.shape[-1] == self.res else F.interpolate(
                p, size=(self.res, self.res), mode="bilinear", align_corners=False
            )
            x = up if x is None else x + up
        if self.decorrelate:
            x = decorrelate_color(x)
        x = torch.sigmoid(2.0 * x)
        return x.expand(-1, 3, -1, -1) if self.channels == 1 else x

    def config(self) -> dict:
        """The constructor arguments needed to rebuild this set (for checkpoints)."""
        return {
            "num_classes": self.num_classes,
            "ipc": self.ipc,
            "res": self.res,
            "param": self.param,
            "decorrelate": self.decorrelate,
            "channels": self.channels,
            "classes": list(self.classes),
            "init": self.init,
            "n_levels": len(self.levels),
        }

    @classmethod
    def from_state(cls, config: dict, state_dict: dict) -> SyntheticSet:
        """Rebuild a set from :meth:`config` and ``state_dict()`` output."""
        cfg = dict(config)
        n_levels = cfg.pop("n_levels")
        s = cls(**cfg, start_levels=n_levels)
        s.load_state_dict(state_dict)
        return s


def synset_payload(images: torch.Tensor, labels: torch.Tensor, **extra) -> dict:
    """The saved-set format shared with the reference implementation.

    ``{"images": float N×3×H×W in [0, 1], "labels": long N}`` plus any ``extra`` keys (lgm_ray
    adds its parameters, config and provenance; readers of the reference format ignore them).
    """
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    labels = labels.detach().long().cpu()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be N×3×H×W, got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    return {"images": images, "labels": labels, **extra}


def validate_synset(payload: object, source: str = "synthetic set") -> dict:
    """Check a loaded payload has the shared format; raise a ``ValueError`` that says what is wrong."""
    if not isinstance(payload, dict) or "images" not in payload or "labels" not in payload:
        raise ValueError(
            f"{source} is not a synthetic set: expected a dict with 'images' (N×3×H×W in [0, 1]) and "
            f"'labels' (N); save one with lgm_ray.synset.synset_payload or `python -m lgm_ray.distill`"
        )
    images, labels = payload["images"], payload["labels"]
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{source}: 'images' must be a float tensor N×3×H×W")
    if not torch.is_tensor(labels) or labels.shape != (images.shape[0],):
        raise ValueError(f"{source}: 'labels' must be a tensor of shape ({images.shape[0]},)")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{source}: 'images' must lie in [0, 1]")
    return payload

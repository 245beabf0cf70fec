"""The synthetic set: image parameterisations, colour decorrelation, rendering, save / load.

Pure torch (no file formats beyond ``torch.save``-able dicts, no Ray, no MLflow). Follows the
paper's parameterisation (docs/design.md §1):

* **pyramid** (default): levels 1×1, 2×2, 4×4 … up to ``res``; a run starts with the coarsest
  level(s) and adds the next finer level every ``pyramid_extent_it`` steps. Rendering sums the
  levels, each bilinearly resized to ``res``.
* **pixel** (ablation): one ``res``×``res`` tensor.

Either way the sum goes through the optional fixed colour decorrelation and ``sigmoid(2·x)``.

A set may hold only some classes (``classes=``): the distributed runner shards the synthetic set
by class, each worker owning its classes' parameters and optimiser state. The noise of class ``c``
at pyramid level ``l`` (initial or added by :meth:`SyntheticSet.grow`) is drawn from
``lgm_ray.core.seeds.generator(seed, "syn", c, l)``, so a set's rows never depend on how the classes
were split: the set built for classes {3, 7} equals rows 3 and 7 of the set built for all classes,
at every level. :meth:`SyntheticSet.class_state` / :meth:`SyntheticSet.load_class_state` move the
parameters of single classes, so a checkpoint written per class resumes on any other split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lgm_ray.common.errors import InputError
from lgm_ray.core.defaults import SYN_RES
from lgm_ray.core.seeds import generator as seeded_generator

# The fixed colour-correlation matrix of the paper (Lucid's ImageNet colour decorrelation),
# normalised by its largest column norm so the rendered colours keep a comparable range.
_COLOR_CORRELATION = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float64
)
COLOR_MATRIX = (_COLOR_CORRELATION / _COLOR_CORRELATION.norm(dim=0).max()).float()

PARAMETERISATIONS = ("pyramid", "pixel")
# How a run starts its set: the paper's noise, or real training images (:meth:`SyntheticSet.set_images`).
INITS = ("noise", "real")
LEVEL_INITS = ("noise", "zero")  # what SyntheticSet(init=…) fills a new level with
REAL_INIT_EPS = 0.02  # a real-image start clips pixels to [eps, 1 − eps] (sigmoid pre-activation ±1.95)


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


def preactivation(images: torch.Tensor, channels: int, decorrelate: bool, eps: float = REAL_INIT_EPS) -> torch.Tensor:
    """What :meth:`SyntheticSet.render` turns into ``images`` (N×3×H×W in [0, 1]): its inverse.

    Pixels are clipped to [eps, 1 − eps] first, so none lands in the sigmoid's flat tail; grey sets
    (``channels`` 1) take the channel mean; colour sets undo the colour decorrelation.
    """
    t = images.detach().float().clamp(eps, 1 - eps)
    if channels == 1:
        t = t.mean(dim=1, keepdim=True)
    pre = 0.5 * torch.log(t / (1 - t))  # render() applies sigmoid(2·x)
    if decorrelate:
        pre = torch.einsum("ij,njhw->nihw", torch.linalg.inv(COLOR_MATRIX.double()).float(), pre)
    return pre


def _checked_classes(num_classes: int, ipc: int, param: str, channels: int, init: str,
                     classes: Sequence[int] | None) -> list[int]:
    """The constructor's input checks; the classes a set owns, sorted."""
    if param not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {param!r}; choose one of {PARAMETERISATIONS}")
    if ipc < 1:
        raise ValueError(f"ipc (images per class) must be ≥ 1, got {ipc}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 3 (colour) or 1 (grey), got {channels}")
    if init not in LEVEL_INITS:
        raise ValueError(f"init must be {' or '.join(map(repr, LEVEL_INITS))}, got {init!r}")
    classes = list(range(num_classes)) if classes is None else sorted(int(c) for c in classes)
    if any(c < 0 or c >= num_classes for c in classes):
        raise ValueError(f"classes {classes} fall outside 0…{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} repeat a class; give each class once")
    return classes


def _levels_of(states: Mapping[int, Mapping[str, torch.Tensor]], classes: list[int]) -> int:
    """The number of levels of per-class states (:meth:`SyntheticSet.class_state`): every class in
    ``classes`` present, all with as many levels."""
    missing = [c for c in classes if c not in states]
    if missing:
        raise ValueError(f"class state is missing classes {missing}; give the state of every class in {classes}")
    counts = {len(states[c]) for c in classes}
    if len(counts) != 1:
        raise ValueError(f"class states hold different numbers of levels {sorted(counts)}; they must come "
                         "from one checkpoint step")
    return counts.pop()


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
            of 1 means one level). Starting with n levels gives the same parameters as starting
            with one and growing n-1 times (up to float rounding of the rescaling).
        seed: the run seed. Class ``c``'s noise at level ``l`` comes from
            ``lgm_ray.core.seeds.generator(seed, "syn", c, l)`` (its ``ipc`` images in one draw), so
            every row depends on (seed, class, level) only, never on which classes the set holds.
        init: ``"noise"`` (standard normal) or ``"zero"``.
    """

    def __init__(
        self,
        num_classes: int,
        ipc: int = 1,
        res: int = SYN_RES,
        *,
        param: str = "pyramid",
        decorrelate: bool = True,
        channels: int = 3,
        classes: Sequence[int] | None = None,
        start_levels: int = 1,
        seed: int = 0,
        init: str = "noise",
    ) -> None:
        super().__init__()
        classes = _checked_classes(num_classes, ipc, param, channels, init, classes)
        self.num_classes = num_classes
        self.ipc = ipc
        self.res = res
        self.param = param
        self.decorrelate = decorrelate and channels == 3
        self.channels = channels
        self.init = init
        self.seed = int(seed)
        self.classes = classes
        self.register_buffer("labels", torch.tensor(classes, dtype=torch.long).repeat_interleave(ipc))
        n_start = 1 if param == "pixel" else min(max(1, start_levels), self.max_levels)
        self.levels = nn.ParameterList(
            [nn.Parameter(self._level_noise(level) / n_start) for level in range(n_start)]
        )

    def level_sides(self) -> list[int]:
        """Side of every level this set can have: ``[res]`` for pixel, the pyramid's otherwise."""
        return [self.res] if self.param == "pixel" else pyramid_resolutions(self.res)

    def _level_noise(self, level: int) -> torch.Tensor:
        """Unscaled noise of level ``level`` for all rows: per class, from (seed, "syn", class, level)."""
        side = self.level_sides()[level]
        shape = (self.ipc, self.channels, side, side)
        if self.init == "zero" or not self.classes:
            return torch.zeros((self.num_images, *shape[1:]))
        return torch.cat([torch.randn(shape, generator=seeded_generator(self.seed, "syn", c, level))
                          for c in self.classes])

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def max_levels(self) -> int:
        return len(self.level_sides())

    @property
    def can_grow(self) -> bool:
        return self.param == "pyramid" and len(self.levels) < self.max_levels

    @torch.no_grad()
    def set_images(self, images: torch.Tensor, eps: float = REAL_INIT_EPS) -> None:
        """Make the set render ``images`` (its rows, N×3×res×res in [0, 1]): the ``init: real`` start.

        Pixel: the one level holds the pre-activation. Pyramid: every level is present from the start
        (the coarse ones zero, the finest holding the pre-activation), so the set does not grow; the
        coarse levels still move the image coarse-to-fine. The pre-activation is :func:`preactivation`'s.
        """
        if tuple(images.shape) != (self.num_images, 3, self.res, self.res):
            raise ValueError(f"set_images needs {self.num_images}×3×{self.res}×{self.res} images, "
                             f"got {tuple(images.shape)}")
        pre = preactivation(images, self.channels, self.decorrelate, eps)
        self.grow_to(self.max_levels)
        for p in self.levels:
            p.zero_()
        self.levels[-1].copy_(pre.to(self.levels[-1]))

    @torch.no_grad()
    def grow(self) -> bool:
        """Add the next finer pyramid level; returns False when already at full resolution.

        As in the paper, the new level is ``randn / n_new`` and the existing levels are scaled by
        ``n_old / n_new``. The noise is class ``c``'s from (seed, "syn", c, level), so a resumed
        run, or any split of the classes, grows identically. The caller must re-create its
        optimiser (the parameter list changed).
        """
        if not self.can_grow:
            return False
        n_old = len(self.levels)
        n_new = n_old + 1
        device = self.levels[0].device
        for p in self.levels:
            p.mul_(n_old / n_new)
        new = self._level_noise(n_old).to(device) / n_new
        self.levels.append(nn.Parameter(new))
        return True

    def grow_to(self, n_levels: int) -> None:
        """Grow until ``n_levels`` levels exist (used when restoring a checkpoint).

        The levels are the ones :meth:`grow` would have made; a restore then overwrites them with
        ``load_state_dict`` or :meth:`load_class_state`.
        """
        if n_levels > self.max_levels:
            raise ValueError(
                f"cannot grow a {self.param} set of res {self.res} to {n_levels} levels (at most {self.max_levels})"
            )
        while len(self.levels) < n_levels:
            self.grow()

    def class_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """The parameters of each class this set holds: ``{class: {"levels.<l>": ipc×C×s×s}}``.

        Detached copies on the set's device. With :meth:`load_class_state` a checkpoint written
        per class (by whichever worker owned it) restores on any other split of the classes.
        """
        return {
            c: {f"levels.{i}": p.detach()[k * self.ipc : (k + 1) * self.ipc].clone() for i, p in enumerate(self.levels)}
            for k, c in enumerate(self.classes)
        }

    @torch.no_grad()
    def load_class_state(self, states: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Load this set's classes from :meth:`class_state` output of any split (extra classes ignored).

        Every class must have the same number of levels. With as many levels as the set has now,
        the parameters are overwritten in place (an optimiser over them stays valid); with more,
        the set first grows to that many (the caller must then re-create its optimiser, as after
        :meth:`grow`); with fewer, it refuses.
        """
        n_levels = _levels_of(states, self.classes)
        if n_levels < len(self.levels):
            raise ValueError(f"class states hold {n_levels} levels but this set already has {len(self.levels)}; "
                             "load them into a freshly built set")
        self.grow_to(n_levels)
        for i, p in enumerate(self.levels):
            key = f"levels.{i}"
            for k, c in enumerate(self.classes):
                t = states[c].get(key)
                if t is None or tuple(t.shape) != (self.ipc, *p.shape[1:]):
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"class {c}: {key} must have shape {(self.ipc, *p.shape[1:])}, got {got}; "
                                     "the state comes from a set with other ipc, channels or res")
                p[k * self.ipc : (k + 1) * self.ipc].copy_(t)

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
        return {"num_classes": self.num_classes, "ipc": self.ipc, "res": self.res, "param": self.param,
                "decorrelate": self.decorrelate, "channels": self.channels, "classes": list(self.classes),
                "init": self.init, "seed": self.seed, "n_levels": len(self.levels)}

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


class SynsetFileError(InputError):
    """A file or payload that is not a synthetic set; the message says what is wrong and the fix."""


def validate_synset(payload: object, source: str = "synthetic set") -> dict:
    """Check a loaded payload has the shared format; raise :class:`SynsetFileError` saying what is wrong."""
    if not isinstance(payload, dict) or "images" not in payload or "labels" not in payload:
        raise SynsetFileError(
            f"{source} is not a synthetic set: expected a dict with 'images' (N×3×H×W in [0, 1]) and "
            f"'labels' (N); save one with lgm_ray.core.synset.synset_payload or `python -m lgm_ray.distill`"
        )
    images, labels = payload["images"], payload["labels"]
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise SynsetFileError(f"{source}: 'images' must be a float tensor N×3×H×W")
    if not torch.is_tensor(labels) or labels.shape != (images.shape[0],):
        raise SynsetFileError(f"{source}: 'labels' must be a tensor of shape ({images.shape[0]},)")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise SynsetFileError(f"{source}: 'images' must lie in [0, 1]")
    return payload


def load_synset_file(path: str | os.PathLike) -> dict:
    """The one loader of a saved synthetic set (``weights_only=True``: plain tensors and lists only), validated.

    Raises:
        SynsetFileError: no such file, a file that is not loadable as plain tensors (a text file, a
            pickle of other objects), or a payload without ``images`` N×3×H×W in [0, 1] and ``labels`` N.
    """
    p = Path(path)
    if not p.is_file():
        raise SynsetFileError(
            f"synthetic set file {str(p)!r} does not exist; pass the synset.pt written by "
            "`python -m lgm_ray.distill` (or any torch.save'd {'images', 'labels'} dict)"
        )
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types; all mean "not a plain set"
        raise SynsetFileError(
            f"cannot load synthetic set {str(p)!r} as plain tensors and lists ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); re-save it as {{'images': tensor, 'labels': tensor, ...}} "
            "with torch.save"
        ) from exc
    return validate_synset(payload, source=str(p))

"""Run configuration: one dataclass holds every field and its default; YAML in, resolved YAML out.

A config file overrides a few fields (like dinov2's ``configs/train/*.yaml`` over its default
config); command-line flags override the file. The resolved config is written next to the results.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lgm_ray.backbones.frozen import NORMALIZATIONS
from lgm_ray.common.atomic import write_text
from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.core.augment import MODES as AUG_MODES
from lgm_ray.core.augment import PADDINGS
from lgm_ray.core.defaults import CROP_RES, REAL_RES, SYN_RES
from lgm_ray.core.matching import AMP_DTYPES
from lgm_ray.core.synset import INITS, PARAMETERISATIONS

PRESETS = ("lgm", "reference")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# The fields that take one of a few names, each list declared once where it is used.
CHOICES: dict[str, tuple[str, ...]] = {
    "preset": PRESETS, "normalization": NORMALIZATIONS, "param": PARAMETERISATIONS, "init": INITS,
    "aug": AUG_MODES, "aug_padding": PADDINGS, "amp": tuple(AMP_DTYPES), "placement": PLACEMENTS,
}
# What a choice means, where the name alone does not say it.
CHOICE_NOTES = {"init": " ('noise': the paper; 'real': random real training images)"}
POSITIVE = ("steps", "ipc", "augs_per_batch", "syn_res", "real_res", "crop_res", "pyramid_extent", "ckpt_every",
            "log_every", "real_streams")
NON_NEGATIVE = ("pyramid_offset", "grid_every", "num_workers", "max_skipped_steps", "workers", "max_failures")

# ``preset: reference`` reproduces the public reference implementation where lgm_ray chose otherwise
# (README, "Paper-exact settings"). A field given explicitly still wins over the preset.
REFERENCE_PRESET: dict[str, Any] = {
    "normalization": "imagenet",  # the reference feeds every backbone ImageNet mean/std
    "raw_output": True,  # CLIP's raw projection, no added LayerNorm
    "aug_zoom_out": True,  # its random-resized crop does not clamp the crop to the image…
    "aug_padding": "zeros",  # …and pads with zeros
    "pyramid_offset": 1,  # grows before 0-based steps 201, 401, … 1601
    "steps": 5001,  # it runs 5,001 iterations
}


class ConfigError(InputError):
    """A config file or flag that cannot be used; the message says which and how to fix it."""


@dataclass
class DistillConfig:
    """One distillation run. Defaults are the paper's (docs/design.md §1) unless noted.

    The fields with their one-line docs are the run's whole vocabulary (every field is a flag of
    ``python -m lgm_ray.distill`` and a key of its YAML); the methods read and check them.
    """

    preset: str = "lgm"  # "reference": every reference-implementation setting at once (REFERENCE_PRESET)
    backbone: str = "digits_simclr_cnn"
    weights: str | None = None  # local backbone weights file instead of the hub cache
    normalization: str = "native"  # or "imagenet" (what the reference feeds every backbone)
    raw_output: bool = False  # no added LayerNorm on backbones whose output is not normalised (CLIP)
    shards: str = "digits"  # a shards folder / URL, or "digits" (in memory)
    steps: int = 5000
    lr: float = 2e-3
    ipc: int = 1
    augs_per_batch: int = 10
    param: str = "pyramid"
    init: str = "noise"  # or "real": start from random real training images (per (seed, class)), not noise
    color: bool = True  # colour decorrelation
    grey: bool = False  # distil grey images (one channel shown as three), for grey datasets
    aug: str = "standard"
    aug_noise_p: float = 0.5  # probability of the additive N(0.5, 0.2²) noise
    aug_min_scale: float = 0.08  # smallest crop area fraction of the random resized crop
    aug_real: bool = True  # augment the real views too (the paper); false: real views only resized (no crop, flip, noise)
    aug_zoom_out: bool = False  # let the crop exceed the image (the reference's unclamped crop)
    aug_padding: str = "reflection"  # or "zeros" (the reference) outside the image
    syn_res: int = SYN_RES
    real_res: int = REAL_RES
    crop_res: int = CROP_RES
    pyramid_extent: int = 200
    pyramid_offset: int = 0  # grow before 0-based steps offset + k·extent (k ≥ 1); the reference: 1
    head_std: float = 0.01
    micro_batch: int | None = None  # views per forward; None = one pass with the graph kept
    amp: str = "none"
    seed: int = 0
    out: str = "runs/distill"
    device: str = "cpu"
    ckpt_every: int = 100
    grid_every: int = 0  # save grids/step_NNNNNN.png every N steps (0: at checkpoints only)
    log_every: int = 10
    num_workers: int = 0  # data-loading processes for shards (per Ray worker when distributed)
    real_streams: int = 8  # virtual real-image streams: the real batch is the same for any ≤ this many workers
    max_skipped_steps: int = 10  # steps with a non-finite gradient skipped before the run stops
    workers: int = 0  # Ray Train workers; 0 = this process
    placement: str = "PACK"  # Ray placement strategy of the workers (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)
    max_failures: int = 1  # worker-group restarts from the last checkpoint before the run fails
    storage_path: str | None = None  # the workers' checkpoints (default OUT/ray); shared or cloud on a cluster

    def validate(self) -> DistillConfig:
        """Check every field's range and choice; returns ``self``, or raises a :class:`ConfigError`."""
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"config field {field!r} = {getattr(self, field)!r}: {why}")

        for name in POSITIVE:
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise bad(name, "must be ≥ 0")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise bad(name, f"choose {_one_of(choices)}{CHOICE_NOTES.get(name, '')}"
                                f"{did_you_mean(getattr(self, name), choices)}")
        if self.lr <= 0:
            raise bad("lr", "must be > 0 (the paper uses 2e-3)")
        if not 0 <= self.aug_noise_p <= 1:
            raise bad("aug_noise_p", "must be a probability in [0, 1]")
        if not 0 < self.aug_min_scale <= 1:
            raise bad("aug_min_scale", "must be in (0, 1]")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise bad("micro_batch", "must be ≥ 1, or null for one pass")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise bad("device", "use 'cpu' or 'cuda' / 'cuda:N'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        """Each field's scalar type and whether it may be None, read from the annotations."""
        out = {}
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            optional = type(None) in args
            base = next((a for a in args if a is not type(None)), hint) if args else hint
            out[name] = (base, optional)
        return out

    @classmethod
    def coerce(cls, name: str, value: Any, source: str = "config") -> Any:
        """``value`` as field ``name``'s type (YAML ``1e-3`` strings, ints for floats), or a ConfigError."""
        typ, optional = cls.field_types()[name]
        if value is None and optional:
            return None
        if typ is bool:
            if isinstance(value, bool):
                return value
        elif typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        elif typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif typ is str and isinstance(value, str):
            return value
        if typ in (float, int) and isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: field {name!r} = {value!r} must be {'null or ' if optional else ''}"
                          f"a{'n' if typ is int else ''} {typ.__name__}")

    @classmethod
    def check_keys(cls, data: dict[str, Any], source: str = "config") -> None:
        """Raise a ConfigError naming each unknown key and the nearest valid one."""
        unknown = sorted(set(data) - set(cls.field_names()), key=str)
        if unknown:
            hints = [f"{key!r}{did_you_mean(key, cls.field_names())}" for key in unknown]
            raise ConfigError(
                f"{source}: unknown field(s) {', '.join(hints)}; valid fields are: {', '.join(cls.field_names())}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DistillConfig:
        cls.check_keys(data, source)
        data = {k: cls.coerce(k, v, source) for k, v in data.items()}
        if data.get("preset") == "reference":
            data = {**REFERENCE_PRESET, **data}
        return cls(**data).validate()


def _one_of(choices: tuple[str, ...]) -> str:
    """``'a' or 'b'``, or ``one of 'a', 'b', 'c'``."""
    names = [repr(c) for c in choices]
    return " or ".join(names) if len(names) == 2 else f"one of {', '.join(names)}"


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file (of :class:`DistillConfig` fields), or a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    return data


def write_yaml(data: dict[str, Any], path: str | Path) -> None:
    """Write ``data`` as YAML (in its own order), whole or not at all."""
    write_text(path, yaml.safe_dump(data, sort_keys=False))

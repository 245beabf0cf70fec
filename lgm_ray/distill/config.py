"""Run configuration: one dataclass holds every field and its default; YAML in, resolved YAML out.

A config file overrides a few fields (like dinov2's ``configs/train/*.yaml`` over its default
config); command-line flags override the file. The resolved config is written next to the results.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from lgm_ray.common.errors import InputError

AMP_DTYPES = ("none", "bf16", "fp16")
PRESETS = ("lgm", "reference")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

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
    """One distillation run. Defaults are the paper's (DESIGN §1) unless noted."""

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
    syn_res: int = 256
    real_res: int = 256
    crop_res: int = 224
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
    step_delay: float = 0.0  # seconds to sleep per step: lets tests kill a run mid-way

    def validate(self) -> DistillConfig:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"config field {field!r} = {getattr(self, field)!r}: {why}")

        for name in ("steps", "ipc", "augs_per_batch", "syn_res", "real_res", "crop_res", "pyramid_extent",
                     "ckpt_every", "log_every", "real_streams"):
            if getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        if self.lr <= 0:
            raise bad("lr", "must be > 0 (the paper uses 2e-3)")
        if not 0 <= self.aug_noise_p <= 1:
            raise bad("aug_noise_p", "must be a probability in [0, 1]")
        if not 0 < self.aug_min_scale <= 1:
            raise bad("aug_min_scale", "must be in (0, 1]")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise bad("micro_batch", "must be ≥ 1, or null for one pass")
        if self.param not in ("pyramid", "pixel"):
            raise bad("param", "choose 'pyramid' or 'pixel'")
        if self.init not in ("noise", "real"):
            raise bad("init", "choose 'noise' (the paper) or 'real' (random real training images)")
        if self.aug not in ("standard", "none"):
            raise bad("aug", "choose 'standard' or 'none'")
        if self.amp not in AMP_DTYPES:
            raise bad("amp", f"choose one of {AMP_DTYPES}")
        for name in ("pyramid_offset", "grid_every", "num_workers", "max_skipped_steps", "workers", "max_failures"):
            if getattr(self, name) < 0:
                raise bad(name, "must be ≥ 0")
        if self.preset not in PRESETS:
            raise bad("preset", f"choose one of {PRESETS}")
        if self.placement not in PLACEMENTS:
            raise bad("placement", f"choose one of {PLACEMENTS}")
        if self.aug_padding not in ("reflection", "zeros"):
            raise bad("aug_padding", "choose 'reflection' or 'zeros'")
        if self.normalization not in ("native", "imagenet"):
            raise bad("normalization", "choose 'native' or 'imagenet'")
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
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            hints = []
            for key in unknown:
                near = difflib.get_close_matches(str(key), cls.field_names(), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
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


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value")
    return data


def write_yaml(data: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

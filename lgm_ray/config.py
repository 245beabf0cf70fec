"""Run configuration: one dataclass holds every field and its default; YAML in, resolved YAML out.

A config file overrides a few fields (like dinov2's ``configs/train/*.yaml`` over its default
config); command-line flags override the file. The resolved config is written next to the results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

AMP_DTYPES = ("none", "bf16", "fp16")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message says which and how to fix it."""


@dataclass
class DistillConfig:
    """One distillation run. Defaults are the paper's (DESIGN §1) unless noted."""

    backbone: str = "digits_simclr_cnn"
    weights: str | None = None  # local backbone weights file instead of the hub cache
    normalization: str = "native"  # or "imagenet" (what the reference feeds every backbone)
    shards: str = "digits"  # a shards folder / URL, or "digits" (in memory)
    steps: int = 5000
    lr: float = 2e-3
    ipc: int = 1
    augs_per_batch: int = 10
    param: str = "pyramid"
    color: bool = True  # colour decorrelation
    grey: bool = False  # distil grey images (one channel shown as three), for grey datasets
    aug: str = "standard"
    aug_noise_p: float = 0.5  # probability of the additive N(0.5, 0.2²) noise
    aug_min_scale: float = 0.08  # smallest crop area fraction of the random resized crop
    syn_res: int = 256
    real_res: int = 256
    crop_res: int = 224
    pyramid_extent: int = 200
    head_std: float = 0.01
    micro_batch: int | None = None  # views per forward; None = one pass with the graph kept
    amp: str = "none"
    seed: int = 0
    out: str = "runs/distill"
    device: str = "cpu"
    ckpt_every: int = 100
    log_every: int = 10
    num_workers: int = 0  # data-loading processes for shards
    step_delay: float = 0.0  # seconds to sleep per step: lets tests kill a run mid-way

    def validate(self) -> DistillConfig:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"config field {field!r} = {getattr(self, field)!r}: {why}")

        for name in ("steps", "ipc", "augs_per_batch", "syn_res", "real_res", "crop_res", "pyramid_extent",
                     "ckpt_every", "log_every"):
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
        if self.aug not in ("standard", "none"):
            raise bad("aug", "choose 'standard' or 'none'")
        if self.amp not in AMP_DTYPES:
            raise bad("amp", f"choose one of {AMP_DTYPES}")
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
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DistillConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{source}: unknown field(s) {unknown}; valid fields are: {', '.join(cls.field_names())}"
            )
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

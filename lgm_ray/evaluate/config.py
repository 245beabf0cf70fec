"""Every evaluation setting and its default, in one place: :class:`EvalConfig`.

The linear-probe protocol (:func:`lgm_ray.evaluate.protocol.evaluate`), the evaluation command's flags
(``python -m lgm_ray.evaluate``) and a sweep spec's ``eval:`` block all derive from this dataclass:
a default changed here changes all three.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from lgm_ray.backbones.frozen import NORMALIZATIONS
from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.core.defaults import CROP_RES, REAL_RES

FULL_MODES = ("fast", "reference")
EVAL_SPLITS = ("val", "test")  # the held-out splits a probe is scored on


@dataclass(frozen=True)
class EvalConfig:
    """How a training set (distilled or a baseline) is scored by a linear probe.

    Attributes:
        epochs: probe epochs; ``None``: 1,000 (100 for the ``full`` baseline).
        seeds: probe seeds ``3407 + k``, ``k < seeds`` (the ``random`` baseline uses selection seed ``k`` too).
        batch: probe batch; ``None``: ``min(100, n)`` (128 for ``full``). The learning rate follows it.
        split: the held-out split that scores the probe (``val`` for choices, ``test`` once at the end).
        full_mode: ``fast`` (the full-data probe on cached centre-crop features) or ``reference``
            (augmented, features recomputed every epoch).
        ipc: images per class of the ``random`` and ``centroids`` baselines.
        device: ``cpu`` or ``cuda``.
        normalization: ``native`` (the backbone's own mean/std) or ``imagenet``; for a distilled set,
            the set's own.
        real_res, crop_res: real images are resized to ``real_res``; the backbone sees ``crop_res``
            crops; for a distilled set, the set's own.
        raw_output: feed the backbone's raw output (no added LayerNorm), as the set was distilled.
    """

    epochs: int | None = None
    seeds: int = 5
    batch: int | None = None
    split: str = "test"
    full_mode: str = "fast"
    ipc: int = 1
    device: str = "cpu"
    normalization: str = "native"
    real_res: int = REAL_RES
    crop_res: int = CROP_RES
    raw_output: bool = False

    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = ("epochs", "seeds", "batch", "full_mode", "split")
    """What a sweep spec's ``eval:`` block may set (the rest follows each run's config)."""
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("real_res", "crop_res", "normalization", "raw_output", "device")
    """What a distilled set's own config decides: it is evaluated as it was distilled."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def defaults(cls, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``{field: default}`` for ``names`` (default: every field)."""
        base = cls()
        return {n: getattr(base, n) for n in (names or cls.field_names())}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, allowed: tuple[str, ...] | None = None,
                  source: str = "eval") -> EvalConfig:
        """A checked config from a mapping; an unknown key names the nearest valid one."""
        valid = allowed or cls.field_names()
        for key in data:
            if key not in valid:
                raise InputError(f"{source}: unknown key {key!r}{did_you_mean(key, valid)}; valid keys: "
                                 f"{', '.join(valid)}")
        cfg = cls(**data)
        cfg.validate(source)
        return cfg

    def replace(self, **changes: Any) -> EvalConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, source: str = "eval") -> None:
        """Raise :class:`~lgm_ray.common.errors.InputError` naming the first bad field and its fix."""
        def positive(name: str, value: Any, optional: bool) -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{source}.{name}: expected a positive integer, got {value!r}")

        positive("epochs", self.epochs, True)
        positive("seeds", self.seeds, False)
        positive("batch", self.batch, True)
        positive("ipc", self.ipc, False)
        positive("real_res", self.real_res, False)
        positive("crop_res", self.crop_res, False)
        for name, choices in (("split", EVAL_SPLITS), ("full_mode", FULL_MODES), ("normalization", NORMALIZATIONS)):
            value = getattr(self, name)
            if value not in choices:
                raise InputError(f"{source}.{name}: {value!r} is not one of {', '.join(choices)}"
                                 f"{did_you_mean(value, choices)}")
        if not isinstance(self.raw_output, bool):
            raise InputError(f"{source}.raw_output: expected true or false, got {self.raw_output!r}")

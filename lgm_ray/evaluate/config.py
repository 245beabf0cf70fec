"""Every evaluation setting and its default, in one place: :class:`EvalConfig`.

The linear-probe protocol (:func:`lgm_ray.evaluate.protocol.evaluate` and the functions built on it),
the evaluation command's flags (``python -m lgm_ray.evaluate``: name, type, choices, default and help
of each are read from here) and a sweep spec's ``eval:`` block all derive from this dataclass: a
default changed here changes all three. The choices of the string settings are declared here
(:data:`FULL_MODES`, :data:`EVAL_SPLITS`) or where they belong (``NORMALIZATIONS``, in
:mod:`lgm_ray.backbones.frozen`), and the image sides in :mod:`lgm_ray.core.defaults`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lgm_ray.backbones.frozen import NORMALIZATIONS
from lgm_ray.common.errors import InputError
from lgm_ray.common.suggest import did_you_mean
from lgm_ray.core.defaults import CROP_RES, REAL_RES

FULL_MODES = ("fast", "reference")
EVAL_SPLITS = ("val", "test")  # the held-out splits a probe is scored on


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word for it
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EvalConfig:
    """How a training set (distilled or a baseline) is scored by a linear probe.

    Every field carries its meaning as ``help`` metadata (:meth:`help`), which is also the flag's help
    of ``python -m lgm_ray.evaluate``. The settings a distilled set fixes (:attr:`SET_FIELDS`) are, for
    a distilled set, the set's own (:func:`lgm_ray.evaluate.protocol.synset_settings`).
    """

    epochs: int | None = _setting(None, "probe epochs; none: 1000 (100 for the full baseline)")
    seeds: int = _setting(5, "probe seeds 3407+k, k < SEEDS (the random baseline uses selection seed k too)")
    batch: int | None = _setting(None, "probe batch; none: min(100, n) (128 for full); lr = 1e-3·batch/256")
    split: str = _setting("test", "held-out split that scores the probe (make choices on val, measure test "
                                  "once at the end)")
    full_mode: str = _setting("fast", "full baseline: fast = head on cached centre-crop features; reference = "
                                      "augmented, features recomputed every epoch")
    ipc: int = _setting(1, "images per class of the random and centroids baselines")
    device: str = _setting("cpu", "cpu or cuda")
    normalization: str = _setting("native", "input mean/std: the backbone's own (native) or ImageNet's")
    real_res: int = _setting(REAL_RES, "real images' resize side (short side)")
    crop_res: int = _setting(CROP_RES, "backbone input side: random resized crops to train, centre crops to test")
    raw_output: bool = _setting(False, "feed the backbone's raw output (no added LayerNorm), as the reference "
                                       "preset distils")

    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = ("epochs", "seeds", "batch", "full_mode", "split")
    """What a sweep spec's ``eval:`` block may set (the rest follows each run's config)."""
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("real_res", "crop_res", "normalization", "raw_output", "device")
    """What a distilled set's own config decides: it is evaluated as it was distilled."""
    SET_FIELDS: ClassVar[tuple[str, ...]] = ("normalization", "real_res", "crop_res", "raw_output")
    """What a saved set fixes for its evaluation (:func:`lgm_ray.evaluate.protocol.synset_settings`)."""
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "split": EVAL_SPLITS, "full_mode": FULL_MODES, "normalization": NORMALIZATIONS}
    """The string settings that take one of a few values."""
    POSITIVE: ClassVar[tuple[str, ...]] = ("epochs", "seeds", "batch", "ipc", "real_res", "crop_res")
    """The integer settings (each ≥ 1; ``epochs`` and ``batch`` may be ``None``)."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def help(cls, name: str) -> str:
        """The meaning of field ``name`` (its ``help`` metadata)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]

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

    def validate(self, source: str = "eval", *, flags: bool = False) -> EvalConfig:
        """Raise :class:`~lgm_ray.common.errors.InputError` naming the first bad field and its fix; else self.

        ``flags``: name a field as the command's flag (``--crop-res``) instead of ``source.crop_res``.
        """
        def where(name: str) -> str:
            return "--" + name.replace("_", "-") if flags else f"{source}.{name}"

        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is None and name in ("epochs", "batch"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{where(name)}: expected a positive integer, got {value!r}")
        for name, choices in self.CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise InputError(f"{where(name)}: {value!r} is not one of {', '.join(choices)}"
                                 f"{did_you_mean(value, choices)}")
        if not isinstance(self.raw_output, bool):
            raise InputError(f"{where('raw_output')}: expected true or false, got {self.raw_output!r}")
        return self

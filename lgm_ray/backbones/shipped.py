"""Shipped demo backbones: loading their weight files.

Every demo backbone of lgm_ray is a small network pre-trained self-supervised on the digits train
split by a script in ``scripts/``, with its ``state_dict`` shipped in ``lgm_ray/backbones/weights/``. Two rules
hold for all of them, and live here once:

* a missing or unreadable weights file is a :class:`~lgm_ray.backbones.registry.BackboneWeightsError` that
  names the file and the command that regenerates it — never a silent random initialisation;
* each module registers itself (``register_build``) with the
  same :class:`~lgm_ray.backbones.registry.BackboneSpec` records as the hub backbones, so tests and the demo
  walk the users' path; each record carries ``input_grid=8``, so every input is first brought to the
  digits' 8×8 grid (:mod:`lgm_ray.backbones.grid`) — the weights files stay the networks' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from lgm_ray.backbones.registry import BackboneWeightsError

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
DIGITS_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DIGITS_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

M = TypeVar("M", bound=nn.Module)


def load_shipped(model: M, path: str | Path, *, name: str, script: str) -> M:
    """Load a ``state_dict`` file into ``model`` and return it in eval mode.

    Args:
        model: the architecture, freshly built.
        path: the weights file.
        name: the backbone's registry name (for the message).
        script: the ``scripts/…`` file that regenerates the weights (for the message).

    Raises:
        BackboneWeightsError: the file is missing, unreadable, or holds another architecture's weights.
    """
    path = Path(path)
    fix = f"regenerate it with `python {script} --out {path}` (or reinstall lgm_ray, which ships it)"
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone {name!r}: weights file {path} does not exist; {fix}. lgm_ray never runs a "
            "pretrained backbone with random weights.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: any unpickling error
        raise BackboneWeightsError(f"backbone {name!r}: cannot read weights file {path} "
                                   f"({type(exc).__name__}: {exc}); {fix}") from exc
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"backbone {name!r}: {path} holds a {type(state).__name__}, not a "
                                   f"state_dict; {fix}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
        first = " ".join(str(exc).split())[:300]
        raise BackboneWeightsError(f"backbone {name!r}: {path} does not fit its architecture ({first}); "
                                   f"{fix}") from exc
    return model.eval()


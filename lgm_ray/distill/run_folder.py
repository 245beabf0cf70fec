"""The run folder: every path one distillation run writes, named once.

``OUT/`` holds

* ``synset.pt`` — the distilled set (:func:`lgm_ray.core.synset.synset_payload`'s format);
* ``grid.png`` — the final images, one column per class; ``grids/step_NNNNNNN.png`` along the way;
* ``config.yaml`` — the resolved config (``config.resumed_at_N.yaml`` beside it for a resume with
  other non-image settings);
* ``checkpoints/step_NNNNNNN/`` — the single process's per-class checkpoints; ``ray/`` — the Ray Train
  workers' (``ray/attempt-N/step_NNNNNNN``, and ``ray/attempt-N/figures_NNNNNNN`` with each worker's
  figures); what a checkpoint folder holds is :mod:`lgm_ray.distill.checkpoints`' business;
* ``result.json`` / ``error.txt`` — written by a sweep trial that owns the folder.

Writers (the loop, the workers, the sweep trial), readers (``--resume``, the report, evaluation) and
tests reach these paths through :class:`RunFolder` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lgm_ray.common.atomic import replace_with, write_text


class RunFolder:
    """The paths of one run folder (nothing is created until written)."""

    SYNSET = "synset.pt"
    GRID = "grid.png"
    GRIDS = "grids"
    CONFIG = "config.yaml"
    CHECKPOINTS = "checkpoints"
    RAY = "ray"
    RESULT = "result.json"
    ERROR = "error.txt"
    ATTEMPT = "attempt-{n}"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # -------------------------------------------------------------- paths
    @property
    def synset(self) -> Path:
        return self.root / self.SYNSET

    @property
    def grid(self) -> Path:
        return self.root / self.GRID

    @property
    def grids(self) -> Path:
        return self.root / self.GRIDS

    def grid_at(self, step: int) -> Path:
        """The progress grid saved at ``step``."""
        return self.grids / f"step_{step:07d}.png"

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    def resumed_config(self, step: int) -> Path:
        """Where a resume at ``step`` with other non-image settings writes its config."""
        return self.root / f"config.resumed_at_{step}.yaml"

    @property
    def checkpoints(self) -> Path:
        """The single process's checkpoints."""
        return self.root / self.CHECKPOINTS

    @staticmethod
    def checkpoint_name(step: int) -> str:
        """The name of the checkpoint folder of ``step``, under ``checkpoints/`` and in a Ray attempt."""
        return f"step_{step:07d}"

    def checkpoint_at(self, step: int) -> Path:
        """The single process's checkpoint of ``step`` (complete once it is there: it is renamed into place)."""
        return self.checkpoints / self.checkpoint_name(step)

    def partial_checkpoint(self, step: int, pid: int) -> Path:
        """Where process ``pid`` writes the checkpoint of ``step`` before renaming it to :meth:`checkpoint_at`."""
        return self.checkpoints / f".tmp-{pid}-{step}"

    def checkpoint_paths(self) -> list[Path]:
        """The single process's complete checkpoint folders, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if p.name.startswith("step_"))

    @staticmethod
    def figures_name(step: int) -> str:
        """The name of the Ray checkpoint that carries the workers' figures of a run ended at ``step``."""
        return f"figures_{step:07d}"

    @property
    def ray(self) -> Path:
        """The Ray Train workers' storage (default ``storage_path``)."""
        return self.root / self.RAY

    @classmethod
    def next_attempt(cls, storage: Path) -> str:
        """The first ``attempt-N`` not yet under the workers' ``storage`` (:attr:`ray` by default): the
        name of the Ray Train run that a start (or a ``--resume``) of the workers makes."""
        n = 0
        while (storage / cls.ATTEMPT.format(n=n)).exists():
            n += 1
        return cls.ATTEMPT.format(n=n)

    def checkpoint_roots(self) -> list[Path]:
        """Every folder a checkpoint of this run may be under: the single process's and the workers'."""
        return [self.checkpoints, self.ray]

    @property
    def result(self) -> Path:
        return self.root / self.RESULT

    @property
    def error(self) -> Path:
        return self.root / self.ERROR

    # -------------------------------------------------------------- reading and writing
    def latest_checkpoint(self):
        """The newest complete checkpoint of this run (:func:`lgm_ray.distill.checkpoints.latest_checkpoint`)."""
        from lgm_ray.distill.checkpoints import latest_checkpoint

        return latest_checkpoint(*self.checkpoint_roots())

    def grid_paths(self) -> list[Path]:
        """The progress grids, oldest first."""
        return sorted(self.grids.glob("step_*.png")) if self.grids.is_dir() else []

    @staticmethod
    def step_of(grid: Path) -> int:
        """The step a progress grid was saved at."""
        return int(grid.stem.split("_")[-1])

    def save_grid(self, images: torch.Tensor, ipc: int, step: int | None = None) -> Path:
        """Save images as a grid, one column per class and one row per image-per-class (atomically):
        ``grid.png``, or the progress grid of ``step``."""
        from torchvision.utils import save_image

        path = self.grid if step is None else self.grid_at(step)
        n_classes = images.shape[0] // ipc
        # Images are stored class-major (class 0's ipc images first); show classes along a row.
        order = torch.arange(images.shape[0]).view(n_classes, ipc).t().flatten()
        replace_with(path, lambda tmp: save_image(images[order].float().cpu(), tmp, nrow=n_classes, padding=2,
                                                  pad_value=1.0))
        return path

    def save_synset(self, payload: dict[str, Any]) -> Path:
        """``torch.save`` the set to a temporary file, then rename: a kill never leaves half a file."""
        replace_with(self.synset, lambda tmp: torch.save(payload, tmp))
        return self.synset

    def load_synset(self) -> dict[str, Any]:
        """The saved set, validated (:func:`lgm_ray.core.synset.load_synset_file`)."""
        from lgm_ray.core.synset import load_synset_file

        return load_synset_file(self.synset)

    def write_result(self, result: dict[str, Any]) -> None:
        write_text(self.result, json.dumps(result, default=str))

    def read_result(self) -> dict[str, Any] | None:
        """The trial's ``result.json``, or None when it is not there."""
        return json.loads(self.result.read_text()) if self.result.is_file() else None

    def write_error(self, text: str) -> None:
        write_text(self.error, text)

    def last_error_line(self) -> str | None:
        """The last non-blank line of ``error.txt`` (what a failure is shown as), or None."""
        if not self.error.is_file():
            return None
        lines = [ln for ln in self.error.read_text().strip().splitlines() if ln.strip()]
        return lines[-1] if lines else "unknown error"

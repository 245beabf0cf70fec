"""Per-class checkpoints of a distillation run, the same for one process and for K Ray workers.

A checkpoint is a folder:

* ``classes-rank{r}.pt`` — written by each process for the classes it owns: every pyramid level's
  rows of those classes and their Adam moments (``exp_avg``, ``exp_avg_sq``), plus Adam's step count;
* ``meta.json`` — written by rank 0 (step, per-step losses, skipped steps, elapsed seconds, pyramid
  levels, the resolved config).

Because the state is per class, a checkpoint written by K processes resumes on any other number
(the classes are dealt again). A checkpoint is *complete* when ``meta.json`` is there and its class
files cover every class exactly once; anything else is ignored, never half-loaded.

The single process writes ``OUT/checkpoints/step_NNNNNNN/`` (a temporary folder renamed into place,
so a kill never leaves half a checkpoint) and keeps the newest two; the paths are
:class:`~lgm_ray.distill.run_folder.RunFolder`'s. Ray workers hand the same files
to ``ray.train.report``, which gathers every rank's files into one checkpoint folder (docs/design.md §5).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lgm_ray.core.seeds import derive_seed
from lgm_ray.core.synset import SyntheticSet
from lgm_ray.distill.config import ConfigError

META = "meta.json"
KEEP = 2
# Fields whose change would change the images: a resumed run must match the checkpoint on all of them.
RESUME_KEYS = ("preset", "backbone", "weights", "normalization", "raw_output", "shards", "ipc", "augs_per_batch",
               "param", "init", "color", "grey", "aug", "aug_noise_p", "aug_min_scale", "aug_real", "aug_zoom_out", "aug_padding",
               "syn_res", "real_res", "crop_res", "pyramid_extent", "pyramid_offset", "head_std", "seed", "lr",
               "real_streams", "amp")


def class_file(rank: int) -> str:
    return f"classes-rank{rank}.pt"


def _rows(synset: SyntheticSet, c: int) -> slice:
    k = synset.classes.index(c)
    return slice(k * synset.ipc, (k + 1) * synset.ipc)


def class_state(synset: SyntheticSet, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state of every class a (shard of a) synthetic set owns: its level rows
    (:meth:`SyntheticSet.class_state`) and their Adam moments, plus Adam's step count."""
    params = list(synset.levels)
    states = [optimizer.state.get(p, {}) for p in params]
    adam_step = float(states[0]["step"]) if states and "step" in states[0] else 0.0
    out = {c: {k: v.cpu() for k, v in levels.items()} for c, levels in synset.class_state().items()}
    if adam_step:
        for c in synset.classes:
            for i, st in enumerate(states):
                out[c][f"exp_avg.{i}"] = st["exp_avg"][_rows(synset, c)].cpu().clone()
                out[c][f"exp_avg_sq.{i}"] = st["exp_avg_sq"][_rows(synset, c)].cpu().clone()
    return {"classes": out, "adam_step": adam_step, "n_levels": len(params)}


def load_class_state(synset: SyntheticSet, optimizer: torch.optim.Optimizer, per_class: dict[int, dict],
                     adam_step: float) -> None:
    """Copy the owned classes' rows (and Adam moments) from ``per_class`` into ``synset`` and ``optimizer``.

    ``synset`` must already have the checkpoint's number of levels (the optimiser is over its parameters).
    """
    levels = {c: {k: v for k, v in state.items() if k.startswith("levels.")} for c, state in per_class.items()}
    synset.load_class_state(levels)
    if not adam_step:
        return
    state = optimizer.state_dict()
    for i, p in enumerate(synset.levels):
        avg, sq = torch.zeros_like(p), torch.zeros_like(p)
        for c in synset.classes:
            avg[_rows(synset, c)] = per_class[c][f"exp_avg.{i}"].to(p.device, p.dtype)
            sq[_rows(synset, c)] = per_class[c][f"exp_avg_sq.{i}"].to(p.device, p.dtype)
        state["state"][i] = {"step": torch.tensor(adam_step), "exp_avg": avg, "exp_avg_sq": sq}
    optimizer.load_state_dict(state)


def write_rank_files(folder: Path, rank: int, synset: SyntheticSet, optimizer: torch.optim.Optimizer,
                     meta: dict[str, Any] | None) -> None:
    """Write this rank's class file (and ``meta.json`` when given, on rank 0) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(class_state(synset, optimizer), folder / class_file(rank))
    if meta is not None:
        (folder / META).write_text(json.dumps(meta))


@dataclass
class Checkpoint:
    """A complete checkpoint read back: its meta and the state of every class."""

    path: Path
    meta: dict[str, Any]
    classes: dict[int, dict]
    adam_step: float

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in ``folder`` if it is complete, else ``None``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text())
        classes: dict[int, dict] = {}
        adam_steps = set()
        for f in sorted(folder.glob("classes-rank*.pt")):
            part = torch.load(f, map_location="cpu", weights_only=True)
            if part["n_levels"] != meta["n_levels"] or set(part["classes"]) & set(classes):
                return None
            classes.update(part["classes"])
            adam_steps.add(part["adam_step"])
    except (OSError, ValueError, KeyError, RuntimeError, EOFError):
        return None
    if set(classes) != set(range(meta["num_classes"])) or len(adam_steps) != 1:
        return None
    return Checkpoint(folder, meta, classes, adam_steps.pop())


def latest_checkpoint(*roots: str | os.PathLike) -> Checkpoint | None:
    """The complete checkpoint with the most steps among every folder holding a ``meta.json`` below ``roots``."""
    best: Checkpoint | None = None
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for meta in root.rglob(META):
            ckpt = read_checkpoint(meta.parent)
            if ckpt is not None and (best is None or ckpt.step > best.step):
                best = ckpt
    return best


def check_resumable(ckpt: Checkpoint, config: dict[str, Any]) -> None:
    """Refuse to resume ``ckpt`` with settings that would change its images."""
    old = ckpt.meta["config"]
    changed = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} → {config.get(k)!r}" for k in changed)
        raise ConfigError(f"the checkpoint {ckpt.path} was written with other settings ({diff}); "
                          "resume with the same settings, or use another --out")


def save_local(folder: Any, rank_files: list[tuple[int, SyntheticSet, torch.optim.Optimizer]],
               meta: dict[str, Any]) -> Path:
    """Write a complete checkpoint into ``folder``'s ``checkpoints/`` atomically; keep the newest :data:`KEEP`.

    ``folder`` is a :class:`~lgm_ray.distill.run_folder.RunFolder` (not imported here: the run folder imports
    this module to find its newest checkpoint, and the arrows go one way).
    """
    final = folder.checkpoint_at(meta["step"])
    tmp = folder.partial_checkpoint(meta["step"], os.getpid())
    if tmp.exists():
        shutil.rmtree(tmp)
    for rank, synset, optimizer in rank_files:
        write_rank_files(tmp, rank, synset, optimizer, meta if rank == 0 else None)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in folder.checkpoint_paths()[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def assemble(ckpt: Checkpoint, device: str | torch.device = "cpu") -> SyntheticSet:
    """The whole synthetic set of a checkpoint, every class in one :class:`SyntheticSet`."""
    cfg = ckpt.meta["config"]
    synset = build_synset(cfg, ckpt.meta["num_classes"], None, ckpt.meta["n_levels"]).to(device)
    load_class_state(synset, torch.optim.Adam(synset.parameters()), ckpt.classes, 0.0)
    return synset


def build_synset(cfg: dict[str, Any], num_classes: int, classes: list[int] | None, n_levels: int = 1
                 ) -> SyntheticSet:
    """The (shard of the) synthetic set of a run config, grown to ``n_levels`` pyramid levels."""
    synset = SyntheticSet(
        num_classes, cfg["ipc"], cfg["syn_res"], param=cfg["param"], decorrelate=cfg["color"],
        channels=1 if cfg["grey"] else 3, classes=classes, seed=derive_seed(cfg["seed"], "synset"),
    )
    while len(synset.levels) < n_levels:
        if not synset.grow():
            raise ConfigError(f"cannot grow a {cfg['param']} set of side {cfg['syn_res']} to {n_levels} levels")
    return synset

"""One distillation run on one process: ``python -m lgm_ray.distill``.

Reads a config (``--config FILE`` and/or flags), distils ``ipc`` images per class against a frozen
backbone with the exact first-order step of :mod:`lgm_ray.matching`, and writes to ``--out``:

* ``synset.pt`` — ``{"images": N×3×H×W in [0, 1], "labels": N}`` (the reference format) plus the
  class names, the parameters and the resolved config;
* ``grid.png`` — the distilled images, one row per image-per-class;
* ``checkpoint.pt`` — written atomically every ``ckpt_every`` steps; ``--resume`` continues from it
  and reproduces an uninterrupted run bit for bit (every random draw of step t comes from a seed
  derived from (seed, t), and the real-image stream is re-opened at every checkpoint);
* ``config.yaml`` — the resolved config.

Progress goes to stderr; the last line on stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lgm_ray.augment import AugSpec, sample_params
from lgm_ray.backbones import BackboneWeightsError, create_backbone
from lgm_ray.config import ConfigError, DistillConfig, load_yaml, write_yaml
from lgm_ray.matching import SynPass, derive_seed, draw_head, meta_loss_and_grad, real_grad, view_layout
from lgm_ray.sources import RealSource, open_source
from lgm_ray.synset import SyntheticSet, synset_payload

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Fields that must match between a checkpoint and the run resuming it.
_RESUME_KEYS = ("backbone", "shards", "ipc", "augs_per_batch", "param", "color", "grey", "aug", "aug_noise_p", "aug_min_scale", "syn_res",
                "real_res", "crop_res", "pyramid_extent", "head_std", "seed", "lr")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: Path, ipc: int) -> None:
    """Save images as a grid with one column per class and one row per image-per-class."""
    from torchvision.utils import save_image

    n_classes = images.shape[0] // ipc
    # Images are stored class-major (class 0's ipc images first); show classes along a row.
    order = torch.arange(images.shape[0]).view(n_classes, ipc).t().flatten()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    save_image(images[order].float().cpu(), tmp, nrow=n_classes, padding=2, pad_value=1.0)
    os.replace(tmp, path)


class Distiller:
    """Holds one run's state; :meth:`run` executes the remaining steps."""

    def __init__(self, cfg: DistillConfig, source: RealSource | None = None) -> None:
        self.cfg = cfg.validate()
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but no CUDA device is visible; use --device cpu")
        self.source = source or open_source(cfg.shards, cfg.real_res, cfg.num_workers)
        self.backbone = create_backbone(
            cfg.backbone, weights=cfg.weights, img_size=cfg.crop_res, normalization=cfg.normalization,
            device=self.device,
        )
        self.spec = AugSpec(mode=cfg.aug, crop_res=cfg.crop_res, noise_p=cfg.aug_noise_p,
                            scale=(cfg.aug_min_scale, 1.0))
        self.num_classes = self.source.num_classes
        init_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
        self.synset = SyntheticSet(
            self.num_classes, cfg.ipc, cfg.syn_res, param=cfg.param, decorrelate=cfg.color,
            channels=1 if cfg.grey else 3, generator=init_gen,
        ).to(self.device)
        self.optimizer = self._new_optimizer()
        self.step = 0
        self.losses: list[float] = []
        self.elapsed = 0.0
        self.out = Path(cfg.out)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.synset.parameters(), lr=self.cfg.lr)

    # ---------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        atomic_save(
            {
                "step": self.step,
                "config": self.cfg.to_dict(),
                "synset_config": self.synset.config(),
                "synset_state": self.synset.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "losses": self.losses,
                "elapsed": self.elapsed,
            },
            self.checkpoint_path,
        )

    def load_checkpoint(self) -> None:
        ckpt = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        old = ckpt["config"]
        changed = [k for k in _RESUME_KEYS if old.get(k) != getattr(self.cfg, k)]
        if changed:
            raise ConfigError(
                f"{self.checkpoint_path} was written with different {changed} "
                f"({ {k: old.get(k) for k in changed} }); resume with the same settings or use another --out"
            )
        self.synset.grow_to(ckpt["synset_config"]["n_levels"])
        self.synset.load_state_dict(ckpt["synset_state"])
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        self.losses = list(ckpt["losses"])
        self.elapsed = ckpt["elapsed"]

    # ---------------------------------------------------------------- the step

    def _maybe_grow(self) -> None:
        if self.step > 0 and self.step % self.cfg.pyramid_extent == 0 and self.synset.can_grow:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "grow", len(self.synset.levels)))
            self.synset.grow(g)
            self.optimizer = self._new_optimizer()  # the paper re-creates Adam at every growth

    def train_step(self, x_real: torch.Tensor, y_real: torch.Tensor) -> float:
        cfg, dev = self.cfg, self.device
        amp = AMP[cfg.amp]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "step", self.step))
        w, b = draw_head(self.num_classes, self.backbone.feature_dim, gen, cfg.head_std)
        w, b = w.to(dev), b.to(dev)
        n = self.synset.num_images
        total_syn = n * cfg.augs_per_batch
        syn_params = sample_params(total_syn, self.spec, gen)
        real_params = sample_params(len(y_real), self.spec, gen)
        g_real = real_grad(self.backbone, x_real.to(dev), y_real.to(dev), w, b, len(y_real), self.spec,
                           real_params, micro_batch=cfg.micro_batch, amp_dtype=amp)
        images = self.synset.render()
        syn = SynPass(self.backbone, images, self.synset.labels, view_layout(n, cfg.augs_per_batch),
                      syn_params, self.spec, micro_batch=cfg.micro_batch, amp_dtype=amp)
        g_syn = syn.forward(w, b, total_syn)
        loss, g = meta_loss_and_grad(g_real, g_syn)
        self.optimizer.zero_grad(set_to_none=True)
        syn.backward(w, b, total_syn, g)
        self.optimizer.step()
        return float(loss)

    # ---------------------------------------------------------------- the loop

    def run(self, log=None) -> dict[str, Any]:
        cfg = self.cfg
        log = log or sys.stderr
        self.out.mkdir(parents=True, exist_ok=True)
        write_yaml(cfg.to_dict(), self.out / "config.yaml")
        batch = cfg.ipc * cfg.augs_per_batch * self.num_classes
        views_per_step = batch + self.synset.num_images * cfg.augs_per_batch
        stream = None
        first = self.step
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            self._maybe_grow()
            if stream is None or self.step % cfg.ckpt_every == 0:
                stream = self.source.stream(batch, seed=derive_seed(cfg.seed, "real", self.step))
            x, y = next(stream)
            self.losses.append(self.train_step(x, y))
            self.step += 1
            if cfg.step_delay:
                time.sleep(cfg.step_delay)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log_progress(log, first, t0)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.elapsed += time.perf_counter() - t0
                t0, first = time.perf_counter(), self.step
                self.save_checkpoint()
                save_grid(self.synset.render().detach(), self.out / "grid.png", cfg.ipc)
        return self.finish(views_per_step)

    def _log_progress(self, log, first: int, t0: float) -> None:
        done = self.step - first
        rate = done / max(time.perf_counter() - t0, 1e-9)
        recent = self.losses[-self.cfg.log_every:]
        eta = (self.cfg.steps - self.step) / max(rate, 1e-9)
        side = self.synset.levels[-1].shape[-1]
        print(f"step {self.step}/{self.cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
              f"{rate:.2f} it/s  eta {eta:.0f}s  pyramid {len(self.synset.levels)} levels ({side}px)",
              file=log, flush=True)

    def finish(self, views_per_step: int) -> dict[str, Any]:
        images = self.synset.render().detach()
        payload = synset_payload(
            images, self.synset.labels,
            class_names=list(self.source.class_names), num_classes=self.num_classes,
            config=self.cfg.to_dict(), synset_config=self.synset.config(),
            synset_state={k: v.cpu() for k, v in self.synset.state_dict().items()},
            backbone=self.cfg.backbone, steps=self.step,
        )
        atomic_save(payload, self.out / "synset.pt")
        save_grid(images, self.out / "grid.png", self.cfg.ipc)
        seconds = self.elapsed
        return {
            "steps": self.step,
            "final_loss": self.losses[-1] if self.losses else None,
            "seconds": round(seconds, 3),
            "images_per_s": round(views_per_step * len(self.losses) / seconds, 2) if seconds else None,
            "out": str(self.out),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lgm_ray.distill", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of DistillConfig fields; flags override it")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    flag = {
        "backbone": str, "weights": str, "normalization": str, "shards": str, "steps": int, "lr": float,
        "ipc": int, "augs_per_batch": int, "param": str, "aug": str, "aug_noise_p": float, "aug_min_scale": float, "syn_res": int, "real_res": int,
        "crop_res": int, "pyramid_extent": int, "head_std": float, "micro_batch": int, "amp": str,
        "seed": int, "out": str, "device": str, "ckpt_every": int, "log_every": int, "num_workers": int,
        "step_delay": float,
    }
    for name, typ in flag.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None)
    p.add_argument("--no-color", dest="color", action="store_false", default=None,
                   help="turn off the colour decorrelation (ablation)")
    p.add_argument("--grey", dest="grey", action="store_true", default=None,
                   help="distil grey images (for grey datasets such as digits)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    data = load_yaml(args.config) if args.config else {}
    DistillConfig.from_dict(data, source=args.config or "config")  # unknown keys fail early
    for name in DistillConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    return DistillConfig.from_dict(data)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        distiller = Distiller(cfg)
        if distiller.checkpoint_path.exists():
            if not args.resume:
                raise ConfigError(
                    f"{distiller.checkpoint_path} exists: pass --resume to continue that run, or choose "
                    "another --out (nothing was overwritten)"
                )
            distiller.load_checkpoint()
            print(f"resumed from step {distiller.step}", file=sys.stderr)
        elif args.resume:
            print(f"no checkpoint in {cfg.out}; starting from step 0", file=sys.stderr)
    except (ConfigError, BackboneWeightsError) as exc:
        raise SystemExit(f"error: {exc}") from None
    summary = distiller.run()
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()

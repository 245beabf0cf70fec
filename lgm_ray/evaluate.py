"""Evaluate a training set (distilled, or a real-image baseline) with the paper's linear probe.

``python -m lgm_ray.evaluate --synset SET.pt --backbone NAME --shards shards/NAME`` trains a fresh
linear head on the frozen backbone's features of the set's images, augmented afresh every epoch,
and tests it on the shards' test split (resize ``--real-res`` + centre crop ``--crop-res``); see
:mod:`lgm_ray.probe` for the protocol (DESIGN §1) and :mod:`lgm_ray.baselines` for ``--baseline``.
``--backbone a,b,c`` evaluates the same set on several backbones (cross-model), as parallel Ray tasks
when ``--ray`` is given (or, from Python, whenever Ray is initialised), sequentially otherwise, with
the same numbers either way.

Class checks: labels outside the shards' classes, ``class_names`` or ``num_classes`` that differ from
the manifest's are errors (the set was distilled from other data). A set with no image of some
class only *warns*: the head still has a row for every class and is tested on the full test split,
so the number stays comparable, and a partial set (e.g. one class shard) is a legitimate thing to
inspect.

Test- and train-split features are cached on disk (:mod:`lgm_ray.feature_cache`, ``--cache-dir``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lgm_ray import baselines as bl
from lgm_ray import probe
from lgm_ray.backbones import BackboneWeightsError, list_backbones
from lgm_ray.feature_cache import FeatureSource, check_backbone
from lgm_ray.synset import validate_synset

log = logging.getLogger(__name__)

FULL_MODES = ("fast", "reference")
FULL_EPOCHS = 100  # the reference's full-dataset probe: 100 epochs at batch 128
FULL_BATCH = 128


def open_shards(root: str | Path):
    """Open a shards folder, with an error that says how to build one when it is missing."""
    root = str(root)
    if "://" not in root and not Path(root).is_dir():
        raise FileNotFoundError(
            f"shards folder {root!r} does not exist; build it first, e.g. "
            f"`python -m lgm_ray.shards build digits --out {root}`, or pass the right --shards"
        )
    from lgm_ray.shards import ShardSet

    return ShardSet(root)


# ---------------------------------------------------------------- one evaluation


def _run_seeds(env: FeatureSource, fit: Callable[[int, int], nn.Module], n_seeds: int) -> dict:
    """Train one probe per seed (``fit(k, seed) → head``), test each, and summarise over the seeds."""
    test = env.features("test")
    seeds = probe.eval_seeds(n_seeds)
    top1, top5, topk = [], [], 1
    for k, seed in enumerate(seeds):
        scores = probe.score_head(fit(k, seed), test.features, test.labels)
        top1.append(scores["top1"])
        top5.append(scores["top5"])
        topk = scores["topk"]
        log.info("%s seed %d: top-1 %.2f  top-%d %.2f", env.backbone.name, seed, top1[-1], topk, top5[-1])
    m1, s1 = probe.summarize(top1)
    m5, s5 = probe.summarize(top5)
    return {"seeds": seeds, "top1_per_seed": top1, "top5_per_seed": top5, "top1_mean": m1, "top1_std": s1,
            "top5_mean": m5, "top5_std": s5, "topk": topk, "n_test": len(test.labels)}


def _selection_source(env: FeatureSource, select_backbone: str | None, select_weights: str | None,
                      cache_dir: str | Path | None) -> FeatureSource:
    """The backbone whose centre-crop features pick centroids / neighbours: the evaluation one by default."""
    if select_backbone in (None, env.backbone.name) and select_weights is None:
        return env
    return FeatureSource(select_backbone or env.backbone.name, env.shards, weights=select_weights,
                         normalization=env.normalization, device=env.device, real_res=env.real_res,
                         crop_res=env.crop_res, cache_dir=cache_dir)


def evaluate(
    backbone_name: str,
    shards_root: str | Path,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    baseline: str | None = None,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    epochs: int | None = None,
    seeds: int = 5,
    batch: int | None = None,
    device: str = "cpu",
    weights: str | None = None,
    normalization: str = "native",
    real_res: int = 256,
    crop_res: int = 224,
    cache_dir: str | Path | None = None,
    full_mode: str = "fast",
    select_backbone: str | None = None,
    select_weights: str | None = None,
    ipc: int = 1,
) -> dict:
    """One evaluation: a training set (``images``/``labels``, or ``baseline``) on one backbone.

    Args:
        backbone_name: the evaluation backbone (a registry name).
        shards_root: the shards folder whose test split scores the probe (and whose train split
            the baselines draw from).
        images, labels: the distilled set (N×3×H×W in [0, 1], N); required unless ``baseline`` is
            ``random``, ``centroids`` or ``full``; ``neighbors`` finds their nearest real images.
        baseline: ``None`` (evaluate ``images``) or one of ``random``, ``centroids``, ``neighbors``,
            ``full`` (:mod:`lgm_ray.baselines`).
        class_names, num_classes: the set's metadata, checked against the manifest when given.
        epochs: probe epochs; default 1,000 (100 for ``full``).
        seeds: probe seeds ``3407 + k``, ``k < seeds`` (``random`` uses selection seed ``k`` too).
        batch: probe batch; default ``min(100, n)`` (128 for ``full``). The learning rate follows it.
        device: ``cpu`` or ``cuda``.
        weights: a local weights file for the evaluation backbone.
        normalization: ``native`` or ``imagenet`` (the reference's choice for every backbone).
        real_res, crop_res: real images are resized to ``real_res``; the backbone sees ``crop_res``
            crops (centre crops at test time).
        cache_dir: feature cache folder (default ``$LGM_RAY_CACHE`` or ``~/.cache/lgm_ray/features``).
        full_mode: ``fast`` (head on cached centre-crop features, no augmentation) or ``reference``
            (augmented, features recomputed every epoch, as the reference).
        select_backbone, select_weights: backbone whose centre-crop features pick ``centroids`` /
            ``neighbors`` (default: the evaluation backbone).
        ipc: images per class of the ``random`` and ``centroids`` baselines.

    Returns:
        A JSON-able dict: ``top1_mean``, ``top1_std``, ``top5_mean``, ``top5_std`` (percent,
        population std over seeds), per-seed values, ``n_train``, ``backbone``, ``baseline``,
        ``epochs``, ``batch``, ``lr``, ``feature_cache`` (split → whether it was a cache hit), …
    """
    t0 = time.perf_counter()
    if baseline is not None and baseline not in bl.BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(bl.BASELINES)}")
    if baseline in (None, "neighbors") and images is None:
        raise ValueError(
            "--baseline neighbors needs --synset (the distilled set whose images' nearest real neighbours "
            "it picks)" if baseline else "nothing to evaluate: give a synthetic set (--synset) or --baseline"
        )
    if full_mode not in FULL_MODES:
        raise ValueError(f"unknown full mode {full_mode!r}; choose one of {', '.join(FULL_MODES)}")
    if seeds < 1:
        raise ValueError(f"seeds must be ≥ 1, got {seeds}")
    check_backbone(backbone_name)
    if select_backbone is not None:
        check_backbone(select_backbone)
    shards = open_shards(shards_root)
    if images is not None and baseline in (None, "neighbors"):
        validate_synset({"images": images, "labels": labels})
        bl.check_synset_classes(labels, shards, class_names=class_names, num_classes=num_classes)
    env = FeatureSource(backbone_name, shards, weights=weights, normalization=normalization, device=device,
                        real_res=real_res, crop_res=crop_res, cache_dir=cache_dir)
    extra: dict = {}
    if baseline == "full":
        epochs, used_batch = epochs or FULL_EPOCHS, batch or FULL_BATCH
        extra["full_mode"] = full_mode
        if full_mode == "fast":
            train = env.features("train")
            n_train = len(train.labels)

            def fit(k: int, seed: int):
                return probe.train_probe_on_features(
                    train.features, train.labels, num_classes=shards.num_classes, seed=seed,
                    epochs=epochs, batch=used_batch, device=device)
        else:
            n_train = shards.count("train")

            def chunks():
                for x, y, _ in shards.iter_split("train", resize=real_res, crop=real_res):
                    yield x, y

            def fit(k: int, seed: int):
                return probe.train_probe_on_stream(
                    chunks, n_train, env.backbone, feature_dim=env.backbone.feature_dim,
                    num_classes=shards.num_classes, seed=seed, epochs=epochs, batch=used_batch,
                    crop_res=crop_res, device=device)
    else:
        if baseline is None:
            sets = [(images.float(), labels.long())]
        elif baseline == "random":
            sets = [bl.select_random(shards, k, ipc=ipc, real_res=real_res) for k in range(seeds)]
            extra["selection_seeds"] = list(range(seeds))
        else:
            sel = _selection_source(env, select_backbone, select_weights, cache_dir)
            train = sel.features("train")
            query = (bl.image_features(sel.backbone, images, real_res, crop_res, device)
                     if baseline == "neighbors" else None)
            idx = bl.select_indices(baseline, train.features, train.labels, shards.num_classes, ipc=ipc,
                                    query=query, query_labels=labels)
            sets = [bl.select_by_indices(shards, train.keys, train.labels, idx, real_res=real_res)]
            extra["select_backbone"] = sel.backbone.name
            extra["selected_keys"] = [train.keys[i] for i in idx.tolist()]
            if sel is not env:
                extra["select_feature_cache"] = dict(sel.cache_hits)
        epochs = epochs or probe.DEFAULT_EPOCHS
        n_train = len(sets[0][1])
        used_batch = batch or probe.default_batch(n_train)

        def fit(k: int, seed: int):
            x, y = sets[k % len(sets)]
            return probe.train_probe_on_images(
                x, y, env.backbone, feature_dim=env.backbone.feature_dim, num_classes=shards.num_classes,
                seed=seed, epochs=epochs, batch=used_batch, crop_res=crop_res, device=device)

    scores = _run_seeds(env, fit, seeds)
    return {
        "backbone": backbone_name, "baseline": baseline, "training_set": baseline or "distilled",
        "n_train": n_train, "epochs": epochs, "batch": used_batch, "lr": probe.probe_lr(used_batch),
        **scores, "num_classes": shards.num_classes, "real_res": real_res, "crop_res": crop_res,
        "normalization": normalization, "device": str(device), "shards": str(shards_root), **extra,
        "feature_cache": dict(env.cache_hits), "wall_s": round(time.perf_counter() - t0, 3),
    }


def evaluate_synset(images: torch.Tensor, labels: torch.Tensor, backbone_name: str, shards_root: str | Path,
                    *, epochs: int = probe.DEFAULT_EPOCHS, seeds: int = 5, **kwargs) -> dict:
    """Evaluate a distilled set on one backbone with the reference protocol (see :func:`evaluate`)."""
    return evaluate(backbone_name, shards_root, images=images, labels=labels, epochs=epochs, seeds=seeds,
                    **kwargs)


def evaluate_baseline(baseline: str, backbone_name: str, shards_root: str | Path, **kwargs) -> dict:
    """Evaluate a real-image baseline on one backbone (see :func:`evaluate`)."""
    return evaluate(backbone_name, shards_root, baseline=baseline, **kwargs)


# ---------------------------------------------------------------- cross-model, Ray or not


def _evaluate_task(backbone_name: str, shards_root: str, images, labels, kwargs: dict) -> dict:
    return evaluate(backbone_name, shards_root, images=images, labels=labels, **kwargs)


def evaluate_cross_model(
    backbones: list[str],
    shards_root: str | Path,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    weights: dict[str, str] | list[str | None] | None = None,
    use_ray: bool | None = None,
    gpus_per_task: float | None = None,
    **kwargs,
) -> list[dict]:
    """Evaluate one training set on several backbones; one result per backbone, in order.

    With Ray up (``use_ray=None`` asks ``ray.is_initialized()``) every backbone is one Ray task
    (1 CPU, and ``gpus_per_task`` GPUs, default 1 on ``device="cuda"``), else they run one after the
    other. The numbers are the same: each evaluation depends on its inputs only, and tasks share
    nothing but the atomic feature cache.

    Args:
        backbones: evaluation backbones.
        shards_root, images, labels: as :func:`evaluate`.
        weights: local weights files: a dict backbone name → file, or a list aligned with
            ``backbones`` (so one architecture can appear twice with different weights).
        use_ray: force Ray on or off; ``None``: on when Ray is initialised.
        gpus_per_task: GPUs per Ray task.
        **kwargs: the other options of :func:`evaluate` (``baseline``, ``epochs``, ``seeds``, …).
    """
    for name in backbones:
        check_backbone(name)
    files = list(weights) if isinstance(weights, (list, tuple)) else [(weights or {}).get(n) for n in backbones]
    if len(files) != len(backbones):
        raise ValueError(f"{len(files)} weights entries for {len(backbones)} backbones")
    jobs = [(name, str(shards_root), {**kwargs, "weights": w}) for name, w in zip(backbones, files, strict=True)]
    if use_ray is None:
        ray_module = sys.modules.get("ray")  # never import Ray just to learn that it is not running
        use_ray = bool(ray_module is not None and ray_module.is_initialized())
    if not use_ray:
        return [_evaluate_task(name, root, images, labels, kw) for name, root, kw in jobs]
    import ray

    if not ray.is_initialized():
        ray.init()
    if gpus_per_task is None:
        gpus_per_task = 1 if str(kwargs.get("device", "cpu")).startswith("cuda") else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus_per_task)(_evaluate_task)
    images_ref, labels_ref = ray.put(images), ray.put(labels)
    return ray.get([task.remote(name, root, images_ref, labels_ref, kw) for name, root, kw in jobs])


# ---------------------------------------------------------------- CLI


def format_table(results: list[dict]) -> str:
    """A plain-text table, one row per evaluation."""
    head = ("backbone", "training set", "n_train", "epochs", "seeds", "top-1 (%)", "top-k (%)")
    rows = []
    for r in results:
        name = r["training_set"] + (f" ({r['full_mode']})" if r.get("full_mode") else "")
        rows.append((r["backbone"], name, str(r["n_train"]), str(r["epochs"]), str(len(r["seeds"])),
                     f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}",
                     f"{r['top5_mean']:.2f} ± {r['top5_std']:.2f} (k={r['topk']})"))
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def _parse_weights(values: list[str], backbones: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in list_backbones():
            out[name] = path
        elif len(backbones) == 1:
            out[backbones[0]] = v
        else:
            raise ValueError(f"--weights {v!r}: with several backbones write NAME=FILE")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lgm_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--synset", help="distilled set (.pt with 'images' and 'labels')")
    p.add_argument("--backbone", required=True, help="evaluation backbone(s), comma-separated: " +
                   ", ".join(list_backbones()))
    p.add_argument("--shards", required=True, help="shards folder (test split scores; train split for baselines)")
    p.add_argument("--baseline", choices=bl.BASELINES, help="evaluate a real-image baseline instead")
    p.add_argument("--full-mode", choices=FULL_MODES, default="fast",
                   help="full baseline: 'fast' = head on cached centre-crop features; 'reference' = augmented")
    p.add_argument("--select-backbone", help="backbone whose features pick centroids/neighbors "
                   "(default: the evaluation backbone)")
    p.add_argument("--select-weights", help="local weights file of --select-backbone")
    p.add_argument("--ipc", type=int, default=1, help="images per class of random/centroids (default 1)")
    p.add_argument("--epochs", type=int, help="probe epochs (default 1000; 100 for --baseline full)")
    p.add_argument("--seeds", type=int, default=5, help="probe seeds 3407+k, k < SEEDS (default 5)")
    p.add_argument("--batch", type=int, help="probe batch (default min(100, n); 128 for full); lr = 1e-3·batch/256")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--weights", action="append", default=[], help="local backbone weights: FILE, or NAME=FILE")
    p.add_argument("--normalization", choices=("native", "imagenet"), default="native",
                   help="input mean/std: the weights' own, or ImageNet's for all (as the reference)")
    p.add_argument("--real-res", type=int, default=256, help="real images' resize side (default 256)")
    p.add_argument("--crop-res", type=int, default=224, help="backbone input / centre-crop side (default 224)")
    p.add_argument("--cache-dir", help="feature cache (default $LGM_RAY_CACHE or ~/.cache/lgm_ray/features)")
    p.add_argument("--ray", action="store_true", help="run the backbones as parallel Ray tasks (ray.init())")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad inputs exit with status 2 and a message naming the problem and the fix."""
    from lgm_ray.shards import ShardError

    parser = build_parser()
    args = parser.parse_args(argv)
    started_ray = False
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
        images = labels = None
        meta: dict = {}
        if args.synset and args.baseline in (None, "neighbors"):
            payload = bl.load_synset(args.synset)
            images, labels = payload["images"], payload["labels"]
            meta = {k: payload.get(k) for k in ("class_names", "num_classes")}
        if args.ray:
            import ray

            if not ray.is_initialized():
                ray.init()  # a local Ray, or the cluster that RAY_ADDRESS names
                started_ray = True
        results = evaluate_cross_model(
            backbones, args.shards, images=images, labels=labels, weights=_parse_weights(args.weights, backbones),
            use_ray=True if args.ray else None, baseline=args.baseline, epochs=args.epochs, seeds=args.seeds,
            batch=args.batch, device=args.device, normalization=args.normalization, real_res=args.real_res,
            crop_res=args.crop_res, cache_dir=args.cache_dir, full_mode=args.full_mode,
            select_backbone=args.select_backbone, select_weights=args.select_weights, ipc=args.ipc, **meta)
    except (FileNotFoundError, ValueError, KeyError, BackboneWeightsError, ShardError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(format_table(results))
    if args.json:
        out = results[0] if len(results) == 1 else {"cross_model": True, "results": results}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The evaluation command: ``python -m lgm_ray.evaluate``.

Evaluates a distilled set (``--synset``) or a real-image baseline (``--baseline``) with the linear-probe
protocol (:mod:`lgm_ray.evaluate.protocol`) on one or several evaluation backbones
(:mod:`lgm_ray.evaluate.cross_model`), prints a table and a JSON line. Bad input: one ``error: …`` line,
exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from lgm_ray.backbones import BackboneWeightsError, list_backbones
from lgm_ray.evaluate import baselines as bl
from lgm_ray.evaluate.cross_model import evaluate_cross_model, format_table
from lgm_ray.evaluate.feature_cache import EvaluationInputError, check_backbone, check_device
from lgm_ray.evaluate.protocol import (
    EVAL_SPLITS,
    FULL_MODES,
    NORMALIZATIONS,
    check_split,
    open_shards,
    resolve_settings,
)


def _parse_weights(values: list[str], backbones: list[str]) -> dict[str, str]:
    """``--weights`` values (``FILE``, or ``NAME=FILE`` with several backbones) → backbone name → file."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in list_backbones():
            out[name] = path
        elif len(backbones) == 1:
            out[backbones[0]] = v
        else:
            raise EvaluationInputError(f"--weights {v!r}: with several backbones write NAME=FILE")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lgm_ray.evaluate`` parser; its flags are :func:`evaluate_cross_model`'s options."""
    p = argparse.ArgumentParser(prog="python -m lgm_ray.evaluate", description="Evaluate a training set "
                                "(distilled, or a real-image baseline) with the paper's linear probe.")
    p.add_argument("--synset", help="distilled set (.pt with 'images' and 'labels'); its own settings are used")
    p.add_argument("--backbone", required=True, help="evaluation backbone(s), comma-separated: " +
                   ", ".join(list_backbones()))
    p.add_argument("--shards", required=True, help="shards folder (held-out split scores; train split for baselines)")
    p.add_argument("--split", choices=EVAL_SPLITS, default="test",
                   help="held-out split that scores the probe (default test; make choices on val)")
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
    p.add_argument("--normalization", choices=NORMALIZATIONS,
                   help="input mean/std: the weights' own, or ImageNet's (as the reference). Default: the "
                   "set's for the backbone it was distilled with, native otherwise")
    p.add_argument("--real-res", type=int, help="real images' resize side (default: the set's, else 256)")
    p.add_argument("--crop-res", type=int, help="backbone input / centre-crop side (default: the set's, else 224)")
    p.add_argument("--cache-dir", help="feature cache (default $LGM_RAY_CACHE or ~/.cache/lgm_ray/features)")
    p.add_argument("--ray", action="store_true", help="run the backbones as parallel Ray tasks (ray.init())")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    return p


def _prepare(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Check the command's inputs and resolve the settings: ``(evaluate_cross_model kwargs, notes)``."""
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    if not backbones:
        raise EvaluationInputError(f"--backbone names no backbone; give one or more of {', '.join(list_backbones())}")
    for name in backbones:
        check_backbone(name)
    check_device(args.device)
    shards = open_shards(args.shards)
    check_split(shards, args.split)
    images = labels = payload = None
    meta: dict = {}
    notes: list[str] = []
    if args.synset and args.baseline in (None, "neighbors"):
        payload = bl.load_synset(args.synset)
        images, labels = payload["images"], payload["labels"]
        meta = {k: payload.get(k) for k in ("class_names", "num_classes")}
        with warnings.catch_warnings():  # errors now, before any note; the warning comes with the run
            warnings.simplefilter("ignore")
            bl.check_synset_classes(labels, shards, **meta, source=args.synset)
        if not isinstance(payload.get("config"), dict):
            notes.append(f"{args.synset} holds no distillation config (reference format): evaluating with "
                         "real_res/crop_res/normalization from flags or the defaults 256/224/native")
    flags = {"normalization": args.normalization, "real_res": args.real_res, "crop_res": args.crop_res}
    per_backbone = []
    for name in backbones:
        settings, more = resolve_settings(payload, name, flags, source=args.synset or "the set")
        per_backbone.append(settings)
        notes.extend(more)
    weights = _parse_weights(args.weights, backbones)
    if payload is not None and isinstance(payload.get("config"), dict):
        cfg = payload["config"]
        distilled_with = payload.get("backbone") or cfg.get("backbone")
        if cfg.get("weights") and distilled_with in backbones and distilled_with not in weights:
            notes.append(f"{args.synset} was distilled with {distilled_with} weights {cfg['weights']}; "
                         f"evaluating {distilled_with} with its default weights (pass --weights for the same)")
    # The set's resolution is the same for every backbone; only the normalisation is per backbone.
    kwargs = dict(
        backbones=backbones, shards_root=args.shards, images=images, labels=labels, weights=weights,
        normalization=[s["normalization"] for s in per_backbone],
        raw_output=[bool(s.get("raw_output")) for s in per_backbone], real_res=per_backbone[0]["real_res"],
        crop_res=per_backbone[0]["crop_res"], split=args.split, baseline=args.baseline, epochs=args.epochs,
        seeds=args.seeds, batch=args.batch, device=args.device, cache_dir=args.cache_dir,
        full_mode=args.full_mode, select_backbone=args.select_backbone, select_weights=args.select_weights,
        ipc=args.ipc, **meta)
    return kwargs, list(dict.fromkeys(notes))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; bad input exits with status 2 and one line naming the problem and the fix."""
    from lgm_ray.shards.format import ShardError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started_ray = False
    try:
        kwargs, notes = _prepare(args)
        for note in notes:
            print(f"{parser.prog}: note: {note}", file=sys.stderr)
        if args.ray:
            import ray

            if not ray.is_initialized():
                ray.init()  # a local Ray, or the cluster that RAY_ADDRESS names
                started_ray = True
        results = evaluate_cross_model(**kwargs, parallel=bool(args.ray))
    except (EvaluationInputError, BackboneWeightsError, ShardError) as exc:
        # Only input errors: each is raised by an explicit check whose message names the fix. One
        # raised in a Ray task arrives wrapped (RayTaskError, with the remote traceback): report its cause.
        ray_exceptions = sys.modules.get("ray.exceptions")
        if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError):
            exc = exc.cause
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(exc).split())}\n")
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(format_table(results))
    if args.json:
        out = results[0] if len(results) == 1 else {"cross_model": True, "results": results}
        print(json.dumps(out))
    return 0

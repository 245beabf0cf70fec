"""The evaluation command: ``python -m lgm_ray.evaluate``.

Evaluates a distilled set (``--synset``) or a real-image baseline (``--baseline``) with the linear-probe
protocol (:mod:`lgm_ray.evaluate.protocol`) on one or several evaluation backbones
(:func:`lgm_ray.evaluate.cross_model.evaluate_cross_model`), prints a table and, with ``--json``, a JSON
line.

The setting flags are :class:`~lgm_ray.evaluate.config.EvalConfig`'s fields (``--epochs``, ``--seeds``,
``--crop-res``, …): name, type, choices, default and help are read from there, never retyped. The
settings a saved set fixes (:attr:`EvalConfig.SET_FIELDS`: normalisation, resolutions, raw output) are
the set's own unless a flag says otherwise, and a flag that overrides one says so on stderr
(:func:`lgm_ray.evaluate.protocol.resolve_settings`). Cross-model (``--backbone a,b,c``): every backbone
gets the set's resolutions; the set's normalisation and raw output apply only to the backbone it was
distilled with, the others get their own (``native``) unless a flag asks otherwise.

``--ray`` runs the backbones as parallel Ray tasks on the Ray that
:func:`lgm_ray.common.ray_start.start_ray` gives (``--address`` / ``RAY_ADDRESS``, else a new local
one); without it they run one after the other in this process.

Bad input (a bad flag or flag value, an unknown backbone, a missing file or split, damaged shards,
missing weights; also raised in a Ray task): one ``error: …`` line, exit 2
(:func:`lgm_ray.common.cli.run_command`). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
import warnings
from typing import Any

from lgm_ray.backbones import list_backbones
from lgm_ray.common.cli import run_command
from lgm_ray.core.synset import load_synset_file
from lgm_ray.evaluate import baselines as bl
from lgm_ray.evaluate.config import EvalConfig
from lgm_ray.evaluate.cross_model import evaluate_cross_model, format_table
from lgm_ray.evaluate.feature_cache import EvaluationInputError, check_backbone, check_device
from lgm_ray.evaluate.protocol import check_split, open_shards, resolve_settings, setting_flag

PROG = "python -m lgm_ray.evaluate"


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are input errors: one ``error: …`` line and exit 2, as every other."""

    def error(self, message: str) -> typing.NoReturn:
        raise EvaluationInputError(f"{message} (see {self.prog} --help)")


def _field_type(name: str) -> tuple[type, bool]:
    """An :class:`EvalConfig` field's type and whether it may be ``None`` (``int | None`` → ``(int, True)``)."""
    typ = EvalConfig.field_types()[name]
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], True
    return typ, False


def _add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`EvalConfig` field; every value stays a string until :func:`settings_from_args`."""
    for name, default in EvalConfig.defaults().items():
        typ, optional = _field_type(name)
        choices = EvalConfig.CHOICES.get(name)
        shown = "none" if default is None else default
        shown = f"the set's, else {shown}" if name in EvalConfig.SET_FIELDS else shown
        text = f"{EvalConfig.help(name)} (default: {shown})"
        if typ is bool:
            p.add_argument(setting_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        else:
            metavar = ("{" + ",".join(choices) + "}" if choices else
                       ("N" if typ is int else name.upper()) + ("|none" if optional else ""))
            p.add_argument(setting_flag(name), dest=name, default=None, metavar=metavar, help=text)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lgm_ray.evaluate`` parser: its inputs, then one flag per :class:`EvalConfig` field."""
    p = _Parser(prog=PROG, description="Evaluate a training set (distilled, or a real-image baseline) with "
                "the paper's linear probe.")
    p.add_argument("--synset", help="distilled set (.pt with 'images' and 'labels'); its own settings are used")
    p.add_argument("--backbone", required=True, help="evaluation backbone(s), comma-separated: " +
                   ", ".join(list_backbones()))
    p.add_argument("--shards", required=True, help="shards folder (held-out split scores; train split for baselines)")
    p.add_argument("--baseline", choices=bl.BASELINES, help="evaluate a real-image baseline instead")
    p.add_argument("--select-backbone", help="backbone whose features pick centroids/neighbors "
                   "(default: the evaluation backbone)")
    p.add_argument("--select-weights", help="local weights file of --select-backbone")
    p.add_argument("--weights", action="append", default=[], help="local backbone weights: FILE, or NAME=FILE")
    p.add_argument("--cache-dir", help="feature cache (default $LGM_RAY_CACHE or ~/.cache/lgm_ray/features)")
    p.add_argument("--ray", action="store_true", help="run the backbones as parallel Ray tasks")
    p.add_argument("--address", help="Ray cluster for --ray (default: RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    _add_setting_flags(p.add_argument_group("settings (lgm_ray.evaluate.config.EvalConfig)"))
    return p


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The setting flags given, converted to their field's type and checked: field → value.

    Raises:
        InputError: a value of the wrong type or not among the choices, naming the flag.
    """
    given: dict[str, Any] = {}
    for name in EvalConfig.field_names():
        raw = getattr(args, name, None)
        if raw is None:
            continue
        typ, optional = _field_type(name)
        if typ is int and not isinstance(raw, bool):
            if optional and str(raw).lower() in ("none", "null"):
                raw = None
            else:
                try:
                    raw = int(raw)
                except ValueError:
                    raise EvaluationInputError(f"{setting_flag(name)}: expected an integer, got {raw!r}") from None
        given[name] = raw
    EvalConfig().replace(**given).validate(flags=True)
    return given


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


def _load_set(path: str, shards) -> tuple[dict, dict, list[str]]:
    """The saved set, checked against the shards: ``(payload, its class metadata, notes)``."""
    payload = load_synset_file(path)
    meta = {k: payload.get(k) for k in ("class_names", "num_classes")}
    with warnings.catch_warnings():  # errors now, before any note; the warning comes with the run
        warnings.simplefilter("ignore")
        bl.check_synset_classes(payload["labels"], shards, **meta, source=path)
    notes = []
    if not isinstance(payload.get("config"), dict):
        d = EvalConfig()
        notes.append(f"{path} holds no distillation config (reference format): evaluating with real_res/crop_res/"
                     f"normalization from flags or the defaults {d.real_res}/{d.crop_res}/{d.normalization}")
    return payload, meta, notes


def _weights_note(payload: dict | None, path: str | None, backbones: list[str], weights: dict) -> list[str]:
    """A note when the set was distilled with a weights file that this evaluation does not use."""
    cfg = payload.get("config") if payload is not None else None
    if not isinstance(cfg, dict) or not cfg.get("weights"):
        return []
    distilled_with = payload.get("backbone") or cfg.get("backbone")
    if distilled_with not in backbones or distilled_with in weights:
        return []
    return [f"{path} was distilled with {distilled_with} weights {cfg['weights']}; evaluating {distilled_with} "
            "with its default weights (pass --weights for the same)"]


def prepare(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Check the command's inputs and resolve the settings: ``(evaluate_cross_model kwargs, notes)``."""
    given = settings_from_args(args)
    backbones = [b.strip() for b in args.backbone.split(",") if b.strip()]
    if not backbones:
        raise EvaluationInputError(f"--backbone names no backbone; give one or more of {', '.join(list_backbones())}")
    for name in backbones:
        check_backbone(name)
    cfg = EvalConfig().replace(**given)
    check_device(cfg.device)
    shards = open_shards(args.shards)
    check_split(shards, cfg.split)
    payload, meta, notes = None, {}, []
    if args.synset and args.baseline in (None, "neighbors"):
        payload, meta, notes = _load_set(args.synset, shards)
    per_backbone = []
    for name in backbones:
        settings, more = resolve_settings(payload, name, given, source=args.synset or "the set")
        per_backbone.append(settings)
        notes.extend(more)
    weights = _parse_weights(args.weights, backbones)
    notes.extend(_weights_note(payload, args.synset, backbones, weights))
    # The set's resolution is the same for every backbone; normalisation and raw output are per backbone.
    cfg = cfg.replace(real_res=per_backbone[0]["real_res"], crop_res=per_backbone[0]["crop_res"])
    kwargs = dict(
        backbones=backbones, shards_root=args.shards, cfg=cfg, weights=weights,
        images=payload["images"] if payload is not None else None,
        labels=payload["labels"] if payload is not None else None,
        normalization=[s["normalization"] for s in per_backbone],
        raw_output=[bool(s["raw_output"]) for s in per_backbone], baseline=args.baseline,
        cache_dir=args.cache_dir, select_backbone=args.select_backbone, select_weights=args.select_weights,
        **meta)
    return kwargs, list(dict.fromkeys(notes))


def run(args: argparse.Namespace) -> list[dict]:
    """The command's work after parsing: check, evaluate (on Ray with ``--ray``), print; the results."""
    kwargs, notes = prepare(args)
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    started_ray = False
    if args.ray:
        from lgm_ray.common.ray_start import start_ray

        started_ray = start_ray(args.address)
    try:
        results = evaluate_cross_model(**kwargs, parallel=bool(args.ray))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    print(format_table(results))
    if args.json:
        out = results[0] if len(results) == 1 else {"cross_model": True, "results": results}
        print(json.dumps(out))
    return results


def main(argv: list[str] | None = None) -> int:
    """The command; its exit status: 0, or 2 after one ``error: …`` line naming the problem and the fix."""
    def body() -> None:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        run(args)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation: a training set (distilled, or a real-image baseline) scored by the paper's linear probe.

:class:`EvalConfig` holds every setting; :func:`evaluate` (and :func:`evaluate_synset`,
:func:`evaluate_baseline`) scores one set on one backbone in this process; :func:`evaluate_cross_model`
on several backbones, as Ray tasks or in turn; :class:`FeatureSource` / :class:`FeatureCache` are the
frozen backbone on a shards set and its on-disk feature cache. The command is ``python -m
lgm_ray.evaluate``. Importing this package imports torch, never Ray.
"""

from lgm_ray.evaluate.config import EVAL_SPLITS, FULL_MODES, EvalConfig
from lgm_ray.evaluate.cross_model import evaluate_cross_model, format_table
from lgm_ray.evaluate.feature_cache import EvaluationInputError, FeatureCache, FeatureSource
from lgm_ray.evaluate.protocol import evaluate, evaluate_baseline, evaluate_synset, synset_settings

__all__ = [
    "EVAL_SPLITS", "FULL_MODES", "EvalConfig", "EvaluationInputError", "FeatureCache", "FeatureSource",
    "evaluate", "evaluate_baseline", "evaluate_cross_model", "evaluate_synset", "format_table",
    "synset_settings",
]

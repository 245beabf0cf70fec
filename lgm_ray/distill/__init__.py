"""One distillation run: the config (:class:`DistillConfig`), the loop that one process and every Ray
Train worker run alike, per-class checkpoints that resume on any number of workers, the real batches,
and the run folder every path of a run goes through (:class:`RunFolder`). :func:`run_distill` is the
engine behind ``python -m lgm_ray.distill`` and the sweep's trials.

Ray is imported only when a run asks for workers (:mod:`lgm_ray.distill.workers`), never here.
"""

from lgm_ray.distill.config import ConfigError, DistillConfig
from lgm_ray.distill.run import run_distill
from lgm_ray.distill.run_folder import RunFolder

__all__ = ["ConfigError", "DistillConfig", "RunFolder", "run_distill"]

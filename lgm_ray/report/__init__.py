"""The sweep's report: one static HTML page (gallery, evolution, cross-model and ablation tables beside the
paper's numbers, meta loss, embedding maps and periphery numbers) and the same figures as MLflow artifacts,
built from a sweep folder or an MLflow experiment (``python -m lgm_ray.report``; the sweep builds it at its
end). Importing the package imports neither MLflow nor pandas nor matplotlib (each is imported where used)."""

from lgm_ray.report.build import build_report, log_report, page_size
from lgm_ray.report.embedding import EmbeddingInputError, embed_set, periphery, plot_embedding
from lgm_ray.report.load import ReportError, Sweep, Trial, load_mlflow, load_sweep_dir

__all__ = ["EmbeddingInputError", "ReportError", "Sweep", "Trial", "build_report", "embed_set", "load_mlflow",
           "load_sweep_dir", "log_report", "page_size", "periphery", "plot_embedding"]

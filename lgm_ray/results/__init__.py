"""What a sweep leaves behind, read and written in one place: the sweep folder
(:class:`~lgm_ray.results.folder.SweepFolder`), the names of its grid points (:mod:`~lgm_ray.results.labels`),
the MLflow runs (:mod:`~lgm_ray.results.tracking`) and the result tables (:mod:`~lgm_ray.results.tables`).
The sweep writes them; the report reads them. Importing the package imports neither MLflow nor pandas
(each is imported where it is used)."""

from lgm_ray.results.folder import SweepFolder
from lgm_ray.results.labels import ablation_label, point_key
from lgm_ray.results.tables import cross_model_table, results_frame, write_tables
from lgm_ray.results.tracking import Tracker, resolve_tracking_uri

__all__ = ["SweepFolder", "Tracker", "ablation_label", "cross_model_table", "point_key", "resolve_tracking_uri",
           "results_frame", "write_tables"]

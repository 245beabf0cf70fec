"""What a sweep leaves behind, read and written in one place: the sweep folder
(:class:`~lgm_ray.results.folder.SweepFolder`), the MLflow runs (:mod:`~lgm_ray.results.tracking`) and
the result tables (:mod:`~lgm_ray.results.tables`). The sweep writes them; the report reads them."""

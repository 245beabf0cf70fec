"""The sections of the report page, one module each, each a function of a
:class:`~lgm_ray.report.context.ReportContext` that writes its figures and returns its HTML:

* :mod:`~lgm_ray.report.sections.gallery` — the distilled images, one row per class;
* :mod:`~lgm_ray.report.sections.evolution` — every set's step grids;
* :mod:`~lgm_ray.report.sections.tables` — the cross-model and ablation tables, beside the paper's numbers;
* :mod:`~lgm_ray.report.sections.losses` — the meta-loss curves;
* :mod:`~lgm_ray.report.sections.embedding_maps` — the embedding maps and periphery numbers;
* :mod:`~lgm_ray.report.sections.failures` — the failed and unfinished trials.

:mod:`lgm_ray.report.page` calls them in that order and places them on the page.
"""

"""What every section of the report shares while the page is built: the sweep, the options, the output
folder, and what the sections record on the way (figures, periphery metrics, notes).

A section (:mod:`lgm_ray.report.sections`) is a function of a :class:`ReportContext`; the page
(:mod:`lgm_ray.report.page`) calls them in order, and :mod:`lgm_ray.report.build` logs what they recorded
to MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lgm_ray.core.synset import SynsetFileError
from lgm_ray.report.figures import file_uri
from lgm_ray.report.frames import tables
from lgm_ray.report.load import Sweep, Trial
from lgm_ray.report.markup import esc, img


@dataclass
class Figure:
    """A figure of the report: its PNG and the Parquet of its data, relative to ``out``; where it goes in MLflow."""

    png: Path
    data: Path | None
    trial: str | None = None  # also logged to this trial's child run


class ReportContext:
    """One sweep's report being built into ``out``.

    Attributes:
        sweep: the loaded sweep.
        out: the report folder (``figures/`` and ``images/`` are written under it).
        tables: every table of the sweep (:func:`lgm_ray.report.frames.tables`), computed once.
        figures: every figure written so far (for :func:`lgm_ray.report.build.log_report`).
        child_metrics: each trial's periphery metrics, by trial key (logged to its child run).
        notes: what was skipped and why, listed at the end of the page.
        embeddings, projection, split, device, cache_dir, thumb_px, max_classes, max_steps,
            evolution_classes: the options of :func:`lgm_ray.report.build.build_report`.
        sources: the backbones the embedding maps loaded, kept between sets
            (:func:`lgm_ray.report.embedding_features.set_features`).
    """

    def __init__(self, sweep: Sweep, out: Path, *, embeddings: bool, projection: str, split: str, device: str,
                 cache_dir: Path | None, thumb_px: int, max_classes: int, max_steps: int,
                 evolution_classes: int) -> None:
        self.sweep, self.out = sweep, out
        self.embeddings, self.projection, self.split, self.device = embeddings, projection, split, device
        self.cache_dir = cache_dir or sweep.cache_dir
        self.thumb_px, self.max_classes, self.max_steps = thumb_px, max_classes, max_steps
        self.evolution_classes = evolution_classes
        self.figures: list[Figure] = []
        self.child_metrics: dict[str, dict[str, float]] = {}
        self.notes: list[str] = []
        self.sources: dict = {}
        self._payloads: dict[str, dict | None] = {}
        self.tables = tables(sweep)

    def payload(self, t: Trial) -> dict | None:
        """The trial's saved set (read once, through the validated loader); None when it has none or it is
        not a set (a note says so)."""
        if t.key not in self._payloads:
            payload = None
            if t.run is not None and t.run.synset.is_file():
                try:
                    payload = t.run.load_synset()
                except SynsetFileError as exc:
                    self.notes.append(f"the set of {t.key}: skipped ({exc})")
            self._payloads[t.key] = payload
        return self._payloads[t.key]

    def split_name(self) -> str:
        """The split the sweep's probes were scored on (its spec's ``eval: split``)."""
        return str((self.sweep.spec.get("eval") or {}).get("split") or "test")

    # ---- files and figures

    def rel(self, path: Path) -> str:
        """``path`` relative to the report folder (a link on the page)."""
        return path.relative_to(self.out).as_posix()

    def fig_uri(self, path: Path, width: int = 1000) -> str:
        return file_uri(path, width, 80)

    def add_figure(self, png: Path, frame=None, trial: str | None = None) -> None:
        """Record a figure; its data (``frame``) is written beside it as Parquet."""
        data = None
        if frame is not None:
            data = png.with_suffix(".parquet")
            frame.to_parquet(data, index=False)
        self.figures.append(Figure(png, data, trial))

    def add_file(self, path: Path, trial: str | None = None) -> None:
        """Record a data file of its own (logged to MLflow like a figure)."""
        self.figures.append(Figure(path, None, trial))

    def fig_block(self, png: Path, caption: str) -> str:
        """A figure on the page: its embedded picture linking to the PNG, a caption, links to the PNG and data."""
        data = png.with_suffix(".parquet")
        link = f' · <a href="{esc(self.rel(data))}">data (Parquet)</a>' if data.exists() else ""
        return (f'<figure>{img(self.fig_uri(png), self.rel(png), caption, "fig")}'
                f'<div class="note">{esc(caption)} · <a href="{esc(self.rel(png))}">PNG</a>{link}</div></figure>')

"""The failed and unfinished trials, each with the last line of its error."""

from __future__ import annotations

from lgm_ray.report.context import ReportContext
from lgm_ray.report.markup import esc


def render(ctx: ReportContext) -> str:
    """The table of every trial that did not finish (empty when all did)."""
    bad = [t for t in ctx.sweep.trials if t.status != "finished"]
    if not bad:
        return ""
    rows = "".join(f'<tr><th class="row">{esc(t.key)}</th><td>{esc(t.status)}</td><td style="text-align:left">'
                   f"{esc(t.error or '')}</td></tr>" for t in bad)
    return (f'<h2 id="failed">Failed and unfinished trials</h2><table><thead><tr><th>trial</th><th>status</th>'
            f"<th>error</th></tr></thead><tbody>{rows}</tbody></table>")

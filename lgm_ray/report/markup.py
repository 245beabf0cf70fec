"""The report page's markup: its CSS, escaping and number formats, tables of frames, images.

Pure string work shared by every section (:mod:`lgm_ray.report.sections`); no files are read or written here.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1400px;padding:0 18px 60px;
color:#222}
h1{margin:18px 0 4px}h2{border-bottom:2px solid #ddd;padding-bottom:3px;margin-top:34px}h3{margin:22px 0 6px}
.meta{color:#555}nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:3px 7px;text-align:center;
vertical-align:top}th{background:#f4f4f4;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;
white-space:nowrap}th.row{text-align:left}
.scroll{overflow-x:auto;max-width:100%}
figure{display:inline-block;margin:2px 3px;text-align:center}figcaption{font-size:12px;color:#333;max-width:120px;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.gallery img{width:var(--thumb);height:var(--thumb);object-fit:contain;image-rendering:pixelated;background:#eee}
.evo figure{display:flex;align-items:center;gap:10px;margin:3px 0}.evo figcaption{width:90px;text-align:right}
.evo img{height:60px;image-rendering:pixelated}.evo-links{margin:4px 0}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
.pair{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.bad{color:#b00}.good{color:#070}.note{color:#666;font-size:13px}details{margin:6px 0}summary{cursor:pointer}
"""


def esc(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(x), quote=True)


def num(v: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals; ``—`` for NaN; anything else escaped as it is."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return esc(v)
    return "—" if math.isnan(f) else f"{f:.{digits}f}"


def pm(mean: Any, std: Any) -> str:
    """``mean ± std`` (the mean alone when either is missing)."""
    m, s = num(mean), num(std)
    return m if m == "—" or s == "—" else f"{m} ± {s}"


def note(text: str) -> str:
    """A grey note paragraph (``text`` is markup)."""
    return f'<p class="note">{text}</p>'


def notes_html(notes: list[str]) -> str:
    """A list of notes (plain text) as a grey list headed "missing cells"; empty for none."""
    if not notes:
        return ""
    return f'<div class="note">missing cells:<ul>{"".join(f"<li>{esc(n)}</li>" for n in notes)}</ul></div>'


def frame_html(frame, std=None, index_name: str | None = None, digits: int = 2, table_id: str | None = None) -> str:
    """A (means[, stds]) frame as an HTML table; ``mean ± std`` cells; ``table_id`` its ``id`` attribute."""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = []
    for label, row in frame.iterrows():
        cells = []
        for c in frame.columns:
            v = row[c]
            if std is not None and c in std.columns:
                text = pm(v, std.loc[label, c])
            elif isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
                text = num(v, digits)
            else:
                text = esc(v)
            cells.append(f'<td class="num">{text}</td>')
        rows.append(f'<tr><th class="row">{esc(label)}</th>{"".join(cells)}</tr>')
    name = index_name if index_name is not None else (frame.index.name or "")
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return (f'<div class="scroll"><table{ident}><thead><tr><th>{esc(name)}</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def paper_html(cmp) -> str:
    """:func:`lgm_ray.results.tables.paper_comparison`'s frame as a table of ``ours / paper (Δ)`` cells."""
    cols = list(dict.fromkeys(cmp["column"]))
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for row, g in cmp.groupby("row", sort=False):
        by = g.set_index("column")
        cells = "".join(
            f'<td class="num">{num(by.loc[c, "ours"])} / {num(by.loc[c, "paper"], 1)}'
            + (f' <span class="{"good" if by.loc[c, "delta"] >= 0 else "bad"}">({by.loc[c, "delta"]:+.1f})</span>'
               if not math.isnan(by.loc[c, "delta"]) else "") + "</td>" for c in cols)
        body.append(f'<tr><th class="row">{esc(row)}</th>{cells}</tr>')
    return (f'<div class="scroll"><table><thead><tr><th>ours / paper (Δ)</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def img(uri: str, href: str | None, alt: str, cls: str = "") -> str:
    """An ``<img>`` of ``uri``, a link to ``href`` when given."""
    tag = f'<img src="{uri}" alt="{esc(alt)}"' + (f' class="{cls}"' if cls else "") + ">"
    return f'<a href="{esc(href)}">{tag}</a>' if href else tag

"""Small, self-contained HTML pages (inline CSS, images as data URLs, no scripts): the reports of
``vlmlab compare``, ``sweep`` and ``eval report`` open from disk anywhere, offline."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.thumb{max-width:160px;max-height:120px;display:block}
.ok{color:#17803d}.bad{color:#b42318}.muted{color:#777}
"""


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def png_data_url(image: Any, max_side: int = 320) -> str:
    """A PIL image as an inline PNG thumbnail."""
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_url(figure: Any) -> str:
    """A matplotlib figure as an inline PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells are escaped unless they are ``Raw`` values; ``numeric`` columns right-align."""
    right = set(numeric)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            content = cell.html if isinstance(cell, Raw) else escape(cell)
            cls = ' class="num"' if index in right else ""
            cells.append(f"<td{cls}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw:
    """Trusted HTML (built by vlmlab, e.g. an <img> with a data URL), inserted unescaped."""

    def __init__(self, html_text: str):
        self.html = html_text


def img(src: str, alt: str, css_class: str = "thumb") -> Raw:
    return Raw(f'<img class="{css_class}" src="{escape(src)}" alt="{escape(alt)}">')


def page(title: str, sections: Iterable[str]) -> str:
    body = "\n".join(sections)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )

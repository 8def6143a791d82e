"""One self-contained HTML report: the table and the plots embedded as data URIs."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from ..io import write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tr.front td:first-child { font-weight: bold; } .error { color: #b00; text-align: left; }
img { max-width: 100%; margin: 1em 0; } .meta { color: #666; font-size: 0.9em; }
"""


def _image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def write_report(path: Path, title: str, columns: list[str], rows: list[list[str]], front_rows: set[int],
                 plots: list[Path], notes: list[str]) -> Path:
    if columns and columns[-1] == "error" and not any(row[-1] for row in rows):
        columns, rows = columns[:-1], [row[:-1] for row in rows]  # no failures: no empty column
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        body.append(f'<tr class="{"front" if index in front_rows else ""}">{cells}</tr>')
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p class='meta'>{html.escape(n)}</p>" for n in notes),
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        "<p class='meta'>Bold names are on the accuracy/effective-MACs Pareto front.</p>",
        *(_image_tag(p) for p in plots if p and p.is_file()),
        "</body></html>",
    ]
    write_text(path, "\n".join(parts))
    return path

"""One self-contained HTML report: the answer for the budget first, then the table, the
plots (embedded as data URIs) and, per candidate, what each layer runs and where the time goes."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from ..io import write_text

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
tr.front td:first-child { font-weight: bold; } .error { color: #b00; text-align: left; }
tr.chosen td { background: #effaf3; }
img { max-width: 100%; margin: 1em 0; } .meta { color: #666; font-size: 0.9em; }
.answer { border-left: 6px solid #2a7; background: #effaf3; padding: 0.6em 1em; margin: 1em 0; font-size: 1.05em; }
.answer p { margin: 0.3em 0; } .answer p:nth-child(2) { font-weight: bold; font-size: 1.15em; }
details { margin: 0.4em 0; } summary { cursor: pointer; font-weight: 600; }
"""


@dataclass
class CandidateDetail:
    label: str
    plan: list[list[str]]        # layer, the input the plan is for, density, what it runs, every choice's ms
    slowest: list[list[str]]     # layer, type, ms, share of the pass
    layers_timed: int
    chosen: bool = False         # the answer's candidate: shown open


def _image_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _table(columns: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for index, row in enumerate(rows):
        cls = row_classes[index] if row_classes else ""
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _detail(detail: CandidateDetail) -> str:
    parts = [f"<details{' open' if detail.chosen else ''}><summary>{html.escape(detail.label)}"
             f"{' (the answer)' if detail.chosen else ''}</summary>"]
    if detail.plan:
        parts.append("<p class='meta'>What each sparse-kernel layer runs (its deploy plan, measured on this "
                     "machine per batch size and thread count):</p>")
        parts.append(_table(["layer", "input", "density", "runs", "measured ms per choice"], detail.plan))
    else:
        parts.append("<p class='meta'>No layer with a kernel choice: every layer runs PyTorch's dense "
                     "operator.</p>")
    if detail.slowest:
        parts.append(f"<p class='meta'>Where the time goes: the slowest of {detail.layers_timed} layers in one "
                     "deployed forward pass (forward hooks; shares of the hooked total):</p>")
        parts.append(_table(["layer", "type", "ms", "share"], detail.slowest))
    parts.append("</details>")
    return "".join(parts)


def write_report(path: Path, title: str, columns: list[str], rows: list[list[str]], front_rows: set[int],
                 plots: list[Path], notes: list[str], answer: list[str] | None = None,
                 details: list[CandidateDetail] | None = None, chosen_row: int | None = None) -> Path:
    if columns and columns[-1] == "error" and not any(row[-1] for row in rows):
        columns, rows = columns[:-1], [row[:-1] for row in rows]  # no failures: no empty column
    classes = [" ".join(c for c in ("front" if index in front_rows else "", "chosen" if index == chosen_row else "") if c)
               for index in range(len(rows))]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if answer:
        parts.append("<div class='answer' id='answer'>" + "".join(f"<p>{html.escape(line)}</p>" for line in answer)
                     + "</div>")
    parts += [*(f"<p class='meta'>{html.escape(n)}</p>" for n in notes),
              "<h2>All candidates</h2>", _table(columns, rows, classes),
              "<p class='meta'>Bold names are on the accuracy/effective-MACs Pareto front; the shaded row is the "
              "answer above. MACs eff: "
              "multiply-accumulates per image that are not multiplications by a zero weight. Speed-up: the faster "
              "dense model's latency (leancnn's deployed PyTorch model, or the row 'dense, ONNX Runtime' when "
              "the onnx extra is installed) over the candidate's, measured here; in brackets against PyTorch's "
              "deployed dense model.</p>",
              "<h2>Accuracy against cost</h2>", *(_image_tag(p) for p in plots if p and p.is_file())]
    if details:
        parts += ["<h2>Per candidate: what each layer runs, where the time goes</h2>", *(_detail(d) for d in details)]
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
    return path

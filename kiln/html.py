"""Reports as tables and plots: one self-contained HTML page, or rich tables on the terminal.

``kiln describe`` and ``kiln report`` build a list of :class:`Section` (a heading, tables, plots)
and render it twice: :func:`print_sections` for the terminal, :func:`render_page` as one HTML file.
The page carries everything inline (the style sheet, the plots as base64 PNG), and nothing in it
points at a URL, so it opens offline, survives being mailed or archived, and leaks no request.
Plots are drawn on a bare :class:`matplotlib.figure.Figure`, never through ``pyplot``: no global
backend is switched and no figure stays open, which matters when kiln runs inside a notebook.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import KilnError


@dataclass
class Table:
    """A titled table; cells are strings or numbers (formatted by :func:`cell`)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    collapsed: bool = False  # long tables (a full configuration) fold away on the page
    terminal: bool = True  # False: on the page only (too long for a terminal summary)


@dataclass
class Plot:
    """A rendered plot: ``name`` is its file stem for ``--png DIR``."""

    name: str
    title: str
    png: bytes


@dataclass
class Section:
    """A heading with its tables, plots and free-text notes."""

    title: str
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cell(value: Any) -> str:
    """A table cell as text: integers with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.4g}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def percent(part: float, whole: float) -> str:
    """``part / whole`` as a percentage with one decimal ("–" when ``whole`` is 0)."""
    return f"{100 * part / whole:.1f}%" if whole else "–"


# -- terminal ---------------------------------------------------------------------------------
def print_sections(sections: list[Section], file: Any = None) -> None:
    """Print the sections' tables and notes with rich (plain text when not on a terminal)."""
    import sys

    from rich.console import Console
    from rich.table import Table as RichTable

    stream = file or sys.stdout
    # Off a terminal rich would wrap to 80 columns; a log or a pipe can take wider tables.
    console = Console(file=stream, width=None if stream.isatty() else 120, highlight=False)
    for section in sections:
        tables = [table for table in section.tables if table.terminal]
        if not tables and not section.notes:
            continue
        console.rule(f"[bold]{section.title}", align="left")
        for table in tables:
            # Title and note as lines of their own: rich would wrap them to the table's width.
            console.print(f"[bold]{_escape_markup(table.title)}")
            shown = RichTable()
            for index, name in enumerate(table.columns):
                numeric = table.rows and all(isinstance(row[index], int | float) or row[index] is None
                                             for row in table.rows)
                shown.add_column(name, overflow="fold", justify="right" if numeric else "left")
            for row in table.rows:
                shown.add_row(*(_escape_markup(cell(value)) for value in row))
            console.print(shown)
            if table.note:
                console.print(_escape_markup(table.note), style="dim")
        for note in section.notes:
            console.print(_escape_markup(note))


def _escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# -- plots ------------------------------------------------------------------------------------
def new_figure(width: float = 7.0, height: float = 3.6) -> Any:
    """A matplotlib Figure that belongs to no backend window (see the module docstring)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(figure: Any) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# -- the page ---------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2rem;
     border-bottom: 1px solid #ddd; padding-bottom: .2rem; } h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: .3rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; vertical-align: top; }
th { background: #f4f4f6; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td { max-width: 40rem; overflow-wrap: anywhere; }
.note { color: #555; font-size: .85rem; margin-top: -.6rem; }
figure { margin: .5rem 0 1.2rem; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
details > summary { cursor: pointer; font-weight: 600; margin: .6rem 0; }
"""


def render_page(title: str, sections: list[Section], subtitle: str = "") -> str:
    """One HTML document holding every table and plot of ``sections``; it refers to no URL."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="subtitle">{html.escape(subtitle)}</p>')
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(note)}</p>" for note in section.notes]
        parts += [_table_html(table) for table in section.tables]
        for plot in section.plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(f'<figure><img class="plot" alt="{html.escape(plot.title, quote=True)}" '
                         f'src="data:image/png;base64,{data}"></figure>')
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in table.columns)
    body = []
    for row in table.rows:
        cells = "".join(f'<td class="num">{html.escape(cell(v))}</td>' if isinstance(v, int | float)
                        and not isinstance(v, bool) else f"<td>{html.escape(cell(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    inner = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}"
    if table.collapsed:
        return f"<details><summary>{html.escape(table.title)}</summary>{inner}</details>"
    return f"<h3>{html.escape(table.title)}</h3>{inner}"


# -- writing ----------------------------------------------------------------------------------
def write_page(path: str | Path, title: str, sections: list[Section], subtitle: str = "") -> Path:
    """Render and write the page atomically; returns the path."""
    from kiln.files import write_text_atomic

    path = Path(path)
    write_text_atomic(path, render_page(title, sections, subtitle))
    return path


def write_pngs(directory: str | Path, plots: list[Plot]) -> list[Path]:
    """Each plot as ``directory/NAME.png`` (the directory is created); returns the files."""
    from kiln.files import atomic_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise KilnError("exists and is not a directory", directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in plots:
        target = directory / f"{plot.name}.png"
        with atomic_file(target, binary=True) as out:
            out.write(plot.png)
        written.append(target)
    return written

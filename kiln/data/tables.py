"""Readers for row-per-example files: TSV, CSV and JSONL.

A reader returns a :class:`Table` that remembers each row's line number, so every later
complaint about a row can say ``path:line``. Tasks map their roles (``text``, ``label`` …) onto
columns with :func:`select_columns`; the same table is written back out by ``predict`` with the
predictions appended, so the output keeps the input's format.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kiln.errors import KilnError

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt")


@dataclass
class Table:
    """Rows of one file. ``rows[i]`` is a list of cells (TSV/CSV) or a dict (JSONL)."""

    path: str
    format: str  # "tsv" | "csv" | "jsonl"
    header: list[str] | None
    rows: list[list[str] | dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def decoded_lines(path: str | Path, stream: TextIO | None = None) -> list[tuple[int, str]]:
    """``(line_number, text)`` pairs, BOM stripped, with invalid UTF-8 reported by line."""
    buffer = getattr(stream, "buffer", None)  # stdin: decode its bytes here, to report bad UTF-8 by line
    if stream is not None and buffer is None:  # an in-memory text stream
        return [(i, text.rstrip("\r\n")) for i, text in enumerate(stream, 1)]
    try:
        raw = buffer.read() if buffer is not None else Path(path).read_bytes()
    except FileNotFoundError:
        raise KilnError("file not found", path) from None
    except IsADirectoryError:
        raise KilnError("is a directory, expected a file", path) from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for number, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KilnError(f"invalid UTF-8 at byte {exc.start} of the line", path, number) from None
        lines.append((number, text.rstrip("\r")))
    if lines and lines[-1][1] == "":
        lines.pop()
    return lines


def jsonl_objects(path: str | Path, lines: list[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank JSONL line; bad JSON is a ``path:line`` error."""
    for number, text in lines:
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KilnError(f"invalid JSON: {exc.msg}", path, number) from None
        if not isinstance(obj, dict):
            raise KilnError("each JSONL line must be an object", path, number)
        yield number, obj


def file_format(path: str | Path) -> str:
    """``tsv``, ``csv`` or ``jsonl`` from the suffix (``.txt`` counts as TSV)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".json"}:
        return "jsonl"
    return "tsv"


def read_table(
    path: str | Path, is_header: Any = None, stream: TextIO | None = None, fmt: str | None = None
) -> Table:
    """Read a TSV/CSV/JSONL file. ``is_header(cells) -> bool`` decides about the first row.

    TSV fields are split on tabs only: GLUE files contain quote characters that are not CSV quoting.
    """
    fmt = fmt or file_format(path)
    lines = decoded_lines(path, stream)
    content = [(n, text) for n, text in lines if text.strip()]
    if not content:
        raise KilnError("file is empty", path, 1 if lines else None)
    table = Table(str(path), fmt, None)
    if fmt == "jsonl":
        for number, obj in jsonl_objects(path, content):
            table.rows.append(obj)
            table.lines.append(number)
        return table
    if fmt == "csv":
        parsed = [(n, next(csv.reader([text]), [])) for n, text in content]
    else:
        parsed = [(n, text.split("\t")) for n, text in content]
    first_line, first = parsed[0]
    if is_header is not None and is_header([c.strip() for c in first]):
        table.header = [c.strip() for c in first]
        parsed = parsed[1:]
    width = len(table.header) if table.header else len(first)
    for number, cells in parsed:
        if len(cells) != width:
            what = "the header" if table.header else f"line {first_line}"
            raise KilnError(f"expected {width} columns like {what}, found {len(cells)}", path, number)
        table.rows.append(cells)
        table.lines.append(number)
    if not table.rows:
        raise KilnError("no rows after the header", path, first_line)
    return table


def parse_columns(spec: str) -> dict[str, str | int]:
    """``"text=3,label=1"`` -> ``{"text": 3, "label": 1}``; names stay strings."""
    mapping: dict[str, str | int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise KilnError(f"--columns expects role=column pairs, got '{part}'")
        role, column = (s.strip() for s in part.split("=", 1))
        mapping[role] = int(column) if column.lstrip("-").isdigit() else column
    return mapping


def select_columns(
    table: Table,
    roles: dict[str, Sequence[str]],
    required: Iterable[str],
    columns: dict[str, str | int] | None = None,
    positional: dict[int, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """Map each row to ``{role: value}`` plus ``_line``.

    ``roles`` lists header/key aliases per role (first match wins); ``columns`` is the user's
    ``--columns`` map; ``positional`` gives the role order for header-less files by column count.
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(roles)
    if unknown:
        raise KilnError(f"--columns: unknown role '{sorted(unknown)[0]}'; roles are {', '.join(roles)}")
    required = list(required)
    index: dict[str, Any] = {}
    if table.format == "jsonl":
        keys = {k for row in table.rows[:100] for k in row}  # type: ignore[union-attr]
        for role, aliases in roles.items():
            if role in columns:
                index[role] = columns[role]
            else:
                index[role] = next((a for a in aliases if a in keys), None)
    else:
        width = len(table.header or table.rows[0])
        names = [h.lower() for h in table.header] if table.header else None
        for role, aliases in roles.items():
            if role in columns:
                index[role] = _column_position(table, columns[role], width)
            elif names is not None:
                index[role] = next((names.index(a) for a in aliases if a in names), None)
            else:
                index[role] = None
        if names is None and not columns and positional:
            order = positional.get(width)
            if order is None:
                raise KilnError(
                    f"cannot tell which of the {width} columns is which; name them with --columns "
                    f"(e.g. --columns {','.join(f'{role}={i}' for i, role in enumerate(roles))})",
                    table.path, table.lines[0]
                )
            index = {role: order.index(role) if role in order else None for role in roles}
    missing = [role for role in required if index.get(role) is None]
    if missing:
        where = "in the header" if table.header or table.format == "jsonl" else "among the columns"
        raise KilnError(
            f"no '{missing[0]}' column {where}; map one with --columns {missing[0]}=NAME_OR_INDEX",
            table.path, table.lines[0] - (1 if table.header else 0),
        )
    records = []
    for line, row in zip(table.lines, table.rows, strict=True):
        record: dict[str, Any] = {"_line": line}
        for role, key in index.items():
            if key is None:
                continue
            if isinstance(row, dict):
                if key not in row and role in required:
                    raise KilnError(f"missing key '{key}'", table.path, line)
                record[role] = row.get(key)
            else:
                record[role] = row[key]
        records.append(record)
    return records


def _column_position(table: Table, column: str | int, width: int) -> int:
    if isinstance(column, int):
        if not 0 <= column < width:
            raise KilnError(f"--columns: position {column} is outside the {width} columns (0-based)",
                            table.path, table.lines[0])
        return column
    names = table.header or []
    if column in names:
        return names.index(column)
    lowered = [n.lower() for n in names]
    if column.lower() in lowered:
        return lowered.index(column.lower())
    raise KilnError(f"--columns: no column named '{column}' in the header", table.path,
                    max(table.lines[0] - 1, 1))


def write_table(table: Table, added: dict[str, list[Any]], out: TextIO | None = None) -> None:
    """Write ``table`` in its own format with the ``added`` columns/fields appended."""
    out = out or sys.stdout
    names = list(added)
    if table.format == "jsonl":
        for i, row in enumerate(table.rows):
            obj = dict(row)  # type: ignore[arg-type]
            obj.update({name: added[name][i] for name in names})
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        return
    if table.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if table.header:
            writer.writerow([*table.header, *names])
        for i, row in enumerate(table.rows):
            writer.writerow([*row, *(_cell(added[n][i]) for n in names)])
        out.write(buffer.getvalue())
        return
    if table.header:
        out.write("\t".join([*table.header, *names]) + "\n")
    for i, row in enumerate(table.rows):
        out.write("\t".join([*row, *(_cell(added[n][i]) for n in names)]) + "\n")  # type: ignore[misc]


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

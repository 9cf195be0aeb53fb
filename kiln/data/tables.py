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
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from kiln.errors import ColumnsMismatch, KilnError, MissingLabels

# Roles that hold what a model learns to predict: a file without any of them is unlabelled.
TARGET_ROLES = frozenset({"label", "target"})
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


MAX_LINE_BYTES = 64 << 20  # a longer "line" is not text a model can use, and must not fill memory
SNIFF_BYTES = 8192  # the first read: a binary file is refused before anything else is read
BLOCK_BYTES = 1 << 20
_LINE_BREAK = re.compile(rb"\r\n?|\n")  # \n, \r\n and a lone \r (old Mac files) all end a line


def iter_lines(path: str | Path, stream: TextIO | None = None) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a UTF-8 file (or ``stream``), read in bounded blocks.

    Lines end in ``\\n``, ``\\r\\n`` or a lone ``\\r``; a leading BOM is dropped. NUL bytes in the
    first 8 KiB refuse the file as binary before more is read; NUL or invalid UTF-8 later, or a line
    over 64 MiB, is a ``path:line`` error.
    """
    buffer = getattr(stream, "buffer", None)  # stdin: decode its bytes here, to report bad UTF-8 by line
    if stream is not None and buffer is None:  # an in-memory text stream
        yield from _text_lines(path, stream)
        return
    try:
        binary = buffer if buffer is not None else open(path, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        raise KilnError("file not found", path) from None
    except IsADirectoryError:
        raise KilnError("is a directory, expected a file", path) from None
    except OSError as exc:
        raise KilnError(f"cannot read this file: {exc.strerror or exc}", path) from None
    try:
        for number, raw in enumerate(_byte_lines(binary, path), 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise KilnError(f"binary data (a NUL byte at byte {nul} of the line); expected UTF-8 text",
                                path, number)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise KilnError(f"invalid UTF-8 at byte {exc.start} of the line", path, number) from None
    finally:
        if buffer is None:
            binary.close()


def decoded_lines(path: str | Path, stream: TextIO | None = None) -> list[tuple[int, str]]:
    """All of :func:`iter_lines` as a list (read streaming: a bad or binary file fails early)."""
    return list(iter_lines(path, stream))


def refuse_binary(head: bytes, path: str | Path) -> None:
    """A one-line error when ``head`` (a file's first bytes) is not UTF-8 text: NUL bytes or a
    UTF-16 byte-order mark (UTF-16 text is full of NUL bytes, and deserves a better message)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise KilnError("UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8", path)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise KilnError(f"binary file (NUL bytes at byte {nul}); expected UTF-8 text", path)


def _byte_lines(binary: BinaryIO, path: str | Path) -> Iterator[bytes]:
    """Lines of ``binary`` without their endings; never buffers more than one block and one line."""
    head = binary.read(SNIFF_BYTES)
    refuse_binary(head, path)
    pending: list[bytes] = []  # pieces of a line that runs across blocks
    pending_bytes = 0
    number = 1
    skip_newline = False  # the last block ended in \r: a \n opening this one completes that \r\n
    block = head
    while block:
        if skip_newline and block.startswith(b"\n"):
            block = block[1:]
        skip_newline = block.endswith(b"\r")
        parts = _LINE_BREAK.split(block)
        if len(parts) > 1:
            pending.append(parts[0])
            yield b"".join(pending)
            pending, pending_bytes = [], 0
            yield from parts[1:-1]
            number += len(parts) - 1
        if parts[-1]:
            pending_bytes += len(parts[-1])
            if pending_bytes > MAX_LINE_BYTES:
                raise KilnError(f"line longer than {MAX_LINE_BYTES >> 20} MiB; expected text with line breaks",
                                path, number)
            pending.append(parts[-1])
        block = binary.read(BLOCK_BYTES)
    if pending:
        yield b"".join(pending)


def _text_lines(path: str | Path, stream: TextIO) -> Iterator[tuple[int, str]]:
    """:func:`iter_lines` for an in-memory text stream (already decoded)."""
    number = 0
    for chunk in stream:  # split on \n; a lone \r inside is a line break too
        for text in chunk.removesuffix("\n").removesuffix("\r").split("\r"):
            number += 1
            if number == 1:
                text = text.removeprefix("\ufeff")
            if "\x00" in text:
                raise KilnError(f"binary data (a NUL character at {text.index(chr(0))} of the line); "
                                "expected text", path, number)
            yield number, text


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
    CSV is read with :mod:`csv`, so a quoted field may hold commas, doubled quotes and line breaks;
    a record's line number is the line where it starts.
    """
    fmt = fmt or file_format(path)
    lines = decoded_lines(path, stream)
    table = Table(str(path), fmt, None)
    if fmt == "jsonl":
        for number, obj in jsonl_objects(path, lines):
            table.rows.append(obj)
            table.lines.append(number)
        if not table.rows:
            raise KilnError("file is empty", path, 1 if lines else None)
        return table
    if fmt == "csv":
        records = list(_csv_records(path, lines))
    else:
        records = [(n, text.split("\t")) for n, text in lines if text.strip()]
    if not records:
        raise KilnError("file is empty", path, 1 if lines else None)
    first_line, first = records[0]
    if is_header is not None and is_header([c.strip() for c in first]):
        table.header = [c.strip() for c in first]
        records = records[1:]
    width = len(table.header) if table.header else len(first)
    for number, cells in records:
        if len(cells) != width:
            what = "the header" if table.header else f"line {first_line}"
            raise KilnError(f"expected {width} columns like {what}, found {len(cells)}", path, number)
        table.rows.append(cells)
        table.lines.append(number)
    if not table.rows:
        raise KilnError("no rows after the header", path, first_line)
    return table


def _csv_records(path: str | Path, lines: list[tuple[int, str]]) -> Iterator[tuple[int, list[str]]]:
    """``(start line, cells)`` per CSV record; blank lines between records are skipped."""
    # The default field limit (128 KiB) would refuse a long document; a line is bounded anyway.
    if csv.field_size_limit() < MAX_LINE_BYTES:
        csv.field_size_limit(MAX_LINE_BYTES)
    # Each line gets its "\n" back, so that a line break inside quotes stays part of the field.
    reader = csv.reader((text + "\n" for _, text in lines), strict=True)
    while reader.line_num < len(lines):
        start = reader.line_num  # index of the record's first line: the reader has consumed the others
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise KilnError(f"bad CSV: {_csv_problem(str(exc))}", path, lines[start][0]) from None
        if reader.line_num == start + 1 and not "".join(cells).strip() and len(cells) <= 1:
            continue  # a blank line
        yield lines[start][0], cells


def _csv_problem(message: str) -> str:
    """The csv module's complaint in words a user can act on."""
    if "end of data" in message:
        return "a quoted field that starts in this record is never closed"
    if "expected after" in message:
        return 'text after a closing quote; inside a quoted field write a quote twice ("")'
    if "field limit" in message:
        return f"a field longer than {MAX_LINE_BYTES >> 20} MiB"
    return message


def parse_columns(spec: str) -> dict[str, Any]:
    """``"text=3,label=1"`` -> ``{"text": 3, "label": 1}``; names stay strings. A role followed by
    bare columns takes them all, in order: ``"text=0,labels=billing,refund"`` -> ``{"text": 0,
    "labels": ["billing", "refund"]}`` (one 0/1 column per label)."""
    mapping: dict[str, Any] = {}
    role = ""
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part and not role:
            raise KilnError(f"--columns expects role=column pairs, got '{part}'")
        if "=" in part:
            role, column = (s.strip() for s in part.split("=", 1))
            mapping[role] = _column_name(column)
        else:
            earlier = mapping[role]
            mapping[role] = [*(earlier if isinstance(earlier, list) else [earlier]), _column_name(part)]
    return mapping


def _column_name(text: str) -> str | int:
    return int(text) if text.lstrip("-").isdigit() else text


def select_columns(
    table: Table,
    roles: Mapping[str, Sequence[str]],
    required: Iterable[str],
    columns: dict[str, Any] | None = None,
    positional: Mapping[int, Sequence[str]] | None = None,
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
        keys = {k for row in table.rows[:100] for k in row}
        for role, aliases in roles.items():
            if role in columns:
                index[role] = columns[role]
            else:
                index[role] = next((a for a in aliases if a in keys), None)
    else:
        index = _delimited_index(table, roles, required, columns, positional)
    missing = [role for role in required if index.get(role) is None]
    if missing:
        where = "in the header" if table.header or table.format == "jsonl" else "among the columns"
        raise (MissingLabels if missing[0] in TARGET_ROLES else KilnError)(
            f"no '{missing[0]}' column {where}; map one with --columns {missing[0]}=NAME_OR_INDEX",
            table.path, table.lines[0] - (1 if table.header else 0),
        )
    records = []
    for line, row in zip(table.lines, table.rows, strict=True):
        record: dict[str, Any] = {"_line": line}
        for role, key in index.items():
            if key is None:
                continue
            if isinstance(key, list):
                record[role] = [row.get(k) if isinstance(row, dict) else row[k] for k in key]
            elif isinstance(row, dict):
                if key not in row and role in required:
                    raise KilnError(f"missing key '{key}'", table.path, line)
                record[role] = row.get(key)
            else:
                record[role] = row[key]
        records.append(record)
    return records


def _delimited_index(table: Table, roles: Mapping[str, Sequence[str]], required: list[str],
                     columns: dict[str, Any], positional: Mapping[int, Sequence[str]] | None) -> dict[str, Any]:
    """Each role's column position in a TSV/CSV table (None: the table has none)."""
    index: dict[str, Any] = {}
    width = len(table.header or table.rows[0])
    names = [h.lower() for h in table.header] if table.header else None
    for role, aliases in roles.items():
        if role in columns and isinstance(columns[role], list):  # several columns make one role's value
            index[role] = [_column_position(table, column, width) for column in columns[role]]
        elif role in columns and role not in required and _absent(table, columns[role], width):
            index[role] = None  # e.g. the run's label=NAME when predicting a file without labels
        elif role in columns and role in TARGET_ROLES and _absent(table, columns[role], width):
            raise MissingLabels(f"--columns {role}={columns[role]}: this file has no such column",
                                table.path, max(table.lines[0] - (1 if table.header else 0), 1))
        elif role in columns:
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
    return index


def _absent(table: Table, column: str | int, width: int) -> bool:
    """Whether ``--columns`` names a column this table does not have."""
    if isinstance(column, int):
        return not 0 <= column < width
    return column.lower() not in {name.lower() for name in table.header or []}


def _column_position(table: Table, column: str | int, width: int) -> int:
    if isinstance(column, int):
        if not 0 <= column < width:
            raise ColumnsMismatch(f"--columns: position {column} is outside the {width} columns (0-based)",
                                  table.path, table.lines[0])
        return column
    names = table.header or []
    if column in names:
        return names.index(column)
    lowered = [n.lower() for n in names]
    if column.lower() in lowered:
        return lowered.index(column.lower())
    raise ColumnsMismatch(f"--columns: no column named '{column}' in the header", table.path,
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
        out.write("\t".join([*row, *(_cell(added[n][i]) for n in names)]) + "\n")


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

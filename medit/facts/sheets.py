"""Requests from a spreadsheet: CSV (``.csv``, comma) and TSV (``.tsv``, tab), UTF-8 with or
without a byte order mark, as a clinic exports them.

The first row names the columns (case and surrounding spaces ignored):

* ``prompt`` (or ``question``) and ``target_new`` (or ``answer`` / ``expected``): required;
* ``subject``, ``ground_truth``, ``id``: optional;
* ``rephrase_prompts`` (or ``rephrase_prompt``): paraphrases separated by ``|``;
* ``locality_prompt`` with ``locality_answer``: one locality probe (type ``given``), and
  ``locality_<type>_prompt`` with ``locality_<type>_answer`` (or ``_ground_truth``) for more;
* any other column is kept in the request's ``meta``.

Empty cells count as absent; blank rows are skipped. Errors name the file, the spreadsheet's row
(the header is row 1, so the row a spreadsheet program shows, however many lines a quoted cell
spans) and the column. A request's id is ``file:row`` unless an ``id`` column gives one.
"""

from __future__ import annotations

import csv
import io
import re
from typing import Any


class SheetError(ValueError):
    """A problem at a spreadsheet ``row`` (1: the header) and ``field`` (or None)."""

    def __init__(self, row: int | None, field: str | None, problem: str):
        super().__init__(problem)
        self.row, self.field, self.problem = row, field, problem


#: header names accepted for medit's fields
ALIASES = {
    "question": "prompt",
    "answer": "target_new",
    "expected": "target_new",
    "expected_answer": "target_new",
    "rephrase_prompt": "rephrase_prompts",
}
#: the locality type of a bare locality_prompt / locality_answer pair
GIVEN = "given"
_PROBE = re.compile(r"^locality(?:_(.+))?_(prompt|answer|ground_truth)$")
REQUIRED = ("prompt", "target_new")


def sheet_records(text: str, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    """(row, record) per non-blank row of a CSV / TSV text, records in the shape
    :func:`medit.facts.requests.parse_record` validates; a :class:`SheetError` otherwise."""
    rows = _rows(text, delimiter)
    if not rows:
        raise SheetError(None, None, "is empty; expected a header row and requests")
    columns = _columns(rows[0])
    records = []
    for number, cells in enumerate(rows[1:], 2):
        if not any(c.strip() for c in cells):
            continue  # a blank row
        if len(cells) > len(columns):
            raise SheetError(
                number,
                None,
                f"{len(cells)} cells, more than the header's {len(columns)} columns "
                "(an unquoted delimiter inside a cell?)",
            )
        records.append((number, _record(columns, cells, number)))
    if not records:
        raise SheetError(None, None, "contains no requests (a header row only)")
    return records


def _rows(text: str, delimiter: str) -> list[list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows = []
    try:
        for cells in reader:
            rows.append(cells)
    except csv.Error as exc:
        raise SheetError(len(rows) + 1, None, f"not valid CSV: {exc}") from None
    return rows


def _columns(header: list[str]) -> list[str]:
    """Normalised field names of the header row; errors name what is missing or repeated."""
    columns = [ALIASES.get(c.strip().lower(), c.strip().lower()) for c in header]
    seen: set[str] = set()
    for raw, col in zip(header, columns, strict=True):
        if not col:
            raise SheetError(1, None, "the header has an empty column name")
        if col in seen:
            raise SheetError(1, raw.strip(), f"column {col!r} appears twice in the header")
        seen.add(col)
    for field in REQUIRED:
        if field not in seen:
            accepted = [field, *(a for a, f in ALIASES.items() if f == field)]
            raise SheetError(
                1,
                None,
                f"no {field!r} column (accepted names: {', '.join(accepted)}; the header has: "
                f"{', '.join(c.strip() for c in header)})",
            )
    return columns


def _record(columns: list[str], cells: list[str], row: int) -> dict[str, Any]:
    """One row as a medit record (the shape :func:`parse_record` validates)."""
    rec: dict[str, Any] = {}
    probes: dict[str, dict[str, str]] = {}
    for col, cell in zip(columns, cells, strict=False):
        value = cell.strip()
        if not value:
            continue
        m = _PROBE.match(col)
        if m:
            kind, part = m.group(1) or GIVEN, "prompt" if m.group(2) == "prompt" else "answer"
            probes.setdefault(kind, {})[part] = value
        elif col == "rephrase_prompts":
            rec[col] = [p.strip() for p in value.split("|") if p.strip()]
        else:
            rec[col] = value
    for kind, probe in probes.items():
        prefix = "locality" if kind == GIVEN else f"locality_{kind}"
        for part in ("prompt", "answer"):
            if part not in probe:
                other = "answer" if part == "prompt" else "prompt"
                raise SheetError(
                    row, f"{prefix}_{part}", f"missing (the row has a {prefix}_{other})"
                )
        rec.setdefault("locality", {})[kind] = [[probe["prompt"], probe["answer"]]]
    return rec

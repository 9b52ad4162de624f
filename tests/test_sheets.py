"""CSV / TSV requests (medit/facts/sheets.py): a clinic's spreadsheet read as edit requests, with
errors naming the file, the spreadsheet's row and the column."""

from __future__ import annotations

import codecs

import pytest

from medit.facts.requests import RequestError, load_requests


def _write(tmp_path, name, text, bom=False):
    path = tmp_path / name
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    return path


def test_csv_with_bom_aliases_rephrases_probes_and_quoted_cells(tmp_path):
    path = _write(
        tmp_path,
        "q.csv",
        "Question , Answer,subject,rephrase_prompts,locality_prompt,locality_answer,ward\n"
        '"Insulin is produced by the",pancreas,Insulin,"The hormone insulin comes from the | '
        'Insulin is made in the",Aspirin treats,pain,ICU\n'
        "\n"
        '"Which organ, in adults,\nfilters blood?",kidney,,,,,\n',
        bom=True,
    )
    first, second = load_requests(path)
    assert first.prompt == "Insulin is produced by the" and first.target_new == "pancreas"
    assert first.subject == "Insulin"
    assert first.rephrase_prompts == (
        "The hormone insulin comes from the",
        "Insulin is made in the",
    )
    assert dict(first.locality) == {"given": (("Aspirin treats", "pain"),)}
    assert first.meta == {"ward": "ICU"} and first.id == "q.csv:2"
    # a quoted cell holds the delimiter and a newline; the blank row 3 is skipped, not renumbered
    assert second.prompt == "Which organ, in adults,\nfilters blood?" and second.id == "q.csv:4"
    assert second.subject is None and not second.locality and not second.rephrase_prompts


def test_tsv_with_named_locality_types_and_an_id_column(tmp_path):
    path = _write(
        tmp_path,
        "q.tsv",
        "id\tprompt\ttarget_new\tlocality_drug_prompt\tlocality_drug_ground_truth\n"
        "fact-7\tMetformin treats\tdiabetes\tIbuprofen treats\tpain\n",
    )
    (req,) = load_requests(path)
    assert req.id == "fact-7" and dict(req.locality) == {"drug": (("Ibuprofen treats", "pain"),)}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.csv", "prompt,answers\nA,b\n", "a.csv: row 1: no 'target_new' column"),
        ("a.csv", "prompt,answer\nA,b\nC,d,e\n", "a.csv: row 3: 3 cells, more than"),
        ("a.csv", "prompt,answer\nA,b\nC,\n", "a.csv: row 3, field 'target_new': missing"),
        (
            "a.csv",
            "prompt,answer,subject\nA b,c,Z\n",
            "a.csv: row 2, field 'subject': subject 'Z' does not occur",
        ),
        (
            "a.tsv",
            "prompt\tanswer\tlocality_prompt\nA\tb\tc\n",
            "a.tsv: row 2, field 'locality_answer': missing",
        ),
        ("a.csv", "prompt,answer,Prompt\nA,b,c\n", "a.csv: row 1, field 'Prompt': column 'prompt'"),
        ("a.csv", "prompt,answer\n", "a.csv: contains no requests"),
        ("a.csv", "", "a.csv: is empty"),
        ("a.csv", 'prompt,answer\n"A,b\n', "a.csv: row 2: not valid CSV"),
    ],
)
def test_errors_name_file_row_and_column(tmp_path, name, text, message):
    with pytest.raises(RequestError) as err:
        load_requests(_write(tmp_path, name, text))
    assert message in str(err.value)


def test_a_spreadsheet_row_counts_a_multiline_cell_once(tmp_path):
    text = 'prompt,answer\n"two\nlines",x\n"three\nlines\nhere",\n'
    with pytest.raises(RequestError, match=r"row 3, field 'target_new'"):
        load_requests(_write(tmp_path, "a.csv", text))


def test_not_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt,answer\nCaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(RequestError, match="latin.csv: not UTF-8 text"):
        load_requests(path)

import pytest

from medit.facts import subject as S
from medit.facts.requests import load_requests
from medit.facts.subject import template_subject

spacy = pytest.importorskip("spacy")


@pytest.fixture(scope="module")
def ruler():
    """The EntityRuler on a blank English pipeline (no parser: none is installed in tests)."""
    return S.subject_pipeline(parser=False)


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("The antidote for paracetamol overdose is", "paracetamol"),
        ("Aspirin is used to treat pain", "Aspirin"),
        ("The hormone insulin is produced by the", "hormone insulin"),
        ("Which drug interacts with warfarin?", "warfarin"),
    ],
)
def test_subject_tokens_cover_exactly_the_subject(tokenizer, prompt, subject):
    start, end = S.subject_tokens(tokenizer, prompt, subject)
    ids = tokenizer(prompt).input_ids
    inside = tokenizer.decode(ids[start:end])
    assert inside.strip() == subject
    outside = tokenizer.decode(ids[:start]) + "|" + tokenizer.decode(ids[end:])
    assert subject not in outside


def test_subject_match_falls_back_to_case_insensitive(tokenizer):
    prompt = "Penicillin is an antibiotic"
    assert S.subject_tokens(tokenizer, prompt, "penicillin") == S.subject_tokens(
        tokenizer, prompt, "Penicillin"
    )


def test_missing_or_empty_subject_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="subject 'kidney' does not occur in the prompt"):
        S.subject_tokens(tokenizer, "The heart has four chambers", "kidney")
    with pytest.raises(ValueError, match="empty subject"):
        S.subject_tokens(tokenizer, "The heart has four chambers", " ")


class _NoOffsets:
    """A tokenizer without character offsets (like slow tokenizers)."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError
        return self.tok(text, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tok.decode(*args, **kwargs)


def test_tokenizers_without_offsets_locate_by_decoding(tokenizer):
    prompt = "The antidote for paracetamol overdose is"
    expected = S.subject_tokens(tokenizer, prompt, "paracetamol")
    assert S.subject_tokens(_NoOffsets(tokenizer), prompt, "paracetamol") == expected


def test_medical_terms_ship_with_the_package():
    terms = S.medical_terms()
    assert len(terms) > 500
    assert len({t.lower() for t in terms}) == len(terms), "duplicate terms"
    assert {"metformin", "type 2 diabetes", "Graves' disease"} <= set(terms)


@pytest.mark.parametrize(
    "prompt, subject",
    [
        ("Metformin belongs to the drug class called", "Metformin"),
        ("The antidiabetic drug metformin is a member of the drug class known as", "metformin"),
        ("Metformin is a first-line treatment for type 2 diabetes.", "Metformin"),
        ("Patients with type 2 diabetes are first treated with", "type 2 diabetes"),
        ("Graves' disease causes", "Graves' disease"),
        ("Which drug is involved in a drug-drug interaction with Warfarin?", "Warfarin"),
    ],
)
def test_ruler_finds_the_first_and_longest_medical_term(ruler, prompt, subject):
    assert S.detect_subject(prompt, ruler) == subject


def test_ruler_agrees_with_the_builtin_requests_subjects(ruler):
    reqs = load_requests("builtin")
    agree = 0
    for req in reqs:
        try:
            agree += S.detect_subject(req.prompt, ruler).lower() == req.subject.lower()
        except ValueError:
            pass
    assert agree >= len(reqs) - 3, agree


def test_no_term_and_no_parser_asks_for_a_subject(ruler):
    with pytest.raises(ValueError, match="no subject found.*no spaCy English parser.*'subject'"):
        S.detect_subject("What is the best treatment for this?", ruler)


def test_parsed_subject_takes_the_grammatical_subject_chunk():
    from spacy.tokens import Doc

    nlp = spacy.blank("en")
    doc = Doc(
        nlp.vocab,
        words=["The", "new", "drug", "lowers", "the", "pressure"],
        heads=[2, 2, 3, 3, 5, 3],
        deps=["det", "amod", "nsubj", "ROOT", "det", "dobj"],
        pos=["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN"],
    )
    assert S.parsed_subject(doc) == "new drug"
    assert S.parsed_subject(nlp("The new drug lowers the pressure")) is None  # not parsed


def test_parser_pipeline_is_used_only_where_installed(monkeypatch):
    loaded = []
    monkeypatch.setattr(spacy.util, "is_package", lambda name: name == "en_core_web_sm")
    monkeypatch.setattr(spacy, "load", lambda name, **kw: loaded.append(name) or spacy.blank("en"))
    S.subject_pipeline.cache_clear()
    try:
        assert S.installed_parser() == "en_core_web_sm"
        nlp = S.subject_pipeline()
        assert loaded == ["en_core_web_sm"] and "entity_ruler" in nlp.pipe_names
    finally:
        S.subject_pipeline.cache_clear()


def test_a_repeated_subject_is_located_once_at_its_first_occurrence(tokenizer):
    prompt = "Aspirin or aspirin? Aspirin is used to treat pain"
    start, end = S.subject_tokens(tokenizer, prompt, "Aspirin")
    ids = tokenizer(prompt).input_ids
    assert tokenizer.decode(ids[start:end]).strip() == "Aspirin"
    assert tokenizer.decode(ids[:start]) == ""  # the first occurrence, not a later one


def test_template_subject_reads_rare_names_off_a_known_prompt():
    known = [
        ("Which drug is involved in a drug-drug interaction with Axelopran?", "Axelopran"),
        ("Aspirin is used to treat", "Aspirin"),
    ]
    ask = "Which drug is involved in a drug-drug interaction with LY-2456302?"
    assert template_subject(ask, known) == "LY-2456302"
    assert template_subject("Bufotenine is used to treat", known) == "Bufotenine"
    assert template_subject("What drug does Cyclandelate resemble?", known) is None
    assert (
        template_subject("Which drug is involved in a drug-drug interaction with?", known) is None
    )
    assert template_subject(ask, [("no subject here", "")]) is None

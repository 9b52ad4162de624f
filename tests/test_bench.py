import json

import pytest
import torch

from medit.bench import runner as bench_runner
from medit.bench import tables
from medit.bench.metrics import (
    aggregate_cases,
    case_metrics,
    edit_groups,
    other_edit_flags,
    quality_flags,
    rouge_l,
)
from medit.bench.runner import BenchConfig, run_bench
from medit.bench.store import read_cases
from medit.bench.suites import get_suite
from medit.facts.requests import RequestError, parse_record
from tests.conftest import need_data


def _slice(tmp_path, name, n):
    records = json.loads(need_data(name).read_text())[:n]
    path = tmp_path / name.replace("/", "_")
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    "suite, name, types",
    [
        ("medcf", "MedCF/test.json", {"target", "mapping", "struc", "tokenSem"}),
        ("medfe", "MedFE/test.json", {"topic", "tokenSem"}),
    ],
)
def test_suites_load_their_files_with_datasets(tmp_path, suite, name, types):
    path = _slice(tmp_path, name, 5)
    reqs = get_suite(suite).load(str(path))
    raw = json.loads(path.read_text())
    assert len(reqs) == 5 and set(reqs[0].locality) == types
    assert reqs[2].prompt == raw[2]["prompt"] and reqs[2].rephrase_prompts == (
        raw[2]["rephrase_prompt"],
    )


def test_a_suite_needs_its_locality_types_and_its_data(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps([{"prompt": "p", "target_new": "t"}]))
    with pytest.raises(RequestError, match="x.json: record 1, field 'locality_mapping_prompt'"):
        get_suite("medcf").load(str(path))
    with pytest.raises(ValueError, match="needs --data"):
        get_suite("medcf").load(None)


def test_quality_flags_find_the_known_medcf_cases():
    reqs = get_suite("medcf").load(str(need_data("MedCF/test.json")))
    flags = [quality_flags(r) for r in reqs]
    assert sum("locality_prompt_is_edit_prompt:mapping" in f for f in flags) == 46
    assert sum("target_equals_ground_truth" in f for f in flags) == 4


def test_rouge_l_by_hand():
    # candidate "a b c d", reference "a c d e": LCS = a c d (3); P = 3/4, R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "a b") == 0.0 and rouge_l("", "a") == 0.0


def test_medfe_generation_scores_explanations_by_rouge_l():
    req = parse_record(
        {
            "prompt": "Why? Adiponectin",
            "target_new": "a b c d",
            "subject": "Adiponectin",
            "rephrase_prompt": "How? Adiponectin",
        },
        "x",
        1,
    )
    post = {
        "teacher_forced": {"efficacy": 0.5, "generality": 0.25, "locality": {}},
        "generation": {
            "prompt": {"text": " Adiponectin: a c d e", "exact": False, "contains": False},
            "rephrases": [{"text": "", "exact": False, "contains": False}],
            "efficacy_contains": False,
            "efficacy_exact": False,
            "generality_contains": 0.0,
            "locality_unchanged": {},
            "fluency": 4.0,
        },
    }
    m = case_metrics(req, post, explanation=True)
    # candidate words: adiponectin a c d e (5); LCS with "a b c d" = a c d: P 3/5, R 3/4
    assert m["gen.efficacy"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["gen.generality"] == 0.0 and m["gen.answer_stated"] == 1.0
    assert "gen.efficacy_exact" not in m
    assert case_metrics(req, post, explanation=False)["gen.efficacy"] == 0.0


def test_aggregation_by_hand_with_exclusions():
    cases = [
        {
            "metrics": {
                "tf.efficacy": 1.0,
                "tf.generality": 0.5,
                "tf.locality.a": 1.0,
                "tf.locality.b": 0.0,
                "gen.efficacy": 1.0,
                "gen.generality": 0.0,
                "gen.locality.a": 1.0,
                "gen.locality.b": 1.0,
                "gen.fluency": 5.0,
            },
            "flags": {},
            "seconds": 1.0,
        },
        {
            "metrics": {
                "tf.efficacy": 0.0,
                "tf.generality": 1.0,
                "tf.locality.a": 0.5,
                "tf.locality.b": 1.0,
                "gen.efficacy": 0.0,
                "gen.generality": 1.0,
                "gen.locality.a": 0.0,
                "gen.locality.b": 0.0,
                "gen.fluency": 3.0,
            },
            "flags": {"locality_prompt_is_edit_prompt:b": ["tf.locality.b", "gen.locality.b"]},
            "seconds": 3.0,
        },
    ]
    agg = aggregate_cases(cases, ["a", "b"])
    tf = agg["teacher_forced"]
    assert tf["efficacy"] == 0.5 and tf["generality"] == 0.75
    assert tf["locality"] == {"a": 0.75, "b": 0.0}  # case 2's b excluded
    assert tf["locality_avg"] == 0.375 and tf["average"] == pytest.approx((0.625 + 0.375) / 2)
    assert agg["generation"]["locality"]["b"] == 1.0 and agg["generation"]["fluency"] == 4.0
    assert agg["excluded"] == {"locality_prompt_is_edit_prompt": 1}
    assert agg["seconds_per_edit"] == 2.0
    kept = aggregate_cases(cases, ["a", "b"], keep_flagged=True)
    assert kept["teacher_forced"]["locality"]["b"] == 0.5


HPARAMS = {
    "ft-m": {"steps": 3},
    "medlasa": {"steps": 3, "lr": 1e-3, "trace_mode": "fast"},
    "alphaedit": {
        "v_steps": 3,
        "prefix_count": 1,
        "cov_samples_per_prompt": 1,
        "cov_new_tokens": 8,
        "L2": 1e-4,
    },
    "grace": {"steps": 3, "radius": "fixed", "eps": 1e-3},
    "tpatcher": {"steps": 10, "memory_texts": 10},
    "serac": {},
}


@pytest.mark.parametrize(
    "mode, method",
    [("single", "ft-m"), ("batch", "ft-m"), ("sequential", "ft-m"), ("sequential", "medlasa")],
)
def test_resume_after_a_crash_gives_the_same_aggregate(
    tmp_path, tiny_model_dir, monkeypatch, mode, method
):
    data = _slice(tmp_path, "MedCF/test.json", 6)
    hparams = HPARAMS
    common = dict(
        suite="medcf",
        data=str(data),
        model=str(tiny_model_dir),
        mode=mode,
        methods=(method,),
        batch_size=4,
        device="cpu",
        quiet=True,
        hparams={method: hparams[method]},
    )
    whole = run_bench(BenchConfig(out=str(tmp_path / "whole"), **common))

    crashed = tmp_path / "crashed"
    real_append, calls = bench_runner.append_case, []

    def crash_after_three(out, record, *file):
        if len(calls) == 3:
            with open(out / "cases.jsonl", "ab") as f:
                f.write(b'{"method": "%s", "case": 5, "flags"' % method.encode())  # kill -9
            raise KeyboardInterrupt
        calls.append(record["case"])
        real_append(out, record, *file)

    monkeypatch.setattr(bench_runner, "append_case", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(crashed), **common))
    monkeypatch.setattr(bench_runner, "append_case", real_append)
    with pytest.raises(ValueError, match="pass --resume"):
        run_bench(BenchConfig(out=str(crashed), **common))
    resumed = run_bench(BenchConfig(out=str(crashed), resume=True, **common))

    cases = read_cases(crashed)
    assert sorted(c["case"] for c in cases) == list(range(6))  # none lost, none duplicated

    def strip(m):
        return {k: v for k, v in m.items() if k not in ("seconds_per_edit", "peak_memory_mb")}  # noqa: E731

    assert strip(resumed["methods"][method]) == strip(whole["methods"][method])
    tables_md = (crashed / "table.md").read_text().split("## retention curve")[0]
    assert tables_md.count(method) == 2  # one row per protocol table


@pytest.mark.parametrize("method", ["medlasa", "alphaedit", "grace", "tpatcher", "serac"])
def test_sequential_crash_between_edits_resumes_from_the_last_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch, method
):
    """Killed during the 4th of 5 edits: the resumed run applies edits 4-5 only (module edits'
    checkpoints - MedLaSA, GRACE, T-Patcher - are one file per edit; AlphaEdit's accumulated
    keys come back with the weights) and its aggregate equals an uninterrupted run's."""
    from medit.editors.base import Editor

    data = _slice(tmp_path, "MedCF/test.json", 5)
    common = dict(
        suite="medcf",
        data=str(data),
        model=str(tiny_model_dir),
        mode="sequential",
        methods=(method,),
        device="cpu",
        quiet=True,
        hparams={method: HPARAMS[method]},
    )
    whole = run_bench(BenchConfig(out=str(tmp_path / "whole"), **common))
    real_apply, calls = Editor.apply, []

    def counting_apply(self, model, tok, requests, prior=None):
        calls.append(requests[0].id)
        if len(calls) == 4 and crash:
            raise KeyboardInterrupt
        return real_apply(self, model, tok, requests, prior)

    monkeypatch.setattr(Editor, "apply", counting_apply)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(tmp_path / "crashed"), **common))
    crash, calls[:] = False, []
    resumed = run_bench(BenchConfig(out=str(tmp_path / "crashed"), resume=True, **common))
    assert len(calls) == 2  # edits 4 and 5 only

    def strip(m):
        return {k: v for k, v in m.items() if k not in ("seconds_per_edit", "peak_memory_mb")}

    assert strip(resumed["methods"][method]) == strip(whole["methods"][method])
    if method != "alphaedit":  # module edits: one checkpoint per edit, written once
        edits = sorted((tmp_path / "crashed" / "checkpoints" / method / "edits").iterdir())
        assert [d.name for d in edits] == [f"{i:06d}" for i in range(5)]
        if method == "serac":  # the scope classifier is stored with the first edit only
            from medit.artifacts.modules import PATCHES_FILE as PATCHES
            from medit.artifacts.modules import read_module_artifact

            first, later = (read_module_artifact(d / "artifact" / PATCHES)[1] for d in edits[:2])
            assert "scope.proj" in first and not any(k.startswith("scope.") for k in later)
            from medit.core.models import load_model
            from medit.editors.load import load_edit

            lm = load_model(str(tiny_model_dir), "cpu")
            with pytest.raises(ValueError, match="load the sequence's checkpoint directory"):
                load_edit(lm.model, lm.tokenizer, edits[1])
    else:  # the same weights bit for bit: the resumed edits saw the earlier edits' keys
        from medit.artifacts.weights import read_artifact

        a = read_artifact(tmp_path / "whole" / "checkpoints" / method)[1]
        b = read_artifact(tmp_path / "crashed" / "checkpoints" / method)[1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, tiny_model_dir):
    data = _slice(tmp_path, "MedCF/test.json", 2)
    common = dict(
        suite="medcf",
        data=str(data),
        model=str(tiny_model_dir),
        device="cpu",
        quiet=True,
        hparams={"ft-m": {"steps": 2}},
    )
    run_bench(BenchConfig(out=str(tmp_path / "r"), **common))
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
        run_bench(BenchConfig(out=str(tmp_path / "r"), resume=True, seed=1, **common))


def test_resume_extends_a_single_run_with_more_cases_and_methods(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A single-mode run resumed with a larger --limit and another method edits only the new
    (method, case) pairs and aggregates as a run started with those settings; a sequential run's
    limit stays fixed."""
    from medit.editors.base import Editor

    data = _slice(tmp_path, "MedCF/test.json", 4)
    common = dict(
        suite="medcf", data=str(data), model=str(tiny_model_dir), device="cpu", quiet=True
    )
    ftm = {"ft-m": {"steps": 2}}
    both = {**ftm, "ft-l": {"steps": 1}}
    whole = run_bench(
        BenchConfig(
            out=str(tmp_path / "whole"), methods=("ft-m", "ft-l"), limit=4, hparams=both, **common
        )
    )
    run_bench(
        BenchConfig(out=str(tmp_path / "r"), methods=("ft-m",), limit=2, hparams=ftm, **common)
    )
    real_apply, calls = Editor.apply, []

    def counting_apply(self, model, tok, requests, prior=None):
        calls.append((self.name, requests[0].id))
        return real_apply(self, model, tok, requests, prior)

    monkeypatch.setattr(Editor, "apply", counting_apply)
    grown = run_bench(
        BenchConfig(
            out=str(tmp_path / "r"),
            methods=("ft-m", "ft-l"),
            limit=4,
            hparams=both,
            resume=True,
            **common,
        )
    )
    assert [m for m, _ in calls].count("ft-m") == 2 and [m for m, _ in calls].count("ft-l") == 4

    def strip(m):
        return {k: v for k, v in m.items() if k not in ("seconds_per_edit", "peak_memory_mb")}

    for method in ("ft-m", "ft-l"):
        assert strip(grown["methods"][method]) == strip(whole["methods"][method])
    bench = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert bench["config"]["limit"] == 4 and bench["identity"]["limit"] == 4
    assert bench["extensions"][0]["changed"]["methods"] == ["ft-m", "ft-l"]
    with pytest.raises(ValueError, match=r"other settings \(hparams"):  # ft-m's settings are fixed
        run_bench(
            BenchConfig(
                out=str(tmp_path / "r"),
                methods=("ft-m", "ft-l"),
                limit=4,
                hparams={**both, "ft-m": {"steps": 3}},
                resume=True,
                **common,
            )
        )
    seq = dict(common, mode="sequential", methods=("ft-m",), hparams=ftm)
    run_bench(BenchConfig(out=str(tmp_path / "s"), limit=2, **seq))
    with pytest.raises(ValueError, match=r"other settings \(limit: 2 -> 4\)"):
        run_bench(BenchConfig(out=str(tmp_path / "s"), limit=4, resume=True, **seq))


def test_tables_and_compare(tmp_path, tiny_model_dir):
    data = _slice(tmp_path, "MedFE/test.json", 2)
    common = dict(
        suite="medfe", data=str(data), model=str(tiny_model_dir), device="cpu", quiet=True
    )
    a = run_bench(
        BenchConfig(
            out=str(tmp_path / "a"), methods=("ft-m",), hparams={"ft-m": {"steps": 2}}, **common
        )
    )
    run_bench(BenchConfig(out=str(tmp_path / "b"), methods=("ft-l",), **common))
    md = tables.markdown(a)
    assert "teacher-forced" in md and "Loc:topic" in md and "ROUGE-L" in md
    assert "protocol,method,metric,value" in (tmp_path / "a" / "table.csv").read_text()
    merged = tables.compare([tmp_path / "a", tmp_path / "b"])
    assert set(merged["methods"]) == {"ft-m (steps=2)", "ft-l"}  # overrides name the row
    with pytest.raises(ValueError, match="not a finished benchmark run"):
        tables.compare([tmp_path])
    # a partial run: --common re-aggregates every row over the cases all rows hold
    one = run_bench(BenchConfig(out=str(tmp_path / "c"), methods=("ft-l",), limit=1, **common))
    both = tables.compare([tmp_path / "a", tmp_path / "c"], common=True)
    assert both["common_cases"] == [0] and "over the 1 cases" in tables.markdown(both)
    assert {m["n"] for m in both["methods"].values()} == {1}
    assert both["methods"]["ft-l"] == one["methods"]["ft-l"]
    first = run_bench(
        BenchConfig(
            out=str(tmp_path / "d"),
            methods=("ft-m",),
            limit=1,
            hparams={"ft-m": {"steps": 2}},
            **common,
        )
    )
    assert (
        both["methods"]["ft-m (steps=2)"]["teacher_forced"]
        == first["methods"]["ft-m"]["teacher_forced"]
    )
    assert tables.compare([tmp_path / "a", tmp_path / "b"])["methods"]["ft-l"]["n"] == 2


def test_probes_asking_another_edits_question_are_flagged_in_multi_edit_modes():
    def case(i, prompt, probe):
        return parse_record(
            {
                "prompt": prompt,
                "target_new": "x",
                "subject": "s",
                "locality_struc_prompt": probe,
                "locality_struc_ground_truth": "y",
            },
            "t.json",
            i,
        )

    reqs = [
        case(0, "Which drug interacts with A?", "Which drug interacts with B ?"),
        case(1, "Which drug interacts with B?", "Which drug interacts with C?"),
        case(2, "Which drug interacts with C?", "Which drug interacts with D?"),
    ]
    assert edit_groups(3, "single", 8) == [[0], [1], [2]]
    assert edit_groups(3, "batch", 2) == [[0, 1], [2]]
    assert edit_groups(3, "sequential", 2) == [[0, 1, 2]]
    flag = {"locality_prompt_is_other_edit:struc": ["tf.locality.struc", "gen.locality.struc"]}
    assert other_edit_flags(reqs, edit_groups(3, "single", 8)) == [{}, {}, {}]
    # batch [0, 1], [2]: case 0's probe is case 1's question (normalised); case 1's probe asks
    # case 2's, which is in another batch
    assert other_edit_flags(reqs, edit_groups(3, "batch", 2)) == [flag, {}, {}]
    assert other_edit_flags(reqs, edit_groups(3, "sequential", 2)) == [flag, flag, {}]


def test_medcf_struc_probes_collide_with_other_edits():
    reqs = get_suite("medcf").load(str(need_data("MedCF/test.json")), 16)
    flags = other_edit_flags(reqs, edit_groups(len(reqs), "batch", 16))
    assert [i for i, f in enumerate(flags) if f] == [3, 4, 14]  # cases 9, 1, 15's questions


def test_builtin_flags_nothing():
    reqs = get_suite("builtin").load(None)
    assert not any(quality_flags(r) for r in reqs)
    assert quality_flags(
        parse_record({"prompt": "p", "target_new": "x", "ground_truth": "X"}, "t", 1)
    ) == {
        "target_equals_ground_truth": [
            "tf.efficacy",
            "tf.generality",
            "gen.efficacy",
            "gen.efficacy_exact",
            "gen.generality",
        ]
    }


def test_cli_bench_and_compare(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from medit.cli import main

    runner = CliRunner()
    args = [
        "-q",
        "bench",
        "--suite",
        "builtin",
        "--model",
        str(tiny_model_dir),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--methods",
        "ft-m,ft-l",
        "--hparam",
        "ft-m:steps=2",
    ]
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "| ft-m |" in res.output and "| ft-l |" in res.output
    bench = json.loads((tmp_path / "a" / "bench.json").read_text())
    assert bench["config"]["hparams"] == {"ft-m": {"steps": 2}, "ft-l": {}}
    res = runner.invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "pass --resume" in res.output
    res = runner.invoke(
        main, ["bench", "--compare", str(tmp_path / "a"), "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 0 and (tmp_path / "c" / "table.md").exists()
    res = runner.invoke(
        main, [*args[:-2], "--hparam", "rome:steps=2", "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 2 and "'rome' is not among --methods" in res.output


def test_the_retention_curve_samples_edits_made_so_far_and_survives_a_crash(
    tmp_path, tiny_model_dir, monkeypatch
):
    """Points every 2 edits and after the last; the last point equals the final evaluation on
    the same sample; a run killed during the 4th edit resumes with the same curve."""
    from medit.editors.base import Editor
    from medit.loop import Curve
    from medit.report.render import render

    data = _slice(tmp_path, "MedCF/test.json", 5)
    common = dict(
        suite="medcf",
        data=str(data),
        model=str(tiny_model_dir),
        mode="sequential",
        methods=("ft-m",),
        device="cpu",
        quiet=True,
        hparams={"ft-m": HPARAMS["ft-m"]},
        curve_every=2,
        curve_sample=2,
    )
    whole = run_bench(BenchConfig(out=str(tmp_path / "whole"), **common))
    points = whole["curves"]["ft-m"]
    assert [p["edits"] for p in points] == [2, 4, 5]
    assert all(p["sample"] == 2 and p["probes"] == 2 for p in points)
    # a weight edit's stored tensors stay one size however many edits it holds
    assert points[0]["stored_bytes"] > 0 and len({p["stored_bytes"] for p in points}) == 1
    edited, probes = Curve(2, 2, None).samples(5, 5)
    assert all(i < 5 for i in edited) and Curve(2, 2, None).samples(2, 5)[0] == [0, 1]
    cases = {c["case"]: c["metrics"] for c in read_cases(tmp_path / "whole")}
    last = points[-1]["teacher_forced"]
    assert last["efficacy"] == pytest.approx(sum(cases[i]["tf.efficacy"] for i in edited) / 2)

    real_apply, calls = Editor.apply, []

    def crashing_apply(self, model, tok, requests, prior=None):
        calls.append(requests[0].id)
        if len(calls) == 4 and crash:
            raise KeyboardInterrupt
        return real_apply(self, model, tok, requests, prior)

    monkeypatch.setattr(Editor, "apply", crashing_apply)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(out=str(tmp_path / "crashed"), **common))
    crash = False
    resumed = run_bench(BenchConfig(out=str(tmp_path / "crashed"), resume=True, **common))

    def strip(pts):
        return [{k: v for k, v in p.items() if "seconds" not in k} for p in pts]

    assert strip(resumed["curves"]["ft-m"]) == strip(points)
    html = render(tmp_path / "crashed")
    assert "Retention curve" in html and "ft-m: retention" in html and "<polyline" in html
    assert "## retention curve" in (tmp_path / "crashed" / "table.md").read_text()


def test_a_sequential_run_keeps_no_edit_result_alive_but_the_combined_one(tiny_model_dir):
    """Each edit's result holds copies of the weights it touched; a sequence of N edits must
    not keep N of them (it grew FT-M's 802-edit run to 3.9 GB and AlphaEdit's by ~130 MB an
    edit): once folded into the combined result, a per-edit result is garbage."""
    import gc
    import weakref

    from medit.core.models import load_model
    from medit.editors.registry import make_editor
    from medit.evaluation import EvalConfig, evaluate
    from medit.facts.requests import load_requests
    from medit.loop import Plan, run_edits

    lm = load_model(str(tiny_model_dir), "cpu", "float32")
    requests = load_requests("builtin")[:4]
    ecfg = EvalConfig(fluency_tokens=0)
    pre = evaluate(lm.model, lm.tokenizer, lm.arch, requests, ecfg)
    editor, made = make_editor("ft-m", steps=2), []
    apply = editor.apply

    def tracked(*args, **kwargs):
        result = apply(*args, **kwargs)
        made.append(weakref.ref(result))
        return result

    editor.apply = tracked
    outcome = run_edits(
        editor, lm, requests, pre, Plan("sequential", ecfg, keep=True), lambda *a: 0
    )
    gc.collect()
    alive = [r() for r in made if r() is not None]
    assert len(made) == 4 and all(r is outcome.combined for r in alive) and len(alive) <= 1
    assert [round(e.seconds, 9) for e in outcome.edits] == [round(s, 9) for s in outcome.seconds]
    assert all(e.names == outcome.combined.names for e in outcome.edits)
    outcome.combined.restore()

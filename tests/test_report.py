"""Reports: rendered from a real run directory, escaped, gated, and opened in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from medit.cli import main
from medit.report.render import render, verdict

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
HOSTILE = "<script>alert(1)</script></td></tr></table>{{ 7*7 }}{% raw %}"


@pytest.fixture
def edit_run(tmp_path, tiny_model_dir):
    reqs = tmp_path / "reqs.json"
    reqs.write_text(
        json.dumps(
            [
                {
                    "prompt": "The hormone insulin is produced by the",
                    "target_new": "liver",
                    "rephrase_prompts": ["Insulin comes from the"],
                    "locality": {"general": [["The heart has four", "chambers"]]},
                },
                {
                    "prompt": "Aspirin is used to treat",
                    "target_new": "scurvy",
                    "locality": {"general": [["Vitamin C deficiency causes", "scurvy"]]},
                },
            ]
        )
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "-q",
            "edit",
            "--model",
            str(tiny_model_dir),
            "--requests",
            str(reqs),
            "--mode",
            "batch",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--hparam",
            "lr=0.01",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_edit_run_writes_its_report_with_verdict_tables_and_charts(edit_run):
    html = (edit_run / "report.html").read_text()
    assert 'id="verdict"' in html and ("PASS" in html or "FAIL" in html)
    assert 'id="metrics"' in html and 'id="tensors"' in html and 'id="provenance"' in html
    assert html.count("<svg") >= 3  # two protocol charts and the per-edit grid
    assert "<script" not in html.lower() and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    results = json.loads((edit_run / "results.json").read_text())
    assert results["config"]["thresholds"] == {"efficacy": 0.8, "generality": 0.5, "locality": 0.8}
    assert [c["key"] for c in verdict(results)["checks"]] == ["efficacy", "generality", "locality"]


def test_model_text_is_shown_as_text_never_markup(edit_run):
    lines = (edit_run / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(x) for x in lines]
    for s in samples:  # the model "said" hostile things
        s["post"]["generation"]["prompt"]["text"] = HOSTILE
        s["post"]["generation"]["locality"][0]["text"] = HOSTILE
        s["request"]["prompt"] = HOSTILE
    (edit_run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    html = render(edit_run)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;/td&gt;" in html
    assert "{{ 7*7 }}" in html and ">49<" not in html
    assert html.count("<table") == html.count("</table>")


def test_fail_under_gates_a_pipeline(edit_run):
    runner = CliRunner()
    results = json.loads((edit_run / "results.json").read_text())
    results["config"]["thresholds"] = {"efficacy": 1.0, "generality": 1.0, "locality": 1.0}
    results["metrics"]["post"]["generation"]["generality_contains"] = 0.0
    (edit_run / "results.json").write_text(json.dumps(results))
    res = runner.invoke(main, ["report", str(edit_run), "--fail-under"])
    assert res.exit_code == 3 and "verdict FAIL" in res.output
    res = runner.invoke(
        main, ["report", str(edit_run), "--format", "md", "-o", str(edit_run / "r.md")]
    )
    assert res.exit_code == 0 and "**Verdict: FAIL**" in (edit_run / "r.md").read_text()
    res = runner.invoke(main, ["report", str(edit_run.parent)])
    assert res.exit_code == 2 and "not a medit run directory" in res.output


def test_bench_report(tmp_path, tiny_model_dir):
    from medit.bench.runner import BenchConfig, run_bench

    run_bench(
        BenchConfig(
            out=str(tmp_path / "b"),
            suite="builtin",
            limit=2,
            device="cpu",
            model=str(tiny_model_dir),
            quiet=True,
            hparams={"ft-m": {"steps": 2}},
        )
    )
    html = render(tmp_path / "b")
    assert "teacher-forced" in html and "generation-based" in html and "<svg" in html
    assert "| ft-m |" in render(tmp_path / "b", "md")


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


@pytest.mark.skipif(
    _chromium() is None,
    reason="Chromium not installed (Debian package 'chromium'; .ci/run installs it)",
)
def test_report_opens_in_headless_chromium(edit_run):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "edit-report.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={edit_run.parent / 'chrome-profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    url = (edit_run / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="verdict"' in dom.stdout and "<svg" in dom.stdout and 'id="metrics"' in dom.stdout
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot_run = subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot_run.returncode == 0 and shot.stat().st_size > 10_000


def test_trace_run_report_shows_heatmaps(tmp_path, tiny_model_dir):
    from medit.tracing.run import TraceRunConfig, run_trace
    from medit.tracing.trace import TraceConfig

    run_trace(
        TraceRunConfig(
            out=str(tmp_path / "t"),
            model=str(tiny_model_dir),
            device="cpu",
            prompt="The hormone insulin is produced by the",
            subject="insulin",
            trace=TraceConfig(samples=2, window=2),
            quiet=True,
        )
    )
    html = render(tmp_path / "t")
    assert "Causal traces" in html and html.count("<svg") >= 2  # profile chart + heatmap
    assert "insulin" in html and "<script" not in html.lower()
    assert "peak layers" in render(tmp_path / "t", "md")


# -- the reviewer's first screen -------------------------------------------------------------------
FIRST_SCREEN = (1280, 800)
#: background of the verdict box (base.html.j2: .verdict.pass / .verdict.fail)
VERDICT_COLOURS = {(0xDA, 0xFB, 0xE1), (0xFF, 0xEB, 0xE9)}


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced PNG (Chromium's)."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i : i + 3]) for r in rows for i in range(0, stride, bpp)]


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed")
def test_the_first_screen_holds_the_verdict_summary_and_edits(edit_run, tmp_path):
    """A reviewer opens the report: at 1280x800, before any scrolling, they see the verdict box
    (its colour is in the screenshot), the summary and the per-edit before/after table; the
    tensor-level detail is folded away."""
    width, height = FIRST_SCREEN
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        f"--window-size={width},{height}",
    ]
    report = edit_run / "report.html"
    shot = tmp_path / "first-screen.png"
    run = subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", report.resolve().as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    w, h, pixels = _png_pixels(shot.read_bytes())
    assert (w, h) == FIRST_SCREEN
    verdict_pixels = sum(1 for p in pixels if tuple(p) in VERDICT_COLOURS)
    assert verdict_pixels > 20_000, verdict_pixels  # the box, not a stray pixel
    # where each part sits: a copy of the report with a probe script (the report has none)
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load', () => { for (const id of ['verdict', 'metrics', "
        "'edits-overview', 'tensors']) { const e = document.getElementById(id); "
        "const r = e.getBoundingClientRect(); document.body.dataset[id.replace('-', '')] = "
        "(!e.checkVisibility() ? 'hidden' : Math.round(r.top) + ',' + Math.round(r.bottom)); "
        "} });</script>"
    )
    probe.write_text(report.read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", probe.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = dict(re.findall(r'data-([a-z]+)="([^"]*)"', dom.stdout))
    for part in ("verdict", "metrics", "editsoverview"):
        top, bottom = map(int, got[part].split(","))
        assert bottom <= height, (part, got)
    assert got["tensors"] == "hidden", got  # folded in a closed <details>


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed")
def test_folded_detail_prints_expanded(edit_run, tmp_path):
    """The <details> sections are closed on screen but print open: printed to PDF, the report
    has more pages than the same report with the print rule taken out."""
    lines = (edit_run / "samples.jsonl").read_text().splitlines()
    (edit_run / "samples.jsonl").write_text("\n".join(lines * 15) + "\n")  # 30 edits of detail
    html = render(edit_run)
    rule = "details::details-content { content-visibility: visible; display: contents; }"
    assert rule in html
    pages = {}
    for name, text in (("expanded", html), ("folded", html.replace(rule, ""))):
        page, pdf = tmp_path / f"{name}.html", tmp_path / f"{name}.pdf"
        page.write_text(text)
        run = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'chrome-profile'}",
                "--no-pdf-header-footer",
                f"--print-to-pdf={pdf}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        pages[name] = len(re.findall(rb"/Type\s*/Page[^s]", pdf.read_bytes()))
    assert pages["expanded"] > pages["folded"] + 2, pages

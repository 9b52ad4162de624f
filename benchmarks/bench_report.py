"""Report rendering at scale: a 1000-edit run directory rendered to HTML.

    python benchmarks/bench_report.py RUN_DIR [--edits 1000] [--out FILE]

RUN_DIR is a real edit run (e.g. the demo's); its samples are repeated up to --edits to make a
1000-edit run directory in a temporary folder, which is then rendered (HTML and Markdown). Prints
seconds and file size; the baseline is the run's own size (so per-edit cost is visible).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medit.report.render import write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    src = Path(args.run_dir)
    samples = (src / "samples.jsonl").read_text().splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "run"
        big.mkdir()
        shutil.copy(src / "results.json", big / "results.json")
        lines = [json.loads(samples[i % len(samples)]) for i in range(args.edits)]
        for i, s in enumerate(lines):
            s["id"] = f"{s['id']}#{i}"
        (big / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
        figures = {"edits": args.edits}
        for fmt in ("html", "md"):
            t = time.perf_counter()
            path = write_report(big, fmt=fmt)
            figures[f"{fmt}_seconds"] = time.perf_counter() - t
            figures[f"{fmt}_mb"] = path.stat().st_size / 2**20
        t = time.perf_counter()
        small = write_report(src, Path(tmp) / "small.html")
        figures["source_edits"] = len(samples)
        figures["source_html_seconds"] = time.perf_counter() - t
        figures["source_html_mb"] = small.stat().st_size / 2**20
    print(
        f"{args.edits}-edit report: HTML {figures['html_seconds']:.2f} s, "
        f"{figures['html_mb']:.1f} MB; Markdown {figures['md_seconds']:.2f} s"
    )
    print(
        f"baseline {len(samples)}-edit run: HTML {figures['source_html_seconds']:.2f} s, "
        f"{figures['source_html_mb']:.2f} MB"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

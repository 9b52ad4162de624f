"""Causal-trace heatmaps as standalone SVG (no plotting library, no scripts).

One SVG per trace: a panel per kind (hidden, mlp, attn), tokens down, layers across, as in the
ROME paper. A cell's colour runs from white (the corrupted probability: restoring it does
nothing) to the panel's strongest colour (its largest score); subject tokens are starred. Every
cell carries a tooltip with its exact value.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

#: panel colours (ROME's convention: hidden purple, mlp green, attention red)
COLOURS = {"hidden": (88, 28, 135), "mlp": (21, 101, 52), "attn": (153, 27, 27)}
TITLES = {
    "hidden": "single restored layer",
    "mlp": "restored MLP (window)",
    "attn": "restored attention (window)",
}
CELL_W, CELL_H, GAP, TOP, FONT = 11, 16, 36, 58, 11


def _mix(rgb: tuple[int, int, int], strength: float) -> str:
    s = min(1.0, max(0.0, strength))
    r, g, b = (round(255 + (c - 255) * s) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _label(token: str, subject: bool) -> str:
    shown = token.replace("\n", "\\n") or "∅"
    return f"{shown}*" if subject else shown


def _panel(trace: dict[str, Any], kind: str, x0: float) -> list[str]:
    """SVG elements of one kind's panel, its top-left cell at (x0, TOP)."""
    grid, low = trace["scores"][kind], trace["corrupted_prob"]
    high = max(max(row) for row in grid)
    span = high - low if high > low else 1.0
    rgb, n_layers = COLOURS.get(kind, (30, 30, 30)), len(grid[0])
    out = [
        f'<text x="{x0}" y="{TOP - 8}" font-weight="bold">{escape(TITLES.get(kind, kind))}</text>'
    ]
    for t, row in enumerate(grid):
        for layer, value in enumerate(row):
            x, y = x0 + layer * CELL_W, TOP + t * CELL_H
            tip = f"{trace['tokens'][t]!r} layer {layer}: p={value:.4g}"
            out.append(
                f'<rect x="{x}" y="{y}" width="{CELL_W}" height="{CELL_H}" '
                f'fill="{_mix(rgb, (value - low) / span)}"><title>{escape(tip)}</title></rect>'
            )
    bottom = TOP + len(grid) * CELL_H
    for layer in range(0, n_layers, 5):
        x = x0 + layer * CELL_W + CELL_W / 2
        out.append(f'<text x="{x}" y="{bottom + 13}" text-anchor="middle">{layer}</text>')
    out.append(
        f'<text x="{x0 + n_layers * CELL_W / 2}" y="{bottom + 27}" text-anchor="middle">layer'
        f"</text>"
    )
    out += _colour_bar(rgb, low, high, x0, bottom + 36, n_layers * CELL_W)
    return out


def _colour_bar(rgb, low: float, high: float, x0: float, y: float, width: float) -> list[str]:
    steps = 20
    out = [
        f'<rect x="{x0 + i * width / steps}" y="{y}" width="{width / steps + 0.5}" height="8" '
        f'fill="{_mix(rgb, i / (steps - 1))}"/>'
        for i in range(steps)
    ]
    out.append(f'<text x="{x0}" y="{y + 20}">{low:.3g}</text>')
    out.append(f'<text x="{x0 + width}" y="{y + 20}" text-anchor="end">{high:.3g}</text>')
    return out


def trace_svg(trace: Any) -> str:
    """A standalone SVG document for a :class:`medit.tracing.trace.Trace` (or its ``to_dict()``)."""
    d = trace if isinstance(trace, dict) else trace.to_dict()
    kinds = [k for k in ("hidden", "mlp", "attn") if k in d["scores"]]
    kinds += [k for k in d["scores"] if k not in kinds]
    start, end = d["subject_range"]
    labels = [_label(tok, start <= i < end) for i, tok in enumerate(d["tokens"])]
    left = 12 + 7 * max(len(s) for s in labels)
    n_layers = len(d["scores"][kinds[0]][0])
    panel_w = n_layers * CELL_W
    width = left + len(kinds) * (panel_w + GAP)
    height = TOP + len(labels) * CELL_H + 70
    title = (
        f"{d['prompt']} → {d['answer_token']!r}   clean p={d['clean_prob']:.3g}, "
        f"corrupted p={d['corrupted_prob']:.3g}   (subject: {d['subject']})"
    )
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="{FONT}">',
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="6" y="16" font-size="13">{escape(title)}</text>',
    ]
    for t, label in enumerate(labels):
        y = TOP + t * CELL_H + CELL_H * 0.72
        out.append(f'<text x="{left - 6}" y="{y}" text-anchor="end">{escape(label)}</text>')
    for i, kind in enumerate(kinds):
        out += _panel(d, kind, left + i * (panel_w + GAP))
    out.append("</svg>")
    return "\n".join(out) + "\n"

"""Inline SVG charts for the HTML report: no JavaScript, no external resources.

Every piece of text placed in an SVG goes through ``markupsafe.escape``; the functions return
``Markup`` so the (autoescaping) templates insert them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

PALETTE = ("#9aa5b1", "#1f6feb", "#2da44e", "#bf8700", "#cf222e", "#8250df", "#0a7f7f")


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(label)}">'
        + "".join(body)
        + "</svg>"
    )


def bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    title: str,
    width: int = 560,
    height: int = 220,
) -> Markup:
    """Grouped vertical bars of values in [0, 1] (e.g. metrics before/after an edit)."""
    left, bottom, top = 36, 40, 24
    plot_h = height - bottom - top
    n_series = max(len(series), 1)
    group_w = (width - left - 10) / max(len(groups), 1)
    bar_w = max(4.0, group_w * 0.8 / n_series)
    body = [f'<text x="{left}" y="14" class="t">{escape(title)}</text>']
    for tick in (0, 0.5, 1.0):
        y = top + plot_h * (1 - tick)
        body.append(f'<line x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        body.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" class="ax" text-anchor="end">{tick:g}</text>'
        )
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, (name, values) in enumerate(series.items()):
            v = values[g]
            x = x0 + s * bar_w
            if v is None:
                continue
            h = plot_h * max(0.0, min(1.0, v))
            color = PALETTE[s % len(PALETTE)]
            body.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{escape(name)} {escape(group)}: '
                f"{v:.3f}</title></rect>"
            )
        cx = left + g * group_w + group_w / 2
        body.append(
            f'<text x="{cx:.1f}" y="{height - bottom + 14}" class="ax" text-anchor="middle">'
            f"{escape(group)}</text>"
        )
    lx = left
    for s, name in enumerate(series):
        body.append(
            f'<rect x="{lx}" y="{height - 14}" width="10" height="10" '
            f'fill="{PALETTE[s % len(PALETTE)]}"/><text x="{lx + 14}" y="{height - 5}" '
            f'class="ax">{escape(name)}</text>'
        )
        lx += 14 + 8 * len(name) + 16
    return _svg(width, height, body, title)


def pass_grid(
    rows: Sequence[str], columns: Sequence[str], cells: Sequence[Sequence[bool | None]], title: str
) -> Markup:
    """A grid of pass (green) / fail (red) / not measured (grey) cells, one row per edit."""
    cell, left, top = 14, 70, 64
    width = max(left + cell * len(columns) + 40, 7 * len(title))
    height = top + cell * len(rows) + 6
    body = [f'<text x="0" y="14" class="t">{escape(title)}</text>']
    for c, name in enumerate(columns):
        x = left + c * cell + cell / 2
        body.append(
            f'<text x="{x:.1f}" y="{top - 4}" class="ax" text-anchor="start" '
            f'transform="rotate(-60 {x:.1f} {top - 4})">{escape(name)}</text>'
        )
    for r, name in enumerate(rows):
        y = top + r * cell
        body.append(
            f'<text x="{left - 4}" y="{y + 11}" class="ax" text-anchor="end">{escape(name)}</text>'
        )
        for c, ok in enumerate(cells[r]):
            color = "#d0d7de" if ok is None else "#2da44e" if ok else "#cf222e"
            state = "not measured" if ok is None else "pass" if ok else "fail"
            body.append(
                f'<rect x="{left + c * cell}" y="{y}" width="{cell - 2}" height="{cell - 2}" '
                f'fill="{color}"><title>{escape(name)} / {escape(columns[c])}: {state}</title></rect>'
            )
    return _svg(width, height, body, title)


def lines(
    series: dict[str, Sequence[tuple[float, float | None]]],
    title: str,
    x_label: str,
    y_max: float | None = 1.0,
    width: int = 560,
    height: int = 240,
) -> Markup:
    """Lines of (x, y) points, one per series (a None y breaks nothing: the point is skipped).
    ``y_max`` fixes the top of the y axis (1.0 for rates); None scales it to the data."""
    left, right, bottom, top = 48, 12, 52, 24
    plot_w, plot_h = width - left - right, height - bottom - top
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None]
    x_max = max((x for x, _ in points), default=1.0) or 1.0
    top_y = y_max if y_max is not None else (max((y for _, y in points), default=1.0) or 1.0)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + plot_w * x / x_max, top + plot_h * (1 - min(y, top_y) / top_y)

    body = [f'<text x="{left}" y="14" class="t">{escape(title)}</text>']
    for frac in (0, 0.5, 1.0):
        _, y = at(0, top_y * frac)
        body.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
        )
        body.append(
            f'<text x="{left - 4}" y="{y + 4:.1f}" class="ax" text-anchor="end">'
            f"{top_y * frac:.3g}</text>"
        )
    for frac in (0, 0.5, 1.0):
        x, _ = at(x_max * frac, 0)
        body.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 14}" class="ax" text-anchor="middle">'
            f"{x_max * frac:.4g}</text>"
        )
    body.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" class="ax" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    for s, (name, pts) in enumerate(series.items()):
        color = PALETTE[(s + 1) % len(PALETTE)]
        shown = [(x, y) for x, y in pts if y is not None]
        if not shown:
            continue
        xy = [at(x, y) for x, y in shown]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for (x, y), (px, py) in zip(xy, shown, strict=True):
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"><title>'
                f"{escape(name)} at {px:g}: {py:.3f}</title></circle>"
            )
    lx = left
    for s, name in enumerate(series):
        body.append(
            f'<rect x="{lx}" y="{height - 14}" width="10" height="10" '
            f'fill="{PALETTE[(s + 1) % len(PALETTE)]}"/><text x="{lx + 14}" y="{height - 5}" '
            f'class="ax">{escape(name)}</text>'
        )
        lx += 14 + 7 * len(name) + 16
    return _svg(width, height, body, title)

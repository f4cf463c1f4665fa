"""The latency trend of a lineage as a PNG: one point per run with its date, y from zero, a min-p90 band, and
a dashed line where the build changed, labelled with what changed.

Pure PIL, no plotting library: the chart is small and must render the same on every machine.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

SIZE = (760, 340)
_BLUE, _RED, _GREY, _BAND = "#1f6feb", "#d1242f", "#999999", "#dbe9ff"


@dataclass(frozen=True)
class TrendPoint:
    """One run of the lineage: when, its median, its min and p90 (the band), whether it regressed, and what
    changed since the run before it (``schedules``, ``apache-tvm``...; None: the same build)."""

    when: dt.datetime | None
    median_ms: float
    low_ms: float
    high_ms: float
    regression: bool = False
    change: str | None = None


def _ms(value: float) -> str:
    """Milliseconds with 4 significant digits: ``118.9``, ``0.01172``."""
    return f"{value:.4g}"


def _nice_top(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5 or 5 x 10^n)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10) if step * magnitude >= value)


def draw_trend(points: Sequence[TrendPoint], title: str) -> bytes:
    """A PNG line chart of the medians (oldest first); the newest point red, regressions circled."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = SIZE
    left, right, top, bottom = 78, 24, 62, 58
    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=11)
    for i, line in enumerate(textwrap.wrap(title, width=88)[:2]):  # the whole title, on two lines at most
        draw.text((left, 10 + 18 * i), line, fill="black", font=font)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=_GREY)
    if not points:
        draw.text((left + 10, top + 10), "no runs yet", fill="#666666", font=font)
        return png(image)
    y_max = _nice_top(max(max(p.high_ms, p.median_ms) for p in points) * 1.05)

    def xy(i: int, value: float) -> tuple[float, float]:
        return left + plot_w * (i + 0.5) / len(points), top + plot_h * (1 - value / y_max)

    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # y from zero
        y = top + plot_h * (1 - frac)
        draw.line((left - 4, y, left, y), fill=_GREY)
        draw.text((6, y - 7), f"{_ms(y_max * frac)} ms", fill="#333333", font=small)
    band = [xy(i, p.high_ms) for i, p in enumerate(points)] + [xy(i, p.low_ms) for i, p in reversed(list(enumerate(points)))]
    if len(points) > 1:
        draw.polygon(band, fill=_BAND)
    _build_changes(draw, points, xy, top, top + plot_h, small)
    medians = [xy(i, p.median_ms) for i, p in enumerate(points)]
    if len(medians) > 1:
        draw.line(medians, fill=_BLUE, width=2)
    for i, ((x, y), point) in enumerate(zip(medians, points)):
        newest = i == len(points) - 1
        r = 5 if newest else 3
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_RED if newest else _BLUE)
        if point.regression:
            draw.ellipse((x - 8, y - 8, x + 8, y + 8), outline=_RED, width=2)
    x, y = medians[-1]
    draw.text((min(x + 8, width - right - 70), max(top, y - 18)), f"{_ms(points[-1].median_ms)} ms", fill=_RED, font=small)
    _date_labels(draw, points, xy, top + plot_h, small)
    caption = (f"median per run (line), min to p90 (band), last {len(points)} run(s); newest in red, regressions "
               "circled, build changes dashed")
    draw.text((left, height - 20), caption, fill="#333333", font=small)
    return png(image)


def _build_changes(draw: Any, points: Sequence[TrendPoint], xy: Any, top: float, bottom: float, font: Any) -> None:
    """A dashed vertical line before each run whose build changed, labelled with what changed."""
    for i, point in enumerate(points):
        if not point.change or i == 0:
            continue
        x = (xy(i - 1, 0)[0] + xy(i, 0)[0]) / 2
        y = top
        while y < bottom:
            draw.line((x, y, x, min(y + 5, bottom)), fill=_GREY, width=1)
            y += 9
        draw.text((x + 3, top + 2), textwrap.shorten(point.change, width=24, placeholder="~"), fill="#555555",
                  font=font)


def _date_labels(draw: Any, points: Sequence[TrendPoint], xy: Any, baseline: float, font: Any) -> None:
    """Dates under the x axis: the first, the last and a few between, never overlapping."""
    step = max(1, len(points) // 5)
    chosen = sorted({0, len(points) - 1, *range(0, len(points), step)})
    last_end = -1e9
    for i in chosen:
        when = points[i].when
        if when is None:
            continue
        text = f"{when:%m-%d %H:%M}"
        x = xy(i, 0)[0] - 30
        if x > last_end + 6:
            draw.text((x, baseline + 6), text, fill="#333333", font=font)
            last_end = x + 62


def png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_url(data: bytes) -> str:
    """``data:image/png;base64,...`` of a PNG."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")

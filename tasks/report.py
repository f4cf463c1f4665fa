"""Report: what a run shows in the Prefect UI besides its task runs.

:func:`publish_run_artifacts` adds four artifacts to the current flow run, all keyed by the run's *series*
(same model name, canonical target and device), so that the UI's Artifacts page lists each series with its
history (a keyed artifact gets a new version per run):

* ``summary-<series>``       markdown: model, digest, target, opt_level, build key, device, stages ran/cached,
  latency with the change against the previous runs, and the latency trend chart embedded as a PNG ``data:``
  URL (Prefect's default UI renders images inside markdown, but shows an *image* artifact only as its URL);
* ``top5-<series>``          table: the top-5 classes;
* ``latency-<series>``       table: mean/median/min/max/std in ms (the history is read back from these);
* ``latency-trend-<series>`` image: the same chart (Prefect's new UI, ``/v2``, renders image artifacts but
  drops images inside markdown).

:class:`Progress` reports long work (tuning, big uploads) as a progress artifact plus log lines.

The chart plots the median latency of the last ``history`` runs of the series, read back from the Prefect
API, so a regression shows at a glance. Publishing never fails the run: if the API cannot be reached, or
anything else goes wrong, it logs a warning and returns.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from statistics import median
from typing import Any

log = logging.getLogger(__name__)

_STAT_NAMES = ("mean", "median", "min", "max", "std")
_CHART_SIZE = (720, 300)


@dataclass(frozen=True)
class Series:
    """Runs that are comparable: same model name, canonical target and device (embedded ports ignored).

    Attributes:
        key: lowercase-dashes id used in artifact keys, e.g. ``efficientnet-lite0-3f2a9c0d1e``.
        title: what people read, e.g. ``efficientnet_lite0 @ llvm (x86_64-conda-linux-gnu) on embedded``.
    """

    key: str
    title: str


@dataclass(frozen=True)
class Point:
    """One run's median latency, as read back from the API."""

    created: datetime | None
    median_ms: float


def device_of(summary: dict[str, Any]) -> str:
    """The summary's device without what changes between runs (an embedded server's port)."""
    device = str(summary.get("device", ""))
    return "embedded" if device.startswith("embedded") else device


def target_title(canonical: str) -> str:
    """A short name of a canonical target: ``llvm (x86_64-conda-linux-gnu, znver4)``."""
    try:
        spec = json.loads(canonical)
    except (TypeError, ValueError):
        return str(canonical)
    details = [str(spec[k]) for k in ("mtriple", "mcpu") if spec.get(k)]
    return f"{spec.get('kind', '?')} ({', '.join(details)})" if details else str(spec.get("kind", canonical))


def series_of(summary: dict[str, Any]) -> Series:
    """The series a run summary belongs to."""
    device = device_of(summary)
    ident = json.dumps([summary["model"], summary["target"], device])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9]+", "-", str(summary["model"]).lower()).strip("-")[:40] or "model"
    return Series(f"{slug}-{digest}", f"{summary['model']} @ {target_title(summary['target'])} on {device}")


def top5_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the top-5 table: rank, class, label, probability."""
    return [
        {"rank": rank, "class": entry["class"], "label": entry["label"], "probability": round(entry["prob"], 4)}
        for rank, entry in enumerate(summary["top5"], 1)
    ]


def latency_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency table: one row per statistic, in ms, with the measurement counts."""
    timing = summary.get("timing", {})
    return [
        {"statistic": name, "ms": round(float(summary["latency_ms"][name]), 4),
         "repeat": timing.get("repeat"), "number": timing.get("number")}
        for name in _STAT_NAMES
    ]


def median_of_table(data: Any) -> float | None:
    """The median (ms) recorded in a latency table artifact's data (a JSON string or the rows), or None."""
    try:
        rows = json.loads(data) if isinstance(data, str) else data
        return next(float(row["ms"]) for row in rows if row.get("statistic") == "median")
    except (TypeError, ValueError, KeyError, AttributeError, StopIteration):
        return None


def change_text(points: list[Point]) -> str:
    """How the newest median compares with the median of the runs before it (oldest first)."""
    if len(points) < 2:
        return "first run of this series"
    before = median(p.median_ms for p in points[:-1])
    change = (points[-1].median_ms - before) / before * 100 if before > 0 else 0.0
    return f"{change:+.1f}% against the median of the previous {len(points) - 1} run(s) ({_ms(before)} ms)"


def draw_trend(points: list[Point], title: str) -> bytes:
    """A PNG line chart of the medians (oldest first); the newest point is marked."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = _CHART_SIZE
    left, right, top, bottom = 70, 20, 40, 45
    image = Image.new("RGB", _CHART_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    while len(title) > 8 and draw.textlength(title, font=font) > width - left - right:
        title = title[:-4] + "..."
    draw.text((left, 12), title, fill="black", font=font)
    draw.rectangle((left, top, width - right, height - bottom), outline="#999999")
    if not points:
        draw.text((left + 10, top + 10), "no runs yet", fill="#666666", font=font)
        return _png(image)
    values = [p.median_ms for p in points]
    low, high = min(values), max(values)
    pad = (high - low) * 0.15 or max(high * 0.05, 1e-3)
    low, high = max(0.0, low - pad), high + pad
    plot_w, plot_h = width - right - left, height - bottom - top

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (plot_w * (i + 0.5) / len(points))
        return x, top + plot_h * (1 - (v - low) / (high - low))

    for frac in (0.0, 0.5, 1.0):  # y ticks
        v = low + (high - low) * frac
        y = top + plot_h * (1 - frac)
        draw.line((left - 4, y, left, y), fill="#999999")
        draw.text((4, y - 7), f"{_ms(v)} ms", fill="#333333", font=small)
    coords = [xy(i, v) for i, v in enumerate(values)]
    if len(coords) > 1:
        draw.line(coords, fill="#1f6feb", width=2)
    for x, y in coords[:-1]:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="#1f6feb")
    x, y = coords[-1]
    draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill="#d1242f")
    draw.text((min(x + 8, width - right - 80), max(top, y - 18)), f"{_ms(values[-1])} ms", fill="#d1242f", font=small)
    first, last = points[0].created, points[-1].created
    caption = f"median latency of the last {len(points)} run(s)"
    if first and last:
        caption += f", {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC"
    draw.text((left, height - bottom + 12), caption, fill="#333333", font=small)
    return _png(image)


def _ms(value: float) -> str:
    """Milliseconds with 4 significant digits: ``118.9``, ``0.01172``."""
    return f"{value:.4g}"


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def data_url(png: bytes) -> str:
    """``data:image/png;base64,...`` of a PNG."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def summary_markdown(summary: dict[str, Any], series: Series, points: list[Point], chart_url: str) -> str:
    """The markdown summary of a run (see the module docstring)."""
    lat = summary["latency_ms"]
    stages = summary["stages"]
    lines = [
        f"# {series.title}",
        "",
        "| | |",
        "|---|---|",
        f"| Model | `{summary['model']}` (digest `{summary['model_digest'][:16]}`) |",
        f"| Target | `{summary['target']}` |",
        f"| opt_level | {summary['opt_level']} |",
        f"| Build key | `{summary['build_key']}` |",
        f"| Library | `{summary.get('artifact', '')}` |",
        f"| Device | {summary['device']} |",
        "",
        "## Stages",
        "",
        "| stage | status |",
        "|---|---|",
        *(f"| {name} | {'**cached**' if status == 'cached' else status} |" for name, status in stages.items()),
        "",
        f"Cached (not rebuilt): {', '.join(n for n, s in stages.items() if s == 'cached') or 'none'}.",
        "",
        "## Latency",
        "",
        f"Median **{_ms(lat['median'])} ms** (mean {_ms(lat['mean'])}, min {_ms(lat['min'])}, "
        f"max {_ms(lat['max'])}, std {_ms(lat['std'])}); {change_text(points)}.",
        "",
        f"![median latency of the last {len(points)} runs]({chart_url})",
    ]
    lines += ["", *(f"> {note}" for note in summary.get("notes", []))] if summary.get("notes") else []
    return "\n".join(lines) + "\n"


def read_history(key: str, limit: int) -> list[Point]:
    """Medians of the newest ``limit`` latency tables under ``key``, oldest first, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            sort=ArtifactSort.CREATED_DESC,
            limit=limit,
        )
    points = [Point(a.created, m) for a in artifacts if (m := median_of_table(a.data)) is not None]
    return points[::-1]


class Progress:
    """Progress of long work (tuning, a big upload) as a Prefect progress artifact and log lines.

    ``update(done, total)`` moves the artifact's bar and logs a line every ``log_every`` percent; it never
    raises: without a reachable API only the log lines remain. Use as ``with Progress("upload-...", "Upload
    of model.so") as progress: ... progress.update(sent, size)``; leaving the block sets 100 % on success.
    """

    def __init__(self, key: str, description: str, log_every: float = 10.0) -> None:
        self.key, self.description, self.log_every = key, description, log_every
        self._artifact_id: Any = None
        self._logged = -log_every
        self._failed = False

    def __enter__(self) -> Progress:
        self.update(0, 1)
        return self

    def update(self, done: float, total: float) -> None:
        percent = max(0.0, min(100.0, 100.0 * done / total)) if total > 0 else 100.0
        if percent - self._logged >= self.log_every or (percent == 100.0 and self._logged < 100.0):
            log.info("%s: %.0f%%", self.description, percent)
            self._logged = percent
            self._publish(percent)

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.update(1, 1)

    def _publish(self, percent: float) -> None:
        if self._failed:
            return
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(percent, key=self.key, description=self.description)
            else:
                update_progress_artifact(self._artifact_id, percent)
        except Exception as exc:  # noqa: BLE001 - progress reporting must not break the work it reports
            self._failed = True
            log.warning("progress of %s is not published to the Prefect API: %s", self.description, exc)


def publish_run_artifacts(summary: dict[str, Any], history: int = 20) -> None:
    """Create the run's artifacts (summary, top-5, latency, latency trend) in the current flow run.

    Args:
        summary: the run summary the flow returns (model, model_digest, target, opt_level, build_key,
            device, stages, top5, latency_ms, timing...).
        history: how many runs of the series the trend chart shows (this one included).

    Never raises: a failure (the API unreachable, say) is logged as a warning.
    """
    try:
        _publish(summary, max(1, history))
    except Exception as exc:  # noqa: BLE001 - the run's result matters more than its report
        log.warning("could not publish the run's artifacts to the Prefect API: %s: %s", type(exc).__name__, exc)


def _publish(summary: dict[str, Any], history: int) -> None:
    from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

    series = series_of(summary)
    create_table_artifact(latency_table(summary), key=f"latency-{series.key}",
                          description=f"Latency (ms) of {series.title}")
    create_table_artifact(top5_table(summary), key=f"top5-{series.key}", description=f"Top-5 of {series.title}")
    points = read_history(f"latency-{series.key}", history)  # this run's table is the newest
    chart = data_url(draw_trend(points, f"Median latency (ms): {series.title}"))
    create_image_artifact(chart, key=f"latency-trend-{series.key}",
                          description=f"Median latency of the last {len(points)} runs of {series.title}")
    create_markdown_artifact(summary_markdown(summary, series, points, chart), key=f"summary-{series.key}",
                             description=f"Run summary: {series.title}")
    log.info("published the run's artifacts under series %s (%d runs in the trend)", series.key, len(points))

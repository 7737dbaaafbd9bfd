"""Figures of a damage sweep: accuracy and CAM drift against the damage fraction, and the grid of
the paper's Figure 5.

Figure 5 (Vasu & Savakis) shows, per sample image, eight columns: the image, CAM and HAR of the
intact network, CAM and HAR after damage, the label predicted after damage (red when wrong),
CAM and HAR after retraining. :func:`sample_panels` computes them with :func:`core.explain.explain`
(each network explains its own top-1 class, as in the paper) and :func:`figure5_grid` draws them;
without a retrained network the last two columns are left out.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
state, safe in worker threads) at fixed pixel sizes, so their dimensions are known in advance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.damage import damaged
from core.damage_spec import DamageSpec
from core.exceptions import InputError
from core.explain import Explanation, explain
from core.render import har_panel, overlay
from core.sweep_report import BOUNDS
from core.sweep_spec import SummaryRow, SweepReport

__all__ = [
    "DPI",
    "GRID_HEADER_PX",
    "GRID_PANEL_PX",
    "GridRow",
    "figure5_grid",
    "grid_columns",
    "plot_accuracy",
    "plot_drift",
    "sample_panels",
]

DPI = 100
#: Side of one panel of the Figure 5 grid and height of its column header row, in pixels.
GRID_PANEL_PX = 200
GRID_HEADER_PX = 56
#: Pixel sizes (width, height) of the two sweep plots.
ACCURACY_PX = (900, 560)
DRIFT_PX = (1500, 900)

_DRIFT_PANELS = (
    ("flip_rate", "label-flip rate"),
    ("cam_correlation", "CAM correlation (Pearson r)"),
    ("har_box_iou", "HAR box IoU"),
    ("mask_iou", "thresholded-mask IoU"),
    ("peak_shift_px", "CAM peak shift (px)"),
)
_BASE_COLUMNS = (
    "image",
    "CAM intact",
    "HAR intact",
    "CAM damaged",
    "HAR damaged",
    "label after damage",
)
_RETRAINED_COLUMNS = ("CAM retrained", "HAR retrained")
_WRONG, _RIGHT = "#d62728", "#1a1a1a"


# --------------------------------------------------------------------------- sweep plots


def plot_accuracy(report: SweepReport, path: str | Path) -> Path:
    """Accuracy against damage fraction, one line per location with its confidence band, the
    retrained accuracy (dashed, where retrained) and the intact accuracy (grey)."""
    fig, ax = _figure(ACCURACY_PX)
    for color, (location, rows) in zip(_colors(), _by_location(report.summary), strict=False):
        _line(ax, rows, "accuracy", color, label=location)
        _line(ax, rows, "retrained_accuracy", color, label=f"{location} retrained", dashed=True)
    ax.axhline(report.intact_accuracy, color="grey", linestyle=":", label="intact")
    ax.set(xlabel="damaged weights (%)", ylabel="accuracy", ylim=(0.0, 1.02), xlim=_x_range(report))
    ax.set_title(_title(report, "accuracy under damage"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_drift(report: SweepReport, path: str | Path) -> Path:
    """Label-flip rate and the four CAM drift measures against damage fraction, per location."""
    fig = _new_figure(DRIFT_PX)
    axes = fig.subplots(2, 3).ravel()
    groups = _by_location(report.summary)
    for ax, (metric, label) in zip(axes, _DRIFT_PANELS, strict=False):
        for color, (location, rows) in zip(_colors(), groups, strict=False):
            _line(ax, rows, metric, color, label=location)
            _line(
                ax, rows, f"retrained_{metric}", color, label=f"{location} retrained", dashed=True
            )
        ax.set(xlabel="damaged weights (%)", title=label, xlim=_x_range(report))
        ax.set_ylim(*_limits(metric))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=9)
    fig.suptitle(_title(report, "CAM drift against the intact network"))
    fig.tight_layout()
    return _save(fig, path)


def _by_location(summary: Sequence[SummaryRow]) -> list[tuple[str, list[SummaryRow]]]:
    groups: dict[str, list[SummaryRow]] = {}
    for row in summary:
        groups.setdefault(row.location, []).append(row)
    return [(location, sorted(rows, key=lambda r: r.fraction)) for location, rows in groups.items()]


def _line(
    ax: Axes,
    rows: Sequence[SummaryRow],
    metric: str,
    color: str,
    *,
    label: str,
    dashed: bool = False,
) -> None:
    """Mean (markers where defined) and, where the trials give one, the confidence band."""
    present = [r for r in rows if metric in r.metrics and r.metrics[metric].mean is not None]
    if not present:
        return
    x = np.array([100 * r.fraction for r in present])
    mean = np.array([_value(r.metrics[metric].mean) for r in present])
    low = np.array([_value(r.metrics[metric].ci_low) for r in present])
    high = np.array([_value(r.metrics[metric].ci_high) for r in present])
    style = "--" if dashed else "-"
    ax.plot(x, mean, style, marker="s" if dashed else "o", markersize=3, color=color, label=label)
    if not np.isnan(low).all():
        ax.fill_between(x, low, high, color=color, alpha=0.08 if dashed else 0.18, linewidth=0)


def _x_range(report: SweepReport) -> tuple[float, float]:
    """The swept levels in percent, with a margin, the same on every panel."""
    levels = [100 * f for f in report.config.fractions]
    margin = max(2.5, 0.05 * (max(levels) - min(levels)))
    return min(levels) - margin, max(levels) + margin


def _limits(metric: str) -> tuple[float, float | None]:
    """The metric's range with a 2 % margin; open-ended metrics (pixels) start at their floor."""
    low, high = BOUNDS[metric]
    if not math.isfinite(high):
        return low, None
    margin = 0.02 * (high - low)
    return low - margin, high + margin


def _value(value: float | None) -> float:
    return math.nan if value is None else value


def _title(report: SweepReport, what: str) -> str:
    trials = report.config.trials
    level = f"{report.config.confidence:.0%} CI over {trials} trials" if trials > 1 else "1 trial"
    return f"{report.arch}: {what} ({report.images} images, {level})"


def _colors() -> list[str]:
    return [f"C{i}" for i in range(10)] * 10


# --------------------------------------------------------------------------- Figure 5 grid


@dataclass(frozen=True)
class GridRow:
    """One sample image of the Figure 5 grid and its explanations; ``true_label`` (None when
    unknown) decides whether the damaged label is wrong, else the intact prediction does."""

    name: str
    image: Image.Image
    true_label: str | None
    intact: Explanation
    damaged: Explanation
    retrained: Explanation | None = None

    @property
    def damaged_wrong(self) -> bool:
        expected = self.true_label or self.intact.result.prediction.label
        return self.damaged.result.prediction.label != expected


def sample_panels(
    model: nn.Module,
    meta: CheckpointMeta,
    samples: Sequence[tuple[str, Image.Image, str | None]],
    spec: DamageSpec,
    *,
    retrained: nn.Module | None = None,
    options: CamOptions | None = None,
) -> list[GridRow]:
    """Explain ``samples`` — (name, image, true label or None) — with the intact ``model``, with
    ``model`` damaged by ``spec`` (in place, restored afterwards) and with ``retrained``."""
    if not samples:
        raise InputError("the Figure 5 grid needs at least one sample image", field="samples")
    options = options or CamOptions()
    images = [(name, image) for name, image, _ in samples]
    intact = explain(model, meta, images, options)
    with damaged(model, spec):
        hit = explain(model, meta, images, options)
    again = explain(retrained, meta, images, options) if retrained is not None else None
    return [
        GridRow(name, image, label, intact[i], hit[i], None if again is None else again[i])
        for i, (name, image, label) in enumerate(samples)
    ]


def grid_columns(rows: Sequence[GridRow]) -> tuple[str, ...]:
    """Column titles of the grid: eight with retrained networks, six without."""
    with_retrained = bool(rows) and all(row.retrained is not None for row in rows)
    return _BASE_COLUMNS + (_RETRAINED_COLUMNS if with_retrained else ())


def figure5_grid(rows: Sequence[GridRow], path: str | Path, *, title: str = "") -> Path:
    """Draw the Figure 5 grid: one row per sample, the columns of :func:`grid_columns`, each
    panel :data:`GRID_PANEL_PX` square under a :data:`GRID_HEADER_PX` header."""
    if not rows:
        raise InputError("the Figure 5 grid needs at least one sample image", field="samples")
    columns = grid_columns(rows)
    width = len(columns) * GRID_PANEL_PX
    height = len(rows) * GRID_PANEL_PX + GRID_HEADER_PX
    fig = _new_figure((width, height))
    if title:
        fig.text(0.5, 1 - 12 / height, title, ha="center", va="center", fontsize=9)
    for c, name in enumerate(columns):
        fig.text(
            (c + 0.5) / len(columns),
            1 - (GRID_HEADER_PX - 18) / height,
            name,
            ha="center",
            va="center",
            fontsize=10,
            weight="bold",
        )
    for r, row in enumerate(rows):
        for c, panel in enumerate(_panels(row, len(columns))):
            top = GRID_HEADER_PX + (r + 1) * GRID_PANEL_PX
            ax = fig.add_axes(
                (
                    (c * GRID_PANEL_PX + 4) / width,
                    1 - (top - 4) / height,
                    (GRID_PANEL_PX - 8) / width,
                    (GRID_PANEL_PX - 8) / height,
                )
            )
            ax.axis("off")
            if isinstance(panel, Image.Image):
                ax.imshow(np.asarray(panel))
            else:
                _label_panel(ax, row)
    return _save(fig, path)


def _panels(row: GridRow, count: int) -> list[Image.Image | str]:
    panels: list[Image.Image | str] = [
        row.image,
        _cam(row.image, row.intact),
        _har(row.image, row.intact),
        _cam(row.image, row.damaged),
        _har(row.image, row.damaged),
        "label",
    ]
    if count > len(panels) and row.retrained is not None:
        panels += [_cam(row.image, row.retrained), _har(row.image, row.retrained)]
    return panels


def _cam(image: Image.Image, explanation: Explanation) -> Image.Image:
    return overlay(image, explanation.maps[0], alpha=0.5)


def _har(image: Image.Image, explanation: Explanation) -> Image.Image:
    """The image with everything outside the HAR dimmed and the HAR box outlined."""
    return har_panel(image, explanation.masks[0], explanation.result.cams[0].boxes[:1])


def _label_panel(ax: Axes, row: GridRow) -> None:
    prediction = row.damaged.result.prediction
    wrong = row.damaged_wrong
    text = f"{prediction.label}\n{prediction.probability:.0%}"
    if row.true_label is not None:
        text += f"\n\n(true: {row.true_label})"
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        fontsize=11,
        wrap=True,
        color=_WRONG if wrong else _RIGHT,
        weight="bold" if wrong else "normal",
        transform=ax.transAxes,
    )


# --------------------------------------------------------------------------- canvas


def _new_figure(size_px: tuple[int, int]) -> Figure:
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _figure(size_px: tuple[int, int]) -> tuple[Figure, Axes]:
    fig = _new_figure(size_px)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: str | Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size promised above.
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out

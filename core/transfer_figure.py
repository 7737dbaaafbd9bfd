"""The report of a transfer experiment (:mod:`core.transfer`): the CAM grid of the paper's
Figure 3, per-sample CAM artifacts, and the JSON summary.

Figure 3 (Vasu & Savakis) shows, for a network trained on one dataset and tested on the other,
an image, its CAM and its highest activation region (HAR), for shared classes (top row) and
previously unseen ones (bottom row). Here every sample image is one row — shared classes first,
then unseen ones — under the columns image | CAM | HAR, followed by CAM | HAR of the fine-tuned
network (the paper's Figure 4, "CAMs after transfer learning") when there is one. A caption
column on the left names the class and the predictions, in red when wrong; an unseen class's
prediction is necessarily a source class and is shown in grey.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global state, safe in worker
threads) at fixed pixel sizes, so :func:`grid_size` is known before drawing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from core.cam_options import CamOptions
from core.explain import Explanation, write_artifacts
from core.render import har_panel, overlay
from core.results import ClassScore, ImageCam
from core.transfer import TransferResult, TransferSample, TransferSummary

__all__ = [
    "CAPTION_PX",
    "GRID_FILE",
    "HEADER_PX",
    "PANEL_PX",
    "REPORT_FILE",
    "grid_columns",
    "grid_size",
    "transfer_grid",
    "write_transfer_report",
]

DPI = 100
#: Side of one image panel, width of the caption column and height of the header, in pixels.
PANEL_PX = 180
CAPTION_PX = 270
HEADER_PX = 64
#: File names inside the report folder; per-sample artifacts go to :data:`CAMS_DIR`.
GRID_FILE = "transfer_grid.png"
REPORT_FILE = "transfer.json"
CAMS_DIR = "cams"

_SOURCE_COLUMNS = ("image", "CAM", "HAR")
_TUNED_COLUMNS = ("CAM fine-tuned", "HAR fine-tuned")
_WRONG, _RIGHT, _MOOT = "#d62728", "#1a1a1a", "#7f7f7f"
_TITLES = {"ucm": "UC Merced", "aid": "AID"}


def grid_columns(result: TransferResult) -> tuple[str, ...]:
    """Image-column titles: three, or five with a fine-tuned network."""
    return _SOURCE_COLUMNS + (_TUNED_COLUMNS if result.fine_tuned is not None else ())


def grid_size(result: TransferResult) -> tuple[int, int]:
    """(width, height) in pixels of :func:`transfer_grid`'s picture."""
    width = CAPTION_PX + len(grid_columns(result)) * PANEL_PX
    return width, HEADER_PX + len(result.samples) * PANEL_PX


def transfer_grid(result: TransferResult, path: str | Path) -> Path:
    """Draw the Figure 3 grid of ``result`` (one row per sample, see the module docstring) as a
    PNG of :func:`grid_size` pixels."""
    canvas = _PixelCanvas(*grid_size(result))
    canvas.text(6, 8, _title(result), ha="left", va="top", fontsize=9)
    for c, name in enumerate(grid_columns(result)):
        x = CAPTION_PX + (c + 0.5) * PANEL_PX
        canvas.text(x, HEADER_PX - 14, name, ha="center", va="center", fontsize=10, weight="bold")
    for r, sample in enumerate(result.samples):
        top = HEADER_PX + r * PANEL_PX
        caption = canvas.axes(0, top, CAPTION_PX, PANEL_PX)
        for i, (text, color, bold) in enumerate(_caption(sample)):
            caption.text(
                0.04,
                0.9 - 0.15 * i,
                text,
                color=color,
                fontsize=8.5,
                weight="bold" if bold else "normal",
                transform=caption.transAxes,
            )
        for c, panel in enumerate(_panels(sample, result.options)):
            left = CAPTION_PX + c * PANEL_PX
            canvas.axes(left + 4, top + 4, PANEL_PX - 8, PANEL_PX - 8).imshow(np.asarray(panel))
    return canvas.save(path)


class _PixelCanvas:
    """A matplotlib figure of a fixed pixel size, laid out in pixels from the top-left."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
        FigureCanvasAgg(self.figure)

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.figure.text(x / self.width, 1 - y / self.height, text, **style)

    def axes(self, left: float, top: float, width: float, height: float) -> Axes:
        """Frameless axes covering the given pixel rectangle."""
        ax = self.figure.add_axes(
            (
                left / self.width,
                1 - (top + height) / self.height,
                width / self.width,
                height / self.height,
            )
        )
        ax.axis("off")
        return ax

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        # No bbox_inches="tight": it would change the promised pixel size.
        self.figure.savefig(out, dpi=DPI, format="png")
        return out


def write_transfer_report(
    result: TransferResult, out_dir: str | Path, *, sample_artifacts: bool = True
) -> TransferSummary:
    """Write the grid (:data:`GRID_FILE`), the JSON summary (:data:`REPORT_FILE`) and, with
    ``sample_artifacts``, each sample's CAM overlays, raw maps and HAR masks
    (:func:`core.explain.write_artifacts`) under :data:`CAMS_DIR`, before and after
    fine-tuning. Returns the summary with every artifact's path relative to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    if sample_artifacts:
        rows = [
            row.model_copy(update=_sample_artifacts(i, sample, out, result.options))
            for i, (sample, row) in enumerate(zip(result.samples, summary.samples, strict=True))
        ]
        summary = summary.model_copy(update={"samples": rows})
    transfer_grid(result, out / GRID_FILE)
    summary = summary.model_copy(update={"artifacts": {"grid": GRID_FILE, "report": REPORT_FILE}})
    (out / REPORT_FILE).write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return summary


def _sample_artifacts(
    index: int, sample: TransferSample, out: Path, options: CamOptions
) -> dict[str, ImageCam]:
    """Write one sample's artifacts; its ``before``/``after`` results with their file names."""
    written = {
        "before": _artifacts(sample.before, sample.image, out, options, f"{index:02d}_before_")
    }
    if sample.after is not None:
        written["after"] = _artifacts(
            sample.after, sample.image, out, options, f"{index:02d}_after_"
        )
    return written


def _artifacts(
    explanation: Explanation, image: Image.Image, out: Path, options: CamOptions, prefix: str
) -> ImageCam:
    written = write_artifacts(explanation, image, out / CAMS_DIR, options, prefix=prefix)
    cams = [
        cam.model_copy(
            update={"artifacts": {k: f"{CAMS_DIR}/{v}" for k, v in cam.artifacts.items()}}
        )
        for cam in written.cams
    ]
    return written.model_copy(update={"cams": cams})


# --------------------------------------------------------------------------- panels


def _panels(sample: TransferSample, options: CamOptions) -> list[Image.Image]:
    panels = [
        sample.image,
        _cam(sample.image, sample.before, options),
        _har(sample.image, sample.before),
    ]
    if sample.after is not None:
        panels += [_cam(sample.image, sample.after, options), _har(sample.image, sample.after)]
    return panels


def _cam(image: Image.Image, explanation: Explanation, options: CamOptions) -> Image.Image:
    """The map of the explained (top) class over the image, its HAR box outlined."""
    boxes = explanation.result.cams[0].boxes[:1]
    return overlay(
        image, explanation.maps[0], colormap=options.colormap, alpha=options.alpha, boxes=boxes
    )


def _har(image: Image.Image, explanation: Explanation) -> Image.Image:
    """The image dimmed outside the highest activation region, its box outlined."""
    return har_panel(image, explanation.masks[0], explanation.result.cams[0].boxes[:1])


def _caption(sample: TransferSample) -> list[tuple[str, str, bool]]:
    """Lines (text, colour, bold) of a row's caption: wrong predictions in bold red, the
    prediction for an unseen class (which cannot be right) in grey."""
    before = sample.before.result.prediction
    if sample.expected is not None:
        lines = [
            (f"shared: {_clip(sample.target_class)}", _RIGHT, True),
            (f"(model class {_clip(sample.expected)})", _RIGHT, False),
            _verdict("predicted", before, sample.expected),
        ]
    else:
        lines = [
            (f"unseen: {_clip(sample.target_class)}", _RIGHT, True),
            ("(no such model class)", _MOOT, False),
            (f"predicted {_score(before)}", _MOOT, False),
        ]
    if sample.after is not None:
        lines.append(_verdict("fine-tuned", sample.after.result.prediction, sample.target_class))
    lines.append((_clip(sample.path.name), _MOOT, False))
    return lines


def _verdict(what: str, prediction: ClassScore, expected: str) -> tuple[str, str, bool]:
    right = prediction.label == expected
    return f"{what} {_score(prediction)}", _RIGHT if right else _WRONG, not right


def _score(score: ClassScore) -> str:
    return f"{_clip(score.label)} {score.probability:.0%}"


def _clip(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _title(result: TransferResult) -> str:
    plan = result.plan
    line = (
        f"{result.meta.arch} trained on {_TITLES[plan.source]}, tested on {_TITLES[plan.target]}: "
        f"shared-class accuracy {_percent(result.before.accuracy)} ({result.before.images} images)"
    )
    if result.fine_tuned is not None:
        tuned = result.fine_tuned
        line += (
            f"\nheld-out test images: {_percent(tuned.before.accuracy)} before, "
            f"{_percent(tuned.after.accuracy)} after fine-tuning"
        )
    return line


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"

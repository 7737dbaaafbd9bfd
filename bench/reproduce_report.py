"""The markdown report of ``bench/reproduce.py``: its numbers next to the paper's (Vasu &
Savakis, ``../shared/paper.md``), with honest notes on what differs, and the figures shrunk for
committing.

Works from the JSON results alone (``bench/results/reproduce.json``); rerunning
``bench/reproduce.py`` with the same settings reuses every cached stage and rewrites the report in
seconds. A stage that did not run gets a line saying so.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["PAPER", "REPORT_FILE", "shrink_png", "write_markdown"]

REPORT_FILE = "REPORT.md"

#: What the paper reports. Table 1 is its only table; §4.2 and Figures 3–5 are qualitative.
PAPER: dict[str, Any] = {
    "title": "Visualizing the Resilience of Deep Convolutional Network Interpretations",
    "authors": "Bhavan Vasu, Andreas Savakis",
    "model": "ResNet50 (input size, initialization and data split not stated)",
    "table1": {
        "UCM": {"training": 0.942, "validation": 0.917},
        "AID": {"training": 0.963, "validation": 0.924},
    },
    "damage": "stuck-at-zero, D1–D4 (first convolution of every block), 5–95 % in steps of 5 %",
    "claims": {
        "survives_damage": "Fig. 5(a)(b): airport and baseball field still classified "
        "correctly after substantial damage (50 % in the caption, 75 % in the text)",
        "har_drop_and_recovery": "Fig. 5: the HAR drops after damage and is recovered after "
        "retraining",
        "retraining_recovers": "§5: retraining a damaged network recovers its performance",
        "transfer_resilient": "Fig. 3: good CAMs across UCM/AID without retraining, even for "
        "classes unseen in training",
    },
}

#: Drift measures shown in the tables (see core/drift.py), with their headings.
_DRIFT = (
    ("flip_rate", "label flips"),
    ("cam_correlation", "CAM r"),
    ("har_box_iou", "HAR box IoU"),
    ("peak_shift_px", "peak shift (px)"),
)


def shrink_png(src: Path, dst: Path, max_bytes: int) -> Path:
    """Write ``src`` to ``dst`` as a PNG of at most ``max_bytes`` where possible: as it is at
    PIL's default zlib level, else with an adaptive 256-colour palette, else also scaled down
    (at most to 40 %, the last attempt is kept)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as opened:
        image = opened.convert("RGB")
    image.save(dst, format="PNG")
    for scale in (1.0, 0.85, 0.7, 0.55, 0.4):
        if dst.stat().st_size <= max_bytes:
            break
        size = (round(image.width * scale), round(image.height * scale))
        smaller = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        paletted = smaller.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        paletted.save(dst, format="PNG")
    return dst


def write_markdown(results: dict[str, Any], report_dir: Path) -> Path:
    """Write ``REPORT.md`` into ``report_dir`` (figures linked relatively) from the results."""
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        _header(results),
        _setup(results),
        _accuracy(results),
        _sweep(results),
        _transfer(results),
        _notes(results),
    ]
    path = report_dir / REPORT_FILE
    path.write_text("\n\n".join(s.strip() for s in sections) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- sections


def _header(results: dict[str, Any]) -> str:
    env, settings = results["environment"], results["settings"]
    mode = (
        "**quick smoke run** (few cells and images; not the reproduction)"
        if settings["quick"]
        else "full run"
    )
    device = env["cuda"] or f"CPU ({env['threads']} thread(s) of {env['cpus']} cores)"
    load = ", ".join(f"{x:.1f}" for x in env["load_average"])
    return f"""
# Reproducing Vasu & Savakis at CPU scale

*{PAPER["title"]}* ({PAPER["authors"]}, `../shared/paper.md`), re-run with camres on
`../shared/data` by `bench/reproduce.py` — {mode}, {env["created_at"]}, {device}, torch
{env["torch"]}, load average {load} at the end. Every number below is also in
`{settings["results"]}`; raw tables, maps and checkpoints stay in the
git-ignored `{settings["out"]}`.
"""


def _setup(results: dict[str, Any]) -> str:
    model, settings = results["model"], results["settings"]
    split = model["split"]
    origin = (
        "trained by this run"
        if model["trained_by_this_run"]
        else f"checkpoint `{model['checkpoint']}`"
    )
    rows = [
        ("network", "ResNet50", f"{model['arch']} ({origin}), from scratch"),
        ("input", "not stated (ResNet50's usual 224 px)", f"{model['input_size']} px"),
        (
            "training data",
            "UC Merced, 14 classes shared with AID",
            f"the same 14 classes (`ucm_aid_classes.json`): {split['train']} training / "
            f"{split['val']} validation / {split['test']} test images (stratified, seed "
            f"{split['seed']})",
        ),
        (
            "damage",
            "stuck at zero, D1–D4, 5–95 % step 5",
            f"the same at {_levels(settings['fractions'])}, {settings['trials']} seed(s) each "
            "(95 % t-intervals over seeds), scored on the test split only",
        ),
        (
            "retraining",
            "damaged weights held, epochs not stated",
            f"masked SGD, {settings['retrain_epochs']} epoch(s) at lr {settings['retrain_lr']}, "
            f"at {_lvl(settings['retrain_at'])} damage, every seed",
        ),
        ("Figure 5", "AID test images, AID-trained network", "UC Merced test images, this network"),
        (
            "transfer",
            "UCM ↔ AID, full AID (10,000 images, 30 classes)",
            f"UCM → AID only, on the AID slice (`aid-mini`, 150 px){_aid_slice(results)}",
        ),
        (
            "hardware",
            "not stated",
            results["environment"]["cuda"] or "2-core CPU, shared with other jobs",
        ),
    ]
    return "## Set-up, and what differs from the paper\n\n" + _table(("", "paper", "here"), rows)


def _aid_slice(results: dict[str, Any]) -> str:
    before = (results.get("transfer") or {}).get("before")
    if before is None:
        return ""
    unseen = before["unseen"]
    extra = "".join(f" + {o['images']} of {name}" for name, o in unseen.items())
    return f": {before['images']} images of {len(before['per_class'])} shared classes{extra}"


def _accuracy(results: dict[str, Any]) -> str:
    stage = results.get("accuracy")
    if stage is None:
        return "## 1. Trained accuracy (Table 1)\n\n_Stage not run._"
    ucm, aid = PAPER["table1"]["UCM"], PAPER["table1"]["AID"]
    train, test = stage["train"], stage["test"]
    lines = [
        "## 1. Trained accuracy (Table 1)",
        "",
        "| | paper, ResNet50 on UCM | here, on UCM | paper, ResNet50 on AID |",
        "| --- | --- | --- | --- |",
        f"| training accuracy | {_pct(ucm['training'])} | {_pct(train['accuracy'])} "
        f"({train['images']} training images, no augmentation) | {_pct(aid['training'])} |",
        f"| validation accuracy | {_pct(ucm['validation'])} | {_pct(test['accuracy'])} "
        f"(held-out test split, {test['images']} images) | {_pct(aid['validation'])} |",
        "",
        "The paper does not say how its validation images were chosen. The comparable number "
        "here is the test split recorded in the checkpoint: never trained on, never used to "
        "choose anything"
        + (
            f"; the validation split ({stage['val']['images']} images), which picked the "
            f"epoch kept, scores {_pct(stage['val']['accuracy'])}."
            if "val" in stage
            else "."
        ),
        "",
        _per_class(stage, results.get("transfer")),
    ]
    return "\n".join(lines)


def _per_class(stage: dict[str, Any], transfer: dict[str, Any] | None) -> str:
    test = stage["test"]
    aid = (transfer or {}).get("before", {}).get("per_class", {})
    by_model_class = {o["expected"]: (name, o) for name, o in aid.items()}
    lines = [
        "| class | test accuracy (images) | AID class | AID accuracy, no retraining (images) |",
        "| --- | --- | --- | --- |",
    ]
    for name, accuracy in test["per_class_accuracy"].items():
        aid_name, outcome = by_model_class.get(name, ("–", None))
        aid_cell = "–" if outcome is None else f"{_pct(outcome['accuracy'])} ({outcome['images']})"
        lines.append(
            f"| {name} | {_pct(accuracy)} ({test['per_class_count'][name]}) | {aid_name} | "
            f"{aid_cell} |"
        )
    return "\n".join(lines)


def _sweep(results: dict[str, Any]) -> str:
    stage = results.get("sweep")
    title = "## 2. Weight damage at D1–D4 (§4.2, Figure 5)"
    if stage is None:
        return f"{title}\n\n_Stage not run._"
    summary = _Summary(stage["summary"])
    config, figures = stage["config"], stage["figures"]
    at = results["settings"]["retrain_at"]
    parts = [
        title,
        f"{stage['images']} test images, intact accuracy **{_pct(stage['intact_accuracy'])}**; "
        f"{len(stage['summary'])} (location, level) pairs × {config['trials']} seed(s) in "
        f"{_duration(stage['seconds'])}. The paper gives no numbers for this experiment "
        "(only Figure 5); its claims are checked against ours at the end of the section.",
        "### Accuracy under damage (mean, 95 % CI over seeds)",
        summary.table("accuracy", config["locations"], percent=True),
        _image(figures.get("accuracy"), "accuracy against damage"),
        f"### Masked retraining at {_lvl(at)}",
        _retraining(summary, config["locations"], at, stage),
        "### CAM drift against the intact network",
        "Means over test images of each damaged network's map of its own top class against the "
        "intact network's (`core/drift.py`): Pearson r of the maps, IoU of the HAR boxes, "
        "distance between the maps' peaks.",
        _drift_table(summary, config["locations"], results["settings"]["fractions"]),
        _image(figures.get("drift"), "label flips and CAM drift against damage"),
        "### Figure 5",
        _figure5(figures, stage, at),
        "### The paper's claims, here",
        _claims(summary, config["locations"], at, results.get("transfer")),
    ]
    return "\n\n".join(parts)


def _retraining(summary: _Summary, locations: Sequence[str], at: float, stage: Any) -> str:
    lines = [
        f"Every seed's damaged network retrained on {stage['retrain_images']} training images; "
        "its damaged weights stay exactly zero (`core/damage.py` verifies it after training).",
        "",
        "| location | accuracy damaged | accuracy retrained | lost accuracy recovered | "
        "HAR box IoU damaged → retrained | CAM r damaged → retrained |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    intact = stage["intact_accuracy"]
    for loc in locations:
        damaged = summary.mean(loc, at, "accuracy")
        retrained = summary.mean(loc, at, "retrained_accuracy")
        recovered = None
        if damaged is not None and retrained is not None and intact - damaged > 0:
            recovered = (retrained - damaged) / (intact - damaged)
        lines.append(
            f"| {loc} | {summary.cell(loc, at, 'accuracy', True)} | "
            f"{summary.cell(loc, at, 'retrained_accuracy', True)} | {_pct(recovered)} | "
            f"{_num(summary.mean(loc, at, 'har_box_iou'))} → "
            f"{_num(summary.mean(loc, at, 'retrained_har_box_iou'))} | "
            f"{_num(summary.mean(loc, at, 'cam_correlation'))} → "
            f"{_num(summary.mean(loc, at, 'retrained_cam_correlation'))} |"
        )
    return "\n".join(lines)


def _drift_table(summary: _Summary, locations: Sequence[str], fractions: Sequence[float]) -> str:
    shown = [f for f in (0.25, 0.5, 0.75, 0.95) if f in fractions] or list(fractions)[:4]
    head = " | ".join(name for _, name in _DRIFT)
    lines = [f"| location | damage | {head} |", "| --- | --- |" + " --- |" * len(_DRIFT)]
    for loc in locations:
        for fraction in shown:
            cells = " | ".join(summary.cell(loc, fraction, m, False) for m, _ in _DRIFT)
            lines.append(f"| {loc} | {_lvl(fraction)} | {cells} |")
    return "\n".join(lines)


def _figure5(figures: dict[str, str], stage: dict[str, Any], at: float) -> str:
    grids = [
        (k.removeprefix("figure5_"), v) for k, v in figures.items() if k.startswith("figure5_")
    ]
    if not grids:
        return "_No grid drawn._"
    classes = ", ".join(name for name, _ in stage["figure5_samples"])
    lines = [
        f"Columns as in the paper: image, CAM and HAR intact, CAM and HAR after {_lvl(at)} damage "
        "(seed 0), the label after damage (red: wrong), CAM and HAR after retraining. Rows: "
        f"the first test image of {classes} (the paper shows airport, baseball field, storage "
        "tanks and resort; UC Merced has no resort class).",
    ]
    lines += [_image(path, f"Figure 5 at {loc}") for loc, path in grids]
    return "\n\n".join(lines)


def _claims(
    summary: _Summary, locations: Sequence[str], at: float, transfer: dict[str, Any] | None
) -> str:
    claims = PAPER["claims"]
    high = max(summary.fractions)
    survive = "; ".join(
        f"{loc} {_pct(summary.mean(loc, at, 'accuracy'))} / "
        f"{_pct(summary.mean(loc, high, 'accuracy'))}"
        for loc in locations
    )
    har = "; ".join(
        f"{loc} {_num(summary.mean(loc, at, 'har_box_iou'))} → "
        f"{_num(summary.mean(loc, at, 'retrained_har_box_iou'))}"
        for loc in locations
    )
    recover = "; ".join(
        f"{loc} {_pct(summary.mean(loc, at, 'accuracy'))} → "
        f"{_pct(summary.mean(loc, at, 'retrained_accuracy'))}"
        for loc in locations
    )
    shared = "transfer stage not run"
    if transfer is not None:
        before = transfer["before"]
        shared = f"AID shared-class accuracy {_pct(before['accuracy'])} ({before['images']} images)"
    rows = [
        (
            claims["survives_damage"],
            f"test accuracy at {_lvl(at)} / {_lvl(high)} damage: {survive}",
        ),
        (
            claims["har_drop_and_recovery"],
            f"HAR box IoU with the intact network at {_lvl(at)}, damaged → retrained: {har}",
        ),
        (claims["retraining_recovers"], f"accuracy at {_lvl(at)}, damaged → retrained: {recover}"),
        (claims["transfer_resilient"], f"{shared}; see section 3"),
    ]
    return _table(("the paper says", "here (means over seeds)"), rows)


def _transfer(results: dict[str, Any]) -> str:
    stage = results.get("transfer")
    title = "## 3. Transfer to AID without retraining (§4.1, Figure 3)"
    if stage is None:
        return f"{title}\n\n_Stage not run._"
    before = stage["before"]
    parts = [
        title,
        f"The UC Merced network classifies the AID slice through the class mapping: accuracy "
        f"counts the {len(stage['shared_classes'])} shared classes only (a prediction is right "
        f"when it names the mapped UC Merced class). Shared-class accuracy: "
        f"**{_pct(before['accuracy'])}** ({before['correct']}/{before['images']} images; per "
        "class in section 1). The paper reports no number for this; its Figure 3 shows CAMs.",
        _unseen(before),
        _fine_tune(stage),
        "Figure 3 here: rows Port and River (the paper's shared examples), Airport and "
        "StorageTanks, and the unseen Bridge; columns image, CAM, HAR"
        + (", and the same after fine-tuning" if stage.get("fine_tune") else "")
        + ". Captions in red: wrong predictions; an unseen class's prediction is in grey.",
        _image(stage["figures"].get("figure3"), "Figure 3: UC Merced network on AID images"),
    ]
    return "\n\n".join(p for p in parts if p)


def _unseen(before: dict[str, Any]) -> str:
    lines = ["| unseen AID class | images | taken for (count) |", "| --- | --- | --- |"]
    for name, outcome in before["unseen"].items():
        taken = ", ".join(f"{label} ({n})" for label, n in outcome["predicted"].items())
        lines.append(f"| {name} | {outcome['images']} | {taken} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _fine_tune(stage: dict[str, Any]) -> str:
    tuned = stage.get("fine_tune")
    if not tuned:
        return "_No fine-tuning (`--finetune-epochs 0`)._"
    split, result = tuned["split"], tuned["result"]
    return (
        f"Fine-tuned on AID (the paper's transfer learning, Fig. 4): a head for AID's "
        f"{len(stage['shared_classes']) + len(stage['unseen_classes'])} classes (shared rows "
        "start from the UC Merced rows), "
        f"{len(result['history'])} epoch(s) at lr {tuned['config']['lr']} on {split['train']} "
        f"images. On {split['test']} held-out AID images, shared-class accuracy "
        f"{_pct(tuned['before']['accuracy'])} before → {_pct(tuned['after']['accuracy'])} "
        "after. Eight images per class make this a smoke test of the pipeline, not a "
        "measurement."
    )


def _notes(results: dict[str, Any]) -> str:
    model, settings = results["model"], results["settings"]
    quick = settings["quick"]
    extra = (
        "\n- **This is a quick run**: a handful of images and one epoch. Its numbers test the "
        "pipeline, not the paper."
        if quick
        else ""
    )
    weights = (results.get("sweep") or {}).get("target_weights", {})
    counted = ", ".join(f"{loc} {n:,}" for loc, n in weights.items())
    counted = f" (weights here: {counted})" if counted else ""
    scored = (results.get("sweep") or {}).get("images") or model["split"]["test"]
    return f"""
## Notes

- **Network and scale.** {model["arch"]} at {model["input_size"]} px trained from scratch on
  {model["split"]["train"]:,} images stands in for the paper's ResNet50; absolute accuracies
  are not comparable, the shape of the curves and the effect of retraining are what can be
  compared. D1–D4 here are the first convolutions of two 3×3 BasicBlocks per stage, where
  ResNet50 has 3–6 Bottlenecks whose first convolution is 1×1{counted}.
- **What the paper leaves open.** Input size, initialization, optimizer, data split, the
  number of retraining epochs and the location of Figure 5's damage are not stated; the
  choices here are in `bench/recipe.py` and the settings of `reproduce.json`.
- **Variability.** Intervals are over damage seeds on a fixed test set
  ({settings["trials"]} seed(s)); with few seeds they are wide (t = 4.3 for three). Image
  sampling error is not in them: one test image is {100 / scored:.2f} accuracy points.
- **AID.** Only UC Merced → AID is run: the AID slice is too small to train the reverse
  direction, and MS-COCO (Figure 4) is not available here.{extra}
"""


# --------------------------------------------------------------------------- helpers


class _Summary:
    """Lookup of the sweep's summary records (``core.sweep_report.summary_record``)."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.records = {(r["location"], round(r["fraction"], 6)): r for r in records}
        self.fractions = sorted({r["fraction"] for r in records})

    def get(self, location: str, fraction: float, metric: str, part: str) -> float | None:
        record = self.records.get((location, round(fraction, 6)), {})
        value = record.get(f"{metric}_{part}")
        return None if value is None or not math.isfinite(value) else float(value)

    def mean(self, location: str, fraction: float, metric: str) -> float | None:
        return self.get(location, fraction, metric, "mean")

    def cell(self, location: str, fraction: float, metric: str, percent: bool) -> str:
        show = _pct if percent else _num
        mean = self.mean(location, fraction, metric)
        low = self.get(location, fraction, metric, "ci_low")
        high = self.get(location, fraction, metric, "ci_high")
        if mean is None:
            return "–"
        if low is None or high is None:
            return show(mean)
        return f"{show(mean)} [{show(low)}–{show(high)}]"

    def table(self, metric: str, locations: Sequence[str], *, percent: bool) -> str:
        lines = [
            "| damage | " + " | ".join(locations) + " |",
            "| --- |" + " --- |" * len(locations),
        ]
        for fraction in self.fractions:
            cells = " | ".join(self.cell(loc, fraction, metric, percent) for loc in locations)
            lines.append(f"| {_lvl(fraction)} | {cells} |")
        return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _levels(fractions: Sequence[float]) -> str:
    pct = [round(100 * f) for f in fractions]
    steps = {b - a for a, b in itertools.pairwise(pct)}
    if len(pct) > 3 and len(steps) == 1:
        return f"{pct[0]}–{pct[-1]} % step {steps.pop()}"
    return ", ".join(f"{p} %" for p in pct)


def _image(name: str | None, alt: str) -> str:
    return f"![{alt}]({name})" if name else f"_({alt}: not drawn)_"


def _lvl(fraction: float) -> str:
    return f"{round(100 * fraction)} %"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"

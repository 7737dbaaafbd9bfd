"""What exact CAM costs over plain inference.

Eq. 1 adds one batched product of the selected fc rows with the last block's features (a 7×7
map at 224 px) to a forward pass, so CAM should cost at most 5 % more than inference (target
ratio ≤ 1.05). Measured paths, on the same preprocessed batch:

* ``plain`` — ``model(x)`` and softmax, in inference mode and eval mode;
* ``cam`` — :class:`core.cam.Cam` on the batch: the forward pass with the hook, the predicted
  class's maps at feature resolution, softmax;
* ``cam_har`` — ``cam`` plus, per image, bilinear upsampling to the original image size,
  normalization and the HAR boxes (what :func:`core.explain.explain` adds before building JSON).

Model: resnet50 with *random* initialization (the cost does not depend on the weight values),
21 UC Merced classes, 224 px input; images: real UC Merced tiles, one per class, preprocessed
once (decoding and resizing are common to both paths and excluded), repeated to fill a batch.
Each repeat runs every path once, in rotating order, so load from other processes on a shared
machine hits all paths alike; the report gives the median time per path, the ratio of medians
and the median of the per-repeat (paired) ratios. Torch threads = the cores this process may use.

    .venv/bin/python bench/cam_throughput.py            # → bench/results/cam_throughput.json
    .venv/bin/python bench/cam_throughput.py --repeats 3 --formats contiguous   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from core.cam import Cam, normalize, select_targets, upsample  # noqa: E402
from core.har import highest_activation_regions  # noqa: E402
from core.hooks import capture_output, eval_mode  # noqa: E402
from core.images import decode_image  # noqa: E402
from core.models import build_model, get_arch  # noqa: E402
from core.preprocessing import Preprocessing  # noqa: E402
from core.results import HarBox  # noqa: E402
from core.transforms import eval_transform  # noqa: E402

SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
TARGET_RATIO = 1.05
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = sorted(p.name for p in (SHARED_DATA / "ucm").iterdir() if p.is_dir())
    spec = get_arch(args.arch)
    model = build_model(args.arch, len(classes)).eval()
    inputs, sizes = _load_images(classes, args.input_size)
    load_before = os.getloadavg()
    runs = []
    for fmt in args.formats:
        model = model.to(memory_format=FORMATS[fmt])  # type: ignore[call-overload]
        extractor = Cam(model, spec.feature_layer, spec.fc_layer)
        for batch_size in args.batch_sizes:
            x = _fill(inputs, batch_size).contiguous(memory_format=FORMATS[fmt])
            paths = _paths(model, extractor, x, _fill_sizes(sizes, batch_size), args)
            times = _measure(paths, args.warmup, args.repeats)
            run = _summarize(fmt, batch_size, times)
            extra = _overhead(
                model, spec.feature_layer, extractor, x, _fill_sizes(sizes, batch_size)
            )
            fastest_plain = min(times["plain"]["wall"])
            run["overhead"] = {
                **extra,
                "estimated_cam_ratio": 1 + extra["cam_extra_s"] / fastest_plain,
                "estimated_cam_har_ratio": 1
                + (extra["cam_extra_s"] + extra["har_extra_s"]) / fastest_plain,
            }
            runs.append(run)
            _print_run(runs[-1])
    report = {
        "benchmark": "cam_throughput",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": __doc__.split("\n\n    .venv")[0] if __doc__ else "",
        "config": {
            "arch": args.arch,
            "weights": "random initialization (cost does not depend on weight values)",
            "num_classes": len(classes),
            "input_size": args.input_size,
            "images": f"UC Merced, one per class ({len(inputs)}), repeated to fill a batch",
            "original_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
            "batch_sizes": args.batch_sizes,
            "formats": args.formats,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "bf16": args.bf16,
        },
        "machine": _machine(args.threads, load_before),
        "target_ratio": TARGET_RATIO,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _paths(
    model: nn.Module, extractor: Cam, x: Tensor, sizes: list[tuple[int, int]], args: Any
) -> dict[str, Callable[[], object]]:
    def plain(bf16: bool = False) -> object:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x).float().softmax(dim=1)

    def cam(bf16: bool = False) -> object:
        return extractor(x, top_k=1, precision="bf16" if bf16 else "fp32")

    def cam_har() -> object:
        batch = extractor(x, top_k=1)
        boxes: list[list[HarBox]] = []
        for maps, (width, height) in zip(batch.maps, sizes, strict=True):
            norm = normalize(upsample(maps, (height, width))).numpy()
            boxes.extend(highest_activation_regions(m).boxes for m in norm)
        return boxes

    paths: dict[str, Callable[[], object]] = {"plain": plain, "cam": cam, "cam_har": cam_har}
    if args.bf16:
        paths["plain_bf16"] = lambda: plain(bf16=True)
        paths["cam_bf16"] = lambda: cam(bf16=True)
    return paths


Timings = dict[str, dict[str, list[float]]]  # path → clock ("wall", "cpu") → seconds per run


def _measure(paths: dict[str, Callable[[], object]], warmup: int, repeats: int) -> Timings:
    """Wall-clock and process CPU time of every path, ``repeats`` times after ``warmup``.

    CPU time (all threads of this process) is what the work itself costs; on a machine shared
    with other processes it is far less disturbed than wall-clock time, which also counts the
    time this process waited for a core.
    """
    names = list(paths)
    for _ in range(warmup):
        for name in names:
            paths[name]()
    times: Timings = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            wall, cpu = time.perf_counter(), time.process_time()
            paths[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _overhead(
    model: nn.Module,
    feature_layer: str,
    extractor: Cam,
    x: Tensor,
    sizes: list[tuple[int, int]],
    iterations: int = 30,
) -> dict[str, float]:
    """The work CAM adds to a forward pass, timed on its own (median of ``iterations``): it is
    too small to see reliably as a difference of two noisy forward-pass timings.

    ``cam_extra``: switching to eval mode and back, adding and removing the hook, picking the
    targets, the maps (Eq. 1, the method's own code) and the result copies. ``har_extra``: per
    image, upsampling to the original size, normalization and the HAR boxes.
    """
    layer = model.get_submodule(feature_layer)
    with torch.inference_mode(), capture_output(layer) as captured:
        logits = model(x)
    features = captured.value
    maps = extractor(x, top_k=1).maps

    def cam_extra() -> None:
        with eval_mode(model), capture_output(layer):
            pass
        with torch.inference_mode():
            targets = select_targets(logits, classes=None, top_k=1)
            out = extractor._maps(features, logits, targets)  # the method's own map code
        out.clone(), logits.clone().softmax(dim=1)

    def har_extra() -> None:
        for image_maps, (width, height) in zip(maps, sizes, strict=True):
            for norm in normalize(upsample(image_maps, (height, width))).numpy():
                highest_activation_regions(norm)

    result = {}
    for name, fn in (("cam_extra_s", cam_extra), ("har_extra_s", har_extra)):
        fn()
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        result[name] = statistics.median(samples)
    return result


def _summarize(fmt: str, batch_size: int, times: Timings) -> dict[str, Any]:
    paths = {
        name: {
            "median_wall_s": statistics.median(clocks["wall"]),
            "images_per_s": batch_size / statistics.median(clocks["wall"]),
            "median_cpu_s": statistics.median(clocks["cpu"]),
            "wall_s": [round(t, 6) for t in clocks["wall"]],
            "cpu_s": [round(t, 6) for t in clocks["cpu"]],
        }
        for name, clocks in times.items()
    }
    ratios: dict[str, Any] = {}
    for path, base in (("cam", "plain"), ("cam_har", "plain"), ("cam_bf16", "plain_bf16")):
        if path in times:
            ratios[f"{path}/{base}"] = {
                clock: _ratios(times[path][clock], times[base][clock]) for clock in ("wall", "cpu")
            }
    return {"format": fmt, "batch_size": batch_size, "paths": paths, "ratios": ratios}


def _ratios(times: list[float], base: list[float]) -> dict[str, Any]:
    paired = statistics.median(t / b for t, b in zip(times, base, strict=True))
    return {
        "ratio_of_medians": statistics.median(times) / statistics.median(base),
        "median_paired_ratio": paired,
        "within_target": paired <= TARGET_RATIO,
    }


def _print_run(run: dict[str, Any]) -> None:
    speeds = ", ".join(f"{k} {v['images_per_s']:.2f} img/s" for k, v in run["paths"].items())
    ratios = ", ".join(
        f"{k} wall {v['wall']['median_paired_ratio']:.3f} cpu {v['cpu']['median_paired_ratio']:.3f}"
        for k, v in run["ratios"].items()
    )
    est = run["overhead"]
    print(
        f"{run['format']:>13} b={run['batch_size']:<3} {speeds} | {ratios}"
        f" | estimated cam {est['estimated_cam_ratio']:.4f}"
        f" cam_har {est['estimated_cam_har_ratio']:.4f}",
        flush=True,
    )


def _load_images(classes: list[str], input_size: int) -> tuple[Tensor, list[tuple[int, int]]]:
    transform = eval_transform(Preprocessing(input_size=input_size))
    tensors, sizes = [], []
    for name in classes:
        path = sorted((SHARED_DATA / "ucm" / name).glob("*.jpg"))[0]
        image = decode_image(path)
        tensors.append(transform(image))
        sizes.append(image.size)
    return torch.stack(tensors), sizes


def _fill(inputs: Tensor, batch_size: int) -> Tensor:
    reps = -(-batch_size // len(inputs))
    return inputs.repeat(reps, 1, 1, 1)[:batch_size].clone()


def _fill_sizes(sizes: list[tuple[int, int]], batch_size: int) -> list[tuple[int, int]]:
    return [sizes[i % len(sizes)] for i in range(batch_size)]


def _machine(threads: int, load_before: tuple[float, float, float]) -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "shared machine: other processes may have been running (see loadavg)",
    }


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=_usable_cores())
    parser.add_argument("--bf16", action="store_true", help="Also time bf16 autocast paths.")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "cam_throughput.json"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())

"""CAM engine speed against the hardware's limit and the plain torchvision forward pass.

One run measures, on one device (``--device cpu`` or ``cuda``):

* **the limit** — the device's own matrix-multiply rate (GFLOP/s, best of a few large square
  products) per precision, and the network's FLOPs per image counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and the fc layer, 2 FLOPs per
  multiply-add), giving ``bound = rate / FLOPs`` images/s: what a forward pass could reach if
  every convolution ran at matmul speed;
* **plain** — ``torchvision`` resnet ``model(x)`` in inference mode: NCHW fp32,
  channels_last fp32, channels_last + bf16 autocast (and fp16 on CUDA);
* **engine** — camres' batch loop (:func:`core.explain.cam_batches`: host tensors → device,
  channels_last, batch norms folded into the convolutions (:mod:`core.folding`), exact CAM of
  the predicted class, results back on the host) per precision and batch size;
* **explain** — :func:`core.explain.explain` end to end from decoded images (preprocessing,
  upsampling to the original size, HAR) at one batch size;
* **third party** — pytorch-grad-cam's GradCAM and TorchCAM's CAM on the same model and batch,
  only if importable (comparison only, never dependencies);
* **agreement** — reduced precision against fp32 on real UC Merced images: top-1 agreement and
  Pearson correlation of the fp32-predicted class's maps (raw 7×7, and upsampled + normalized).
  With ``--checkpoint`` a trained camres model is used; without one, the random-init model,
  which the report flags as weaker evidence.

Every figure is images/s with its ratio to the bound and to the matching plain forward pass.
Weights are random for speed (cost does not depend on values). Load average is recorded at
start and end: on a shared machine, compare ratios within one run.

    .venv/bin/python bench/engine_speed.py --quick          # a short smoke run
    .venv/bin/python bench/engine_speed.py                  # → bench/results/engine_speed.json
    .venv/bin/python bench/engine_speed.py --device cuda --precisions fp32,bf16,fp16 \\
        --out bench/results/engine_speed_cuda.json
    .venv/bin/python bench/engine_speed.py --checkpoint bench/out/ucm14_resnet18_128.safetensors
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from core.cam import Cam, normalize, upsample  # noqa: E402
from core.cam_options import CamOptions  # noqa: E402
from core.checkpoint import load_model  # noqa: E402
from core.checkpoint_meta import CheckpointMeta  # noqa: E402
from core.engine import apply_thread_policy, autocast, prepare_for_inference, to_device  # noqa: E402
from core.explain import cam_batches, explain  # noqa: E402
from core.folding import folded_view  # noqa: E402
from core.images import decode_image  # noqa: E402
from core.models import build_model, get_arch  # noqa: E402
from core.preprocessing import Preprocessing  # noqa: E402
from core.transforms import eval_transform  # noqa: E402

SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
#: Issue #7's targets for resnet50 at 224 px on the 2-core AVX-512/BF16 machine (images/s).
TARGETS = {"fp32": 18.0, "bf16": 40.0, "map_correlation": 0.99, "top1_agreement": 0.99}
PLAIN_FOR = {
    "fp32": "channels_last_fp32",
    "bf16": "channels_last_bf16",
    "fp16": "channels_last_fp16",
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_KINDS = ("plain", "engine", "explain")
#: (path, variant, precision) of one timed path.
_Key = tuple[str, str, str]


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress in logs
    threads = apply_thread_policy(override=args.threads)
    device = torch.device(args.device)
    load_start = os.getloadavg()
    torch.manual_seed(0)
    ucm = sorted(p.name for p in (SHARED_DATA / "ucm").iterdir() if p.is_dir())
    spec = get_arch(args.arch)
    model = build_model(args.arch, len(ucm)).eval().to(device)
    pictures = _pictures(ucm, 1)
    host = [eval_transform(Preprocessing(input_size=args.input_size))(im) for _, im in pictures]

    flops = _flops_per_image(model, args.input_size, device)
    limits: dict[str, dict[str, Any]] = {}
    for precision in args.precisions:
        gflops = _matmul_gflops(device, _DTYPES[precision], args.matmul_size, args.quick)
        limits[precision] = {
            "matmul_gflops": gflops,
            "bound_images_per_s": gflops * 1e9 / flops,
            "native": _native(precision, device),
        }
        if not limits[precision]["native"]:
            limits[precision]["note"] = (
                "this CPU has no bf16 instructions (AVX-512 BF16 / AMX): bf16 is emulated, "
                "so this 'bound' is a software rate, not the hardware's limit"
            )
    print(f"FLOPs/image {flops / 1e9:.2f} G; limits {json.dumps(limits)}")

    timer = _Timer(device, args.warmup, args.repeats)
    nhwc = prepare_for_inference(copy.deepcopy(model))
    extractor = Cam(folded_view(nhwc), spec.feature_layer, spec.fc_layer)
    meta = CheckpointMeta(
        arch=args.arch, classes=ucm, preprocessing=Preprocessing(input_size=args.input_size)
    )
    rows: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        paths = _paths(model, nhwc, extractor, meta, host, pictures, batch, args, device)
        for (kind, variant, precision), rate in timer.interleaved(paths).items():
            rows.append(
                {"path": kind, "variant": variant, "precision": precision, "batch": batch, **rate}
            )
    rows = [_with_ratios(row, rows, limits) for row in rows]
    plain, engine, explained = ([r for r in rows if r["path"] == k] for k in _KINDS)
    third = _third_party(copy.deepcopy(nhwc), host, args.explain_batch, device, timer)
    agreement = _agreement(args, device, nhwc if args.checkpoint is None else None, ucm)

    report = {
        "benchmark": "engine_speed",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "description": __doc__.split("\n\n    .venv")[0] if __doc__ else "",
        "config": {
            "arch": args.arch,
            "weights": "random initialization for speed (cost does not depend on values)",
            "num_classes": len(ucm),
            "input_size": args.input_size,
            "device": str(device),
            "batch_sizes": args.batch_sizes,
            "precisions": args.precisions,
            "images_per_run": args.images_per_run,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "quick": args.quick,
            "timing": "median of repeats; images/s = images / wall seconds (CUDA synchronized)",
        },
        "machine": _machine(threads, device, load_start),
        "flops_per_image": flops,
        "limits": limits,
        "plain": plain,
        "engine": engine,
        "explain": explained,
        "third_party": third,
        "agreement": agreement,
        "targets": TARGETS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- measurement


class _Timer:
    """Images/s of a callable: ``warmup`` untimed calls, then the median of ``repeats``."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def interleaved(self, paths: dict[_Key, tuple[Callable[[], object], int]]) -> dict[_Key, Any]:
        """Every path once per repeat, in an order rotated each repeat, so load from other
        processes on a shared machine hits all paths alike."""
        keys = list(paths)
        for key in keys:
            for _ in range(self.warmup):
                paths[key][0]()
        times: dict[_Key, list[float]] = {key: [] for key in keys}
        for r in range(self.repeats):
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                times[key].append(self._time(paths[key][0]))
                print(key, f"{paths[key][1] / times[key][-1]:.2f} images/s")
        return {key: self._stats(times[key], paths[key][1]) for key in keys}

    def _time(self, fn: Callable[[], object]) -> float:
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - start

    @staticmethod
    def _stats(times: list[float], images: int) -> dict[str, Any]:
        return {
            "images_per_s": images / statistics.median(times),
            "best_images_per_s": images / min(times),
            "images_per_call": images,
            "seconds": times,
        }

    def rate(self, fn: Callable[[], object], images: int) -> dict[str, Any]:
        for _ in range(self.warmup):
            fn()
        return self._stats([self._time(fn) for _ in range(self.repeats)], images)


def _matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, quick: bool) -> float:
    """Best rate of square products (2n³ FLOPs each) over ~1 s of repeats (0.3 s quick).

    The size grows from 512 up to ``n`` (8192 on CUDA, where smaller products leave the GPU
    partly idle) while one product takes under 0.1 s, so an emulated dtype (bf16 on a CPU
    without bf16 instructions runs at well under 1 GFLOP/s) does not stall the run."""
    top = max(n, 8192) if device.type == "cuda" else n
    size = min(512, top)
    while True:
        took = _time_mm(device, dtype, size)  # also the warm-up of this size
        if size >= top or took > 0.1:
            break
        size *= 2
    best, spent = 2 * size**3 / took / 1e9, took
    while spent < (0.3 if quick else 1.0):
        took = _time_mm(device, dtype, size)
        best, spent = max(best, 2 * size**3 / took / 1e9), spent + took
    return best


def _time_mm(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # kernel selection, page faults
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _native(precision: str, device: torch.device) -> bool:
    if device.type == "cuda" or precision == "fp32":
        return True
    flags = _cpu_flags()["flags"]
    return bool(flags["avx512_bf16"] or flags["amx_bf16"])


def _flops_per_image(model: nn.Module, size: int, device: torch.device) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size, device=device))
    return float(counter.get_total_flops())


def _paths(
    model: nn.Module,
    nhwc: nn.Module,
    extractor: Cam,
    meta: CheckpointMeta,
    host: list[Tensor],
    pictures: list[tuple[str, Image.Image]],
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[_Key, tuple[Callable[[], object], int]]:
    """What is timed at one batch size. Plain runs from a pre-stacked host batch (pinned on
    CUDA and copied without blocking, as a DataLoader with pin_memory gives it); the engine
    from per-image host tensors, as :func:`core.explain.explain` has them."""
    chunks = _chunks(host, batch, max(batch, args.images_per_run))
    n = sum(map(len, chunks))
    x = torch.stack(chunks[0])
    x = x.pin_memory() if device.type == "cuda" else x

    def plain(net: nn.Module, fmt: torch.memory_format, precision: str) -> Callable[[], object]:
        def forward() -> None:
            with torch.inference_mode(), autocast(precision, device):
                for _ in chunks:
                    inputs = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
                    net(inputs).float().softmax(dim=1)

        return forward

    paths: dict[_Key, tuple[Callable[[], object], int]] = {
        ("plain", "nchw_fp32", "fp32"): (plain(model, torch.contiguous_format, "fp32"), n)
    }
    for p in args.precisions:
        paths["plain", PLAIN_FOR[p], p] = (plain(nhwc, torch.channels_last, p), n)
        cams = partial(cam_batches, extractor, chunks, total=n, device=device, precision=p)
        paths["engine", "cam_top1", p] = (cams, n)
        if batch == args.explain_batch:
            some = [pictures[i % len(pictures)] for i in range(n)]
            options = CamOptions(precision=p)
            full = partial(explain, nhwc, meta, some, options, batch_size=batch)
            paths["explain", "cam_top1_har", p] = (full, n)
    return paths


def _with_ratios(
    row: dict[str, Any], rows: list[dict[str, Any]], limits: dict[str, Any]
) -> dict[str, Any]:
    def plain_rate(variant: str) -> float | None:
        found = [
            r["images_per_s"]
            for r in rows
            if r["path"] == "plain" and r["variant"] == variant and r["batch"] == row["batch"]
        ]
        return found[0] if found else None

    ips, precision = row["images_per_s"], row["precision"]
    same, nchw = plain_rate(PLAIN_FOR[precision]), plain_rate("nchw_fp32")
    return {
        **row,
        "ratio_to_bound": ips / limits[precision]["bound_images_per_s"],
        "ratio_to_plain_same_precision": ips / same if same else None,
        "ratio_to_plain_nchw_fp32": ips / nchw if nchw else None,
        "target_images_per_s": TARGETS.get(precision) if row["path"] != "plain" else None,
    }


def _chunks(host: list[Tensor], batch: int, total: int) -> list[list[Tensor]]:
    items = [host[i % len(host)] for i in range(-(-total // batch) * batch)]
    return [items[i : i + batch] for i in range(0, len(items), batch)]


# --------------------------------------------------------------------------- third party


def _third_party(
    model: nn.Module, host: list[Tensor], batch: int, device: torch.device, timer: _Timer
) -> dict[str, Any]:
    """The same model and batch through other CAM libraries, when they are installed."""
    x = to_device([host[i % len(host)] for i in range(batch)], device)
    out: dict[str, Any] = {}

    def gradcam() -> Callable[[], object]:
        from pytorch_grad_cam import GradCAM

        method = GradCAM(model=model, target_layers=[model.get_submodule("layer4")])
        return lambda: method(input_tensor=x, targets=None)

    def torchcam() -> Callable[[], object]:
        from torchcam.methods import CAM

        extractor = CAM(model, target_layer="layer4", fc_layer="fc")

        def run() -> object:
            with torch.inference_mode():
                scores = model(x)
            return extractor(scores.argmax(dim=1).tolist(), scores)

        return run

    for name, module, make in (
        ("pytorch_grad_cam.GradCAM", "pytorch_grad_cam", gradcam),
        ("torchcam.methods.CAM", "torchcam", torchcam),
    ):
        if importlib.util.find_spec(module) is None:
            out[name] = {"status": "not installed"}
            continue
        try:
            out[name] = {"status": "measured", "batch": batch, **timer.rate(make(), batch)}
        except Exception as exc:  # another version's API: recorded, not fatal
            out[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        print(name, out[name])
    return out


# --------------------------------------------------------------------------- agreement


def _agreement(
    args: argparse.Namespace, device: torch.device, random_model: nn.Module | None, ucm: list[str]
) -> dict[str, Any]:
    """Reduced precision against fp32 on ``--per-class`` UC Merced images of each class."""
    if args.checkpoint is not None:
        model, ckpt = load_model(args.checkpoint, device=device)
        meta = ckpt.meta
        weights = f"trained checkpoint {args.checkpoint} ({meta.arch})"
        caveat = None
    else:
        assert random_model is not None
        model, meta = (
            random_model,
            CheckpointMeta(
                arch=args.arch, classes=ucm, preprocessing=Preprocessing(input_size=args.input_size)
            ),
        )
        weights = f"random initialization ({args.arch})"
        caveat = (
            "measured on random initialization: untrained logits are nearly tied and the maps "
            "carry no learnt structure, so top-1 agreement and map correlation say little about "
            "a trained model; rerun with --checkpoint"
        )
    prepare_for_inference(model)
    classes = [c for c in meta.classes if (SHARED_DATA / "ucm" / c).is_dir()]
    pictures = _pictures(classes, args.per_class)
    labels = [meta.classes.index(name.split("/")[0]) for name, _ in pictures]
    transform = eval_transform(meta.preprocessing)
    host = [transform(image) for _, image in pictures]
    spec = get_arch(meta.arch)
    extractor = Cam(folded_view(model), spec.feature_layer, spec.fc_layer)  # as explain runs it
    every = len(meta.classes)  # all classes' maps, so both runs explain fp32's top-1 class

    def run(precision: str) -> Any:
        chunks = [host[i : i + 16] for i in range(0, len(host), 16)]
        return cam_batches(
            extractor, chunks, total=len(host), device=device, top_k=every, precision=precision
        )

    full = run("fp32")
    top1 = full.targets[:, :1]
    result: dict[str, Any] = {
        "weights": weights,
        "caveat": caveat,
        "images": f"UC Merced, {args.per_class} per class, {len(classes)} classes ({len(host)})",
        "fp32_accuracy_vs_folder_labels": (top1[:, 0] == torch.tensor(labels))
        .float()
        .mean()
        .item(),
    }
    for precision in args.precisions[1:]:
        low = run(precision)
        maps_full, maps_low = _class_maps(full, top1), _class_maps(low, top1)
        raw = _pearson(maps_full, maps_low)
        sizes = [image.size[::-1] for _, image in pictures]
        seen = _pearson(*(_visible(m, sizes) for m in (maps_full, maps_low)))
        result[precision] = {
            "top1_agreement": (low.targets[:, 0] == top1[:, 0]).float().mean().item(),
            "map_pearson_raw": _stats(raw),
            "map_pearson_upsampled_normalized": _stats(seen),
        }
        print(precision, result[precision])
    return result


def _class_maps(batch: Any, classes: Tensor) -> Tensor:
    # Column of each image's class in its own target order (targets are sorted by score).
    column = (batch.targets == classes).float().argmax(dim=1)
    return batch.maps[torch.arange(len(column)), column]


def _visible(maps: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
    return [normalize(upsample(m, size)) for m, size in zip(maps, sizes, strict=True)]


def _pearson(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> list[float]:
    values = []
    for x, y in zip(a, b, strict=True):
        x, y = x.flatten().double(), y.flatten().double()
        x, y = x - x.mean(), y - y.mean()
        denominator = x.norm() * y.norm()
        values.append(float((x @ y) / denominator) if denominator > 0 else float("nan"))
    return values


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(v for v in values if v == v)
    return {
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "p05": ordered[int(0.05 * (len(ordered) - 1))],
        "share_at_least_0.99": sum(v >= 0.99 for v in ordered) / len(ordered),
        "undefined": len(values) - len(ordered),
    }


# --------------------------------------------------------------------------- inputs, machine


def _pictures(classes: list[str], per_class: int) -> list[tuple[str, Image.Image]]:
    out = []
    for name in classes:
        for path in sorted((SHARED_DATA / "ucm" / name).glob("*.jpg"))[:per_class]:
            out.append((f"{name}/{path.name}", decode_image(path)))
    return out


def _cpu_flags() -> dict[str, Any]:
    cpu, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu": cpu, "flags": {f: f in flags for f in wanted}}


def _machine(threads: int, device: torch.device, load_start: Any) -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        **_cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "gpu": gpu,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32 first; fp16 on CUDA only")
    p.add_argument("--explain-batch", type=int, default=16)
    p.add_argument("--images-per-run", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--per-class", type=int, default=5, help="agreement images per UCM class")
    p.add_argument("--checkpoint", type=Path, default=None, help="trained camres checkpoint")
    p.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    p.add_argument("--quick", action="store_true", help="batch 16, one repeat, few images")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/engine_speed.json")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.precisions = args.precisions.split(",")
    if args.precisions[0] != "fp32":
        p.error("--precisions must start with fp32 (the reference)")
    if args.quick:
        args.batch_sizes, args.repeats, args.images_per_run = [16], 1, 16
        args.per_class = min(args.per_class, 1)
    return args


if __name__ == "__main__":
    raise SystemExit(main())

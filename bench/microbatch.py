"""Micro-batching of CAM jobs (worker/batching.py): does a stream of one-image jobs from many
clients get close to the throughput of one batched forward pass?

Measured, on resnet50 at 224 px (random initialization: speed does not depend on the weight
values) and real UC Merced tiles:

* offline: :func:`core.explain.explain` on ``--batch`` (32) decoded images in one call,
  images/s, in this process — the ceiling; and the same followed by every image's artifacts
  (:func:`core.explain.write_artifacts`: overlay, 16-bit map and mask PNGs, raw map, JSON),
  the work each CAM job of the service does;
* through the real service (gateway + one worker, started with the helpers of
  ``bench/service_latency.py``), with batching on and off (``CAMRES_CAM_BATCHING``):
  - ``--clients`` (32) concurrent clients, each submitting a one-image job and waiting for it to the
    end, again and again, ``--jobs`` jobs in all: images/s and the batch sizes the jobs report
    (``progress.metrics.batch_jobs``);
  - a lone client's one-image jobs, one at a time: the p50 latency.

Targets (issue #7): concurrent throughput with batching ≥ 80 % of offline; a lone request's
p50 grows by at most the batch wait (``CAMRES_CAM_BATCH_WAIT_MS``).

Both the worker and the offline baseline use ``--threads`` torch threads. The machine may be
shared: the load average is recorded; compare figures within one run.

    .venv/bin/python bench/microbatch.py            # → bench/results/microbatch.json
    .venv/bin/python bench/microbatch.py --quick    # a short run proving the script works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.service_latency import _service, _stats, _timed  # noqa: E402
from service.client import CamresClient  # noqa: E402

SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CLASSES = ["agricultural", "airplane", "beach", "forest", "harbor"]
ARCH, INPUT_SIZE = "resnet50", 224
CAM: dict[str, Any] = {"method": "cam", "top_k": 1}
TARGET_RATIO = 0.8


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    import torch

    torch.set_num_threads(args.threads)
    images = _images(args.batch)
    with tempfile.TemporaryDirectory(prefix="camres-microbatch-") as tmp_name:
        tmp = Path(tmp_name)
        model_path = _make_checkpoint(tmp / "bench-resnet50.safetensors")
        offline = _offline(model_path, images, args)
        print(f"offline: {offline['images_per_s']} images/s (batch {args.batch})", flush=True)
        modes: dict[str, Any] = {}
        for mode in args.modes:
            modes[mode] = {}
            for batching in (True, False):
                label = "batching_on" if batching else "batching_off"
                os.environ["CAMRES_CAM_BATCHING"] = str(batching).lower()
                os.environ["CAMRES_CAM_BATCH_WAIT_MS"] = str(args.wait_ms)
                os.environ["CAMRES_CAM_BATCH_MAX_SIZE"] = str(args.batch)
                loadavg = list(os.getloadavg())
                with _service(mode, tmp / f"{mode}-{label}", args.threads) as (url, _):
                    result = _bench_service(url, model_path, images, args, deadline)
                result["loadavg_before"] = loadavg
                modes[mode][label] = result
                print(f"{mode} {label}: {json.dumps(_brief(result))}", flush=True)
            modes[mode]["summary"] = _summary(modes[mode], offline, args.wait_ms)
    report = {
        "benchmark": "microbatch",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "offline": offline,
        "modes": modes,
        "setup": _setup(args, images),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="Offline batch, max batch size.")
    parser.add_argument("--clients", type=int, default=32, help="Concurrent one-image clients.")
    parser.add_argument("--jobs", type=int, default=256, help="Jobs of the concurrent run.")
    parser.add_argument("--runs", type=int, default=20, help="Lone sequential jobs timed.")
    parser.add_argument("--offline-runs", type=int, default=5, help="Timed offline batches.")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="CAMRES_CAM_BATCH_WAIT_MS.")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.0,
        help="0: clients long-poll (GET ?wait=, as CamresClient.wait does); > 0: they poll "
        "every this many seconds instead",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads.")
    parser.add_argument("--modes", nargs="+", default=["embedded", "redis"])
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="Whole-run bound.")
    parser.add_argument("--quick", action="store_true", help="A short run: few jobs, embedded.")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "microbatch.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.clients, args.jobs = 8, 8, 16
        args.runs, args.offline_runs, args.modes = 4, 2, ["embedded"]
    return args


def _images(count: int) -> list[Path]:
    """``count`` real UC Merced tiles, round-robin over the classes."""
    per_class = [sorted((SHARED_DATA / "ucm" / c).glob("*.jpg")) for c in CLASSES]
    return [per_class[i % len(CLASSES)][i // len(CLASSES)] for i in range(count)]


def _make_checkpoint(path: Path) -> Path:
    import torch

    from core.checkpoint import save_checkpoint
    from core.checkpoint_meta import CheckpointMeta
    from core.models import build_model
    from core.preprocessing import Preprocessing

    torch.manual_seed(0)
    meta = CheckpointMeta(
        arch=ARCH,
        classes=CLASSES,
        preprocessing=Preprocessing(input_size=INPUT_SIZE),
        provenance={"source": "bench/microbatch.py", "init": "random, seed 0"},
    )
    save_checkpoint(path, build_model(ARCH, len(CLASSES)), meta)
    return path


def _offline(model_path: Path, images: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """One ``explain`` call on the whole batch of decoded images: the ceiling. Also timed:
    the same call followed by each image's artifacts (what every CAM job writes), so the
    service's figure can be read against the work its jobs must do as well."""
    import tempfile

    from core.cam_options import CamOptions
    from core.checkpoint import load_model
    from core.explain import explain, write_artifacts
    from core.images import decode_image

    model, checkpoint = load_model(model_path, device="cpu")
    items = [(path.name, decode_image(path)) for path in images]
    options = CamOptions.model_validate(CAM)

    def with_artifacts() -> None:
        explained = explain(model, checkpoint.meta, items, options, batch_size=len(items))
        with tempfile.TemporaryDirectory() as out:
            for explanation, (_, image) in zip(explained, items, strict=True):
                write_artifacts(explanation, image, out, options)

    stats = _timed(
        lambda: explain(model, checkpoint.meta, items, options, batch_size=len(items)),
        args.offline_runs,
        warmup=1,
    )
    full = _timed(with_artifacts, args.offline_runs, warmup=0)
    return {
        "batch": len(items),
        "batch_time": stats,
        "images_per_s": round(len(items) / (stats["median_ms"] / 1000), 2),
        "with_artifacts": {
            "batch_time": full,
            "images_per_s": round(len(items) / (full["median_ms"] / 1000), 2),
        },
    }


def _bench_service(
    url: str, model_path: Path, images: list[Path], args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    with CamresClient(url) as client:
        model = client.upload_model(model_path)["id"]
        spec = {"kind": "cam", "model": model, "cam": CAM}
        for path in images[:2]:  # the worker loads and caches the model
            _wait(client, client.submit_job(spec, [path])["id"], args.poll_interval)
        lone = []
        for i in range(args.runs):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            job = client.submit_job(spec, [images[i % len(images)]])
            _wait(client, job["id"], args.poll_interval)
            lone.append(time.perf_counter() - start)
    return {"lone_latency": _stats(lone), "concurrent": _concurrent(url, spec, images, args)}


def _concurrent(
    url: str, spec: dict[str, Any], images: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """``clients`` threads share ``jobs`` one-image jobs, each waiting for its job's end."""
    remaining = iter(range(args.jobs))
    lock = threading.Lock()
    latencies: list[float] = []
    batch_jobs: Counter[int] = Counter()

    def client_loop() -> None:
        with CamresClient(url) as client:
            while True:
                with lock:
                    index = next(remaining, None)
                if index is None:
                    return
                start = time.perf_counter()
                job = client.submit_job(spec, [images[index % len(images)]])
                job = _wait(client, job["id"], args.poll_interval)
                seconds = time.perf_counter() - start
                with lock:
                    latencies.append(seconds)
                    batch_jobs[int(job["progress"]["metrics"].get("batch_jobs", 1))] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(args.clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "clients": args.clients,
        "jobs": len(latencies),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 2),
        "latency": _stats(latencies),
        "jobs_by_batch_jobs": dict(sorted(batch_jobs.items())),
    }


def _wait(client: CamresClient, job_id: str, poll_interval: float) -> dict[str, Any]:
    """The finished job: long-polled, or polled every ``poll_interval`` seconds (a progress
    callback makes :meth:`CamresClient.wait` poll)."""
    if poll_interval > 0:
        return client.wait(job_id, poll_interval=poll_interval, timeout=600, on_progress=_ignore)
    return client.wait(job_id, timeout=600)


def _ignore(job: dict[str, Any]) -> None:
    """A progress callback that only switches :meth:`CamresClient.wait` to polling."""


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "lone_p50_ms": result["lone_latency"].get("median_ms"),
        "concurrent_images_per_s": result["concurrent"]["images_per_s"],
        "batches": result["concurrent"]["jobs_by_batch_jobs"],
    }


def _summary(mode: dict[str, Any], offline: dict[str, Any], wait_ms: float) -> dict[str, Any]:
    on, off = mode["batching_on"], mode["batching_off"]
    ratio_on = on["concurrent"]["images_per_s"] / offline["images_per_s"]
    growth = on["lone_latency"]["median_ms"] - off["lone_latency"]["median_ms"]
    with_artifacts = offline["with_artifacts"]["images_per_s"]
    return {
        "concurrent_vs_offline_on": round(ratio_on, 3),
        "concurrent_vs_offline_with_artifacts_on": round(
            on["concurrent"]["images_per_s"] / with_artifacts, 3
        ),
        "concurrent_vs_offline_off": round(
            off["concurrent"]["images_per_s"] / offline["images_per_s"], 3
        ),
        "meets_throughput_target": ratio_on >= TARGET_RATIO,
        "lone_p50_growth_ms": round(growth, 1),
        "wait_ms": wait_ms,
        "meets_latency_target": growth <= wait_ms,
    }


def _setup(args: argparse.Namespace, images: list[Path]) -> dict[str, Any]:
    import torch

    return {
        "model": {"arch": ARCH, "init": "random (seed 0)", "classes": CLASSES},
        "input_size": INPUT_SIZE,
        "cam": CAM,
        "images": [str(path.relative_to(SHARED_DATA)) for path in images],
        "batch": args.batch,
        "clients": args.clients,
        "jobs": args.jobs,
        "runs": args.runs,
        "wait_ms": args.wait_ms,
        "clients_wait_by": (
            f"polling every {args.poll_interval} s" if args.poll_interval else "long polling"
        ),
        "torch_threads": args.threads,
        "loadavg_at_end": list(os.getloadavg()),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


if __name__ == "__main__":
    sys.exit(main())

"""Service overhead: a one-image CAM job through the REST API against the bare core call.

For each deployment mode — ``embedded`` (``camres serve``: gateway + one worker, filesystem
broker, SQLite job store) and ``redis`` (uvicorn gateway + ``camres worker`` on a private
``redis-server``) — the script starts the processes on free loopback ports with a temporary
data folder, uploads one checkpoint, and measures:

* latency: submit one image → poll every ``--poll-interval`` (10 ms) until ``succeeded``,
  ``--runs`` times after warm-up; median and p90, with the server-side split (queued → started
  → finished) read from the job record;
* throughput: ``--clients`` threads (16), each its own client, over ``--jobs`` jobs in all;
* idle cost: CPU used by the deployment's processes (the worker's alone too) over
  ``--idle-seconds`` with no job, e.g. the embedded broker's polling
  (``CAMRES_BROKER_POLLING_INTERVAL``).

The baseline is ``core.explain.explain`` on the same decoded image and model, in this process
(also reported with ``write_artifacts``, which the worker does too). Target: the service adds
at most 100 ms at the median. Model: resnet18, random initialization (latency does not depend
on the weight values), five UC Merced classes, 224 px input; image: a real UC Merced tile.

The machine may be shared: the load average is recorded before and after each mode, and the
compute-bound terms (``core``, ``server_running``) should be read against it.

Loopback only; every run and the whole script are bounded in time; the subprocesses are
stopped (their process group, SIGTERM then SIGKILL) however the script ends.

    .venv/bin/python bench/service_latency.py            # → bench/results/service_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from service.client import CamresClient, ClientError  # noqa: E402

SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CLASSES = ["agricultural", "airplane", "beach", "forest", "harbor"]
IMAGE = SHARED_DATA / "ucm" / "airplane" / "airplane00.jpg"
ARCH, INPUT_SIZE = "resnet18", 224
TARGET_OVERHEAD_MS = 100.0
_MODE_SETTINGS = frozenset({"CAMRES_BROKER_URL", "CAMRES_STORE_URL", "CAMRES_DATA_DIR"})
CAM_SPEC: dict[str, Any] = {"cam": {"method": "cam", "top_k": 1}}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="camres-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_path = _make_checkpoint(tmp / "bench-resnet18.safetensors")
        core = _bench_core(model_path, args.runs, tmp / "core-artifacts")
        print(f"core explain: median {core['explain']['median_ms']:.1f} ms", flush=True)
        modes = {}
        for mode in args.modes:
            loadavg_before = list(os.getloadavg())
            with _service(mode, tmp / mode, args.threads) as (base_url, processes):
                modes[mode] = _bench_service(base_url, model_path, args, deadline)
                modes[mode]["idle_cpu"] = _idle_cpu(processes, args.idle_seconds)
            modes[mode]["loadavg"] = {"before": loadavg_before, "after": list(os.getloadavg())}
            modes[mode]["overhead"] = _overhead(modes[mode], core)
            print(f"{mode}: {json.dumps(modes[mode]['overhead'])}", flush=True)
    report = {
        "benchmark": "service_latency",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "setup": _setup(args),
        "target_overhead_ms": TARGET_OVERHEAD_MS,
        "core": core,
        "modes": modes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="Timed sequential jobs per mode.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed jobs first.")
    parser.add_argument("--jobs", type=int, default=48, help="Jobs of the throughput run.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent client threads.")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="Latency polling, s.")
    parser.add_argument(
        "--throughput-poll-interval", type=float, default=0.05, help="Polling under load, s."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads, every process.")
    parser.add_argument("--modes", nargs="+", default=["embedded", "redis"])
    parser.add_argument(
        "--idle-seconds", type=float, default=10.0, help="Idle CPU measurement window, s."
    )
    parser.add_argument("--max-seconds", type=float, default=900.0, help="Whole-run bound.")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "bench" / "results" / "service_latency.json"
    )
    return parser.parse_args(argv)


# -- the model and the baseline ------------------------------------------------------------


def _make_checkpoint(path: Path) -> Path:
    import torch

    from core.checkpoint import save_checkpoint
    from core.checkpoint_meta import CheckpointMeta
    from core.models import build_model
    from core.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = build_model(ARCH, len(CLASSES))
    meta = CheckpointMeta(
        arch=ARCH,
        classes=CLASSES,
        preprocessing=Preprocessing(input_size=INPUT_SIZE),
        provenance={"source": "bench/service_latency.py", "init": "random, seed 0"},
    )
    save_checkpoint(path, model, meta)
    return path


def _bench_core(model_path: Path, runs: int, out_dir: Path) -> dict[str, Any]:
    """``explain`` alone, and ``explain`` + ``write_artifacts``, on the decoded image."""
    from core.cam_options import CamOptions
    from core.checkpoint import load_model
    from core.explain import explain, write_artifacts
    from core.images import decode_image

    model, checkpoint = load_model(model_path)
    image = decode_image(IMAGE)
    options = CamOptions.model_validate(CAM_SPEC["cam"])
    items = [(IMAGE.name, image)]

    def bare() -> None:
        explain(model, checkpoint.meta, items, options)

    def with_artifacts() -> None:
        (explanation,) = explain(model, checkpoint.meta, items, options)
        write_artifacts(explanation, image, out_dir, options)

    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "explain": _timed(bare, runs),
        "explain_and_write_artifacts": _timed(with_artifacts, runs),
    }


def _timed(call: Callable[[], object], runs: int, warmup: int = 3) -> dict[str, Any]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return _stats(samples)


def _stats(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(1000 * s for s in seconds)
    if not ms:
        return {"n": 0}
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(p90, 1),
        "min_ms": round(ms[0], 1),
        "max_ms": round(ms[-1], 1),
    }


# -- the service ---------------------------------------------------------------------------


def _bench_service(
    base_url: str, model_path: Path, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    with CamresClient(base_url) as client:
        model_id = client.upload_model(model_path)["id"]
        spec = {"kind": "cam", "model": model_id, **CAM_SPEC}
        for _ in range(args.warmup):  # the worker loads (and caches) the model here
            _one_job(client, spec, args.poll_interval)
        latencies, queued, running, outside = [], [], [], []
        for _ in range(args.runs):
            if time.monotonic() > deadline:
                break
            seconds, job = _one_job(client, spec, args.poll_interval)
            latencies.append(seconds)
            queued.append(_between(job, "created_at", "started_at"))
            running.append(_between(job, "started_at", "finished_at"))
            outside.append(seconds - (running[-1] or 0.0))
    return {
        "poll_interval_s": args.poll_interval,
        "latency": _stats(latencies),
        "server_queued": _stats([s for s in queued if s is not None]),
        "server_running": _stats([s for s in running if s is not None]),
        # Per job: what the client waited beyond the task itself (HTTP, upload, queue, polls).
        "outside_task": _stats(outside),
        "throughput": _throughput(base_url, spec, args, deadline),
    }


def _overhead(mode: dict[str, Any], core: dict[str, Any]) -> dict[str, Any]:
    """The service's cost at the median: against the bare ``explain`` call (the target's
    measure), against ``explain`` + ``write_artifacts`` (what the worker also does), and per
    job outside the task (robust to CPU contention, which inflates the compute terms)."""
    median = mode["latency"]["median_ms"]
    vs_explain = round(median - core["explain"]["median_ms"], 1)
    return {
        "vs_explain_median_ms": vs_explain,
        "vs_explain_and_artifacts_median_ms": round(
            median - core["explain_and_write_artifacts"]["median_ms"], 1
        ),
        "outside_task_median_ms": mode["outside_task"]["median_ms"],
        "target_ms": TARGET_OVERHEAD_MS,
        "meets_target": vs_explain <= TARGET_OVERHEAD_MS,
    }


def _one_job(client: CamresClient, spec: dict[str, Any], poll: float) -> tuple[float, Any]:
    start = time.perf_counter()
    job = client.submit_job(spec, [IMAGE])
    # A progress callback keeps wait() polling every ``poll`` s, as this benchmark documents
    # (without one it long-polls; bench/microbatch.py measures that).
    job = client.wait(job["id"], poll_interval=poll, timeout=120, on_progress=lambda _: None)
    return time.perf_counter() - start, job


def _between(job: dict[str, Any], first: str, second: str) -> float | None:
    if not job.get(first) or not job.get(second):
        return None
    begin = datetime.fromisoformat(job[first].replace("Z", "+00:00"))
    end = datetime.fromisoformat(job[second].replace("Z", "+00:00"))
    return (end - begin).total_seconds()


def _throughput(
    base_url: str, spec: dict[str, Any], args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    """``clients`` threads share ``jobs`` jobs; each thread submits and waits, one at a time."""
    remaining = iter(range(args.jobs))
    lock = threading.Lock()
    latencies: list[float] = []

    def client_loop() -> None:
        with CamresClient(base_url) as client:
            while time.monotonic() < deadline:
                with lock:
                    if next(remaining, None) is None:
                        return
                seconds, _ = _one_job(client, spec, args.throughput_poll_interval)
                with lock:
                    latencies.append(seconds)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        for future in [pool.submit(client_loop) for _ in range(args.clients)]:
            future.result()
    wall = time.perf_counter() - start
    return {
        "clients": args.clients,
        "jobs": len(latencies),
        "poll_interval_s": args.throughput_poll_interval,
        "wall_s": round(wall, 2),
        "jobs_per_s": round(len(latencies) / wall, 2),
        "latency_under_load": _stats(latencies),
    }


@contextmanager
def _service(
    mode: str, data_dir: Path, threads: int
) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """Start a deployment on loopback; yield its base URL once a worker is ready, and its
    processes by role ("serve" runs the gateway and, as its child, the worker)."""
    data_dir.mkdir(parents=True)
    port = _free_port()
    # The broker and store are the mode's own, whatever this shell exports.
    inherited = {k: v for k, v in os.environ.items() if k not in _MODE_SETTINGS}
    env = {
        **inherited,
        "CAMRES_DATA_DIR": str(data_dir),
        "CAMRES_HOST": "127.0.0.1",
        "CAMRES_PORT": str(port),
        "CAMRES_DEVICE": "cpu",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    camres = str(Path(sys.executable).with_name("camres"))
    with ExitStack() as stack:
        if mode == "embedded":
            serve = [camres, "serve"]
            processes = {"serve": stack.enter_context(_process(serve, env, data_dir / "serve.log"))}
        elif mode == "redis":
            redis_port = _free_port()
            redis = [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data_dir),
            ]
            processes = {"redis": stack.enter_context(_process(redis, env, data_dir / "redis.log"))}
            env["CAMRES_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            gateway = [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "service.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
            processes["gateway"] = stack.enter_context(
                _process(gateway, env, data_dir / "gateway.log")
            )
            processes["worker"] = stack.enter_context(
                _process([camres, "worker"], env, data_dir / "worker.log")
            )
        else:
            raise SystemExit(f"unknown mode {mode!r}: embedded or redis")
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, data_dir)
        yield base_url, processes


@contextmanager
def _process(
    command: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        # A new session: the whole group (Celery's pool children included) is stopped below.
        proc = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    # Stragglers in the group (pool children) die with SIGKILL once the leader is gone.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(base_url: str, data_dir: Path, timeout: float = 180.0) -> None:
    """Poll ``/readyz`` (broker reachable, a worker heartbeat) until it answers 200."""
    stop = time.monotonic() + timeout
    with CamresClient(base_url, retries=0, timeout=5.0) as client:
        while time.monotonic() < stop:
            try:
                client.ready()
                return
            except ClientError:
                time.sleep(0.25)
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in data_dir.glob("*.log")
    )
    raise SystemExit(f"service at {base_url} not ready after {timeout:.0f} s\n{logs}")


def _idle_cpu(processes: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, Any]:
    """CPU time used while no job runs, in percent of one core: by every process of the
    deployment (children included), and by the Celery worker's process tree alone."""
    time.sleep(2.0)  # the last job's acknowledgement and logs settle first
    roots = [proc.pid for proc in processes.values()]
    if "worker" in processes:
        worker = processes["worker"].pid
    else:  # camres serve: the worker is the gateway process's child
        worker = next(iter(_children(processes["serve"].pid)), processes["serve"].pid)
    trees = {
        "deployment": lambda: [pid for root in roots for pid in _tree(root)],
        "worker": lambda: _tree(worker),
    }
    before = {name: _cpu_seconds(tree()) for name, tree in trees.items()}
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return {
        "seconds": round(elapsed, 1),
        "percent_of_one_core": {
            name: round(100 * (_cpu_seconds(tree()) - before[name]) / elapsed, 2)
            for name, tree in trees.items()
        },
    }


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (processes that vanished count 0)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings_used() -> dict[str, Any]:
    """The latency-relevant settings the services ran with (defaults and overrides)."""
    from service.settings import Settings

    settings = Settings()
    names = ("broker_polling_interval", "progress_interval", "cancel_poll_interval")
    return {name: getattr(settings, name) for name in names}


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    with Image.open(IMAGE) as image:
        size = image.size
    return {
        "model": {
            "arch": ARCH,
            "init": "random (seed 0)",
            "classes": CLASSES,
            "input_size": INPUT_SIZE,
        },
        "image": {"path": str(IMAGE.relative_to(SHARED_DATA)), "size": list(size)},
        "cam": CAM_SPEC["cam"],
        "runs": args.runs,
        "warmup": args.warmup,
        "torch_threads": args.threads,
        # Settings overrides the services ran with (e.g. CAMRES_BROKER_POLLING_INTERVAL).
        "service_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CAMRES_")},
        "settings": _settings_used(),
        "loadavg_at_end": list(os.getloadavg()),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


if __name__ == "__main__":
    sys.exit(main())

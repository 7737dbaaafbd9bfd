"""Load: many CAM jobs from concurrent clients, with the health endpoint timed throughout.

Starts ``camres serve`` (the embedded deployment: gateway + worker, filesystem broker, SQLite job
store) on a free loopback port with a temporary data folder and API keys for ``--tenants``
owners. ``--clients`` client threads, spread over the owners, submit ``--jobs`` one-image CAM jobs
in all (a real UC Merced tile each, a tiny resnet18 at 64 px), honouring 429 + Retry-After when
their owner is at its limit of active jobs, and poll them to the end. Meanwhile one more thread
requests ``/healthz`` every ``--health-interval`` seconds.

Checks (recorded in the JSON, and the exit status is 1 when one fails):

* every job completes (``succeeded``): none lost;
* the store holds exactly the accepted jobs, each run once (``attempts == 1``) and each result
  naming its own image: none duplicated;
* every owner lists exactly its own jobs;
* the health endpoint's p99 latency under load stays below ``--health-p99-ms`` (100 ms).

Loopback only; the whole run is bounded (``--max-seconds``) and the server's process group is
stopped (SIGTERM, then SIGKILL) however the script ends.

    .venv/bin/python bench/load.py                      # → bench/results/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CLASSES = ["agricultural", "airplane", "beach"]
INPUT_SIZE = 64
TERMINAL = {"succeeded", "failed", "cancelled"}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    deadline = time.monotonic() + args.max_seconds
    images = sorted((SHARED_DATA / "ucm").glob("*/*.jpg"))[: args.jobs]
    if len(images) < args.jobs:
        raise SystemExit(f"need {args.jobs} images under {SHARED_DATA / 'ucm'}")
    keys = {f"load-key-{i:02d}-0123456789abcdef": f"tenant{i}" for i in range(args.tenants)}
    with tempfile.TemporaryDirectory(prefix="camres-load-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = _make_checkpoint(tmp / "tiny.safetensors")
        with _serve(tmp / "var", keys, args) as (base_url, log):
            models = {key: _upload(base_url, key, checkpoint) for key in keys}
            _warm_up(base_url, next(iter(keys)), models, images[0], deadline)
            run = _load(base_url, keys, models, images, args, deadline)
            checks = _verify(base_url, tmp / "var", keys, run)
            _stop_note(log)
    health = _health_stats(run.health_ms, args.health_p99_ms)
    report: dict[str, Any] = {
        "benchmark": "load",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "setup": _setup(args),
        "jobs": run.summary(),
        "health": health,
        "checks": checks,
        "passed": all(checks.values()) and health["p99_under_target"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("jobs", "health", "checks", "passed")}, indent=2))
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="CAM jobs in all.")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent client threads.")
    parser.add_argument("--tenants", type=int, default=4, help="Owners (API keys).")
    parser.add_argument("--max-active", type=int, default=20, help="Active jobs per owner.")
    parser.add_argument("--concurrency", type=int, default=2, help="Worker pool processes.")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="Job polling, s.")
    parser.add_argument("--health-interval", type=float, default=0.02, help="Health probes, s.")
    parser.add_argument("--health-p99-ms", type=float, default=100.0, help="Target p99 latency.")
    parser.add_argument("--max-seconds", type=float, default=1200.0, help="Whole-run bound.")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "load.json")
    return parser.parse_args(argv)


# -- the deployment ----------------------------------------------------------------------------


def _make_checkpoint(path: Path) -> Path:
    import torch

    from core.checkpoint import save_checkpoint
    from core.checkpoint_meta import CheckpointMeta
    from core.models import build_model
    from core.preprocessing import Preprocessing

    torch.manual_seed(0)
    meta = CheckpointMeta(
        arch="resnet18",
        classes=CLASSES,
        preprocessing=Preprocessing(input_size=INPUT_SIZE),
        provenance={"source": "bench/load.py", "init": "random, seed 0"},
    )
    save_checkpoint(path, build_model("resnet18", len(CLASSES)), meta)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def _serve(
    data_dir: Path, keys: dict[str, str], args: argparse.Namespace
) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMRES_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
        CAMRES_API_KEYS=json.dumps(keys),
        CAMRES_MAX_ACTIVE_JOBS=str(args.max_active),
        CAMRES_BUSY_RETRY_AFTER="1",
        CAMRES_HEARTBEAT_INTERVAL="1",
    )
    log = data_dir.parent / "serve.log"
    command = [sys.executable, "-m", "cli.main", "serve", "--host", "127.0.0.1", "--port",
               str(port), "--data-dir", str(data_dir), "--concurrency", str(args.concurrency),
               "--log-level", "warning"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=out, start_new_session=True
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, next(iter(keys)), process, log)
        yield base_url, log
    finally:
        _stop(process)


def _wait_ready(base_url: str, key: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    with httpx.Client(base_url=base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"camres serve exited:\n{log.read_text()[-3000:]}")
            with suppress(httpx.TransportError):
                if client.get("/readyz").status_code == 200:
                    return
            time.sleep(0.25)
    raise SystemExit(f"camres serve not ready after 180 s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            process.wait(wait)


def _stop_note(log: Path) -> None:
    errors = [line for line in log.read_text(errors="replace").splitlines() if "ERROR" in line]
    if errors:
        print(f"{len(errors)} error line(s) in the server log, e.g. {errors[0]}")


def _upload(base_url: str, key: str, checkpoint: Path) -> str:
    with httpx.Client(base_url=base_url, timeout=120, headers={"X-API-Key": key}) as client:
        response = client.post(
            "/v1/models", files={"file": (checkpoint.name, checkpoint.read_bytes())}
        )
        response.raise_for_status()
        model: str = response.json()["id"]
        return model


def _warm_up(base_url: str, key: str, models: dict[str, str], image: Path, deadline: float) -> None:
    """One job per pool process loads torch and the model, so the run measures steady state."""
    with httpx.Client(base_url=base_url, timeout=60, headers={"X-API-Key": key}) as client:
        spec = json.dumps({"kind": "cam", "model": models[key], "cam": {"top_k": 1}})
        job = client.post("/v1/jobs", files=_job_files(spec, image)).json()["id"]
        while client.get(f"/v1/jobs/{job}").json()["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise SystemExit("the warm-up job did not finish")
            time.sleep(0.2)


def _job_files(spec: str, image: Path) -> list[tuple[str, tuple[str | None, bytes | str]]]:
    return [("spec", (None, spec)), ("images", (image.name, image.read_bytes()))]


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the clients saw."""

    accepted: dict[str, tuple[str, str]] = field(default_factory=dict)  # job → (key, image)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    busy_answers: int = 0
    other_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    health_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for job in self.final.values():
            statuses[job["status"]] = statuses.get(job["status"], 0) + 1
        turnaround = [
            _seconds(job["finished_at"]) - _seconds(job["created_at"])
            for job in self.final.values()
            if job.get("finished_at")
        ]
        return {
            "accepted": len(self.accepted),
            "statuses": statuses,
            "busy_429_answers": self.busy_answers,
            "client_errors": self.other_errors[:10],
            "wall_seconds": round(self.seconds, 1),
            "jobs_per_second": round(len(self.final) / self.seconds, 2) if self.seconds else None,
            "turnaround_s": _stats([1000 * t for t in turnaround], scale=0.001),
        }


def _load(
    base_url: str,
    keys: dict[str, str],
    models: dict[str, str],
    images: list[Path],
    args: argparse.Namespace,
    deadline: float,
) -> Run:
    run = Run()
    stop = threading.Event()
    prober = threading.Thread(target=_probe_health, args=(base_url, run, stop, args), daemon=True)
    key_list = list(keys)
    shares = [images[i :: args.clients] for i in range(args.clients)]
    prober.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            futures = [
                pool.submit(
                    _client,
                    base_url,
                    key_list[i % len(key_list)],
                    models,
                    share,
                    run,
                    args,
                    deadline,
                )
                for i, share in enumerate(shares)
            ]
            for future in futures:
                future.result()
    finally:
        run.seconds = time.monotonic() - start
        stop.set()
        prober.join(timeout=5)
    return run


def _client(
    base_url: str,
    key: str,
    models: dict[str, str],
    images: list[Path],
    run: Run,
    args: argparse.Namespace,
    deadline: float,
) -> None:
    """Submit every image as a job (waiting out 429s), then poll the jobs to their end."""
    spec = json.dumps({"kind": "cam", "model": models[key], "cam": {"top_k": 1}})
    mine: list[str] = []
    with httpx.Client(base_url=base_url, timeout=60, headers={"X-API-Key": key}) as client:
        for image in images:
            while time.monotonic() < deadline:
                response = client.post("/v1/jobs", files=_job_files(spec, image))
                if response.status_code == 202:
                    job = response.json()["id"]
                    with run.lock:
                        run.accepted[job] = (key, image.name)
                    mine.append(job)
                    break
                if response.status_code == 429:
                    with run.lock:
                        run.busy_answers += 1
                    time.sleep(float(response.headers.get("retry-after", "1")))
                    _finish_some(client, mine, run)
                    continue
                with run.lock:
                    run.other_errors.append(f"{response.status_code}: {response.text[:200]}")
                break
        while mine and time.monotonic() < deadline:
            _finish_some(client, mine, run)
            time.sleep(args.poll_interval)


def _finish_some(client: httpx.Client, mine: list[str], run: Run) -> None:
    for job_id in list(mine):
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            mine.remove(job_id)
            with run.lock:
                run.final[job_id] = job


def _probe_health(base_url: str, run: Run, stop: threading.Event, args: argparse.Namespace) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        while not stop.is_set():
            begin = time.perf_counter()
            response = client.get("/healthz")
            elapsed = 1000 * (time.perf_counter() - begin)
            if response.status_code == 200:
                run.health_ms.append(elapsed)
            stop.wait(args.health_interval)


# -- verification --------------------------------------------------------------------------------


def _verify(base_url: str, data_dir: Path, keys: dict[str, str], run: Run) -> dict[str, bool]:
    with sqlite3.connect(data_dir / "camres.sqlite3") as db:
        rows = db.execute("SELECT id, status, attempts, result FROM jobs").fetchall()
    stored = {job_id: (status, attempts, result) for job_id, status, attempts, result in rows}
    expected = set(run.accepted)
    warm = set(stored) - expected  # the warm-up job
    names_match = all(
        json.loads(stored[job][2])["images"][0]["image"] == image
        for job, (_, image) in run.accepted.items()
        if stored.get(job, ("", 0, None))[2]
    )
    per_owner = True
    for key in keys:
        with httpx.Client(base_url=base_url, timeout=60, headers={"X-API-Key": key}) as client:
            listed: set[str] = set()
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                page = client.get("/v1/jobs", params=params).json()
                listed |= {job["id"] for job in page["items"]}
                cursor = page["next_cursor"]
                if cursor is None:
                    break
        own = {job for job, (owner_key, _) in run.accepted.items() if owner_key == key}
        per_owner = per_owner and listed - warm == own
    return {
        "all_accepted_jobs_succeeded": len(run.final) == len(expected)
        and all(job["status"] == "succeeded" for job in run.final.values()),
        "none_lost": expected <= set(stored),
        "none_duplicated": len(warm) == 1
        and all(stored[job][1] == 1 for job in expected if job in stored),
        "results_name_their_own_image": names_match,
        "owners_see_exactly_their_jobs": per_owner,
        "no_client_errors": not run.other_errors,
    }


# -- reporting -------------------------------------------------------------------------------------


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _stats(values_ms: list[float], scale: float = 1.0) -> dict[str, Any]:
    """Percentiles of ``values_ms`` (nearest rank), reported in ms × ``scale`` units."""
    ordered = sorted(values_ms)
    if not ordered:
        return {"n": 0}

    def rank(q: float) -> float:
        return round(scale * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {
        "n": len(ordered),
        "median": round(scale * statistics.median(ordered), 3),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": round(scale * ordered[-1], 3),
    }


def _health_stats(values_ms: list[float], target_ms: float) -> dict[str, Any]:
    stats = _stats(values_ms)
    return {
        "unit": "ms",
        **stats,
        "target_p99_ms": target_ms,
        "p99_under_target": bool(values_ms) and stats["p99"] < target_ms,
    }


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    return {
        "deployment": "embedded (camres serve: gateway + worker, filesystem broker, SQLite)",
        "jobs": args.jobs,
        "clients": args.clients,
        "tenants": args.tenants,
        "max_active_jobs_per_owner": args.max_active,
        "worker_processes": args.concurrency,
        "model": f"resnet18, {len(CLASSES)} classes, {INPUT_SIZE} px, random weights",
        "job": "cam, one uploaded UC Merced tile (256 px JPEG), top_k 1",
        "health_interval_s": args.health_interval,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(main())

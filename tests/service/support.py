"""Helpers and fixtures shared by the service and worker tests (imported by both conftests).

Real components only: a real Redis (the one on 127.0.0.1:6379, or a ``redis-server`` started
here), a real tiny checkpoint written by ``core.checkpoint``, real UC Merced images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Three UC Merced classes for the tiny model and the small datasets.
TINY_CLASSES = ["agricultural", "airplane", "beach"]
TINY_INPUT_SIZE = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL: every process a test starts ends with the test."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# --- real data -----------------------------------------------------------------------------------
def make_tiny_checkpoint(path: Path, classes: list[str] = TINY_CLASSES) -> str:
    """A randomly initialised resnet18 checkpoint for ``classes`` at 64 px; returns its digest."""
    import torch

    from core.checkpoint import save_checkpoint
    from core.checkpoint_meta import CheckpointMeta
    from core.models import build_model
    from core.preprocessing import Preprocessing

    torch.manual_seed(0)
    model = build_model("resnet18", len(classes))
    meta = CheckpointMeta(
        arch="resnet18",
        classes=list(classes),
        preprocessing=Preprocessing(input_size=TINY_INPUT_SIZE),
        provenance={"purpose": "camres service tests"},
    )
    return save_checkpoint(path, model, meta)


def rewrite_meta(checkpoint: bytes, **changes: Any) -> bytes:
    """The checkpoint with fields of its camres metadata replaced (the tensors untouched): a
    checkpoint whose metadata lies about its weights."""
    (size,) = struct.unpack("<Q", checkpoint[:8])
    header = json.loads(checkpoint[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["camres"])
    header["__metadata__"]["camres"] = json.dumps({**meta, **changes})
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + checkpoint[8 + size :]


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width``×``height`` grey pixels (a decompression bomb: its
    header promises far more pixels than its few bytes hold)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def executable_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is loaded."""
    import pickle

    return pickle.dumps({"fc.weight": _CreatesFile(marker)}, protocol=4)


def pool_processes(pid: int) -> list[int]:
    """Child processes of ``pid`` (a Celery worker's pool), from /proc."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            children += [int(c) for c in task.read_text().split()]
    return children


def ucm_images(ucm_dir: Path, classes: list[str], per_class: int) -> dict[str, list[Path]]:
    """The first ``per_class`` images of each UC Merced class."""
    return {c: sorted((ucm_dir / c).glob("*.jpg"))[:per_class] for c in classes}


def zip_bytes(members: dict[str, bytes | Path], *, symlinks: dict[str, str] | None = None) -> bytes:
    """A zip archive holding ``members`` (name → bytes or a file to copy) and symlinks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content.read_bytes() if isinstance(content, Path) else content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, target)
    return buffer.getvalue()


def dataset_zip(ucm_dir: Path, classes: list[str], per_class: int, top: str = "") -> bytes:
    """A class-folder zip of real UC Merced images, optionally under a wrapper folder."""
    members: dict[str, bytes | Path] = {}
    for cls, paths in ucm_images(ucm_dir, classes, per_class).items():
        for path in paths:
            members[f"{top}{cls}/{path.name}"] = path
    return zip_bytes(members)


# --- redis ---------------------------------------------------------------------------------------
def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: the one on 127.0.0.1:6379, else a ``redis-server`` started for the run."""
    default = "redis://127.0.0.1:6379/0"
    if _redis_answers(default):
        yield default
        return
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "no Redis answers on 127.0.0.1:6379 and redis-server is not installed "
            "(apt-get install redis-server); the job-store and integration tests need one"
        )
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: _redis_answers(url), 10, "redis-server to answer")
        yield url
    finally:
        stop_process(process)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to one test; its keys are deleted afterwards."""
    import redis

    prefix = f"camres-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    with contextlib.suppress(redis.RedisError):
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    client.close()


# --- shared fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real camres checkpoint: resnet18, three UC Merced classes, 64 px."""
    path = tmp_path_factory.mktemp("checkpoints") / "tiny-resnet18.safetensors"
    make_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def ucm_image(ucm_dir: Path) -> Path:
    """One real UC Merced image (256×256 JPEG)."""
    return sorted((ucm_dir / "airplane").glob("*.jpg"))[0]


def subprocess_env(**settings: object) -> dict[str, str]:
    """The environment for a camres subprocess: this interpreter's, the repo on the path,
    and ``CAMRES_*`` settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMRES_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # Two shared cores: one thread per process keeps the test workers polite.
    env.setdefault("OMP_NUM_THREADS", "1")
    for key, value in settings.items():
        env[f"CAMRES_{key.upper()}"] = str(value)
    return env


def camres_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


# --- real processes ------------------------------------------------------------------------------
STARTUP_TIMEOUT = 90.0
JOB_TIMEOUT = 120.0


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start_process(command: list[str], log: Path, **settings: object) -> subprocess.Popen[bytes]:
    """A camres process with ``CAMRES_*`` settings, its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=subprocess_env(**settings), stdout=out, stderr=out
        )


def worker_command(name: str) -> list[str]:
    """A prefork worker with one pool process (whose death the tests provoke)."""
    return camres_command(
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--hostname",
        name,
        "--loglevel",
        "INFO",
    )


class Api:
    """The few calls the process tests make, on a TestClient or an httpx.Client."""

    def __init__(self, client: Any, log: Path) -> None:
        self.client = client
        self.log = log

    def ready(self, process: subprocess.Popen[bytes] | None = None) -> None:
        def check() -> bool:
            if process is not None:
                assert process.poll() is None, f"process exited early:\n{log_tail(self.log)}"
            try:
                return bool(self.client.get("/readyz").status_code == 200)
            except httpx.TransportError:
                return False

        wait_for(check, STARTUP_TIMEOUT, f"readiness\n{log_tail(self.log)}", step=0.25)

    def upload_model(self, checkpoint: Path) -> str:
        response = self.client.post(
            "/v1/models", files={"file": ("tiny.safetensors", checkpoint.read_bytes())}
        )
        assert response.status_code == 201, response.text
        model: str = response.json()["id"]
        return model

    def upload_dataset(self, data: bytes) -> str:
        response = self.client.post("/v1/datasets", files={"file": ("d.zip", data)})
        assert response.status_code == 201, response.text
        dataset: str = response.json()["id"]
        return dataset

    def submit(self, spec: dict[str, Any], images: list[Path] | tuple[Path, ...] = ()) -> str:
        files: list[tuple[str, Any]] = [("spec", (None, json.dumps(spec)))]
        files += [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        response = self.client.post("/v1/jobs", files=files)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        job: dict[str, Any] = {}

        def done() -> bool:
            nonlocal job
            job = self.job(job_id)
            return until(job)

        wait_for(done, JOB_TIMEOUT, f"job {job_id} {what}\n{log_tail(self.log)}", step=0.1)
        return job

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.wait(job_id, lambda job: job["status"] in TERMINAL_STATUSES, "to finish")


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})

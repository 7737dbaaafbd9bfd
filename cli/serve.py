"""``camres serve``, ``camres worker`` and ``camres export-openapi``.

``serve`` is the single-machine deployment: the gateway (uvicorn, in this process) and one
Celery worker (a child process) sharing the embedded broker and job store under the data
folder, with no external server. The worker goes through exactly the code path of a scaled-out
``camres worker``; it is stopped when the gateway stops (SIGINT/SIGTERM), and the gateway
stops if the worker dies. Without API keys configured, access control is off: fine on the
loopback interface (the default), warned about on any other.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("camres.serve")

#: Seconds a stopping worker may take to finish its current task before it is killed.
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
#: Hosts only this machine can reach: serving there without API keys is the local default.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _apply_env(**values: object) -> None:
    """Export settings overrides so this process and its children read the same settings."""
    for key, value in values.items():
        if value is not None:
            os.environ[f"CAMRES_{key.upper()}"] = str(value)
    from service.settings import get_settings

    get_settings.cache_clear()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the worker gets SIGTERM if `camres serve` dies without cleaning up."""
    os.setsid()  # its own process group: a terminal's Ctrl-C reaches it only through us
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_worker(concurrency: int | None, loglevel: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "cli.main", "worker", "--hostname", "embedded@%h"]
    command += ["--loglevel", loglevel]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return subprocess.Popen(command, preexec_fn=_die_with_parent)


def _stop_worker(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Warm shutdown (SIGTERM: finish the current task), then cold (SIGQUIT), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            log.warning("worker %d still running after signal %s", process.pid, sig.name)


def _on_signals(
    server: uvicorn.Server, worker: subprocess.Popen[bytes] | None, stopping: threading.Event
) -> None:
    """SIGINT/SIGTERM handling around uvicorn's own.

    uvicorn handles both while it serves, then re-raises the signal into the handler it found
    installed; without this one the process would die there, before stopping the worker. While
    the worker stops, a second signal asks it for a cold shutdown instead.
    """

    def handle(signum: int, frame: object) -> None:
        if not stopping.is_set():
            server.should_exit = True  # a signal before uvicorn installed its handlers
        elif worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGQUIT)

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)


@click.command()
@click.option("--host", default=None, help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to bind (default 8000).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Models, datasets, artifacts, job database, embedded broker (default ./var).",
)
@click.option("--concurrency", type=int, default=None, help="Worker processes (default 1).")
@click.option("--no-worker", is_flag=True, help="Run the gateway only.")
@click.option(
    "--shutdown-timeout",
    type=float,
    default=DEFAULT_SHUTDOWN_TIMEOUT,
    show_default=True,
    help="Seconds the worker may take to finish its task on shutdown.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    concurrency: int | None,
    no_worker: bool,
    shutdown_timeout: float,
    log_level: str,
) -> None:
    """Run the gateway and a worker on this machine."""
    import uvicorn

    from service.settings import get_settings

    _apply_env(data_dir=data_dir.resolve() if data_dir else None, host=host, port=port)
    settings = get_settings()
    settings.ensure_dirs()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if not settings.auth_enabled and settings.host not in LOOPBACK_HOSTS:
        log.warning(
            "serving on %s with access control off: anyone who can reach it sees every model, "
            "dataset and job; set CAMRES_API_KEYS (and CAMRES_ADMIN_KEYS)",
            settings.host,
        )
    config = uvicorn.Config(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
    )
    server = uvicorn.Server(config)
    worker_process = None if no_worker else _start_worker(concurrency, log_level.upper())
    worker_died = threading.Event()
    stopping = threading.Event()

    if worker_process is not None:

        def watch(process: subprocess.Popen[bytes]) -> None:
            process.wait()
            if not stopping.is_set():
                log.error("the worker exited (code %s); stopping the gateway", process.returncode)
                worker_died.set()
                server.should_exit = True

        threading.Thread(target=watch, args=(worker_process,), daemon=True).start()
    _on_signals(server, worker_process, stopping)
    try:
        server.run()
    finally:
        stopping.set()
        if worker_process is not None:
            _stop_worker(worker_process, shutdown_timeout)
    if worker_died.is_set():
        sys.exit(1)


@click.command()
@click.option(
    "--queues",
    "-Q",
    default=None,
    help="Comma-separated queues to consume (default: the GPU and CPU queues).",
)
@click.option("--concurrency", "-c", type=int, default=None, help="Pool processes (default 1).")
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default=None,
    help="Execution pool (default prefork; time limits need prefork).",
)
@click.option("--hostname", "-n", default=None, help="Node name, e.g. gpu1@%h.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    hostname: str | None,
    loglevel: str,
) -> None:
    """Run a Celery worker for camres jobs."""
    from service.settings import get_settings
    from worker.app import celery_app

    settings = get_settings()
    argv = [
        "worker",
        f"--queues={queues or f'{settings.gpu_queue},{settings.cpu_queue}'}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--pool={pool or settings.worker_pool}",
        f"--loglevel={loglevel}",
        # Job state lives in the job store; worker-to-worker chatter is not needed.
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


@click.command("export-openapi")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("openapi/openapi.json"),
    show_default=True,
    help="Where to write the document ('-' for stdout).",
)
def export_openapi(out: Path) -> None:
    """Write the gateway's OpenAPI document (stable: sorted keys)."""
    from service.openapi import openapi_document

    document = openapi_document()
    if str(out) == "-":
        click.echo(document, nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    click.echo(f"wrote {out}")

"""``camres submit``: the flags become the JobSpec the real gateway accepts, failures are one
message and a non-zero exit (never a traceback), and — with ``camres serve`` running — a job
goes all the way to downloaded artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from service.client import CamresClient
from service.settings import Settings
from service.store import FinishStatus, JobError, JobStore, open_store
from tests.service import support
from tests.service.support import camres_command, free_port, stop_process, subprocess_env, wait_for
from tests.service.test_client import serve_app

# The service tests' fixtures (tests/service/conftest.py does not reach tests/cli).
tiny_checkpoint = support.tiny_checkpoint
ucm_image = support.ucm_image


def submit(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["submit", *map(str, args)])


@pytest.fixture(scope="module")
def gateway_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def gateway(gateway_dir: Path) -> Iterator[str]:
    """A gateway without a worker: jobs are admitted and stay queued."""
    with serve_app(gateway_dir) as url:
        yield url


@pytest.fixture
def store(gateway: str, gateway_dir: Path) -> Iterator[JobStore]:
    """The gateway's job store, for playing the worker's part."""
    opened = open_store(Settings(data_dir=gateway_dir))
    yield opened
    opened.close()


@pytest.fixture
def dataset_dir(ucm_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "retrain-set"
    for name in ("airplane", "beach"):
        (root / name).mkdir(parents=True)
        for source in sorted((ucm_dir / name).glob("*.jpg"))[:2]:
            shutil.copy(source, root / name)
    return root


# -- usage errors: refused before anything is sent --------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "0", "--model", "m"], "--damage-target and --seed need --damage-fraction"),
        (["--epochs", "2", "--model", "m"], "--epochs needs --retrain-dataset"),
        ([], "give --model (or a whole job with --spec)"),
        (["--spec", "SPEC", "--seed", "0"], "--seed cannot be combined with --spec"),
        (["--spec", "SPEC", "--class", "beach", "--top-k", "2"], "--class, --top-k cannot"),
    ],
)
def test_contradictory_flags_are_usage_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('{"kind": "damage", "model": "m", "damage": {"fraction": 0.1}}')
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = submit("--url", unreachable, *[str(spec) if a == "SPEC" else a for a in args])
    assert result.exit_code == 2
    assert message in result.output


def test_a_spec_file_that_is_not_a_job_spec_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text('["not", "an", "object"]')
    result = submit("--url", f"http://127.0.0.1:{free_port()}", "--spec", spec)
    assert result.exit_code == 2
    assert "not a job spec object" in result.output


def test_an_unreachable_service_is_one_line_and_exit_1(ucm_image: Path) -> None:
    result = submit("--url", f"http://127.0.0.1:{free_port()}", "--model", "m", ucm_image)
    assert result.exit_code == 1
    assert "cannot reach the service" in result.output
    assert "Traceback" not in result.output


# -- against the real gateway ----------------------------------------------------------------


def test_the_servers_problem_detail_is_shown(gateway: str, ucm_image: Path) -> None:
    result = submit("--url", gateway, "--model", "sha256:unknown", "-q", ucm_image)
    assert result.exit_code == 1
    assert "422" in result.output
    assert "spec.model: no model with id 'sha256:unknown'" in result.output
    assert "Traceback" not in result.output


def test_flags_build_the_cam_spec_and_local_files_are_uploaded(
    gateway: str, tiny_checkpoint: Path, ucm_image: Path, dataset_dir: Path
) -> None:
    result = submit(
        "--url", gateway, "--model", tiny_checkpoint, ucm_image,
        "--method", "gradcam", "--top-k", "2", "--threshold", "0.3",
        "--damage-target", "D4", "--damage-target", "D3", "--damage-fraction", "0.5",
        "--seed", "7", "--retrain-dataset", dataset_dir, "--epochs", "3", "--no-wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]
    with CamresClient(gateway) as api:
        job = api.get_job(job_id)
        spec = job["spec"]
        assert spec["kind"] == "cam"
        assert spec["model"] == api.upload_model(tiny_checkpoint)["id"]
        assert (spec["cam"]["method"], spec["cam"]["top_k"]) == ("gradcam", 2)
        assert spec["cam"]["har_threshold"] == pytest.approx(0.3)
        assert spec["damage"]["targets"] == ["D4", "D3"]
        assert (spec["damage"]["fraction"], spec["damage"]["seed"]) == (0.5, 7)
        dataset = api.list_datasets()[-1]
        assert spec["retrain"]["dataset"] == dataset["id"]
        assert dataset["counts"] == {"airplane": 2, "beach": 2}
        assert spec["retrain"]["config"]["epochs"] == 3
        api.cancel(job_id)


def test_a_spec_file_is_sent_with_the_uploaded_model(
    gateway: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "damage.json"
    spec.write_text(json.dumps({"kind": "damage", "damage": {"fraction": 0.25, "seed": 3}}))
    result = submit("--url", gateway, "--spec", spec, "--model", tiny_checkpoint, "--no-wait")
    assert result.exit_code == 0, result.output
    with CamresClient(gateway) as api:
        job = api.get_job(result.stdout.strip().splitlines()[-1])
        assert job["kind"] == "damage"
        assert job["spec"]["damage"]["fraction"] == 0.25
        assert job["spec"]["model"].startswith("sha256:")
        api.cancel(job["id"])


def test_waiting_past_the_timeout_exits_1_and_says_the_job_goes_on(
    gateway: str, tiny_checkpoint: Path, ucm_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = submit(
        "--url", gateway, "--model", tiny_checkpoint, ucm_image,
        "--timeout", "0.3", "--poll-interval", "0.05", "--out", out, "-q",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "still queued after 0.3 s; it keeps running on the service (0 attempts)" in result.output
    assert not out.exists()


def play_worker(
    store: JobStore, runs: int, outcome: FinishStatus, result: dict[str, Any] | None = None
) -> threading.Thread:
    """A thread acting as workers on the next job the CLI submits: it starts it ``runs``
    times (each worker but the last dies under it), then ends it with ``outcome`` (and
    ``result``)."""
    known = {record.id for record in store.list_jobs(limit=500).items}

    def act() -> None:
        wait_for(
            lambda: any(r.id not in known for r in store.list_jobs(limit=500).items),
            30,
            "the CLI's job",
        )
        [job_id] = [r.id for r in store.list_jobs(limit=500).items if r.id not in known]
        for run in range(runs):
            store.start(job_id, f"worker-{run}")
        if outcome == "succeeded":
            store.finish(job_id, outcome, result={} if result is None else result)
        else:
            store.finish(job_id, outcome, error=JobError(type="RuntimeError", message="boom"))

    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("runs", "outcome", "expected", "exit_code"),
    [
        (2, "failed", "failed: RuntimeError: boom (2 attempts)", 1),
        (1, "succeeded", "succeeded in", 0),
    ],
)
def test_the_jobs_attempts_are_shown_with_its_final_status(
    gateway: str,
    store: JobStore,
    tiny_checkpoint: Path,
    tmp_path: Path,
    runs: int,
    outcome: FinishStatus,
    expected: str,
    exit_code: int,
) -> None:
    spec = tmp_path / "damage.json"
    spec.write_text(json.dumps({"kind": "damage", "damage": {"fraction": 0.25}}))
    worker = play_worker(store, runs, outcome)
    result = submit(
        "--url", gateway, "--spec", spec, "--model", tiny_checkpoint,
        "--poll-interval", "0.02", "--timeout", "30", "--out", tmp_path / "out", "-q",
    )  # fmt: skip
    worker.join(timeout=30)
    assert result.exit_code == exit_code, result.output
    assert expected in result.output
    assert f"({runs} attempt{'s' if runs > 1 else ''})" in result.output


def test_a_sweep_result_is_summarized(
    gateway: str, store: JobStore, tiny_checkpoint: Path, tmp_path: Path, dataset_dir: Path
) -> None:
    with CamresClient(gateway) as api:
        dataset = api.upload_dataset(dataset_dir)["id"]
    spec = tmp_path / "sweep.json"
    spec.write_text(json.dumps({"kind": "sweep", "dataset": dataset}))
    result = {"cells": 228, "images": 2100, "intact_accuracy": 0.875, "summary": []}
    worker = play_worker(store, 1, "succeeded", result)
    done = submit(
        "--url", gateway, "--spec", spec, "--model", tiny_checkpoint,
        "--poll-interval", "0.02", "--out", tmp_path / "out", "-q",
    )  # fmt: skip
    worker.join(timeout=30)
    assert done.exit_code == 0, done.output
    assert "228 damaged networks on 2100 images; intact accuracy 87.5%" in done.output
    assert "summary" not in done.output  # the table is in job.json, not on the terminal


# -- end to end: `camres serve` with its worker --------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``camres serve`` (gateway + embedded worker) on a free port and a fresh data folder."""
    data_dir = tmp_path_factory.mktemp("served")
    port = free_port()
    log = (data_dir / "serve.log").open("wb")
    process = subprocess.Popen(
        camres_command("serve", "--port", str(port), "--data-dir", str(data_dir / "var")),
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (data_dir / "serve.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 180, "camres serve to be ready", step=0.5)
        yield url
    finally:
        stop_process(process, timeout=30)
        log.close()


def run_submit(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The real entry point in a subprocess, as a user runs it."""
    return subprocess.run(
        camres_command("submit", *map(str, args)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_submit_runs_a_cam_job_and_downloads_its_artifacts(
    served: str, tiny_checkpoint: Path, ucm_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = run_submit(
        "--url", served, "--model", tiny_checkpoint, ucm_image, "--top-k", "2",
        "--poll-interval", "0.1", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "succeeded"
    assert f"job {job['id']} succeeded" in done.stdout
    (image,) = job["result"]["images"]
    intact = image["conditions"]["intact"]
    assert image["image"] == ucm_image.name
    assert len(intact["cams"]) == 2
    with CamresClient(served) as api:
        listed = {item["name"]: item["size"] for item in api.list_artifacts(job["id"])}
    downloaded = {p.name: p.stat().st_size for p in out.iterdir() if p.name != "job.json"}
    assert downloaded == listed
    for cam in intact["cams"]:
        overlay = out / cam["artifacts"]["overlay"]
        assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.part"))


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_job_exits_1_with_the_jobs_error(
    served: str, tiny_checkpoint: Path, ucm_dir: Path, tmp_path: Path
) -> None:
    # Retraining needs images of the model's own classes; which classes a dataset holds is
    # only matched against the model when the worker opens it.
    other_classes = tmp_path / "other-classes"
    for name in ("forest", "harbor"):
        (other_classes / name).mkdir(parents=True)
        for source in sorted((ucm_dir / name).glob("*.jpg"))[:2]:
            shutil.copy(source, other_classes / name)
    done = run_submit(
        "--url", served, "--model", tiny_checkpoint, ucm_dir / "beach" / "beach00.jpg",
        "--damage-fraction", "0.5", "--damage-target", "D4",
        "--retrain-dataset", other_classes, "--epochs", "1", "--out", tmp_path / "out", "-q",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "failed: DatasetError" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()

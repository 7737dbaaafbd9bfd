"""The container files: docker-compose.yml's structure and the Dockerfile's rules.

No Docker engine runs the tests, so these read the files: the services, healthchecks, the shared
volume and the GPU reservation must be there, and the commands the containers run must be
commands the project actually has.
"""

from __future__ import annotations

import importlib
import re
import shlex
from typing import Any

import click
import pytest
import yaml

from tests.conftest import REPO_ROOT

CAMRES_SERVICES = ("gateway", "worker-gpu", "worker-cpu")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Target path → named volume, for the short ``volume:/path`` syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= {"redis", "gateway", "worker-gpu", "worker-cpu", "flower"}


def test_redis_persists_and_is_healthchecked(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = _command(redis)
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-cli ping" in _healthcheck(redis)
    (volume,) = _mounts(redis).values()
    assert volume in compose["volumes"]


def test_camres_services_share_one_image_broker_and_data_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    images = {services[name]["image"] for name in CAMRES_SERVICES}
    assert len(images) == 1
    for name in CAMRES_SERVICES:
        service = services[name]
        assert service["build"] in (".", {"context": "."}), name
        env = service["environment"]
        assert env["CAMRES_BROKER_URL"] == "redis://redis:6379/0", name
        # The artifact store must be the same volume at the same path everywhere: the gateway
        # serves files by the path the worker wrote them under.
        assert _mounts(service).get(env["CAMRES_DATA_DIR"]) == "artifacts", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert "artifacts" in compose["volumes"]


def test_gateway_runs_the_app_factory_with_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    gateway = services["gateway"]
    command = _command(gateway)
    assert command[0] == "uvicorn"
    assert "--factory" in command
    target = next(arg for arg in command[1:] if ":" in arg and not arg.startswith("-"))
    assert target == "service.app:create_app"
    assert command[command.index("--port") + 1] == "8000"
    assert "8000:8000" in [str(p) for p in gateway["ports"]]
    assert "/healthz" in _healthcheck(gateway)


def test_gpu_worker_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in services["worker-cpu"]


@pytest.mark.parametrize(("name", "queue"), [("worker-gpu", "gpu"), ("worker-cpu", "cpu")])
def test_workers_consume_their_queue(
    services: dict[str, dict[str, Any]], name: str, queue: str
) -> None:
    command = _command(services[name])
    assert command[:2] == ["camres", "worker"]
    assert command[command.index("--queues") + 1] == queue


@pytest.mark.parametrize("name", ["worker-gpu", "worker-cpu"])
def test_worker_commands_parse_with_the_real_cli(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    from cli.main import COMMANDS

    module_name, attr = COMMANDS["worker"].split(":")
    worker: click.Command = getattr(importlib.import_module(module_name), attr)
    args = _command(services[name])[2:]
    # make_context parses (and rejects unknown options) without running the worker.
    with worker.make_context("worker", list(args), resilient_parsing=False) as ctx:
        assert ctx.params


def test_flower_watches_the_same_broker(services: dict[str, dict[str, Any]]) -> None:
    flower = services["flower"]
    command = _command(flower)
    assert "flower" in command
    assert "--broker=redis://redis:6379/0" in command
    assert any(str(p).endswith("5555:5555") for p in flower["ports"])


# -- Dockerfile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    # Join continuation lines, drop comments: one instruction per item.
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerfile_base_user_and_pins(dockerfile: list[str]) -> None:
    froms = [line.split()[1] for line in dockerfile if line.startswith("FROM ")]
    assert froms
    assert all(image == "python:3.11-slim" for image in froms)
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    installs = [line for line in dockerfile if "pip install" in line and "-r " in line]
    assert installs
    assert all("-c constraints.txt" in line for line in installs)


def test_dockerfile_bakes_no_secrets(dockerfile: list[str]) -> None:
    secretive = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE)", re.IGNORECASE)
    for line in dockerfile:
        if line.startswith(("ENV ", "ARG ")):
            assert not secretive.search(line), line


def test_dockerignore_admits_exactly_what_the_build_copies(dockerfile: list[str]) -> None:
    rules = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # deny by default: no .venv, .git, var/ or checkpoints in context
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for line in dockerfile:
        if line.startswith("COPY ") and "--from=" not in line:
            copied.update(line.split()[1:-1])
    assert copied == admitted
    for source in copied:
        assert (REPO_ROOT / source).exists(), source

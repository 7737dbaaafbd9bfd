"""Spec fuzzing: Schemathesis generates requests from the committed openapi/openapi.json (valid
and invalid ones, odd headers, wrong methods) and sends them to the live gateway, in process,
with access control on. No response may be a 5xx or break the documented schema (status
codes, content types, headers, bodies), and invalid requests and keys must be refused.

Bounded for CI: ``CAMRES_FUZZ_EXAMPLES`` examples per operation (default 25, derandomized so
a run is reproducible); raise it for a deeper local run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.service.support import REPO_ROOT

KEY = "fuzz-key-0123456789abcdef"
EXAMPLES = int(os.environ.get("CAMRES_FUZZ_EXAMPLES", "25"))


def _live_app() -> tuple[FastAPI, tempfile.TemporaryDirectory[str]]:
    folder = tempfile.TemporaryDirectory(prefix="camres-fuzz-")
    app = create_app(
        Settings(data_dir=Path(folder.name) / "var", api_keys={KEY: "fuzz"}, heartbeat_max_age=3600)
    )
    # A worker that beat recently, so that /readyz answers 200: its documented 503 is a 5xx.
    app.state.camres.store.heartbeat("fuzz@test")
    return app, folder


# Schemathesis binds the app to the operations when it collects them, hence a module-level app.
APP, _DATA = _live_app()
# Hypothesis's cache goes with the app's data, not into the working tree.
set_hypothesis_home_dir(str(Path(_DATA.name) / "hypothesis"))
schema = schemathesis.openapi.from_path(REPO_ROOT / "openapi" / "openapi.json")
schema.app = APP


@pytest.fixture(scope="module", autouse=True)
def _close_the_app() -> Iterator[None]:
    yield
    APP.state.camres.close()
    _DATA.cleanup()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_honours_its_openapi_document(case: schemathesis.Case) -> None:
    # A request that fits the schema may still be refused: bytes that are not a checkpoint or
    # a zip, a spec string that is not JSON. Everything else is checked.
    case.call_and_validate(headers={"X-API-Key": KEY}, excluded_checks=[positive_data_acceptance])

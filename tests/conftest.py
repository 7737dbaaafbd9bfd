"""Shared fixtures: where the real aerial images live.

The data is the project's real test material (``../shared/data``, see its README); a missing
folder is an error, not a skip, so a broken checkout cannot pass silently.
"""

from __future__ import annotations

import os
from pathlib import Path

# Two cores are shared by the test process and the workers it starts: torch's default thread
# pool oversubscribes them and made forward passes up to ~50x slower here. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CAMRES_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real datasets: ``ucm/``, ``ucm-tif/``, ``aid-mini/``, the class mapping."""
    if not (SHARED_DATA / "ucm").is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA}; set CAMRES_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ucm_dir(shared_data: Path) -> Path:
    return shared_data / "ucm"


@pytest.fixture(scope="session")
def ucm_tif_dir(shared_data: Path) -> Path:
    return shared_data / "ucm-tif"


@pytest.fixture(scope="session")
def aid_dir(shared_data: Path) -> Path:
    return shared_data / "aid-mini"


@pytest.fixture(scope="session")
def class_mapping_file(shared_data: Path) -> Path:
    return shared_data / "ucm_aid_classes.json"

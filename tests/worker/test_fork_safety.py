"""The worker's parent process may import the task code (and torch) before the prefork pool
forks, but must not initialise CUDA: a CUDA context does not survive a fork."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.support import REPO_ROOT, subprocess_env

SCRIPT = """
import torch
import worker.app, worker.tasks  # what `celery worker` imports before forking
print("CUDA_INITIALIZED:", torch.cuda.is_initialized())
"""


def test_importing_the_worker_does_not_initialise_cuda(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=subprocess_env(data_dir=tmp_path / "var"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "CUDA_INITIALIZED: False" in result.stdout

"""The torch-free Preprocessing model: defaults, validation, JSON round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def test_defaults_are_imagenet_at_224() -> None:
    pre = Preprocessing()
    assert pre.input_size == 224
    assert pre.mean == IMAGENET_MEAN
    assert pre.std == IMAGENET_STD
    assert pre.resize == "stretch"


def test_json_round_trip() -> None:
    pre = Preprocessing(input_size=96, mean=(0.1, 0.2, 0.3), std=(1, 2, 3), resize="center_crop")
    assert Preprocessing.model_validate_json(pre.model_dump_json()) == pre


@pytest.mark.parametrize(
    "bad",
    [
        {"input_size": 8},
        {"input_size": 100_000},
        {"std": (0.2, 0.0, 0.2)},
        {"std": (0.2, -1.0, 0.2)},
        {"mean": (0.1, float("nan"), 0.1)},
        {"mean": (0.1, 0.2)},
        {"resize": "squash"},
        {"colour": "rgb"},
    ],
)
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Preprocessing(**bad)  # type: ignore[arg-type]


def test_is_frozen() -> None:
    with pytest.raises(ValidationError):
        Preprocessing().input_size = 64


def test_does_not_import_torch() -> None:
    code = "import sys, core.preprocessing; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""Progress reporting and cooperative cancellation for long computations.

Core functions take ``progress`` and ``should_stop`` callables instead of knowing about Celery:
the worker relays :class:`Progress` to the job record and answers ``should_stop`` from the job's
cancel flag; the CLI draws a progress bar. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.exceptions import CancelledError


@dataclass(frozen=True)
class Progress:
    """A snapshot of a long computation: overall ``fraction`` done in [0, 1], the ``stage``
    being run (e.g. "train", "damage", "cam"), a human ``message``, and stage ``metrics``
    (epoch, step, loss, accuracy, ...)."""

    fraction: float
    stage: str
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[Progress], None]
ShouldStop = Callable[[], bool]


def report(callback: ProgressCallback | None, progress: Progress) -> None:
    """Send ``progress`` to ``callback`` when there is one."""
    if callback is not None:
        callback(progress)


def check_stop(should_stop: ShouldStop | None, where: str) -> None:
    """Raise :class:`CancelledError` when the caller asked to stop; call between units of work."""
    if should_stop is not None and should_stop():
        raise CancelledError(f"cancelled during {where}")

"""The embedded broker: kombu's filesystem transport with atomic publishing.

kombu's filesystem channel creates a message file in the queue folder and then writes it. A
consumer polling that folder can move and read the file in between, find it empty, and die on
the JSON decode — the message is lost with the worker (seen here once polling was fast enough
for a one-image job). Publishing here writes a ``.part`` file, which consumers skip (they take
only ``<name>.<queue>.msg``), and renames it into place: the rename is atomic on one filesystem,
so a consumer sees a whole message or none. A message that still cannot be decoded (a disk
fault) is logged and skipped instead of stopping the worker.

Registered with kombu as the ``camresfs://`` transport by :func:`register_transport`;
torch-free (the gateway imports it).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from service.settings import EMBEDDED_BROKER_SCHEME

log = logging.getLogger("camres.broker")


class Channel(filesystem.Channel):
    """A filesystem channel whose messages appear in the queue folder whole."""

    # kombu's own classes disagree on these signatures; these follow filesystem.Channel.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = Path(self.data_folder_out) / name
        partial = final.with_name(name + ".part")
        try:
            with partial.open("wb") as sink:
                sink.write(str_to_bytes(dumps(payload)))
                sink.flush()
                os.fsync(sink.fileno())  # a message the broker accepted survives a crash
            os.replace(partial, final)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"cannot add {name!r} to the queue folder") from exc

    def _get(self, queue: str) -> Any:  # type: ignore[override]
        try:
            return super()._get(queue)
        except ValueError as exc:  # json.JSONDecodeError: a corrupt file, not a worker bug
            log.error("skipped an undecodable message in queue %r: %s", queue, exc)
            raise Empty() from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel


def register_transport() -> None:
    """Make ``camresfs://`` URLs resolve to :class:`Transport` in this process."""
    TRANSPORT_ALIASES.setdefault(EMBEDDED_BROKER_SCHEME, f"{__name__}:Transport")

"""The embedded broker publishes atomically: a consumer polling the queue folder never takes a
half-written message (kombu's plain filesystem channel lets it, and the worker died on the
empty JSON)."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from kombu import Connection

from service.broker import register_transport


def _connection(folder: Path) -> Connection:
    register_transport()
    options = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
        "control_folder": str(folder.parent / "control"),  # kombu's default is ./control
    }
    return Connection("camresfs://localhost/", transport_options=options)


def _fresh_queue() -> str:
    """A queue name no other test in this process used: kombu's filesystem transport keeps
    exchange bindings in process-wide state, so shared names would cross-talk."""
    return f"q{uuid.uuid4().hex}"


def test_consumer_never_sees_partial_messages(tmp_path: Path) -> None:
    tmp_path = tmp_path / "queue"
    tmp_path.mkdir()
    stop = threading.Event()
    seen: list[str] = []
    partial: list[str] = []

    def watch() -> None:  # what a polling consumer would find in the folder
        while not stop.is_set():
            for path in tmp_path.glob("*.msg"):
                try:
                    if path.stat().st_size == 0:
                        partial.append(path.name)
                    seen.append(path.name)
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with _connection(tmp_path) as conn:
            queue = conn.SimpleQueue(_fresh_queue())
            for i in range(300):
                queue.put({"job": i})
            bodies = [queue.get(timeout=5).payload for _ in range(300)]
            queue.close()
    finally:
        stop.set()
        watcher.join()

    assert sorted(b["job"] for b in bodies) == list(range(300))
    assert seen, "the watcher never looked at a message file"
    assert partial == []
    assert not list(tmp_path.glob("*.part"))


def test_an_undecodable_message_is_skipped_not_fatal(tmp_path: Path) -> None:
    tmp_path = tmp_path / "queue"
    tmp_path.mkdir()
    name = _fresh_queue()
    (tmp_path / f"1_broken.{name}.msg").write_bytes(b"")
    with _connection(tmp_path) as conn:
        queue = conn.SimpleQueue(name)
        queue.put({"job": "after"})
        assert queue.get(timeout=5).payload == {"job": "after"}
        queue.close()

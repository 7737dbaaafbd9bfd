"""SQLite job store for the embedded deployment (stdlib ``sqlite3``, WAL journal).

WAL lets the gateway read while a worker process writes; each status transition is one
``UPDATE … WHERE status IN (…)`` so it is atomic across processes without explicit locking.
Connections are per thread and per process (reopened after ``fork``). A database written by an
earlier version gains the newer columns when it is opened.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.store.base import (
    ANY_OWNER,
    TERMINAL,
    FinishStatus,
    JobConflictError,
    JobError,
    JobNotFoundError,
    JobPage,
    JobProgress,
    JobRecord,
    JobStore,
    OwnerFilter,
    PartsChange,
    PartState,
    StoreError,
    TooManyJobsError,
    WorkerBeat,
    decode_cursor,
    encode_cursor,
)

#: Host parameters per statement (SQLite's limit is 999 before 3.32).
_MAX_PARAMS = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    spec TEXT NOT NULL,
    progress TEXT NOT NULL,
    result TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    seen_at REAL NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS job_parts (
    job_id TEXT NOT NULL,
    part TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, part)
);
CREATE TABLE IF NOT EXISTS deleted_counts (
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (kind, status)
);
"""

#: Columns added after the first release: (name, declaration), added to older databases.
_ADDED_COLUMNS = (("owner", "TEXT"), ("attempts", "INTEGER NOT NULL DEFAULT 0"))

_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, status);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
"""

_COLUMNS = (
    "id, kind, status, created_at, started_at, finished_at, spec, progress, result, error, "
    "cancel_requested, worker, owner, attempts"
)
_TERMINAL_SQL = ", ".join(f"'{status}'" for status in sorted(TERMINAL))


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        spec=json.loads(row["spec"]),
        progress=JobProgress.model_validate_json(row["progress"]),
        result=None if row["result"] is None else json.loads(row["result"]),
        error=None if row["error"] is None else JobError.model_validate_json(row["error"]),
        cancel_requested=bool(row["cancel_requested"]),
        worker=row["worker"],
        owner=row["owner"],
        attempts=row["attempts"],
    )


class SQLiteJobStore(JobStore):
    """Jobs in one SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
            present = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            for name, declaration in _ADDED_COLUMNS:
                if name not in present:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
            conn.executescript(_INDEXES)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prepare job database {self.path}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str) -> SQLiteJobStore:
        """``sqlite:///absolute/path.db`` or ``sqlite:///relative.db``."""
        if not url.startswith("sqlite:///"):
            raise StoreError(f"not a sqlite URL: {url!r}")
        return cls(url.removeprefix("sqlite:///"))

    # --- connections -----------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            # A connection inherited through fork must not be used by the child.
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _connect(self) -> sqlite3.Connection:
        try:
            return self._connection()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open job database {self.path}: {exc}") from exc

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._connect().execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"job database error: {exc}") from exc

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local = threading.local()

    # --- contract --------------------------------------------------------------------------
    def ping(self) -> None:
        self._execute("SELECT 1").fetchone()

    @contextmanager
    def _write_transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (taken at once: reads in it cannot interleave with another
        process's writes)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"job database error: {exc}") from exc

    def create(self, record: JobRecord, *, max_active: int | None = None) -> None:
        try:
            with self._write_transaction() as conn:
                if max_active is not None:
                    (active,) = conn.execute(
                        "SELECT COUNT(*) FROM jobs WHERE owner IS ? "
                        "AND status IN ('queued', 'running')",
                        (record.owner,),
                    ).fetchone()
                    if active >= max_active:
                        raise TooManyJobsError(record.owner, max_active)
                conn.execute(
                    f"INSERT INTO jobs ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.kind,
                        record.status,
                        record.created_at,
                        record.started_at,
                        record.finished_at,
                        _dump(record.spec),
                        record.progress.model_dump_json(),
                        _dump(record.result),
                        None if record.error is None else record.error.model_dump_json(),
                        int(record.cancel_requested),
                        record.worker,
                        record.owner,
                        record.attempts,
                    ),
                )
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise JobConflictError(record.id, "existing", "create") from exc
            raise

    def get(self, job_id: str) -> JobRecord | None:
        row = self._execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row_to_record(row)

    def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        ids = list(job_ids)
        for start in range(0, len(ids), _MAX_PARAMS):
            chunk = ids[start : start + _MAX_PARAMS]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id, status FROM jobs WHERE id IN ({marks})"
            found.update(self._execute(sql, tuple(chunk)).fetchall())
        return found

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: OwnerFilter = ANY_OWNER,
    ) -> JobPage:
        where: list[str] = []
        params: list[Any] = []
        if owner is not ANY_OWNER:
            where.append("owner IS ?")
            params.append(owner)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [created_at, created_at, job_id]
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._execute(
            f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        items = [_row_to_record(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(items[-1].created_at, items[-1].id)
        return JobPage(items=items, next_cursor=next_cursor)

    def start(self, job_id: str, worker: str) -> JobRecord | None:
        updated = self._execute(
            "UPDATE jobs SET status = 'running', started_at = ?, worker = ?, "
            "attempts = attempts + 1 "
            "WHERE id = ? AND status IN ('queued', 'running') AND cancel_requested = 0",
            (time.time(), worker, job_id),
        ).rowcount
        return self.get(job_id) if updated else None

    def requeue(self, job_id: str) -> bool:
        updated = self._execute(
            "UPDATE jobs SET status = 'queued', worker = NULL WHERE id = ? AND status = 'running'",
            (job_id,),
        ).rowcount
        return bool(updated)

    def set_progress(self, job_id: str, progress: JobProgress) -> None:
        self._execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'",
            (progress.model_dump_json(), job_id),
        )

    def finish(
        self,
        job_id: str,
        status: FinishStatus,
        *,
        result: dict[str, Any] | None = None,
        error: JobError | None = None,
    ) -> bool:
        updated = self._execute(
            "UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ? "
            "WHERE id = ? AND status IN ('queued', 'running')",
            (
                status,
                time.time(),
                _dump(result),
                None if error is None else error.model_dump_json(),
                job_id,
            ),
        ).rowcount
        return bool(updated)

    def request_cancel(self, job_id: str) -> JobRecord:
        # One write transaction, so the status read and the update cannot interleave with a
        # worker's start() or finish().
        with self._write_transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(job_id)
            if row["status"] == "queued":
                conn.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?, "
                    "cancel_requested = 1 WHERE id = ?",
                    (time.time(), job_id),
                )
            elif row["status"] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise JobConflictError(job_id, row["status"], "cancel")
        record = self.get(job_id)
        if record is None:  # deleted meanwhile (expired): it was finished, hence a conflict
            raise JobNotFoundError(job_id)
        return record

    def cancel_requested(self, job_id: str) -> bool:
        row = self._execute(
            "SELECT cancel_requested, status FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return row is not None and (bool(row["cancel_requested"]) or row["status"] == "cancelled")

    def fail_running(self, error: JobError, *, worker: str | None = None) -> list[str]:
        clause, params = ("AND worker = ?", (worker,)) if worker is not None else ("", ())
        ids = [
            row["id"]
            for row in self._execute(
                f"SELECT id FROM jobs WHERE status = 'running' {clause}", params
            ).fetchall()
        ]
        return [job_id for job_id in ids if self.finish(job_id, "failed", error=error)]

    def expired(self, before: float, limit: int = 500) -> list[str]:
        rows = self._execute(
            f"SELECT id FROM jobs WHERE status IN ({_TERMINAL_SQL}) AND finished_at < ? "
            "ORDER BY finished_at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [row["id"] for row in rows]

    def delete(self, job_id: str) -> bool:
        with self._write_transaction() as conn:
            row = conn.execute("SELECT kind, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] not in TERMINAL:
                return False
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            conn.execute("DELETE FROM job_parts WHERE job_id = ?", (job_id,))
            conn.execute(
                "INSERT INTO deleted_counts (kind, status, n) VALUES (?, ?, 1) "
                "ON CONFLICT(kind, status) DO UPDATE SET n = n + 1",
                (row["kind"], row["status"]),
            )
        return True

    def parts(self, job_id: str) -> dict[str, PartState]:
        rows = self._execute("SELECT part, state FROM job_parts WHERE job_id = ?", (job_id,))
        return {row["part"]: PartState.model_validate_json(row["state"]) for row in rows}

    def update_parts(self, job_id: str, change: PartsChange) -> dict[str, PartState] | None:
        with self._write_transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "running":
                return None
            rows = conn.execute("SELECT part, state FROM job_parts WHERE job_id = ?", (job_id,))
            current = {r["part"]: PartState.model_validate_json(r["state"]) for r in rows}
            written, progress = change(current)
            conn.executemany(
                "INSERT INTO job_parts (job_id, part, state) VALUES (?, ?, ?) "
                "ON CONFLICT(job_id, part) DO UPDATE SET state = excluded.state",
                [(job_id, name, state.model_dump_json()) for name, state in written.items()],
            )
            if progress is not None:
                conn.execute(
                    "UPDATE jobs SET progress = ? WHERE id = ?",
                    (progress.model_dump_json(), job_id),
                )
        return {**current, **written}

    def heartbeat(self, worker: str, info: dict[str, Any] | None = None) -> None:
        self._execute(
            "INSERT INTO workers (name, seen_at, info) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET seen_at = excluded.seen_at, info = excluded.info",
            (worker, time.time(), json.dumps(info or {})),
        )

    def workers(self) -> list[WorkerBeat]:
        rows = self._execute("SELECT name, seen_at, info FROM workers ORDER BY seen_at DESC")
        return [
            WorkerBeat(name=row["name"], seen_at=row["seen_at"], info=json.loads(row["info"]))
            for row in rows.fetchall()
        ]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._execute(
            "SELECT kind, status, SUM(n) AS n FROM ("
            "SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status "
            "UNION ALL SELECT kind, status, n FROM deleted_counts"
            ") GROUP BY kind, status"
        )
        return {(row["kind"], row["status"]): row["n"] for row in rows.fetchall()}

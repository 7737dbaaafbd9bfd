"""Redis job store for the scale-out deployment (the same Redis as the Celery broker).

Layout under ``<prefix>:``: ``job:<id>`` a hash (one field per record attribute, JSON values),
``jobs`` a sorted set of ids scored by creation time (listing), ``counts`` a hash of
``kind|status`` → n (metrics, never decremented by deletions), ``active`` a hash of owner →
queued and running jobs (the per-owner limit), ``finished`` a sorted set of finished ids scored
by their finish time (expiry), ``workers`` a sorted set of worker names scored by their last
heartbeat. Every status transition is a Lua script, hence atomic against concurrent gateways
and workers. Durability is Redis's own (run it with AOF in production).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from service.store.base import (
    ANY_OWNER,
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

# KEYS[1] job hash, KEYS[2] jobs zset, KEYS[3] counts hash, KEYS[4] active hash; ARGV: id,
# created_at, kind, status, owner (its JSON), max active ('' for no limit), then field/value
# pairs. Returns 1, 0 when the id exists, -1 when the owner is at the limit.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[6] ~= '' and tonumber(redis.call('HGET', KEYS[4], ARGV[5]) or '0') >= tonumber(ARGV[6])
then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3] .. '|' .. ARGV[4], 1)
if ARGV[4] == 'queued' or ARGV[4] == 'running' then redis.call('HINCRBY', KEYS[4], ARGV[5], 1) end
return 1
"""

# Compare-and-set of the status. KEYS[1] job hash, KEYS[2] counts hash, KEYS[3] active hash,
# KEYS[4] finished zset; ARGV[1] allowed statuses joined by ',', ARGV[2] new status, ARGV[3]
# '1' to refuse when cancel was requested, ARGV[4] '1' to count an attempt, ARGV[5] job id,
# ARGV[6] now, then field/value pairs to set. Returns the previous status, or false.
_TRANSITION = """
local fields = redis.call('HMGET', KEYS[1], 'status', 'kind', 'cancel_requested', 'owner')
local status, kind, cancel, owner = fields[1], fields[2], fields[3], fields[4] or 'null'
if not status then return false end
if not string.find(',' .. ARGV[1] .. ',', ',' .. status .. ',', 1, true) then return false end
if ARGV[3] == '1' and cancel == 'true' then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 7))
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
if status ~= ARGV[2] then
  redis.call('HINCRBY', KEYS[2], kind .. '|' .. status, -1)
  redis.call('HINCRBY', KEYS[2], kind .. '|' .. ARGV[2], 1)
  local was = status == 'queued' or status == 'running'
  local now = ARGV[2] == 'queued' or ARGV[2] == 'running'
  if was and not now then
    redis.call('HINCRBY', KEYS[3], owner, -1)
    redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5])
  elseif now and not was then
    redis.call('HINCRBY', KEYS[3], owner, 1)
  end
end
return status
"""

# KEYS[1] job hash, KEYS[2] jobs zset, KEYS[3] finished zset, KEYS[4] the job's parts hash;
# ARGV[1] job id. Deletes a finished job; returns 1, or 0 when it is unknown or not finished.
_DELETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS[1] job hash; ARGV[1] progress JSON. Only a running job takes progress.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
end
return 1
"""

# KEYS[1] job hash; sets the flag on a running job, returns the status it found.
_FLAG_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' then redis.call('HSET', KEYS[1], 'cancel_requested', 'true') end
return status
"""

_LIST_BATCH = 200


#: Stored as plain strings so the Lua scripts can compare them; every other field is JSON.
_PLAIN = frozenset({"id", "kind", "status"})


def _encode(key: str, value: Any) -> str:
    return str(value) if key in _PLAIN else json.dumps(value, separators=(",", ":"))


def _record_fields(record: JobRecord) -> dict[str, str]:
    return {key: _encode(key, value) for key, value in record.model_dump(mode="json").items()}


def _decode(raw: dict[bytes, bytes]) -> JobRecord:
    data = {}
    for raw_key, raw_value in raw.items():
        key = raw_key.decode()
        data[key] = raw_value.decode() if key in _PLAIN else json.loads(raw_value)
    return JobRecord.model_validate(data)


class RedisJobStore(JobStore):
    """Jobs in Redis, under one key prefix."""

    def __init__(self, client: redis.Redis, prefix: str = "camres") -> None:
        self._redis = client
        self.prefix = prefix.rstrip(":")
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._progress = client.register_script(_PROGRESS)
        self._flag_cancel = client.register_script(_FLAG_CANCEL)
        self._delete = client.register_script(_DELETE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "camres") -> RedisJobStore:
        # redis-py's pool notices a fork (pid check) and reconnects in the child.
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
        return cls(client, prefix)

    # --- keys ------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _job_key(self, job_id: str) -> str:
        return self._key("job", job_id)

    def _parts_key(self, job_id: str) -> str:
        return self._key("job", job_id, "parts")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreError(f"job store (redis) error: {exc}") from exc

    def _set(
        self,
        job_id: str,
        allowed: str,
        new_status: str,
        fields: dict[str, Any],
        *,
        guard: bool,
        attempt: bool = False,
    ) -> str | None:
        flat: list[str] = []
        for key, value in fields.items():
            flat += [key, _encode(key, value)]
        previous = self._call(
            self._transition,
            keys=[
                self._job_key(job_id),
                self._key("counts"),
                self._key("active"),
                self._key("finished"),
            ],
            args=[
                allowed,
                new_status,
                "1" if guard else "0",
                "1" if attempt else "0",
                job_id,
                repr(time.time()),
                *flat,
            ],
        )
        return None if previous is None else str(previous.decode())

    # --- contract --------------------------------------------------------------------------
    def ping(self) -> None:
        self._call(self._redis.ping)

    def close(self) -> None:
        self._redis.close()

    def create(self, record: JobRecord, *, max_active: int | None = None) -> None:
        fields = _record_fields(record)
        flat = [item for pair in fields.items() for item in pair]
        created = self._call(
            self._create,
            keys=[
                self._job_key(record.id),
                self._key("jobs"),
                self._key("counts"),
                self._key("active"),
            ],
            args=[
                record.id,
                repr(record.created_at),
                record.kind,
                record.status,
                fields["owner"],
                "" if max_active is None else str(max_active),
                *flat,
            ],
        )
        if created == 0:
            raise JobConflictError(record.id, "existing", "create")
        if created == -1:
            assert max_active is not None
            raise TooManyJobsError(record.owner, max_active)

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._call(self._redis.hgetall, self._job_key(job_id))
        return _decode(raw) if raw else None

    def statuses(self, job_ids: Sequence[str]) -> dict[str, str]:
        ids = list(job_ids)
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self._job_key(job_id), "status")
        values = self._call(pipe.execute)
        return {job_id: v.decode() for job_id, v in zip(ids, values, strict=True) if v is not None}

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: OwnerFilter = ANY_OWNER,
    ) -> JobPage:
        after = decode_cursor(cursor) if cursor is not None else None
        maximum: str = "+inf" if after is None else repr(after[0])
        items: list[JobRecord] = []
        offset = 0
        more = False
        while not more:
            batch = self._call(
                self._redis.zrevrangebyscore,
                self._key("jobs"),
                maximum,
                "-inf",
                start=offset,
                num=_LIST_BATCH,
                withscores=True,
            )
            if not batch:
                break
            offset += len(batch)
            records = self._fetch([member.decode() for member, _ in batch])
            for record in records:
                if after is not None and (record.created_at, record.id) >= after:
                    continue
                if (status and record.status != status) or (kind and record.kind != kind):
                    continue
                if owner is not ANY_OWNER and record.owner != owner:
                    continue
                if len(items) == limit:
                    more = True
                    break
                items.append(record)
        next_cursor = encode_cursor(items[-1].created_at, items[-1].id) if more else None
        return JobPage(items=items, next_cursor=next_cursor)

    def _fetch(self, ids: list[str]) -> list[JobRecord]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job_key(job_id))
        raws = self._call(pipe.execute)
        # Equal scores come back in reverse member order, which is the (created_at, id)
        # descending order the SQL store uses too.
        return [_decode(raw) for raw in raws if raw]

    def start(self, job_id: str, worker: str) -> JobRecord | None:
        fields = {"started_at": time.time(), "worker": worker}
        if self._set(job_id, "queued,running", "running", fields, guard=True, attempt=True) is None:
            return None
        return self.get(job_id)

    def requeue(self, job_id: str) -> bool:
        return self._set(job_id, "running", "queued", {"worker": None}, guard=False) is not None

    def set_progress(self, job_id: str, progress: JobProgress) -> None:
        self._call(
            self._progress,
            keys=[self._job_key(job_id)],
            args=[json.dumps(progress.model_dump(mode="json"), separators=(",", ":"))],
        )

    def finish(
        self,
        job_id: str,
        status: FinishStatus,
        *,
        result: dict[str, Any] | None = None,
        error: JobError | None = None,
    ) -> bool:
        fields = {
            "finished_at": time.time(),
            "result": result,
            "error": None if error is None else error.model_dump(mode="json"),
        }
        return self._set(job_id, "queued,running", status, fields, guard=False) is not None

    def request_cancel(self, job_id: str) -> JobRecord:
        fields = {"finished_at": time.time(), "cancel_requested": True}
        if self._set(job_id, "queued", "cancelled", fields, guard=False) is None:
            found = self._call(self._flag_cancel, keys=[self._job_key(job_id)], args=[])
            if found is None:
                raise JobNotFoundError(job_id)
            status = found.decode()
            if status != "running":
                raise JobConflictError(job_id, status, "cancel")
        record = self.get(job_id)
        if record is None:
            raise JobNotFoundError(job_id)
        return record

    def cancel_requested(self, job_id: str) -> bool:
        cancel, status = self._call(
            self._redis.hmget, self._job_key(job_id), ["cancel_requested", "status"]
        )
        return cancel == b"true" or status == b"cancelled"

    def fail_running(self, error: JobError, *, worker: str | None = None) -> list[str]:
        failed: list[str] = []
        page = self.list_jobs(status="running", limit=1000)
        while True:
            for record in page.items:
                if worker is not None and record.worker != worker:
                    continue
                if self.finish(record.id, "failed", error=error):
                    failed.append(record.id)
            if page.next_cursor is None:
                return failed
            page = self.list_jobs(status="running", limit=1000, cursor=page.next_cursor)

    def expired(self, before: float, limit: int = 500) -> list[str]:
        ids = self._call(
            self._redis.zrangebyscore, self._key("finished"), "-inf", f"({before!r}", 0, limit
        )
        return [job_id.decode() for job_id in ids]

    def delete(self, job_id: str) -> bool:
        deleted = self._call(
            self._delete,
            keys=[
                self._job_key(job_id),
                self._key("jobs"),
                self._key("finished"),
                self._parts_key(job_id),
            ],
            args=[job_id],
        )
        return bool(deleted)

    def parts(self, job_id: str) -> dict[str, PartState]:
        raw = self._call(self._redis.hgetall, self._parts_key(job_id))
        return {name.decode(): PartState.model_validate_json(value) for name, value in raw.items()}

    def update_parts(self, job_id: str, change: PartsChange) -> dict[str, PartState] | None:
        job_key, parts_key = self._job_key(job_id), self._parts_key(job_id)

        def attempt(pipe: Any) -> dict[str, PartState] | None:
            # Optimistic: WATCHed keys changed by another part before EXEC → redis-py reruns
            # this function on fresh values, so no part's update is lost.
            if pipe.hget(job_key, "status") != b"running":
                return None
            current = {
                name.decode(): PartState.model_validate_json(value)
                for name, value in pipe.hgetall(parts_key).items()
            }
            written, progress = change(current)
            pipe.multi()
            if written:
                pipe.hset(parts_key, mapping={n: st.model_dump_json() for n, st in written.items()})
            if progress is not None:
                pipe.hset(
                    job_key, "progress", _encode("progress", progress.model_dump(mode="json"))
                )
            return {**current, **written}

        result: dict[str, PartState] | None = self._call(
            self._redis.transaction, attempt, job_key, parts_key, value_from_callable=True
        )
        return result

    def heartbeat(self, worker: str, info: dict[str, Any] | None = None) -> None:
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(self._key("workers"), {worker: now})
        pipe.hset(self._key("worker-info"), worker, json.dumps(info or {}))
        self._call(pipe.execute)

    def workers(self) -> list[WorkerBeat]:
        beats = self._call(self._redis.zrevrange, self._key("workers"), 0, -1, withscores=True)
        infos = self._call(self._redis.hgetall, self._key("worker-info"))
        return [
            WorkerBeat(
                name=name.decode(),
                seen_at=score,
                info=json.loads(infos.get(name, b"{}")),
            )
            for name, score in beats
        ]

    def counts(self) -> dict[tuple[str, str], int]:
        raw = self._call(self._redis.hgetall, self._key("counts"))
        counts: dict[tuple[str, str], int] = {}
        for key, value in raw.items():
            kind, _, status = key.decode().partition("|")
            if int(value) > 0:
                counts[(kind, status)] = int(value)
        return counts

"""Who belongs to a micro-batch (:mod:`worker.batching`), kept in the job store so that a batch
outlives the process that ran it.

A leader records each job it takes from the batch queue as a *part* of its own job (the store's
parts, :meth:`service.store.JobStore.update_parts`, the mechanism a fanned-out sweep uses for
its parts): keyed by the member's job id, marked :data:`MEMBER`. From then on the store, not the
member's broker message, answers for the member:

* the leader's own message (acks_late, requeued at once when its pool process dies:
  ``task_reject_on_worker_lost``) brings the leader back, and it runs the recorded members that
  are not finished (:func:`unfinished`);
* when the hard time limit kills the leader, :meth:`worker.tasks.JobTask.on_failure` fails
  them with the leader (:func:`fail`).

Parts are written only while the leader's job is running (the store's compare-and-set), and
kept until the leader's record is deleted, so a leader whose own job finished still finds its
members when it comes back.
"""

from __future__ import annotations

import logging

from service.store import JobError, JobProgress, JobStore, PartState

log = logging.getLogger(__name__)

#: The ``spec`` of a part that is a batch member (a sweep's parts carry their cells instead).
MEMBER = {"batch_member": True}


def record(store: JobStore, leader: str, member: str, worker: str) -> bool:
    """Record ``member`` in ``leader``'s batch; False, recording nothing, when the leader's job
    is not running (finished, cancelled, or not started) or the store fails: the caller puts
    the member's message back."""
    state = PartState(spec=MEMBER, worker=worker)

    def change(
        current: dict[str, PartState],
    ) -> tuple[dict[str, PartState], JobProgress | None]:
        return {member: state}, None  # the leader's progress stays its own

    try:
        return store.update_parts(leader, change) is not None
    except Exception:
        log.warning("could not record job %s in the batch of %s", member, leader, exc_info=True)
        return False


def members(store: JobStore, leader: str) -> list[str]:
    """The jobs recorded in ``leader``'s batch, the leader excluded."""
    return [name for name, part in store.parts(leader).items() if part.spec == MEMBER]


def unfinished(store: JobStore, leader: str) -> list[str] | None:
    """The members of ``leader``'s batch not finished yet; None when it never recorded one (a
    first delivery, as opposed to a leader delivered again after its process died)."""
    recorded = members(store, leader)
    if not recorded:
        return None
    records = ((job_id, store.get(job_id)) for job_id in recorded)
    return [job_id for job_id, found in records if found is not None and not found.finished]


def fail(store: JobStore, leader: str, error: JobError) -> list[str]:
    """Fail every unfinished member of ``leader``'s batch with ``error``; their ids."""
    return [
        job_id for job_id in members(store, leader) if store.finish(job_id, "failed", error=error)
    ]

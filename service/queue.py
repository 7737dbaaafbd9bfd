"""The Celery application as configured for camres, without any task code.

The gateway builds it to send tasks by name (``camres.<kind>``) and to probe the broker; the
worker (``worker.app``) builds the very same configuration and adds the task module. Keeping
the configuration here means both sides agree on queues, serializers and acknowledgement
semantics, and the gateway never imports torch through a task module. Torch-free.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from service.broker import register_transport
from service.settings import JOB_KINDS, Settings

#: Prefix of the registered task names: ``camres.cam``, ``camres.train``, ...
TASK_PREFIX = "camres."


def task_name(kind: str) -> str:
    """Celery task name of a job kind."""
    return f"{TASK_PREFIX}{kind}"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Transport options: folders of the filesystem broker, or Redis's visibility timeout."""
    if settings.embedded:
        broker = settings.broker_dir
        return {
            # One folder for both directions: producer and consumer share the queue.
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "control_folder": str(broker / "control"),
            "processed_folder": str(broker / "processed"),
            # Processed messages are deleted; the job store keeps the history.
            "store_processed": False,
            "polling_interval": settings.broker_polling_interval,
        }
    return {
        # With acks_late, the task of a worker that vanished (its message unacknowledged) is
        # redelivered after the visibility timeout, so it must outlast the longest task or a
        # long job would run twice. A pool process that dies is noticed by its worker, which
        # requeues the task at once (task_reject_on_worker_lost).
        "visibility_timeout": settings.effective_visibility_timeout,
        # Broker keys live under the deployment's prefix, next to the job store's.
        "global_keyprefix": f"{settings.redis_prefix}:broker:",
    }


def make_celery(settings: Settings, *, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app configured from ``settings``; ``include`` names task modules to load.

    Building it has no side effect; the embedded broker's folders must exist before a task is
    sent or consumed (:meth:`Settings.ensure_dirs`)."""
    register_transport()
    app = Celery("camres", broker=settings.effective_broker_url, include=list(include))
    # The batch queue holds only CAM jobs a worker may run in one forward pass with others
    # (worker/batching.py), so a worker draining it never takes a job it must put back.
    queues = (settings.gpu_queue, settings.cpu_queue, settings.cam_batch_queue)
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        # Job state and results live in the service's job store, not in a result backend;
        # so do the parts of a fanned-out sweep (why: worker/sweep_fanout.py).
        task_ignore_result=True,
        result_backend=None,
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name) for name in queues
        ],
        task_default_queue=settings.gpu_queue,
        task_routes={
            **{task_name(kind): {"queue": settings.queue_for(kind)} for kind in JOB_KINDS},
            # The parts of a sweep split across workers go where the sweep goes.
            task_name("sweep_part"): {"queue": settings.queue_for("sweep")},
        },
        # A task is acknowledged after it ran, and requeued if its worker process died, so
        # a crash never loses a job silently; one task reserved per process keeps long jobs
        # from queueing behind each other in a busy worker.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_track_started=False,
        worker_send_task_events=False,
        # Remote control needs a broadcast exchange; the embedded broker would poll for it.
        worker_enable_remote_control=not settings.embedded,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # After a pool process dies Celery waits this long for a result it may have sent before
        # requeueing its task. Results live in the job store (run_job skips a finished job), so
        # the default 10 s only delays the rerun of every killed job.
        worker_lost_wait=2.0,
        timezone="UTC",
        enable_utc=True,
    )
    return app


def send_job(
    app: Celery, settings: Settings, job_id: str, kind: str, *, batchable: bool = False
) -> None:
    """Queue the task of a job; the task id is the job id. A ``batchable`` CAM job goes to
    the batch queue while batching is on (:func:`service.submission.cam_batchable`)."""
    queue = settings.queue_for(kind)
    if batchable and kind == "cam" and settings.cam_batching:
        queue = settings.cam_batch_queue
    app.send_task(
        task_name(kind),
        args=[job_id],
        task_id=job_id,
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )


def broker_reachable(app: Celery, timeout: float = 2.0) -> str | None:
    """None when the broker answers, else the reason it does not."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:  # any transport error means "not ready"
        return f"{type(exc).__name__}: {exc}"
    return None

"""Where and how the CAM engine computes: memory format, numeric precision, device transfers and
CPU threads.

The forward pass of Eq. 1 (CAM) is a ResNet forward pass plus one small product, so the engine
is as fast as the network's convolutions. Three things decide their speed:

* **Memory format.** oneDNN (CPU) and cuDNN (GPU) run convolutions fastest on NHWC
  ("channels_last") tensors; an NCHW model pays a layout reorder around every convolution.
  :func:`prepare_for_inference` converts a model's 4-D weights once, in place: values and
  ``Parameter`` objects stay the same, only strides change, and every operation camres runs on
  weights (damage, masked retraining, checkpoint writing) is layout-agnostic.
* **Precision.** ``fp32`` by default; ``bf16`` (CPU and CUDA) and ``fp16`` (CUDA only) run the
  forward pass under :func:`torch.autocast`, while the maps are always computed and returned in
  float32 (:func:`autocast_dtype`).
* **Threads.** :func:`thread_count` — see its docstring for the rule with Celery's pools.

On CUDA, :func:`to_device` stages a batch in pinned host memory and copies it with
``non_blocking=True``, and :func:`to_host` brings the collected results back with one
synchronization, so the per-batch loop of :func:`core.explain.explain` never waits on the GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import get_args

import torch
from torch import Tensor, nn

from core.cam_options import CamPrecisionName
from core.exceptions import InputError

__all__ = [
    "PRECISIONS",
    "THREADS_ENV",
    "apply_thread_policy",
    "autocast",
    "autocast_dtype",
    "available_cores",
    "env_threads",
    "is_channels_last",
    "prepare_for_inference",
    "thread_count",
    "to_device",
    "to_host",
    "wants_pinned_memory",
]

#: Numeric precisions of the forward pass (``CamOptions.precision``).
PRECISIONS: tuple[str, ...] = get_args(CamPrecisionName)

#: Environment variable that overrides :func:`thread_count` (a positive integer).
THREADS_ENV = "CAMRES_THREADS"

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- precision


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: plain float32).

    bf16 keeps float32's exponent range, so activations cannot overflow; it runs on any CPU
    (natively with AVX-512 BF16 or AMX, emulated — and slower than fp32 — elsewhere) and on
    CUDA GPUs that support it. fp16 is offered on CUDA only: CPU kernels for it are slow or
    missing. Anything else is an :class:`InputError` on ``precision``.
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise InputError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
            field="precision",
        )
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise InputError(
            f"precision 'fp16' needs a CUDA device, this computes on {device.type}; "
            "use 'bf16' or 'fp32'",
            field="precision",
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(
            "precision 'bf16' is not supported by this GPU; use 'fp16' or 'fp32'",
            field="precision",
        )
    return _AUTOCAST_DTYPES[precision]


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device) -> Iterator[None]:
    """Run the block under autocast to ``precision`` (see :func:`autocast_dtype`)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


# --------------------------------------------------------------------------- memory format


def is_channels_last(model: nn.Module) -> bool:
    """Whether every 4-D parameter and buffer of ``model`` is stored channels_last."""
    return all(
        t.is_contiguous(memory_format=torch.channels_last)
        for t in (*model.parameters(), *model.buffers())
        if t.ndim == 4
    )


def prepare_for_inference(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """Put ``model`` in channels_last (and on ``device`` when given), in place; return it.

    Idempotent and cheap when nothing is to change (a walk over the parameters' strides), so it
    is safe on a shared, cached model at every call. ``nn.Module.to`` reassigns ``param.data``:
    the ``Parameter`` objects survive, so optimizers, hooks and damage masks that hold them stay
    valid, and the values are bit-identical. The train/eval flags are not touched.
    """
    if device is not None:
        return model.to(device=torch.device(device), memory_format=torch.channels_last)  # type: ignore[call-overload]
    if not is_channels_last(model):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


# --------------------------------------------------------------------------- transfers


def wants_pinned_memory(device: str | torch.device) -> bool:
    """Whether a host batch bound for ``device`` should be staged in pinned memory: only for
    CUDA, where pinned pages let the copy run asynchronously (pinning costs, and buys nothing,
    on the CPU)."""
    return torch.device(device).type == "cuda"


def to_device(images: Sequence[Tensor], device: str | torch.device) -> Tensor:
    """Stack equally shaped C×H×W host ``images`` into an N×C×H×W channels_last batch on
    ``device``. For CUDA the batch is stacked straight into pinned memory (torch's caching host
    allocator reuses those pages) and copied with ``non_blocking=True``: the host does not wait
    for the copy, and the copy overlaps the previous batch's kernels."""
    device = torch.device(device)
    if not wants_pinned_memory(device):
        return torch.stack(list(images)).to(device).contiguous(memory_format=torch.channels_last)
    first = images[0]
    staged = torch.empty((len(images), *first.shape), dtype=first.dtype, pin_memory=True)
    torch.stack(list(images), out=staged)
    # The layout change runs on the GPU, after the copy, where it is nearly free.
    moved = staged.to(device, non_blocking=True)
    return moved.contiguous(memory_format=torch.channels_last)


def to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """CPU copies of ``tensors`` with at most one synchronization: CUDA tensors are copied into
    pinned buffers with ``non_blocking=True``, then their streams are synchronized once."""
    out: list[Tensor] = []
    streams = set()
    for tensor in tensors:
        if tensor.device.type != "cuda":
            out.append(tensor.cpu())
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        streams.add(torch.cuda.current_stream(tensor.device))
        out.append(host)
    for stream in streams:
        stream.synchronize()
    return out


# --------------------------------------------------------------------------- threads


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``taskset``, cgroup cpusets as
    seen by the scheduler), not the machine's total, which ``os.cpu_count`` reports."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_count(concurrency: int = 1, override: int | str | None = None) -> int:
    """Intra-op threads for one compute process or pool thread.

    Rule: the cores this process may use, shared evenly by the ``concurrency`` tasks that can
    run at once — Celery's prefork children each get ``cores // concurrency`` (at least 1), so
    the pool never runs more busy threads than cores; oversubscribing makes every task slower
    (threads of one OpenMP team wait for each other at every barrier). ``override`` (the
    ``--threads`` option, or the ``CAMRES_THREADS`` environment variable) wins when given.
    """
    if override is not None and override != "":
        try:
            threads = int(override)
        except (TypeError, ValueError):
            threads = 0
        if threads < 1 or isinstance(override, bool):
            raise InputError(
                f"threads must be a positive integer, got {override!r}", field="threads"
            )
        return threads
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InputError(
            f"concurrency must be a positive integer, got {concurrency!r}", field="concurrency"
        )
    return max(1, available_cores() // concurrency)


def env_threads(environ: Mapping[str, str]) -> str | None:
    """The thread count an operator set in ``environ``: :data:`THREADS_ENV` first, else a plain
    positive ``OMP_NUM_THREADS`` — the knob torch itself honours, which a policy must not undo
    (test runs and shared hosts set it to keep processes from oversubscribing the cores)."""
    if environ.get(THREADS_ENV):
        return environ[THREADS_ENV]
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    return omp if omp.isdigit() and int(omp) > 0 else None


def apply_thread_policy(concurrency: int = 1, override: int | str | None = None) -> int:
    """``torch.set_num_threads(thread_count(concurrency, override))``; returns the count.
    Call it once per compute process, before its first forward pass."""
    threads = thread_count(concurrency, override)
    torch.set_num_threads(threads)
    return threads

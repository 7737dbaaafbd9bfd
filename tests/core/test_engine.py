"""The engine's memory format, transfers and thread policy (core.engine), and proof that a model
put in channels_last for CAM still damages, retrains and saves exactly as before."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from core.cam import CAM_METHODS
from core.checkpoint import load_model, save_checkpoint
from core.checkpoint_meta import CheckpointMeta
from core.damage import apply_damage, hold_damage
from core.damage_spec import BitFlip, DamageSpec
from core.engine import (
    THREADS_ENV,
    apply_thread_policy,
    autocast_dtype,
    available_cores,
    env_threads,
    is_channels_last,
    prepare_for_inference,
    thread_count,
    to_device,
    to_host,
    wants_pinned_memory,
)
from core.exceptions import InputError
from core.explain import queue_cam_batches
from core.models import build_model
from core.preprocessing import Preprocessing

CLASSES = ["a", "b", "c"]


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES))


def params_4d(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.ndim == 4]


# --------------------------------------------------------------------------- memory format


def test_prepare_converts_in_place_and_keeps_parameters_and_values(model: nn.Module) -> None:
    model.get_submodule("layer2").train(False)  # a mixed train/eval state must survive
    flags = [m.training for m in model.modules()]
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    assert not is_channels_last(model)

    assert prepare_for_inference(model) is model
    assert is_channels_last(model)
    assert [m.training for m in model.modules()] == flags
    for name, p in model.named_parameters():
        param, value = before[name]
        assert p is param  # optimizers, hooks and damage masks hold these objects
        assert torch.equal(p, value)
    # Idempotent, and a no-op the second time: no tensor is reallocated.
    pointers = [p.data_ptr() for p in params_4d(model)]
    prepare_for_inference(model)
    assert [p.data_ptr() for p in params_4d(model)] == pointers
    prepare_for_inference(model, "cpu")
    assert is_channels_last(model)


def test_damage_on_a_channels_last_model_is_the_same_damage(model: nn.Module) -> None:
    nhwc = prepare_for_inference(copy.deepcopy(model))
    for fault in (None, BitFlip(bits=[30])):
        spec = DamageSpec(targets=["D2", "D4"], fraction=0.3, seed=3)
        if fault is not None:
            spec = spec.model_copy(update={"fault": fault})
        plain, last = apply_damage(model, spec), apply_damage(nhwc, spec)
        assert plain.masks.keys() == last.masks.keys()
        for name, mask in plain.masks.items():
            assert torch.equal(last.masks[name], mask)
            assert torch.equal(nhwc.get_parameter(name), model.get_parameter(name))
        assert last.verify().ok
        last.restore()
        plain.restore()
        assert is_channels_last(nhwc)
        for (_, a), (_, b) in zip(model.named_parameters(), nhwc.named_parameters(), strict=True):
            assert torch.equal(a, b)


def test_masked_retraining_on_a_channels_last_model(model: nn.Module) -> None:
    # float64: a random network in train mode (batch-norm over 6 images) amplifies the float32
    # rounding differences of NHWC and NCHW kernels (they sum in another order, and differently
    # with 1 or 2 threads) far beyond any tolerance; in float64 they stay at ~1e-12.
    model = model.double()
    nhwc = prepare_for_inference(copy.deepcopy(model))
    spec = DamageSpec(targets=["D1", "D3"], fraction=0.5, seed=1)
    x = torch.randn(6, 3, 48, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    updated = []
    for net in (model, nhwc):
        damage = apply_damage(net, spec)
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        with hold_damage(net, damage.masks, optimizer):
            for _ in range(3):
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                optimizer.step()
        assert damage.verify().ok  # every damaged weight still exactly at its fault value
        updated.append(dict(net.named_parameters()))
    for name, param in updated[0].items():
        torch.testing.assert_close(updated[1][name], param, rtol=1e-7, atol=1e-9)
    assert is_channels_last(nhwc)  # the optimizer kept the layout


def test_checkpoint_of_a_channels_last_model_round_trips(model: nn.Module, tmp_path: Path) -> None:
    meta = CheckpointMeta(arch="resnet18", classes=CLASSES, preprocessing=Preprocessing())
    model.eval()
    save_checkpoint(tmp_path / "plain.safetensors", model, meta)
    save_checkpoint(tmp_path / "nhwc.safetensors", prepare_for_inference(model), meta)
    plain, _ = load_model(tmp_path / "plain.safetensors")
    loaded, _ = load_model(tmp_path / "nhwc.safetensors")
    assert not is_channels_last(loaded)  # files hold plain row-major tensors
    for (name, a), (_, b) in zip(
        plain.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------- transfers


def test_pinned_memory_only_for_cuda() -> None:
    assert wants_pinned_memory("cuda")
    assert wants_pinned_memory(torch.device("cuda", 1))
    assert not wants_pinned_memory("cpu")
    images = [torch.randn(3, 8, 10) for _ in range(3)]
    batch = to_device(images, "cpu")
    assert not batch.is_pinned()
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images))
    (back,) = to_host([batch])
    assert torch.equal(back, batch)


def test_precision_rules_per_device() -> None:
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(InputError) as info:
        autocast_dtype("fp16", "cpu")
    assert info.value.field == "precision"
    with pytest.raises(InputError) as info:
        autocast_dtype("float16", "cpu")
    assert info.value.field == "precision"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["cam", "gradcam"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_batch_loop_never_synchronizes(model: nn.Module, method: str, precision: str) -> None:
    model = prepare_for_inference(model.eval(), "cuda")
    extractor = CAM_METHODS.get(method)(model, "layer4", "fc")
    chunks = [[torch.randn(3, 64, 64) for _ in range(4)] for _ in range(3)]
    device = torch.device("cuda")
    queue_cam_batches(extractor, chunks[:1], total=4, device=device)  # warm-up: cuDNN, allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for classes in (None, [0, 2]):
            queued = queue_cam_batches(
                extractor, chunks, total=12, device=device, classes=classes, precision=precision
            )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    (maps,) = to_host([queued.maps])
    assert maps.shape == (12, 2, 2, 2)
    assert maps.dtype == torch.float32


# --------------------------------------------------------------------------- threads


def test_thread_count_shares_the_cores_this_process_may_use() -> None:
    cores = len(os.sched_getaffinity(0))
    assert available_cores() == cores
    assert thread_count() == cores
    assert thread_count(concurrency=cores) == 1
    assert thread_count(concurrency=cores * 4) == 1  # never 0
    assert thread_count(concurrency=4, override=3) == 3
    assert thread_count(override="5") == 5  # as read from CAMRES_THREADS
    assert thread_count(override="") == cores  # an empty variable is no override
    for bad in (0, -1, "many", True):
        with pytest.raises(InputError) as info:
            thread_count(override=bad)
        assert info.value.field == "threads"
    with pytest.raises(InputError) as info:
        thread_count(concurrency=0)
    assert info.value.field == "concurrency"
    assert THREADS_ENV == "CAMRES_THREADS"


def test_apply_thread_policy_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert apply_thread_policy(override=1) == 1
        assert torch.get_num_threads() == 1
        assert apply_thread_policy() == available_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_an_operators_thread_setting_wins_over_the_policy() -> None:
    assert env_threads({}) is None
    assert env_threads({"OMP_NUM_THREADS": "1"}) == "1"
    assert env_threads({"OMP_NUM_THREADS": "4,2"}) is None  # nested form: not a count
    assert env_threads({"OMP_NUM_THREADS": "0"}) is None
    assert env_threads({"CAMRES_THREADS": "3", "OMP_NUM_THREADS": "1"}) == "3"

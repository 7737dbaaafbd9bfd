"""Checkpoints: round trip, the torch-free header reader, and everything that must be refused —
pickles (without ever running them), foreign and damaged files, metadata that lies."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from core.checkpoint import (
    check_weights,
    import_state_dict,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from core.checkpoint_meta import (
    MASK_PREFIX,
    META_KEY,
    CheckpointMeta,
    LineageStep,
    bytes_digest,
    file_digest,
    read_header,
    read_meta,
)
from core.damage_spec import DamageSpec
from core.exceptions import CheckpointError
from core.models import build_model
from core.preprocessing import Preprocessing

CLASSES = ["airplane", "beach", "forest"]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES)).eval()


@pytest.fixture
def meta() -> CheckpointMeta:
    return CheckpointMeta(
        arch="resnet18",
        classes=CLASSES,
        preprocessing=Preprocessing(input_size=96),
        provenance={"dataset": "ucm", "notes": "test"},
        lineage=[
            LineageStep(op="train", params={"epochs": 1}),
            LineageStep(
                op="damage",
                parent_digest="sha256:" + "ab" * 32,
                params={"spec": DamageSpec(fraction=0.5).model_dump()},
            ),
        ],
        damage=DamageSpec(targets=["D1"], fraction=0.5),
    )


@pytest.fixture
def saved(tmp_path: Path, model: nn.Module, meta: CheckpointMeta) -> Path:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, meta, damage_masks=_masks(model))
    return path


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    return {
        name: torch.rand(params[name].shape, generator=generator) < 0.5
        for name in ("layer1.0.conv1.weight", "layer1.1.conv1.weight")
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: Mapping[str, object]) -> Path:
    """A safetensors file with arbitrary camres metadata (what save_checkpoint refuses to do)."""
    safetensors.torch.save_file(tensors, path, metadata={META_KEY: json.dumps(meta)})
    return path


class _Marker:
    """Unpickling this creates ``path``: proof that a loader ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_is_bit_identical(saved: Path, model: nn.Module, meta: CheckpointMeta) -> None:
    ckpt = load_checkpoint(saved)
    original = model.state_dict()
    assert ckpt.state_dict.keys() == original.keys()
    for name, tensor in original.items():
        assert ckpt.state_dict[name].dtype == tensor.dtype
        assert torch.equal(ckpt.state_dict[name], tensor), name
    expected_masks = _masks(model)
    assert ckpt.damage_masks.keys() == expected_masks.keys()
    for name, mask in expected_masks.items():
        assert ckpt.damage_masks[name].dtype == torch.bool
        assert torch.equal(ckpt.damage_masks[name], mask)
    assert ckpt.digest == file_digest(saved)
    assert ckpt.meta.has_damage_masks
    assert ckpt.meta.model_dump(exclude={"provenance", "has_damage_masks"}) == meta.model_dump(
        exclude={"provenance", "has_damage_masks"}
    )


def test_provenance_is_kept_and_completed(saved: Path) -> None:
    provenance = read_meta(saved).provenance
    assert provenance["dataset"] == "ucm"
    assert provenance["notes"] == "test"
    assert provenance["torch_version"] == torch.__version__
    assert {"created_at", "camres_version", "torchvision_version"} <= provenance.keys()


def test_read_meta_is_the_same_from_bytes_and_path(saved: Path) -> None:
    data = saved.read_bytes()
    assert read_meta(data) == read_meta(saved)
    assert bytes_digest(data) == file_digest(saved)
    assert load_checkpoint(data).meta == read_meta(saved)


def test_load_model_reproduces_the_outputs(saved: Path, model: nn.Module) -> None:
    loaded, ckpt = load_model(saved)
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # The model owns its weights: editing them leaves the checkpoint's tensors alone.
    weight = loaded.get_parameter("conv1.weight")
    with torch.no_grad():
        weight.zero_()
    assert ckpt.state_dict["conv1.weight"].abs().sum() > 0
    assert weight.requires_grad


def test_a_checkpoint_without_masks(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "plain.safetensors"
    digest = save_checkpoint(path, model, CheckpointMeta(arch="resnet18", classes=CLASSES))
    assert digest == file_digest(path)
    ckpt = load_checkpoint(path)
    assert ckpt.damage_masks == {}
    assert not ckpt.meta.has_damage_masks
    assert ckpt.meta.damage is None


def test_saving_overwrites_atomically(
    tmp_path: Path, model: nn.Module, meta: CheckpointMeta
) -> None:
    path = tmp_path / "m.safetensors"
    first = save_checkpoint(path, model, meta)
    second = save_checkpoint(path, model, meta.model_copy(update={"classes": ["a", "b", "c"]}))
    assert first != second
    assert read_meta(path).classes == ["a", "b", "c"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left over


def test_half_precision_weights_load_as_float32(tmp_path: Path, model: nn.Module) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = _write(tmp_path / "half.safetensors", state, {"arch": "resnet18", "classes": CLASSES})
    loaded, _ = load_model(path)
    assert loaded.get_parameter("conv1.weight").dtype == torch.float32


# --- refusing pickles without running them ---------------------------------------------------


def _pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": _Marker(marker)}))
    return path


def _torch_save_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "payload": _Marker(marker)}, path)
    return path


@pytest.mark.parametrize("make", [_pickle_file, _torch_save_file])
@pytest.mark.parametrize("loader", [read_meta, load_checkpoint, load_model])
def test_pickles_are_refused_and_never_run(tmp_path: Path, make: object, loader: object) -> None:
    marker = tmp_path / "pwned"
    path = make(tmp_path / "model.pt", marker)  # type: ignore[operator]
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickle") as info:
        loader(path)  # type: ignore[operator]
    assert "only safetensors checkpoints are accepted" in str(info.value)
    assert info.value.field == "checkpoint"
    with pytest.raises(CheckpointError):
        read_meta(path.read_bytes())
    assert not marker.exists()


def test_import_state_dict_refuses_code_but_reads_plain_state_dicts(
    tmp_path: Path, model: nn.Module
) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="cannot import"):
        import_state_dict(_torch_save_file(tmp_path / "evil.pt", marker))
    assert not marker.exists()

    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "plain.pth")
    state = import_state_dict(tmp_path / "plain.pth")
    assert state.keys() == model.state_dict().keys()
    assert torch.equal(state["fc.weight"], model.state_dict()["fc.weight"])
    check_weights("resnet18", len(CLASSES), state)

    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a name"):
        import_state_dict(tmp_path / "list.pt")


# --- foreign, truncated and malformed files --------------------------------------------------


def _zip(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("weights.bin", b"\0" * 16)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "shorter than the 8-byte"),
        (b"\x01\x02", "shorter than the 8-byte"),
        (bytes(range(256)) * 4, "header length"),
        (struct.pack("<Q", 10) + b"not json!!", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (b"\x1f\x8b\x08\x00" + b"\0" * 20, "gzip"),
    ],
)
def test_foreign_bytes_are_described(content: bytes, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        read_meta(content)


def test_a_deeply_nested_header_is_refused() -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(CheckpointError, match="not JSON"):
        read_meta(struct.pack("<Q", len(nested)) + nested)


def test_a_zip_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="zip archive"):
        read_meta(_zip(tmp_path / "a.zip"))


@pytest.mark.parametrize("keep", [0.5, 0.999, 20 / 1_000_000])
def test_truncated_checkpoints_are_refused(saved: Path, tmp_path: Path, keep: float) -> None:
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: max(9, int(len(data) * keep))])
    for loader in (read_meta, load_checkpoint):
        with pytest.raises(CheckpointError, match="truncated"):
            loader(cut)


def test_a_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "nope.safetensors")


def _raw(header: dict[str, object], data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


@pytest.mark.parametrize(
    ("entry", "data", "reason"),
    [
        ({"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}, b"\0", "unsupported dtype"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, b"\0" * 4, "invalid shape"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, b"\0" * 4, "spans 4 bytes"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}, b"\0" * 8, "starts at byte 4"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, b"\0" * 8, "the file has 8"),
        ({"dtype": "F32", "shape": [1]}, b"", "exactly dtype, shape and data_offsets"),
    ],
)
def test_malformed_headers_are_refused(entry: dict[str, object], data: bytes, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        read_header(_raw({"w": entry}, data))


def test_overlapping_tensors_are_refused() -> None:
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    with pytest.raises(CheckpointError, match="overlapping"):
        read_header(_raw({"a": entry, "b": entry}, b"\0" * 4))


def test_non_string_metadata_is_refused() -> None:
    with pytest.raises(CheckpointError, match="strings to strings"):
        read_header(_raw({"__metadata__": {"camres": {"arch": "resnet18"}}}))


def test_a_plain_safetensors_file_is_not_a_camres_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, path)
    assert read_header(path).tensors["w"].shape == (3,)
    with pytest.raises(CheckpointError, match="without camres metadata"):
        read_meta(path)


# --- metadata that contradicts the weights ---------------------------------------------------


def _state(arch: str, num_classes: int) -> dict[str, torch.Tensor]:
    return build_model(arch, num_classes).state_dict()


def test_class_count_contradicting_the_head(tmp_path: Path) -> None:
    classes = [f"c{i}" for i in range(10)]
    path = _write(
        tmp_path / "c.safetensors", _state("resnet18", 14), {"arch": "resnet18", "classes": classes}
    )
    read_meta(path)  # the header alone is well-formed
    with pytest.raises(
        CheckpointError, match=r"fc\.weight has 14 outputs but the metadata lists 10"
    ) as info:
        load_model(path)
    assert info.value.field == "classes"


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    meta = {"arch": "resnet50", "classes": CLASSES}
    path = _write(tmp_path / "a.safetensors", _state("resnet18", 3), meta)
    with pytest.raises(CheckpointError, match="not a resnet50 with 3 classes") as info:
        load_model(path)
    assert "missing" in str(info.value)
    assert info.value.field == "arch"


def test_an_unknown_architecture(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "u.safetensors", {"w": torch.zeros(1)}, {"arch": "lenet", "classes": CLASSES}
    )
    with pytest.raises(CheckpointError, match=r"unknown architecture 'lenet'; known: .*resnet50"):
        load_model(path)


def test_saving_refuses_a_model_that_is_not_the_meta_arch(tmp_path: Path, model: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="not a resnet34"):
        save_checkpoint(
            tmp_path / "x.safetensors", model, CheckpointMeta(arch="resnet34", classes=CLASSES)
        )
    with pytest.raises(CheckpointError, match="4 classes"):
        save_checkpoint(
            tmp_path / "x.safetensors",
            model,
            CheckpointMeta(arch="resnet18", classes=[*CLASSES, "x"]),
        )
    assert not list(tmp_path.iterdir())


def test_masks_must_match_parameters(
    tmp_path: Path, model: nn.Module, meta: CheckpointMeta
) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="unknown tensor") as info:
        save_checkpoint(
            path, model, meta, damage_masks={"nope.weight": torch.zeros(1, dtype=torch.bool)}
        )
    assert info.value.field == "damage_masks"
    with pytest.raises(CheckpointError, match="bool tensor"):
        save_checkpoint(path, model, meta, damage_masks={"conv1.weight": torch.rand(64, 3, 7, 7)})
    with pytest.raises(CheckpointError, match="shape"):
        save_checkpoint(
            path, model, meta, damage_masks={"conv1.weight": torch.zeros(3, dtype=torch.bool)}
        )


def test_mask_flag_must_agree_with_the_tensors(tmp_path: Path, model: nn.Module) -> None:
    state = model.state_dict()
    masked = {
        **state,
        MASK_PREFIX + "conv1.weight": torch.ones_like(state["conv1.weight"], dtype=torch.bool),
    }
    base = {"arch": "resnet18", "classes": CLASSES}
    with pytest.raises(CheckpointError, match="has damage masks but has_damage_masks is False"):
        read_meta(_write(tmp_path / "a.safetensors", masked, base))
    with pytest.raises(CheckpointError, match="has no damage masks"):
        read_meta(_write(tmp_path / "b.safetensors", state, {**base, "has_damage_masks": True}))
    stray = {**state, MASK_PREFIX + "nope": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(CheckpointError, match="matches no tensor"):
        read_meta(_write(tmp_path / "c.safetensors", stray, {**base, "has_damage_masks": True}))


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"arch": "resnet18", "classes": CLASSES, "format_version": 2}, "format_version"),
        ({"arch": "resnet18", "classes": ["a", "a"]}, "unique"),
        ({"arch": "resnet18", "classes": []}, "classes"),
        ({"arch": "resnet18", "classes": CLASSES, "colour": "red"}, "colour"),
        ({"arch": "resnet18", "classes": CLASSES, "damage": {"fraction": 2}}, "damage.fraction"),
    ],
)
def test_invalid_metadata_is_refused(tmp_path: Path, meta: dict[str, object], reason: str) -> None:
    path = _write(tmp_path / "m.safetensors", {"w": torch.zeros(1)}, meta)
    with pytest.raises(CheckpointError, match=reason):
        read_meta(path)


def test_lineage_digest_format_is_checked() -> None:
    with pytest.raises(ValueError, match="sha256"):
        LineageStep(op="damage", parent_digest="md5:abc")


def test_checkpoint_meta_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, core.checkpoint_meta, core.preprocessing; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

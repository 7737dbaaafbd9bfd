from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.cam import Cam
from core.cam_options import CamOptions
from core.checkpoint_meta import CheckpointMeta
from core.engine import is_channels_last
from core.exceptions import (
    CancelledError,
    InputError,
    UnknownClassError,
    UnsupportedModelError,
)
from core.explain import Explanation, explain, safe_name, write_artifacts
from core.images import decode_image
from core.models import build_model
from core.preprocessing import Preprocessing
from core.progress import Progress
from core.render import read_map_png16
from core.results import ImageCam
from core.transforms import eval_transform

CLASSES = ["airplane", "baseballdiamond", "harbor", "storagetanks"]


@pytest.fixture(scope="module")
def meta() -> CheckpointMeta:
    return CheckpointMeta(
        arch="resnet18", classes=CLASSES, preprocessing=Preprocessing(input_size=64)
    )


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", len(CLASSES)).eval()


@pytest.fixture(scope="module")
def images(ucm_tif_dir: Path, ucm_dir: Path) -> list[tuple[str, Image.Image]]:
    tifs = [(p.name, decode_image(p)) for p in sorted(ucm_tif_dir.glob("*.tif"))[:2]]
    jpeg = decode_image(ucm_dir / "beach" / "beach00.jpg")
    # A non-square image of another size: maps and boxes must follow the original size.
    return [*tifs, ("wide beach.jpg", jpeg.resize((120, 70)))]


def test_explain_builds_a_consistent_result_per_image(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    explanations = explain(model, meta, images, CamOptions(top_k=2), batch_size=2)
    inputs = torch.stack([eval_transform(meta.preprocessing)(img) for _, img in images])
    with torch.no_grad():
        probabilities = model(inputs).softmax(1)
    assert [e.result.image for e in explanations] == [name for name, _ in images]
    for ex, (_, image), probs in zip(explanations, images, probabilities, strict=True):
        result = ex.result
        assert (result.width, result.height) == image.size
        assert [s.index for s in result.top_k] == probs.topk(2).indices.tolist()
        assert result.top_k[0].probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert result.prediction == result.top_k[0]
        assert [c.target for c in result.cams] == result.top_k
        assert [s.label for s in result.top_k] == [CLASSES[s.index] for s in result.top_k]
        for cam, norm, raw, mask in zip(result.cams, ex.maps, ex.raw_maps, ex.masks, strict=True):
            assert raw.shape == (2, 2)  # 64 px input, stride 32
            assert (cam.map_min, cam.map_max) == (float(raw.min()), float(raw.max()))
            assert norm.shape == mask.shape == (image.height, image.width)
            assert norm.dtype == np.float32
            assert norm.min() == 0.0
            assert norm.max() == pytest.approx(1.0)
            assert len(cam.boxes) == 1
            box = cam.boxes[0]
            assert 0 <= box.x0 < box.x1 <= image.width
            assert 0 <= box.y0 < box.y1 <= image.height
            assert mask.sum() == box.area
            assert mask[box.y0 : box.y1, box.x0 : box.x1].sum() == box.area


def test_batching_does_not_change_results(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    options = CamOptions(classes=["harbor", "airplane"])
    one = explain(model, meta, images, options, batch_size=1)
    many = explain(model, meta, images, options, batch_size=16)
    for a, b in zip(one, many, strict=True):
        assert [c.target.label for c in a.result.cams] == ["harbor", "airplane"]
        assert a.result.prediction.index == b.result.prediction.index
        for x, y in zip(a.raw_maps, b.raw_maps, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_explain_runs_channels_last_and_leaves_the_model_usable(
    meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    torch.manual_seed(1)
    net = build_model("resnet18", len(CLASSES)).eval()
    reference = copy.deepcopy(net)
    params = dict(net.named_parameters())
    options = CamOptions(top_k=2)
    got = explain(net, meta, images, options)
    assert is_channels_last(net)
    assert dict(net.named_parameters()) == params  # the same Parameter objects
    assert not any(m.training for m in net.modules())
    for name, p in reference.named_parameters():
        assert torch.equal(params[name], p)
    # The row-major model through the bare extractor gives the same answers.
    inputs = torch.stack([eval_transform(meta.preprocessing)(img) for _, img in images])
    want = Cam(reference, "layer4", "fc")(inputs, top_k=2)
    assert not is_channels_last(reference)
    for i, ex in enumerate(got):
        assert [c.target.index for c in ex.result.cams] == want.targets[i].tolist()
        for t, raw in enumerate(ex.raw_maps):
            np.testing.assert_allclose(raw, want.maps[i, t].numpy(), rtol=1e-4, atol=1e-4)


def test_bf16_explanations_track_fp32_on_real_images(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    # Every class named, so both runs explain the same classes whatever they predict.
    full = explain(model, meta, images, CamOptions(classes=CLASSES))
    low = explain(model, meta, images, CamOptions(classes=CLASSES, precision="bf16"))
    for a, b in zip(full, low, strict=True):
        for x, y in zip(a.raw_maps, b.raw_maps, strict=True):
            assert y.dtype == np.float32
            assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99
        for x, y in zip(a.maps, b.maps, strict=True):
            assert y.dtype == np.float32
            # Normalized maps, in [0, 1]: min-max stretches a weak map's rounding, so a mean.
            assert np.abs(x - y).mean() < 0.02


def test_gradcam_and_all_components(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    options = CamOptions(method="gradcam", har_all_components=True, har_threshold=0.5)
    (ex,) = explain(model, meta, images[:1], options)
    cam = ex.result.cams[0]
    assert cam.method == "gradcam"
    assert cam.threshold == 0.5
    assert cam.map_min >= 0.0  # Grad-CAM's own ReLU
    areas = [b.area for b in cam.boxes]
    assert areas == sorted(areas, reverse=True)
    assert ex.masks[0].sum() == sum(areas)


def test_errors_come_before_any_work(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(UnknownClassError) as info:
            explain(model, meta, images, CamOptions(classes=["harbor", "volcano"]))
        assert info.value.field == "classes"
        with pytest.raises(InputError) as info2:
            explain(model, meta, images, CamOptions(), batch_size=0)
        assert info2.value.field == "batch_size"
        with pytest.raises(InputError):
            explain(model, meta, [("", images[0][1])], CamOptions())
        with pytest.raises(InputError) as info3:  # fp16 autocast is offered on CUDA only
            explain(model, meta, images, CamOptions(precision="fp16"), device="cpu")
        assert info3.value.field == "precision"
    finally:
        handle.remove()
    assert calls == []


def test_cam_needs_a_gap_fc_head(images: list[tuple[str, Image.Image]]) -> None:
    meta = CheckpointMeta(arch="mobilenet_v3_small", classes=CLASSES)
    net = build_model("mobilenet_v3_small", len(CLASSES)).eval()
    with pytest.raises(UnsupportedModelError) as info:
        explain(net, meta, images, CamOptions(method="cam"))
    assert info.value.field == "method"


def test_progress_and_cancellation(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> None:
    seen: list[Progress] = []
    explain(model, meta, images, CamOptions(), batch_size=2, progress=seen.append)
    assert [p.fraction for p in seen] == [2 / 3, 1.0]
    assert {p.stage for p in seen} == {"cam"}
    with pytest.raises(CancelledError):
        explain(model, meta, images, CamOptions(), should_stop=lambda: True)


@pytest.fixture(scope="module")
def explained(
    model: nn.Module, meta: CheckpointMeta, images: list[tuple[str, Image.Image]]
) -> list[Explanation]:
    return explain(model, meta, images, CamOptions(top_k=2))


def test_write_artifacts_files_and_json(
    tmp_path: Path, explained: list[Explanation], images: list[tuple[str, Image.Image]]
) -> None:
    ex, image = explained[2], images[2][1]
    result = write_artifacts(ex, image, tmp_path, CamOptions(), prefix="intact_")
    stem = "intact_wide_beach"
    labels = [c.target.label for c in result.cams]
    expected = {f"{stem}.json"} | {
        f"{stem}_{label}_{kind}"
        for label in labels
        for kind in ("overlay.png", "map.npy", "map16.png", "mask.png")
    }
    assert {p.name for p in tmp_path.iterdir()} == expected
    on_disk = ImageCam.model_validate_json((tmp_path / f"{stem}.json").read_text())
    assert on_disk == result
    assert result.model_copy(update={"cams": ex.result.cams}) == ex.result
    for cam, norm, raw in zip(result.cams, ex.maps, ex.raw_maps, strict=True):
        files = cam.artifacts
        assert set(files) == {"overlay", "map_npy", "map_png16", "mask"}
        with Image.open(tmp_path / files["overlay"]) as overlay:
            assert overlay.size == image.size
            assert overlay.mode == "RGB"
        np.testing.assert_array_equal(np.load(tmp_path / files["map_npy"]), raw)
        assert np.abs(read_map_png16(tmp_path / files["map_png16"]) - norm).max() <= 1 / 65535


def test_write_artifacts_sanitizes_names(
    tmp_path: Path, explained: list[Explanation], images: list[tuple[str, Image.Image]]
) -> None:
    ex = explained[0]
    evil = ex.result.model_copy(update={"image": "../../etc/..passwd.tif"})
    out = tmp_path / "out"
    write_artifacts(
        Explanation(evil, ex.maps, ex.raw_maps, ex.masks),
        images[0][1],
        out,
        CamOptions(),
        prefix="../x/",
        write_mask=False,
    )
    assert [p.parent for p in tmp_path.rglob("*") if p.is_file()] == [out] * 7
    names = sorted(p.name for p in out.iterdir())
    assert all(".." not in n and not n.startswith(".") for n in names)
    assert "passwd.json" in names
    with pytest.raises(InputError) as info:
        write_artifacts(ex, images[2][1], out, CamOptions())
    assert info.value.field == "image"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("harbor00.tif", "harbor00.tif"),
        ("../../a b/c.jpg", "c.jpg"),
        ("C:\\Users\\x\\scene 1.png", "scene_1.png"),
        ("..", "fallback"),
        ("...hidden", "hidden"),
        ("a..b", "a.b"),
        ("plage été", "plage_t_"),
        ("x" * 200, "x" * 80),
    ],
)
def test_safe_name(text: str, expected: str) -> None:
    assert safe_name(text, default="fallback") == expected

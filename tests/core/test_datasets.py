"""Dataset folders (the real UCM and AID copies, UCM's original layout rebuilt from its real
TIFFs), stratified splits, and the UCM↔AID class mapping."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from core.datasets import (
    ClassMapping,
    ImageDataset,
    ImageFolder,
    Sample,
    stratified_split,
)
from core.exceptions import DatasetError, ImageDecodeError, InputError, UnknownClassError
from core.preprocessing import Preprocessing
from core.transforms import eval_transform

# --- folders ---------------------------------------------------------------------------------


def test_real_ucm_copy(ucm_dir: Path) -> None:
    folder = ImageFolder.from_path(ucm_dir)
    assert folder.layout == "class-folders"
    assert len(folder.classes) == 21
    assert folder.classes == sorted(folder.classes)
    assert len(folder) == 2100
    assert set(folder.class_counts().values()) == {100}
    for sample in folder.samples[::250]:
        assert sample.path.parent.name == folder.classes[sample.label]
    labels = [s.label for s in folder.samples]
    assert labels == sorted(labels)


def test_real_aid_copy(aid_dir: Path) -> None:
    folder = ImageFolder.from_path(aid_dir)
    assert len(folder.classes) == 15
    assert "Bridge" in folder.classes
    assert set(folder.class_counts().values()) == {8}


def test_dataset_items_are_tensors_and_labels(ucm_dir: Path) -> None:
    folder = ImageFolder.from_path(ucm_dir)
    dataset = ImageDataset(folder.samples, eval_transform(Preprocessing(input_size=64)))
    assert len(dataset) == 2100
    for index in (0, 1234):
        tensor, label = dataset[index]
        assert tensor.shape == (3, 64, 64)
        assert tensor.dtype == torch.float32
        assert label == folder.samples[index].label
    assert dataset.targets[1234] == folder.samples[1234].label


@pytest.fixture
def ucm_original(tmp_path: Path, ucm_tif_dir: Path) -> Path:
    """UC Merced as distributed (``UCMerced_LandUse/Images/<class>/*.tif``), from the real TIFFs."""
    images = tmp_path / "UCMerced_LandUse" / "Images"
    for tif in sorted(ucm_tif_dir.glob("*.tif")):
        (images / tif.stem.rstrip("0123456789")).mkdir(parents=True)
        shutil.copy(tif, images / tif.stem.rstrip("0123456789") / tif.name)
    return tmp_path / "UCMerced_LandUse"


def test_ucm_original_layout(ucm_original: Path) -> None:
    folder = ImageFolder.from_path(ucm_original)
    assert folder.layout == "ucm"
    assert folder.root == ucm_original / "Images"
    assert folder.classes == ["airplane", "baseballdiamond", "harbor", "storagetanks"]
    tensor, label = ImageDataset(folder.samples, eval_transform(Preprocessing(input_size=32)))[2]
    assert tensor.shape == (3, 32, 32)
    assert folder.classes[label] == "harbor"


def test_a_wrapper_folder_is_looked_through(ucm_original: Path) -> None:
    folder = ImageFolder.from_path(ucm_original.parent)  # the archive's extraction folder
    assert folder.layout == "ucm"
    assert len(folder.classes) == 4


def test_explicit_classes_fix_order_and_subset(ucm_dir: Path) -> None:
    folder = ImageFolder.from_path(ucm_dir, classes=["river", "airplane"])
    assert folder.classes == ["river", "airplane"]
    assert len(folder) == 200
    assert {s.path.parent.name for s in folder.samples if s.label == 0} == {"river"}


def test_unknown_class_is_named(ucm_dir: Path) -> None:
    with pytest.raises(DatasetError, match="'volcano'") as info:
        ImageFolder.from_path(ucm_dir, classes=["river", "volcano"])
    assert info.value.field == "classes"
    assert "airplane" in str(info.value)  # what is available
    with pytest.raises(DatasetError, match="repeat"):
        ImageFolder.from_path(ucm_dir, classes=["river", "river"])
    with pytest.raises(DatasetError, match="at least 2"):
        ImageFolder.from_path(ucm_dir, classes=["river"])


def _tree(root: Path, layout: dict[str, list[str]], source: Path) -> Path:
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(source, root / cls / name)
    return root


@pytest.fixture
def jpeg(ucm_dir: Path) -> Path:
    return ucm_dir / "forest" / "forest00.jpg"


def test_bad_folders_are_refused(tmp_path: Path, jpeg: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder.from_path(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolder.from_path(tmp_path / "empty")
    one = _tree(tmp_path / "one", {"forest": ["a.jpg", "b.jpg"]}, jpeg)
    with pytest.raises(DatasetError, match="at least 2"):
        ImageFolder.from_path(one)
    hollow = _tree(tmp_path / "hollow", {"forest": ["a.jpg"], "beach": ["notes.txt"]}, jpeg)
    with pytest.raises(DatasetError, match=r"beach.*contains no images"):
        ImageFolder.from_path(hollow)


def test_extensions_hidden_files_and_stray_files(tmp_path: Path, jpeg: Path) -> None:
    root = _tree(
        tmp_path / "ds",
        {
            "a": ["x.JPG", "y.jpeg", "z.png", ".hidden.jpg", "readme.txt"],
            "b": ["t.TIF", "u.tiff"],
            ".cache": ["w.jpg"],
            "__MACOSX": ["v.jpg"],
        },
        jpeg,
    )
    shutil.copy(jpeg, root / "stray.jpg")  # files next to class folders are not a class
    folder = ImageFolder.from_path(root)
    assert folder.classes == ["a", "b"]
    assert sorted(s.path.name for s in folder.samples) == [
        "t.TIF",
        "u.tiff",
        "x.JPG",
        "y.jpeg",
        "z.png",
    ]


def test_undecodable_file_raises_with_its_path(tmp_path: Path, jpeg: Path) -> None:
    root = _tree(tmp_path / "ds", {"a": ["ok.jpg"], "b": ["broken.jpg"]}, jpeg)
    (root / "b" / "broken.jpg").write_bytes(jpeg.read_bytes()[:3000])
    dataset = ImageDataset(
        ImageFolder.from_path(root).samples, eval_transform(Preprocessing(input_size=32))
    )
    assert dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match=str(root / "b" / "broken.jpg")):
        dataset[1]


# --- splits ----------------------------------------------------------------------------------


def _samples(counts: dict[int, int]) -> list[Sample]:
    return [
        Sample(Path(f"c{label}/{i:03d}.jpg"), label)
        for label, n in counts.items()
        for i in range(n)
    ]


def test_split_is_disjoint_complete_and_stratified(ucm_dir: Path) -> None:
    samples = ImageFolder.from_path(ucm_dir).samples
    split = stratified_split(samples, val=0.15, test=0.15, seed=7)
    parts = [split.train, split.val, split.test]
    paths = [{s.path for s in part} for part in parts]
    assert sum(len(p) for p in paths) == len(samples)
    assert set.union(*paths) == {s.path for s in samples}
    assert not paths[0] & paths[1]
    assert not paths[0] & paths[2]
    assert not paths[1] & paths[2]
    for part, per_class in zip(parts, (70, 15, 15), strict=True):
        assert set(Counter(s.label for s in part).values()) == {per_class}


def test_split_is_reproducible_and_seeded() -> None:
    samples = _samples({0: 40, 1: 40, 2: 40})
    first = stratified_split(samples, 0.2, 0.2, seed=1)
    assert stratified_split(samples, 0.2, 0.2, seed=1) == first
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert stratified_split(shuffled, 0.2, 0.2, seed=1) == first  # input order is irrelevant
    assert stratified_split(samples, 0.2, 0.2, seed=2).val != first.val


def test_adding_a_class_does_not_reshuffle_the_others() -> None:
    before = stratified_split(_samples({0: 30, 1: 30}), 0.2, 0.2, seed=3)
    after = stratified_split(_samples({0: 30, 1: 30, 2: 30}), 0.2, 0.2, seed=3)
    assert [s for s in after.test if s.label < 2] == before.test


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (3, 0.1, 0.1, (1, 1, 1)),  # small classes still appear in every split
        (10, 0.05, 0.05, (8, 1, 1)),
        (2, 0.3, 0.3, (1, 1, 0)),  # too small for all three: training keeps one
        (1, 0.3, 0.3, (1, 0, 0)),
        (10, 0.0, 0.2, (8, 0, 2)),
        (20, 0.5, 0.45, (1, 10, 9)),
        (100, 0.15, 0.15, (70, 15, 15)),
    ],
)
def test_split_sizes_per_class(
    n: int, val: float, test: float, expected: tuple[int, int, int]
) -> None:
    split = stratified_split(_samples({0: n}), val, test, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == expected


@pytest.mark.parametrize(
    ("val", "test", "field"), [(-0.1, 0.1, "val"), (0.1, 1.0, "test"), (0.5, 0.5, "test")]
)
def test_split_fractions_are_validated(val: float, test: float, field: str) -> None:
    with pytest.raises(InputError) as info:
        stratified_split(_samples({0: 10, 1: 10}), val, test)
    assert info.value.field == field


def test_splitting_nothing_is_an_error() -> None:
    with pytest.raises(DatasetError):
        stratified_split([], 0.1, 0.1)


# --- class mapping ---------------------------------------------------------------------------


@pytest.fixture
def mapping(class_mapping_file: Path) -> ClassMapping:
    return ClassMapping.load(class_mapping_file)


def test_mapping_both_ways(mapping: ClassMapping) -> None:
    assert len(mapping.ucm_to_aid) == 14
    assert mapping.to_aid("harbor") == "Port"
    assert mapping.to_ucm("Port") == "harbor"
    assert mapping.unseen_ucm == ("intersection",)
    assert mapping.unseen_aid == ("Bridge",)
    for ucm, aid in mapping.ucm_to_aid.items():
        assert mapping.to_ucm(mapping.to_aid(ucm)) == ucm
        assert mapping.aid_to_ucm[aid] == ucm
    with pytest.raises(UnknownClassError, match="intersection") as info:
        mapping.to_aid("intersection")
    assert info.value.field == "classes"
    with pytest.raises(UnknownClassError):
        mapping.to_ucm("Bridge")


def test_mapping_names_exist_in_the_real_datasets(
    mapping: ClassMapping, ucm_dir: Path, aid_dir: Path
) -> None:
    ucm = ImageFolder.from_path(ucm_dir).classes
    aid = ImageFolder.from_path(aid_dir).classes
    assert set(mapping.ucm_to_aid) | set(mapping.unseen_ucm) <= set(ucm)
    assert set(mapping.ucm_to_aid.values()) | set(mapping.unseen_aid) <= set(aid)


def test_align_aid_to_a_ucm_model(mapping: ClassMapping, aid_dir: Path) -> None:
    """Evaluate a UCM model on AID: AID images get the model's labels; Bridge is dropped."""
    model_classes = [*sorted(mapping.ucm_to_aid), "intersection"]
    aligned = mapping.align(ImageFolder.from_path(aid_dir), model_classes)
    assert aligned.classes == model_classes
    assert len(aligned) == 14 * 8
    for sample in aligned.samples:
        assert mapping.to_ucm(sample.path.parent.name) == model_classes[sample.label]
    assert aligned.class_counts()["intersection"] == 0


def test_align_keeps_same_named_classes(mapping: ClassMapping, ucm_dir: Path) -> None:
    folder = ImageFolder.from_path(ucm_dir, classes=["harbor", "intersection"])
    aligned = mapping.align(folder, ["intersection", "harbor", "forest"])
    assert aligned.class_counts() == {"intersection": 100, "harbor": 100, "forest": 0}
    with pytest.raises(DatasetError, match="corresponds"):
        mapping.align(folder, ["Bridge", "Forest"])


def test_bad_mapping_files(tmp_path: Path) -> None:
    for content in (
        "not json",
        '{"unseen": {}}',
        '{"ucm_to_aid": {"a": 1}}',
        '{"ucm_to_aid": {"a": "X", "b": "X"}}',
    ):
        path = tmp_path / "m.json"
        path.write_text(content)
        with pytest.raises(DatasetError) as info:
            ClassMapping.load(path)
        assert info.value.field == "class_mapping"

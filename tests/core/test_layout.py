"""Dataset layout discovery without torch: the UCM and class-folder layouts on real images."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from core.exceptions import DatasetError
from core.layout import IMAGE_EXTENSIONS, ImageFolder, Sample, is_image

REPO_ROOT = Path(__file__).resolve().parents[2]


def copy_classes(ucm_dir: Path, dest: Path, classes: list[str], per_class: int) -> None:
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        for path in sorted((ucm_dir / cls).glob("*.jpg"))[:per_class]:
            shutil.copyfile(path, dest / cls / path.name)


def test_class_folders_in_a_wrapper(tmp_path: Path, ucm_dir: Path) -> None:
    copy_classes(ucm_dir, tmp_path / "top", ["beach", "airplane"], 2)
    (tmp_path / "top" / "beach" / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "top" / "beach" / "notes.txt").write_text("not an image")
    (tmp_path / "top" / "__MACOSX").mkdir()
    folder = ImageFolder.from_path(tmp_path)
    assert folder.layout == "class-folders"
    assert folder.root == tmp_path / "top"
    assert folder.classes == ["airplane", "beach"]
    assert folder.class_counts() == {"airplane": 2, "beach": 2}
    assert [s.label for s in folder.samples] == [0, 0, 1, 1]
    assert all(s.path.suffix == ".jpg" for s in folder.samples)


def test_the_distributed_ucm_layout(tmp_path: Path, ucm_tif_dir: Path) -> None:
    tifs = sorted(ucm_tif_dir.glob("*.tif"))[:2]
    for index, path in enumerate(tifs):
        (tmp_path / "UCMerced_LandUse" / "Images" / f"c{index}").mkdir(parents=True)
        shutil.copyfile(path, tmp_path / "UCMerced_LandUse" / "Images" / f"c{index}" / path.name)
    folder = ImageFolder.from_path(tmp_path)
    assert folder.layout == "ucm"
    assert folder.root == tmp_path / "UCMerced_LandUse" / "Images"
    assert folder.samples == [
        Sample(folder.root / "c0" / tifs[0].name, 0),
        Sample(folder.root / "c1" / tifs[1].name, 1),
    ]


def test_an_explicit_class_list_fixes_the_labels(tmp_path: Path, ucm_dir: Path) -> None:
    copy_classes(ucm_dir, tmp_path, ["beach", "airplane", "forest"], 1)
    folder = ImageFolder.from_path(tmp_path, classes=["forest", "beach"])
    assert folder.classes == ["forest", "beach"]
    assert [s.path.parent.name for s in folder.samples] == ["forest", "beach"]


def nothing(root: Path, ucm_dir: Path) -> None:
    """No class folder at all."""


def one_class(root: Path, ucm_dir: Path) -> None:
    copy_classes(ucm_dir, root, ["beach"], 1)


def an_empty_class(root: Path, ucm_dir: Path) -> None:
    copy_classes(ucm_dir, root, ["beach"], 1)
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("not an image")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (nothing, "no class folders"),
        (one_class, "at least 2"),
        (an_empty_class, "contains no images"),
    ],
)
def test_unusable_folders(
    tmp_path: Path, ucm_dir: Path, make: Callable[[Path, Path], None], message: str
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    make(root, ucm_dir)
    with pytest.raises(DatasetError, match=message) as info:
        ImageFolder.from_path(root)
    assert info.value.field == "root"


def test_a_missing_folder_and_an_unknown_class(tmp_path: Path, ucm_dir: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolder.from_path(tmp_path / "missing")
    copy_classes(ucm_dir, tmp_path / "d", ["beach", "forest"], 1)
    with pytest.raises(DatasetError, match="'moon'") as info:
        ImageFolder.from_path(tmp_path / "d", classes=["beach", "moon"])
    assert info.value.field == "classes"


def test_is_image_goes_by_extension_case_insensitively(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.tiff", "c.gif", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "e.jpg").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir() if is_image(p)) == ["a.JPG", "b.tiff", "d.png"]
    assert frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"}) == IMAGE_EXTENSIONS


def test_core_datasets_re_exports_the_layout_types() -> None:
    import core.datasets

    assert core.datasets.ImageFolder is ImageFolder
    assert core.datasets.Sample is Sample
    assert core.datasets.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS


def test_the_module_does_not_import_torch() -> None:
    script = "import sys, core.layout; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

"""The archive (melanoma.data.archive) and the synthetic demo set, built in tmp folders
from real HAM10000 images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from melanoma.data import archive as archive_module
from melanoma.data.archive import build_archive, open_archive, read_rows
from melanoma.data.preprocess import PreprocessParams, load_image
from melanoma.data.sources import read_dataset
from melanoma.data.synthetic import LOOKS, make_synthetic_dataset
from melanoma.errors import DataError

HEADER_KEYS = {"format_version", "source", "synthetic", "classes", "class_counts", "split_counts", "preprocess", "seed",
               "val_fraction", "test_fraction", "test_where", "n_images", "sha256", "versions", "created", "skipped"}
SPLIT_OPTIONS = {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, "test_where": None}
BUILD_OPTIONS = dict(workers=1, progress=False, **SPLIT_OPTIONS)


@pytest.fixture
def real_folder(ham_dir: Path, tmp_path: Path) -> Path:
    """Folder-per-class layout: 12 real images of each of mel, nv and bkl (symlinks),
    and one truncated JPEG among the nevi."""
    metadata = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    root = tmp_path / "folder"
    for dx in ("mel", "nv", "bkl"):
        (root / dx).mkdir(parents=True)
        for image_id in metadata.loc[metadata["dx"] == dx, "image_id"].iloc[:12]:
            source = next(ham_dir.glob(f"HAM10000_images_part_*/{image_id}.jpg"))
            (root / dx / source.name).symlink_to(source)
    data = next(ham_dir.glob("HAM10000_images_part_1/*.jpg")).read_bytes()
    (root / "nv" / "ISIC_0000000_truncated.jpg").write_bytes(data[: len(data) // 2])
    return root


@pytest.mark.realdata
def test_build_and_open(real_folder: Path, tmp_path: Path) -> None:
    params = PreprocessParams(image_size=48)
    dataset = read_dataset(real_folder)
    summary = build_archive(dataset, tmp_path / "archive", params, workers=2, progress=False, **SPLIT_OPTIONS)
    archive = open_archive(tmp_path / "archive", verify=True)

    assert HEADER_KEYS <= set(archive.header) and archive.header["source"] == "folder"
    assert not archive.header["synthetic"] and archive.header["preprocess"] == params.to_dict()
    assert archive.images.shape == (36, 48, 48, 3) and isinstance(archive.images, np.memmap)
    assert archive.header["class_counts"] == {"bkl": 12, "mel": 12, "nv": 12}
    assert list(archive.manifest.columns[:6]) == ["image_id", "label", "label_index", "group_id", "split", "path"]
    # Every row holds the image its manifest row names, also after the bad row was dropped.
    for row in archive.manifest.itertuples():
        assert np.array_equal(archive.images[row.Index], load_image(row.path, params))
        assert archive.classes[archive.labels[row.Index]] == row.label
    skipped = pd.read_csv(tmp_path / "archive" / "skipped.csv")
    assert skipped["path"].str.endswith("ISIC_0000000_truncated.jpg").tolist() == [True]
    assert "truncated" in skipped["reason"].iloc[0].lower()

    indices = np.concatenate([archive.indices(s) for s in ("train", "val", "test")])
    assert sorted(indices) == list(range(36))
    assert summary.counts.to_numpy().sum() == 36 and len(summary.skipped) == 1 and not summary.reused
    assert not (tmp_path / "archive.partial").exists()


@pytest.mark.realdata
def test_reuse_refuse_and_force(real_folder: Path, tmp_path: Path) -> None:
    dataset = read_dataset(real_folder)
    out = tmp_path / "archive"
    build_archive(dataset, out, PreprocessParams(image_size=32), workers=1, progress=False, **SPLIT_OPTIONS)
    created = json.loads((out / "header.json").read_text())["created"]
    again = build_archive(dataset, out, PreprocessParams(image_size=32), workers=1, progress=False, **SPLIT_OPTIONS)
    assert again.reused and again.n_images == 36
    with pytest.raises(DataError, match="other data or parameters") as error:
        build_archive(dataset, out, PreprocessParams(image_size=40), workers=1, progress=False, **SPLIT_OPTIONS)
    assert "--force" in error.value.hint
    build_archive(dataset, out, PreprocessParams(image_size=40), workers=1, progress=False, force=True, **SPLIT_OPTIONS)
    rebuilt = open_archive(out, verify=True)
    assert rebuilt.images.shape[1] == 40 and rebuilt.header["created"] >= created
    assert not (tmp_path / "archive.old").exists()


@pytest.mark.realdata
def test_open_archive_refuses_damaged_archives(small_ham_archive: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_ham_archive, copy)
    open_archive(copy, verify=True)

    with open(copy / "images.npy", "r+b") as images:  # one flipped byte in the pixels
        images.seek(-1, 2)
        last = images.read(1)
        images.seek(-1, 2)
        images.write(bytes([last[0] ^ 0xFF]))
    open_archive(copy)  # shapes still agree: only verify reads the pixels
    with pytest.raises(DataError, match="sha256 of images.npy differs"):
        open_archive(copy, verify=True)

    manifest = pd.read_csv(copy / "manifest.csv")
    manifest.iloc[:-1].to_csv(copy / "manifest.csv", index=False)
    with pytest.raises(DataError, match="manifest.csv has 398 rows, the header says 399"):
        open_archive(copy)

    (copy / "header.json").unlink()
    with pytest.raises(DataError, match="not a prepared archive"):
        open_archive(copy)
    (tmp_path / "copy.partial").mkdir()
    with pytest.raises(DataError, match="interrupted run") as error:
        open_archive(copy)
    assert "again" in error.value.hint


def _resident_bytes_of(path: Path) -> int:
    """How much of the file at ``path`` is mapped into this process's resident memory."""
    resident, in_file = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            in_file = fields[-1] == str(path)
        elif in_file and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


def test_read_rows_matches_indexing_without_keeping_pages(small_ham_archive: Path) -> None:
    archive = open_archive(small_ham_archive)
    rows = np.array([0, 7, 8, 150, len(archive.images) - 1])
    assert np.array_equal(read_rows(archive.images, rows), archive.images[rows])
    assert np.array_equal(read_rows(archive.images[5:], rows[:3]), archive.images[5:][rows[:3]])  # a slice of the map
    in_memory = np.asarray(archive.images[:10])
    assert np.array_equal(read_rows(in_memory, [3, 1]), in_memory[[3, 1]])
    assert read_rows(archive.images, []).shape == (0, *archive.images.shape[1:])
    with pytest.raises(IndexError, match="outside the archive"):
        read_rows(archive.images, [len(archive.images)])

    if Path("/proc/self/smaps").is_file():  # Linux: the file's pages stay out of this process
        images_file = (small_ham_archive / "images.npy").resolve()
        before = _resident_bytes_of(images_file)
        read_rows(archive.images, np.arange(len(archive.images)))
        assert _resident_bytes_of(images_file) == before
        archive.images[np.arange(len(archive.images))]  # what indexing the map would have done
        assert _resident_bytes_of(images_file) > before


@pytest.mark.realdata
def test_checks_before_any_work(real_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = read_dataset(real_folder)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(DataError, match="Cannot write the archive"):
        build_archive(dataset, a_file / "archive", PreprocessParams(image_size=32), workers=1, **SPLIT_OPTIONS)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(archive_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DataError, match=r"Not enough free disk space .* needs 0.00 GB, 0.00 GB are free"):
        build_archive(dataset, tmp_path / "archive", PreprocessParams(image_size=32), workers=1, **SPLIT_OPTIONS)
    assert not (tmp_path / "archive.partial" / "images.npy").exists()

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty and is not an archive"):
        build_archive(dataset, tmp_path / "taken", PreprocessParams(image_size=32), workers=1, force=True,
                      **SPLIT_OPTIONS)
    assert (tmp_path / "taken" / "thesis.tex").read_text() == "precious"


def test_synthetic_set_is_labelled_and_learnable(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    root = make_synthetic_dataset(tmp_path / "synthetic", n_per_class=15, seed=0, size=96)
    dataset = read_dataset(root)
    assert dataset.source == "synthetic" and dataset.classes == sorted(LOOKS)
    assert len(dataset.manifest) == 15 * len(LOOKS)
    build_archive(dataset, tmp_path / "archive", PreprocessParams(image_size=32), workers=1, progress=False,
                  **SPLIT_OPTIONS)
    archive = open_archive(tmp_path / "archive")
    assert archive.header["synthetic"] is True and archive.header["source"] == "synthetic"
    # The classes differ visibly: even a linear model on 8x8 thumbnails tells them apart.
    thumbs = np.stack([cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA) for image in archive.images])
    features = thumbs.reshape(len(thumbs), -1) / 255.0
    assert cross_val_score(LogisticRegression(max_iter=2000), features, archive.labels, cv=3).mean() > 0.9
    with pytest.raises(DataError, match="not a synthetic data set"):
        make_synthetic_dataset(tmp_path / "archive", n_per_class=1, seed=0, size=32)


# --------------------------------------------------------------------------- never lose or reuse stale data


@pytest.fixture
def small_synthetic(tmp_path: Path) -> Path:
    """4 generated images of each class, quick to prepare."""
    return make_synthetic_dataset(tmp_path / "synthetic", n_per_class=4, seed=0, size=48)


def test_folders_next_to_the_output_that_prepare_did_not_make_are_left_alone(small_synthetic: Path,
                                                                              tmp_path: Path) -> None:
    dataset = read_dataset(small_synthetic)
    out = tmp_path / "archive"
    for leftover in (tmp_path / "archive.partial", tmp_path / "archive.old"):
        leftover.mkdir()
        (leftover / "thesis.tex").write_text("precious")
        with pytest.raises(DataError, match=f"{leftover} exists but was not made by `melanoma prepare`") as error:
            build_archive(dataset, out, PreprocessParams(image_size=32), force=True, **BUILD_OPTIONS)
        assert "Move or delete it yourself" in error.value.hint
        assert (leftover / "thesis.tex").read_text() == "precious" and not out.exists()
        shutil.rmtree(leftover)

    # What prepare made itself it may delete: an interrupted run, a replaced archive.
    build_archive(dataset, out, PreprocessParams(image_size=32), **BUILD_OPTIONS)
    shutil.copytree(out, tmp_path / "archive.old")  # carries the marker, as a crash mid-replace would leave it
    build_archive(dataset, out, PreprocessParams(image_size=40), force=True, **BUILD_OPTIONS)
    assert open_archive(out, verify=True).images.shape[1] == 40
    assert not (tmp_path / "archive.old").exists() and not (tmp_path / "archive.partial").exists()


def test_an_image_changed_in_place_is_not_taken_for_the_old_one(small_synthetic: Path, tmp_path: Path) -> None:
    params = PreprocessParams(image_size=32, crop_vignette=False, color_constancy=False)
    out = tmp_path / "archive"
    build_archive(read_dataset(small_synthetic), out, params, **BUILD_OPTIONS)
    changed = Path(open_archive(out).manifest["path"].iloc[0])
    cv2.imwrite(str(changed), np.full((48, 48, 3), 200, np.uint8))  # same name, other pixels

    with pytest.raises(DataError, match="an image file changed since") as error:
        build_archive(read_dataset(small_synthetic), out, params, **BUILD_OPTIONS)
    assert "--force" in error.value.hint
    build_archive(read_dataset(small_synthetic), out, params, force=True, **BUILD_OPTIONS)
    rebuilt = open_archive(out)
    row = rebuilt.manifest.index[rebuilt.manifest["path"] == str(changed)][0]
    np.testing.assert_array_equal(rebuilt.images[row], load_image(changed, params))


HOLD_THE_BUILD = """
import sys
from pathlib import Path
from melanoma.data import archive
from melanoma.data.preprocess import PreprocessParams
from melanoma.data.sources import read_dataset

fill = archive._fill_images
def paused(*args, **kwargs):  # the run has its lock and its partial folder: wait for the test
    print("working", flush=True)
    sys.stdin.readline()
    fill(*args, **kwargs)
archive._fill_images = paused
archive.build_archive(read_dataset(Path(sys.argv[1])), Path(sys.argv[2]), PreprocessParams(image_size=32),
                      workers=1, progress=False, seed=0, val_fraction=0.2, test_fraction=0.2, test_where=None)
"""


def test_a_second_run_on_the_same_output_stops_clearly(small_synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "archive"
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_BUILD, str(small_synthetic), str(out)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "working\n"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOMA_")}
        second = subprocess.run([sys.executable, "-m", "melanoma", "prepare", "--data-dir", small_synthetic,
                                 "--out", out, "--image-size", "32", "--workers", "1"],
                                capture_output=True, text=True, check=False, timeout=120, env={**env, "COLUMNS": "300"})
        assert second.returncode == 2, second.stderr
        assert f"Another `melanoma prepare` (process {first.pid}) is writing to {out}.partial" in second.stderr
        assert "Traceback" not in second.stderr
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.wait(120) == 0
    finally:
        first.kill()
    assert open_archive(out, verify=True).images.shape == (4 * len(LOOKS), 32, 32, 3)
    assert not (tmp_path / "archive.partial").exists() and not (out / "prepare.lock").exists()


def test_entries_that_cannot_be_images_are_listed_in_skipped_csv(small_synthetic: Path, tmp_path: Path) -> None:
    nevi = next(p for p in small_synthetic.iterdir() if p.is_dir())
    (nevi / "loop.jpg").symlink_to("loop.jpg")
    (nevi / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (nevi / "folder.jpg").mkdir()
    summary = build_archive(read_dataset(small_synthetic), tmp_path / "archive", PreprocessParams(image_size=32),
                            **BUILD_OPTIONS)
    skipped = pd.read_csv(tmp_path / "archive" / "skipped.csv")
    assert sorted(Path(p).name for p in skipped["path"]) == ["dangling.jpg", "folder.jpg", "loop.jpg"]
    assert len(summary.skipped) == 3 and summary.n_images == 4 * len(LOOKS)
    assert open_archive(tmp_path / "archive").header["skipped"] == 3

"""`melanoma prepare` end to end, through the real command line, on the real data."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from melanoma.data.archive import open_archive
from melanoma.data.preprocess import PreprocessParams, load_image
from melanoma.errors import DataError

pytestmark = pytest.mark.realdata
HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
BAD_FILES = {"truncated.jpg", "empty.jpg", "notes.jpg"}


def prepare(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run `melanoma prepare` in a fresh process, in ``cwd`` (so defaults land there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELANOMA_")}
    env["COLUMNS"] = "1000"  # no line wrapping inside the messages checked here
    return subprocess.run([sys.executable, "-m", "melanoma", "prepare", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False, timeout=300)


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# --------------------------------------------------------------------------- HAM10000, ISIC 2019


@pytest.fixture(scope="module")
def full_ham(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("full_ham")
    result = prepare("--data-dir", ham_dir, "--out", work / "archive", "--image-size", 128, "--workers", 2, cwd=work)
    return work / "archive", result


@pytest.mark.slow
def test_full_ham10000(full_ham: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = full_ham
    assert result.returncode == 0, result.stderr
    assert "Detected a ham10000 data set" in result.stdout and "No image skipped" in result.stdout
    archive = open_archive(out, verify=True)  # recomputes the sha256 recorded in header.json
    assert isinstance(archive.images, np.memmap) and archive.images.shape == (10_015, 128, 128, 3)
    table = archive.manifest
    assert table["label"].value_counts().to_dict() == HAM_COUNTS == archive.header["class_counts"]
    assert table.groupby("group_id")["split"].nunique().max() == 1  # no lesion in two splits
    shares = table["split"].value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.01) and shares["val"] == pytest.approx(0.15, abs=0.01)
    assert archive.images[:64].mean() > 50  # real pixels, not the zeros of an unwritten row


@pytest.mark.slow
def test_isic2019_layout_from_ham_images(ham_dir: Path, isic2019_csv_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "isic2019"
    (root / "ISIC_2019_Training_Input").mkdir(parents=True)
    for image in ham_dir.glob("HAM10000_images_part_*/*.jpg"):
        (root / "ISIC_2019_Training_Input" / image.name).symlink_to(image)
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        (root / name).symlink_to(isic2019_csv_dir / name)

    result = prepare("--data-dir", root, "--out", tmp_path / "archive", "--image-size", 32, "--workers", 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Detected a isic2019 data set" in result.stdout
    assert "10,015 images of 8 classes found" in result.stdout
    assert "15,316 label rows have no image file" in result.stdout
    archive = open_archive(tmp_path / "archive")
    assert archive.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert len(pd.read_csv(tmp_path / "archive" / "missing.csv")) == 15_316
    ham = pd.read_csv(ham_dir / "HAM10000_metadata.csv").set_index("image_id")["dx"]
    labels = archive.manifest.set_index("image_id")["label"]
    assert (labels == "SCC").sum() == 197 and (ham[labels[labels == "SCC"].index] == "akiec").all()
    assert (labels == "AK").sum() == 130 and (labels == "NV").sum() == 6_705
    # ISIC 2019 lesion ids are HAM's: still no lesion in two splits.
    assert archive.manifest.groupby("group_id")["split"].nunique().max() == 1


def test_lesion_framing_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    """`--resize-mode lesion` on a few real HAM10000 and ISIC Archive images: the archive
    records the mode, and holds exactly what load_image (predict, serve) makes of each file."""
    root = tmp_path / "data"
    ham = pd.read_csv(shared_data / "ham10000" / "HAM10000_metadata.csv")
    ham_paths = {p.stem: p for p in (shared_data / "ham10000").glob("HAM10000_images_part_*/*.jpg")}
    isic = pd.read_csv(shared_data / "isic2019" / "ISIC_2019_Training_Input_sources.csv")
    for label, ham_dx in (("mel", "mel"), ("nv", "nv")):
        (root / label).mkdir(parents=True)
        for image_id in ham.loc[ham["dx"] == ham_dx, "image_id"].iloc[:4]:
            (root / label / f"{image_id}.jpg").symlink_to(ham_paths[image_id])
        for image in isic.loc[isic["label"] == label.upper(), "image"].iloc[:4]:
            (root / label / f"{image}.jpg").symlink_to(shared_data / "isic2019" / "ISIC_2019_Training_Input" / f"{image}.jpg")

    out = tmp_path / "archive"
    result = prepare("--data-dir", root, "--out", out, "--image-size", 48, "--resize-mode", "lesion", "--workers", 1,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    archive = open_archive(out, verify=True)
    assert archive.images.shape == (16, 48, 48, 3)
    recorded = archive.header["preprocess"]
    assert recorded["resize_mode"] == "lesion" and "resize_lesion" in recorded["steps"]
    params = PreprocessParams.from_dict(recorded)
    for row, path in enumerate(archive.manifest["path"]):
        assert np.array_equal(archive.images[row], load_image(path, params)), path
    assert "--resize-mode lesion" in (out / "DATASET_CARD.md").read_text()


# --------------------------------------------------------------------------- bad files, kill + resume


@pytest.fixture(scope="module")
def messy_folder(ham_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder-per-class layout of 1,500 real images (500 each of nv, mel, bkl) plus a
    truncated JPEG, a zero-byte file, a text file named .jpg and an RGBA PNG."""
    root = tmp_path_factory.mktemp("messy") / "data"
    metadata = pd.read_csv(ham_dir / "HAM10000_metadata.csv")
    paths = {p.stem: p for p in ham_dir.glob("HAM10000_images_part_*/*.jpg")}
    for dx in ("nv", "mel", "bkl"):
        (root / dx).mkdir(parents=True)
        for image_id in metadata.loc[metadata["dx"] == dx, "image_id"].iloc[:500]:
            (root / dx / f"{image_id}.jpg").symlink_to(paths[image_id])
    jpeg = paths["ISIC_0024306"].read_bytes()
    (root / "mel" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "mel" / "empty.jpg").write_bytes(b"")
    (root / "mel" / "notes.jpg").write_text("a text file, named like an image\n")
    bgr = cv2.imread(str(paths["ISIC_0024307"]))
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[:, :, 3] = 255
    bgra[:10, :10, 3] = 0  # some transparency
    cv2.imwrite(str(root / "mel" / "with_alpha.png"), bgra)
    return root


@pytest.fixture(scope="module")
def clean_messy_run(messy_folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    work = messy_folder.parent
    result = prepare("--data-dir", messy_folder, "--out", work / "clean", "--image-size", 64, "--workers", 2, cwd=work)
    return work / "clean", result


@pytest.mark.slow
def test_bad_files_are_skipped_and_listed(clean_messy_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, result = clean_messy_run
    assert result.returncode == 0, result.stderr
    assert "3 image(s) skipped" in result.stdout
    skipped = pd.read_csv(out / "skipped.csv")
    assert {Path(p).name for p in skipped["path"]} == BAD_FILES
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"].str.lower()))
    assert "truncated" in reasons["truncated.jpg"] and "empty" in reasons["empty.jpg"]
    assert reasons["notes.jpg"].startswith("not an image (unrecognised format")
    archive = open_archive(out, verify=True)
    assert len(archive.manifest) == 1_501 and not set(archive.manifest["image_id"]) & {"truncated", "empty", "notes"}
    png = archive.manifest.index[archive.manifest["image_id"] == "with_alpha"][0]
    assert np.array_equal(archive.images[png], load_image(archive.manifest.loc[png, "path"], PreprocessParams(64)))


@pytest.mark.slow
def test_killed_run_resumes_to_an_identical_archive(messy_folder: Path,
                                                    clean_messy_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    clean, _ = clean_messy_run
    work = messy_folder.parent
    out = work / "resumed"
    args = ["prepare", "--data-dir", messy_folder, "--out", out, "--image-size", 64, "--workers", 1]
    run = subprocess.Popen([sys.executable, "-m", "melanoma", *map(str, args)], cwd=work, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress_file = work / "resumed.partial" / "progress.npz"
    done = 0
    deadline = time.monotonic() + 120
    while done == 0 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
        try:
            with np.load(progress_file) as saved:
                done = int((saved["status"] != 0).sum())
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or being replaced
    os.killpg(run.pid, signal.SIGKILL)  # the CLI and its worker processes, with no chance to clean up
    run.wait()
    assert 0 < done < 1_504, "the run was not caught mid-way"
    assert not out.exists()
    with pytest.raises(DataError, match="interrupted run"):
        open_archive(out)

    result = prepare(*args[1:], cwd=work)
    assert result.returncode == 0, result.stderr
    assert "Resumed an interrupted run" in result.stdout
    assert sha256(out / "images.npy") == sha256(clean / "images.npy")
    for name in ("manifest.csv", "skipped.csv"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    assert open_archive(out, verify=True).header["sha256"] == open_archive(clean).header["sha256"]
    assert not (work / "resumed.partial").exists()


# --------------------------------------------------------------------------- structural errors


def ham_layout(root: Path, metadata: str) -> Path:
    root.mkdir()
    (root / "HAM10000_metadata.csv").write_text(metadata)
    return root


@pytest.mark.parametrize("case", ["missing column", "duplicate ids", "empty dx", "a column named label",
                                  "unwritable output"])
def test_structural_errors_exit_2(case: str, messy_folder: Path, tmp_path: Path) -> None:
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
    row = "HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp\n"
    out = tmp_path / "archive"
    if case == "missing column":
        data = ham_layout(tmp_path / "ham", header.replace(",dx,", ",") + row.replace(",bkl,", ","))
        expected = ["HAM10000_metadata.csv", "lacks the column(s) dx"]
    elif case == "duplicate ids":
        data = ham_layout(tmp_path / "ham", header + row + row)
        expected = ["HAM10000_metadata.csv", "ISIC_0027419", "more than once"]
    elif case == "empty dx":
        data = ham_layout(tmp_path / "ham", header + row + row.replace(",bkl,", ",,").replace("27419", "27420"))
        expected = ["HAM10000_metadata.csv has 1 row(s) without a dx (e.g. ISIC_0027420)"]
    elif case == "a column named label":
        data = ham_layout(tmp_path / "ham", header.replace("\n", ",label\n") + row.replace("\n", ",bkl\n"))
        expected = ["HAM10000_metadata.csv has a column named 'label'", "Hint: Rename or remove that column"]
    else:
        (tmp_path / "a_file").write_text("")
        data, out = messy_folder, tmp_path / "a_file" / "archive"
        expected = ["Cannot write the archive", str(tmp_path / "a_file"), "Hint: Choose a writable --out folder"]
    result = prepare("--data-dir", data, "--out", out, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 2
    assert all(text in result.stderr for text in expected), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


def test_odd_entries_in_class_folders_are_listed_not_fatal(tmp_path: Path) -> None:
    """A symbolic link loop, a broken link, a folder named like an image, a file name that
    is not UTF-8, and x.jpg beside x.png: the run goes on and says what it did with each."""
    from melanoma.data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path / "data", n_per_class=3, seed=0, size=48)
    mel = root / "MEL"
    (mel / "loop.jpg").symlink_to("loop.jpg")
    (mel / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (mel / "folder.jpg").mkdir()
    shutil.copy(next(mel.glob("*.jpg")), os.fsencode(mel) + b"/caf\xe9.jpg")
    twin = next(p for p in sorted(mel.glob("*.jpg")) if p.is_file() and not p.is_symlink())
    cv2.imwrite(str(twin.with_suffix(".png")), cv2.imread(str(twin)))
    result = prepare("--data-dir", root, "--out", tmp_path / "archive", "--image-size", 32, "--workers", 1, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "4 image(s) skipped" in result.stdout
    skipped = pd.read_csv(tmp_path / "archive" / "skipped.csv")
    reasons = dict(zip(skipped["path"].map(lambda p: Path(p).name), skipped["reason"]))
    assert reasons == {"loop.jpg": "cannot be read (Too many levels of symbolic links)",
                       "dangling.jpg": f"broken symbolic link (its target {tmp_path / 'nowhere.jpg'} does not exist)",
                       "folder.jpg": "is a folder, not an image file",
                       "caf\\xe9.jpg": "its path is not valid UTF-8 (rename it)"}
    assert "2 files share their name, not their extension" in result.stdout
    ids = set(open_archive(tmp_path / "archive").manifest["image_id"])
    assert {twin.name, twin.with_suffix(".png").name} <= ids  # both kept

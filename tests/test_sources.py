"""Readers (melanoma.data.sources) and splits (melanoma.data.splits), on the real data
where it matters and on small layouts written here for the edge cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma.data.sources import (
    SYNTHETIC_MARKER,
    combine_datasets,
    detect_source,
    read_dataset,
)
from melanoma.data.splits import grouped_split, split_by_condition
from melanoma.errors import DataError

HAM_COUNTS = {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514, "akiec": 327, "vasc": 142, "df": 115}
ISIC2019_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def write_isic2019_truth(path: Path, labels: dict[str, str]) -> None:
    """An ISIC 2019-style ground truth: one-hot floats, CRLF line ends."""
    lines = ["image," + ",".join(ISIC2019_COLUMNS)]
    for image, label in labels.items():
        lines.append(image + "," + ",".join("1.0" if c == label else "0.0" for c in ISIC2019_COLUMNS))
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


def touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # readers only look at names; decoding is tested elsewhere


# --------------------------------------------------------------------------- HAM10000


@pytest.mark.realdata
def test_ham10000_as_distributed(ham_dir: Path) -> None:
    dataset = read_dataset(ham_dir)
    table = dataset.manifest
    assert dataset.source == "ham10000" and detect_source(ham_dir) == "ham10000"
    assert len(table) == 10_015 and not dataset.missing
    assert table["label"].value_counts().to_dict() == HAM_COUNTS
    assert dataset.classes == sorted(HAM_COUNTS)
    assert table["group_id"].nunique() == 7_470 and table["group_id"].str.startswith("HAM_").all()
    assert table["image_id"].is_unique and all(Path(p).is_file() for p in table["path"].iloc[::500])
    # The clinic of each image comes from HAM10000_metadata_sites.csv beside the metadata.
    assert table["dataset"].value_counts()["rosendahl"] == 2_259


@pytest.mark.realdata
def test_ham10000_with_isic2019_labels(ham_dir: Path, isic2019_csv_dir: Path) -> None:
    dataset = read_dataset(ham_dir, isic2019_labels=isic2019_csv_dir / "ISIC_2019_Training_GroundTruth.csv")
    counts = dataset.manifest["label"].value_counts()
    assert dataset.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    assert counts["SCC"] == 197 and counts["AK"] == 130 and counts["NV"] == 6_705
    assert (dataset.manifest.loc[dataset.manifest["label"] == "SCC", "dx"] == "akiec").all()
    assert any("akiec -> 130 AK, 197 SCC" in note for note in dataset.notes)


def test_ham10000_structural_errors(tmp_path: Path) -> None:
    good = "lesion_id,image_id,dx,dx_type,age,sex,localization\nHAM_1,ISIC_1,nv,histo,40.0,male,back\n"
    (tmp_path / "HAM10000_metadata.csv").write_text(good.replace(",dx,", ",diagnosis,"))
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv lacks the column\(s\) dx"):
        read_dataset(tmp_path, "ham10000")
    (tmp_path / "HAM10000_metadata.csv").write_text(good + "HAM_1,ISIC_1,nv,histo,40.0,male,back\n")
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv lists 1 image_id\(s\) more than once \(e.g. ISIC_1\)"):
        read_dataset(tmp_path, "ham10000")
    (tmp_path / "HAM10000_metadata.csv").write_text(good)
    with pytest.raises(DataError, match="HAM10000_images_part_1"):
        read_dataset(tmp_path, "ham10000")  # no image folder at all


def test_ham10000_empty_dx_and_a_column_named_label_are_refused(tmp_path: Path) -> None:
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
    touch_images(tmp_path / "HAM10000_images_part_1", ["ISIC_1.jpg", "ISIC_2.jpg"])
    metadata = tmp_path / "HAM10000_metadata.csv"
    metadata.write_text(header + "HAM_1,ISIC_1,nv,histo,40.0,male,back\nHAM_2,ISIC_2, ,histo,50.0,male,back\n")
    with pytest.raises(DataError, match=r"HAM10000_metadata.csv has 1 row\(s\) without a dx \(e.g. ISIC_2\)"):
        read_dataset(tmp_path)
    metadata.write_text(header.replace("\n", ",label\n") + "HAM_1,ISIC_1,nv,histo,40.0,male,back,x\n")
    with pytest.raises(DataError, match="HAM10000_metadata.csv has a column named 'label'") as error:
        read_dataset(tmp_path)
    assert "Rename" in error.value.hint


def test_two_files_for_one_image_id_are_refused(tmp_path: Path) -> None:
    (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n")
    touch_images(tmp_path / "HAM10000_images_part_1", ["ISIC_1.jpg"])
    touch_images(tmp_path / "HAM10000_images_part_2", ["ISIC_1.JPEG"])
    with pytest.raises(DataError, match=r"1 image id\(s\) have more than one file .*ISIC_1.jpg and ISIC_1.JPEG"):
        read_dataset(tmp_path)


# --------------------------------------------------------------------------- ISIC 2019


def test_isic2019_layout_edge_cases(tmp_path: Path) -> None:
    write_isic2019_truth(tmp_path / "ISIC_2019_Training_GroundTruth.csv", {
        "ISIC_0000001": "MEL", "ISIC_0000002_downsampled": "NV", "ISIC_0000003": "SCC", "ISIC_0000004": "NV",
    })
    (tmp_path / "ISIC_2019_Training_Metadata.csv").write_bytes(
        b"image,age_approx,anatom_site_general,lesion_id,sex\r\n"
        b"ISIC_0000001,55,anterior torso,,female\r\n"
        b"ISIC_0000002_downsampled,30,head/neck,BCN_0001,male\r\n"
        b"ISIC_0000003,70,,BCN_0001,male\r\n"
        b"ISIC_0000004,45,back,HAM_9,female\r\n"
    )
    touch_images(tmp_path / "ISIC_2019_Training_Input",
                 ["ISIC_0000001.jpg", "ISIC_0000002_downsampled.JPEG", "ISIC_0000003.png", "notes.txt"])
    dataset = read_dataset(tmp_path)
    table = dataset.manifest.set_index("image_id")
    assert dataset.source == "isic2019"
    assert dataset.classes == ISIC2019_COLUMNS[:-1]  # UNK is never used: dropped
    assert dataset.missing == ["ISIC_0000004"]
    assert table["label"].to_dict() == {"ISIC_0000001": "MEL", "ISIC_0000002_downsampled": "NV", "ISIC_0000003": "SCC"}
    # An empty lesion_id makes the image its own group.
    assert table["group_id"].to_dict() == {"ISIC_0000001": "ISIC_0000001", "ISIC_0000002_downsampled": "BCN_0001",
                                           "ISIC_0000003": "BCN_0001"}
    assert table.loc["ISIC_0000003", "path"].endswith("ISIC_0000003.png")
    assert table.loc["ISIC_0000002_downsampled", "anatom_site_general"] == "head/neck"


def test_isic2019_structural_errors(tmp_path: Path) -> None:
    truth = tmp_path / "ISIC_2019_Training_GroundTruth.csv"
    write_isic2019_truth(truth, {"ISIC_1": "MEL", "ISIC_2": "NV"})
    (tmp_path / "ISIC_2019_Training_Metadata.csv").write_text("image,lesion_id\nISIC_1,L1\nISIC_9,L2\n")
    with pytest.raises(DataError, match=r"ISIC_2019_Training_Metadata.csv has 1 image id\(s\) that are not in .*ISIC_9"):
        read_dataset(tmp_path)
    truth.write_text("image,MEL,NV\nISIC_1,1.0,1.0\n")
    with pytest.raises(DataError, match="is not a one-hot ground truth"):
        read_dataset(tmp_path, "isic2019")
    truth.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot be read as CSV"):
        read_dataset(tmp_path, "isic2019")


# --------------------------------------------------------------------------- ISIC 2020, folders


def test_isic2020_target_and_diagnosis(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target\n"
        "ISIC_1,IP_1,male,45,torso,nevus,benign,0\n"
        "ISIC_2,IP_1,male,45,torso,melanoma,malignant,1\n"
        "ISIC_3,IP_2,female,60,,unknown,benign,0\n"
    )
    touch_images(tmp_path / "train", ["ISIC_1.jpg", "ISIC_2.jpg", "ISIC_3.jpg"])
    assert detect_source(tmp_path) == "isic2020"
    binary = read_dataset(tmp_path)
    assert binary.classes == ["benign", "melanoma"]
    assert binary.manifest["label"].tolist() == ["benign", "melanoma", "benign"]
    assert binary.manifest["group_id"].tolist() == ["IP_1", "IP_1", "IP_2"]
    by_diagnosis = read_dataset(tmp_path, isic2020_target="diagnosis")
    assert by_diagnosis.classes == ["melanoma", "nevus", "unknown"]
    (tmp_path / "train.csv").write_text("image_name,patient_id,target\nISIC_1,IP_1,yes\n")
    with pytest.raises(DataError, match="column 'target' must be 0 or 1, found 'yes'"):
        read_dataset(tmp_path)


def test_folder_per_class(tmp_path: Path) -> None:
    touch_images(tmp_path / "benign", ["a.jpg", "b.jpeg", "shared.png", ".hidden.jpg", "readme.txt"])
    touch_images(tmp_path / "malignant", ["c.JPG", "shared.jpg"])
    (tmp_path / "empty").mkdir()
    assert detect_source(tmp_path) == "folder"
    dataset = read_dataset(tmp_path)
    assert dataset.source == "folder" and dataset.classes == ["benign", "malignant"]
    assert sorted(dataset.manifest["image_id"]) == ["a", "b", "benign/shared", "c", "malignant/shared"]
    assert (dataset.manifest["group_id"] == dataset.manifest["image_id"]).all()
    assert any("appear in more than one class folder" in note and "shared" in note for note in dataset.notes)
    (tmp_path / SYNTHETIC_MARKER).write_text("demo")
    assert read_dataset(tmp_path).source == "synthetic"
    with pytest.raises(DataError, match=r"Class\(es\) nevus are not in the data set"):
        read_dataset(tmp_path, classes=["nevus"])
    assert read_dataset(tmp_path, classes=["malignant"]).manifest["label"].unique().tolist() == ["malignant"]


def test_same_name_with_another_extension_keeps_both_in_one_group(tmp_path: Path) -> None:
    touch_images(tmp_path / "nv", ["x.jpg", "x.png", "x.JPEG", "y.jpg"])
    touch_images(tmp_path / "mel", ["x.jpg"])
    dataset = read_dataset(tmp_path)
    table = dataset.manifest.set_index("image_id")
    assert sorted(table.index) == ["mel/x", "nv/x.JPEG", "nv/x.jpg", "nv/x.png", "y"]  # x is in two classes too
    assert table.loc["nv/x.jpg", "path"].endswith("nv/x.jpg")
    assert set(table.loc[["nv/x.jpg", "nv/x.png", "nv/x.JPEG"], "group_id"]) == {"nv/x"}
    assert table.loc["mel/x", "group_id"] == "mel/x" and table.loc["y", "group_id"] == "y"
    assert any("1 file name(s) appear in more than one class folder (e.g. x)" in note for note in dataset.notes)
    assert any("3 files share their name" in note and "nv/x.png" in note for note in dataset.notes)


def test_entries_that_cannot_be_images_are_listed_not_fatal(tmp_path: Path) -> None:
    touch_images(tmp_path / "nv", ["good.jpg"])
    touch_images(tmp_path / "mel", ["good2.jpg"])
    (tmp_path / "nv" / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "nv" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "mel" / "folder.jpg").mkdir()
    bad_name = os.fsencode(tmp_path / "mel") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(bad_name, "wb"):
        pass
    dataset = read_dataset(tmp_path)
    assert sorted(dataset.manifest["image_id"]) == ["good", "good2"]
    reasons = {Path(path).name: reason for path, reason in dataset.skipped}
    assert reasons == {
        "loop.jpg": "cannot be read (Too many levels of symbolic links)",
        "dangling.jpg": f"broken symbolic link (its target {tmp_path / 'nowhere.jpg'} does not exist)",
        "folder.jpg": "is a folder, not an image file",
        "caf\\xe9.jpg": "its path is not valid UTF-8 (rename it)",
    }
    for path, _ in dataset.skipped:
        path.encode("utf-8")  # every listed path can be written to skipped.csv

    # A folder of unusable entries only is no class; a class named with non-UTF-8 bytes is refused.
    (tmp_path / "bcc").mkdir()
    (tmp_path / "bcc" / "gone.jpg").symlink_to(tmp_path / "gone.jpg")
    dataset = read_dataset(tmp_path)
    assert dataset.classes == ["mel", "nv"] and len(dataset.skipped) == 5
    assert any("Folder(s) bcc hold no usable image" in note for note in dataset.notes)
    latin = os.fsencode(tmp_path) + b"/n\xe6vi"
    os.mkdir(latin)
    with open(latin + b"/a.jpg", "wb"):
        pass
    with pytest.raises(DataError, match=r"The class folder .*n\\xe6vi has a name that is not valid UTF-8"):
        read_dataset(tmp_path)


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match="does not look like a known data set layout"):
        detect_source(tmp_path)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_dataset(tmp_path / "absent")


def test_unreadable_folder(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: permissions cannot make a folder unreadable")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match="cannot be read"):
            read_dataset(locked, "folder")
    finally:
        locked.chmod(0o700)


# --------------------------------------------------------------------------- splits


@pytest.mark.realdata
def test_grouped_split_on_ham10000(ham_dir: Path) -> None:
    table = read_dataset(ham_dir).manifest
    split = grouped_split(table["label"], table["group_id"], val_fraction=0.15, test_fraction=0.15, seed=0)
    # No lesion in two splits.
    assert table.groupby("group_id").apply(lambda g: len(set(split[g.index]))).max() == 1
    shares = pd.Series(split).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.70, abs=0.01) and shares["test"] == pytest.approx(0.15, abs=0.01)
    # Every class is represented in each split at (about) its overall share.
    per_class = pd.crosstab(table["label"], split, normalize="index")
    assert (per_class["test"] - 0.15).abs().max() < 0.03
    # Deterministic for a seed, different for another.
    again = grouped_split(table["label"], table["group_id"], val_fraction=0.15, test_fraction=0.15, seed=0)
    other = grouped_split(table["label"], table["group_id"], val_fraction=0.15, test_fraction=0.15, seed=1)
    assert (split == again).all() and (split != other).mean() > 0.1


@pytest.mark.realdata
def test_split_by_clinic(ham_dir: Path) -> None:
    table = read_dataset(ham_dir).manifest
    split = split_by_condition(table, "dataset=rosendahl", val_fraction=0.15, seed=0)
    assert (split[table["dataset"] == "rosendahl"] == "test").all()
    assert (split[table["dataset"] != "rosendahl"] != "test").all()
    assert pd.Series(split[split != "test"]).value_counts(normalize=True)["val"] == pytest.approx(0.15, abs=0.01)
    with pytest.raises(DataError, match="no column 'clinic'") as error:
        split_by_condition(table, "clinic=rosendahl", val_fraction=0.15, seed=0)
    assert "dataset" in error.value.hint
    with pytest.raises(DataError, match="No image has dataset=graz") as error:
        split_by_condition(table, "dataset=graz", val_fraction=0.15, seed=0)
    assert "rosendahl" in error.value.hint
    with pytest.raises(DataError, match="not of the form COLUMN=VALUE"):
        split_by_condition(table, "rosendahl", val_fraction=0.15, seed=0)


def test_images_without_group_are_their_own_group() -> None:
    labels = np.array(["a", "b"] * 50)
    groups = np.array(["L1"] * 10 + [f"img{i}" for i in range(90)])
    split = grouped_split(labels, groups, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert len(set(split[:10])) == 1
    assert pd.Series(split).value_counts().to_dict() == {"train": 60, "val": 20, "test": 20}
    with pytest.raises(DataError, match="leave no training set"):
        grouped_split(labels, groups, val_fraction=0.5, test_fraction=0.5, seed=3)


# --------------------------------------------------------------------------- several sources


@pytest.mark.realdata
def test_ham10000_and_isic_archive_in_one_label_space(ham_dir: Path, isic2019_csv_dir: Path) -> None:
    """The real HAM10000 folder and the real ISIC 2019 folder (2,280 ISIC Archive images,
    the others' label rows absent) make one 7-class data set, each image with its source."""
    dataset = combine_datasets([read_dataset(ham_dir), read_dataset(isic2019_csv_dir)])
    table = dataset.manifest
    assert dataset.classes == sorted(HAM_COUNTS) and dataset.source == "ham10000+isic2019"
    assert len(table) == 12_295 and table["image_id"].is_unique
    assert table["source"].value_counts().to_dict() == {
        "vidir_molemax": 3_954, "vidir_modern": 3_363, "isic-archive": 2_280, "rosendahl": 2_259, "vienna_dias": 439}
    archive_labels = table.loc[table["source"] == "isic-archive", "label"].value_counts().to_dict()
    assert archive_labels == {"nv": 1_551, "bkl": 386, "mel": 343}
    # The HAM10000 images are present through the HAM folder: only the other 13,036 rows are missing.
    assert len(dataset.missing) == 25_331 - 12_295 and "ISIC_0024306" not in dataset.missing
    # Lesion ids group across sources; images without one are their own group.
    msk = table[table["source"] == "isic-archive"]
    assert msk["group_id"].str.startswith("MSK").sum() == 812
    split = split_by_condition(table, "source=isic-archive", val_fraction=0.15, seed=0)
    assert (split[table["source"] == "isic-archive"] == "test").all() and (split[table["source"] != "isic-archive"] != "test").all()


def test_combine_maps_isic2019_labels_onto_ham_classes(tmp_path: Path) -> None:
    ham = tmp_path / "ham"
    (ham / "HAM10000_metadata.csv").parent.mkdir()
    (ham / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\nHAM_2,ISIC_2,akiec\n")
    touch_images(ham / "HAM10000_images_part_1", ["ISIC_1.jpg", "ISIC_2.jpg"])
    isic = tmp_path / "isic"
    isic.mkdir()
    write_isic2019_truth(isic / "ISIC_2019_Training_GroundTruth.csv",
                         {"ISIC_1": "MEL", "ISIC_9": "SCC", "ISIC_8": "NV", "BCN_7": "BKL"})
    (isic / "ISIC_2019_Training_Metadata.csv").write_text(
        "image,lesion_id\nISIC_1,HAM_1\nISIC_9,MSK4_3\nISIC_8,\nBCN_7,BCN_0007\n")
    touch_images(isic / "ISIC_2019_Training_Input", ["ISIC_1.jpg", "ISIC_9.jpg", "ISIC_8.jpg", "BCN_7.jpg"])
    dataset = combine_datasets([read_dataset(ham), read_dataset(isic)])
    table = dataset.manifest.set_index("image_id")
    assert dataset.classes == ["akiec", "mel", "bkl", "nv"]  # HAM's names: the first data set's, then new ones
    assert table.loc["ISIC_9", "label"] == "akiec" and table.loc["ISIC_9", "isic2019_label"] == "SCC"
    assert table.loc["ISIC_1", "source"] == "ham10000" and str(table.loc["ISIC_1", "path"]).startswith(str(ham))
    assert table.loc["BCN_7", "source"] == "bcn20000" and table.loc["ISIC_8", "source"] == "isic-archive"
    assert table.loc["ISIC_8", "group_id"] == "ISIC_8" and table.loc["ISIC_9", "group_id"] == "MSK4_3"
    assert any("1 image id(s) are in more than one data set" in note for note in dataset.notes)
    # Restricting classes after combining keeps only those rows.
    assert set(combine_datasets([read_dataset(ham), read_dataset(isic)], ["mel"]).manifest["label"]) == {"mel"}
    # HAM10000's labels do not fit ISIC 2019's 8 classes the other way round.
    with pytest.raises(DataError, match="do not fit") as error:
        combine_datasets([read_dataset(isic), read_dataset(ham)])
    assert "--isic2019-labels" in error.value.hint

"""Data sets as they are distributed -> one manifest (one row per image found).

Readers, one per layout (see ../shared/DESIGN.md §3):

- ``isic2019``: ``ISIC_2019_Training_GroundTruth.csv`` (one-hot floats, CRLF, an ``UNK``
  column, some ids end in ``_downsampled``), ``ISIC_2019_Training_Metadata.csv`` (optional;
  ``lesion_id`` may be empty) and ``ISIC_2019_Training_Input/``.
- ``ham10000``: ``HAM10000_metadata.csv`` and ``HAM10000_images_part_1/``, ``_part_2/``;
  classes from ``dx``. Where ``HAM10000_metadata_sites.csv`` lies beside it, its extra
  columns (``dataset``: the clinic each image comes from) are merged in. With
  ``isic2019_labels`` the labels are those of the ISIC 2019 ground truth (8 classes:
  197 ``akiec`` become ``SCC``, the others ``AK``).
- ``isic2020``: ``train/`` and ``train.csv`` or ``ISIC_2020_Training_GroundTruth.csv``;
  ``target`` gives the classes ``benign`` (0) and ``melanoma`` (1), ``diagnosis`` gives
  one class per diagnosis; the group is the ``patient_id``.
- ``folder``: ``root/<class name>/<image>``. A folder holding a file ``SYNTHETIC.txt``
  (written by :func:`melanoma.data.synthetic.make_synthetic_dataset`) is read the same way
  but gets the source ``"synthetic"``, so that the archive records its origin.

Every manifest has a ``source`` column, the collection or clinic each image comes from:
HAM10000's ``dataset`` site where the sites file is present (rosendahl, vidir_modern, ...),
for ISIC 2019 the collection its lesion id names (``ham10000``, ``bcn20000``) or
``isic-archive``, else the reader's name. :func:`combine_datasets` joins several data sets
into one label space, so that one archive can hold several sources and
``--test-where source=...`` gives leave-one-source-out splits.

Structural problems (a CSV missing or malformed, a required column absent or empty, a
column named like one of the manifest's own, duplicate or unknown ids, two files for one
image id, an unreadable folder) raise :class:`DataError` before any image is touched. A
label row whose image file is absent is not an error: it is listed in ``Dataset.missing``;
nor is an entry named like an image that cannot be one (a folder, a broken or looping
symbolic link, a name that is not UTF-8): it is listed in ``Dataset.skipped``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from melanoma.errors import DataError

SOURCES = ("isic2019", "ham10000", "isic2020", "folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SYNTHETIC_MARKER = "SYNTHETIC.txt"

ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_IMAGES = "ISIC_2019_Training_Input"
HAM_METADATA = "HAM10000_metadata.csv"
HAM_SITES = "HAM10000_metadata_sites.csv"
HAM_IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
ISIC2020_LABEL_FILES = ("train.csv", "ISIC_2020_Training_GroundTruth.csv")
ISIC2020_IMAGES = "train"
ISIC2020_TARGET_CLASSES = ("benign", "melanoma")

# Columns every manifest starts with; readers add metadata columns after them.
MANIFEST_COLUMNS = ["image_id", "label", "group_id", "path", "source"]

# ISIC 2019's 8 classes onto HAM10000's 7 (HAM's akiec covers both AK and SCC).
ISIC2019_TO_HAM = {"MEL": "mel", "NV": "nv", "BCC": "bcc", "AK": "akiec", "SCC": "akiec", "BKL": "bkl", "DF": "df",
                   "VASC": "vasc"}
# ISIC 2019 lesion ids start with the collection they come from; the rest is the ISIC Archive.
ISIC2019_LESION_SOURCES = {"HAM_": "ham10000", "BCN_": "bcn20000"}
ISIC_ARCHIVE_SOURCE = "isic-archive"
# The manifest column naming each image's source: `source` (one per data set or clinic),
# else HAM10000's `dataset` site (manifests written before `source` existed).
SOURCE_COLUMNS = ("source", "dataset")
UNKNOWN_SOURCE = "unknown"
# Names a label or metadata CSV must not use: the manifest (and the archive's) own columns.
RESERVED_COLUMNS = ("label", "label_index", "group_id", "split", "path")


@dataclass
class Dataset:
    """One data set, read: which images exist, their labels, groups and metadata."""

    source: str
    root: Path
    classes: list[str]
    manifest: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): named like images, unusable


def detect_source(root: Path) -> str:
    """Name the layout of the data set in ``root`` from the files present."""
    root = Path(root)
    _require_dir(root, "data folder")
    if (root / ISIC2019_GROUND_TRUTH).is_file():
        return "isic2019"
    if (root / HAM_METADATA).is_file():
        return "ham10000"
    if (root / ISIC2020_IMAGES).is_dir() and any((root / name).is_file() for name in ISIC2020_LABEL_FILES):
        return "isic2020"
    if _class_folders(root):
        return "folder"
    raise DataError(
        f"{root} does not look like a known data set layout.",
        hint=(
            f"Expected one of: {ISIC2019_GROUND_TRUTH} + {ISIC2019_IMAGES}/ (ISIC 2019); "
            f"{HAM_METADATA} + {'/, '.join(HAM_IMAGE_DIRS)}/ (HAM10000); "
            f"{' or '.join(ISIC2020_LABEL_FILES)} + {ISIC2020_IMAGES}/ (ISIC 2020); "
            "or one sub-folder of images per class. `melanoma download isic2019` fetches ISIC 2019."
        ),
    )


def image_sources(manifest: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """The column that names each image's source, and each row's source ("unknown" where
    blank); None where the manifest has no such column."""
    column = next((name for name in SOURCE_COLUMNS if name in manifest.columns), None)
    if column is None:
        return None
    return column, manifest[column].fillna(UNKNOWN_SOURCE).astype(str)


def read_dataset(
    root: Path,
    source: str = "auto",
    *,
    classes: list[str] | None = None,
    isic2019_labels: Path | None = None,
    isic2020_target: str = "target",
) -> Dataset:
    """Read the data set in ``root``; ``source="auto"`` detects the layout.

    ``classes`` keeps only these classes, in this order (rows of other classes are dropped
    and counted in ``notes``). ``isic2019_labels`` (HAM10000 only) is the path of an ISIC
    2019 ground truth CSV whose labels replace ``dx``. ``isic2020_target`` is ``"target"``
    or ``"diagnosis"``.
    """
    root = Path(root)
    if source == "auto":
        source = detect_source(root)
    if isic2019_labels is not None and source != "ham10000":
        raise DataError(
            f"--isic2019-labels applies to HAM10000 only, but {root} is {source}.",
            hint="Leave the option out, or point --data-dir at a HAM10000 folder.",
        )
    if source == "isic2019":
        dataset = _read_isic2019(root)
    elif source == "ham10000":
        dataset = _read_ham10000(root, isic2019_labels)
    elif source == "isic2020":
        dataset = _read_isic2020(root, isic2020_target)
    elif source == "folder":
        dataset = _read_folder(root)
    else:
        raise DataError(f"Unknown source {source!r}.", hint=f"Use one of: auto, {', '.join(SOURCES)}.")
    if classes is not None:
        _restrict_classes(dataset, classes)
    if dataset.manifest.empty:
        raise DataError(f"No images of the data set in {root} were found.", hint=_missing_hint(dataset))
    return dataset


# --------------------------------------------------------------------------- readers


def _read_isic2019(root: Path) -> Dataset:
    truth_path = root / ISIC2019_GROUND_TRUTH
    truth = _read_csv(truth_path, required=["image"], id_column="image")
    labels, classes = _one_hot_labels(truth, truth_path)
    table = pd.DataFrame({"image_id": truth["image"], "label": labels})
    metadata_path = root / ISIC2019_METADATA
    notes = []
    if metadata_path.is_file():
        metadata = _read_csv(metadata_path, required=["image", "lesion_id"], id_column="image")
        _reject_unknown_ids(metadata["image"], table["image_id"], metadata_path, truth_path)
        table = table.merge(metadata.rename(columns={"image": "image_id"}), on="image_id", how="left")
        table["group_id"] = table.pop("lesion_id")
    else:
        notes.append(f"{metadata_path.name} not found: no lesion ids, every image is its own group.")
        table["group_id"] = pd.NA
    table["source"] = ISIC_ARCHIVE_SOURCE
    for prefix, name in ISIC2019_LESION_SOURCES.items():
        table.loc[table["group_id"].astype("string").str.startswith(prefix).fillna(False), "source"] = name
    images, skipped = _index_images([root / ISIC2019_IMAGES], required=True)
    return _finish(Dataset("isic2019", root, classes, table, notes=notes, skipped=skipped), images)


def _read_ham10000(root: Path, isic2019_labels: Path | None) -> Dataset:
    metadata_path = root / HAM_METADATA
    table = _read_csv(metadata_path, required=["lesion_id", "image_id", "dx"], id_column="image_id")
    _require_values(table, "dx", metadata_path, "image_id")
    table = table.rename(columns={"lesion_id": "group_id", "dx": "label"})
    notes = []
    sites_path = root / HAM_SITES
    if sites_path.is_file():
        sites = _read_csv(sites_path, required=["image_id"], id_column="image_id")
        _reject_unknown_ids(sites["image_id"], table["image_id"], sites_path, metadata_path)
        extra = [c for c in sites.columns if c not in table.columns and c not in ("lesion_id", "dx")]
        table = table.merge(sites[["image_id", *extra]], on="image_id", how="left")
        notes.append(f"Merged {', '.join(extra) or 'no'} column(s) from {sites_path.name}.")
    table["source"] = table["dataset"] if "dataset" in table.columns else "ham10000"
    classes = sorted(table["label"].unique())
    if isic2019_labels is not None:
        classes = _relabel_from_isic2019(table, Path(isic2019_labels), metadata_path, notes)
    images, skipped = _index_images([root / name for name in HAM_IMAGE_DIRS], required=True)
    return _finish(Dataset("ham10000", root, classes, table, notes=notes, skipped=skipped), images)


def _relabel_from_isic2019(table: pd.DataFrame, truth_path: Path, metadata_path: Path, notes: list[str]) -> list[str]:
    """Replace HAM ``dx`` labels by those of the ISIC 2019 ground truth, in place."""
    truth = _read_csv(truth_path, required=["image"], id_column="image")
    labels, classes = _one_hot_labels(truth, truth_path)
    by_id = pd.Series(labels, index=truth["image"])
    unknown = table.loc[~table["image_id"].isin(by_id.index), "image_id"]
    if len(unknown):
        raise DataError(
            f"{len(unknown)} image ids of {metadata_path} are not in {truth_path} (e.g. {', '.join(unknown[:3])}).",
            hint="Pass the official ISIC_2019_Training_GroundTruth.csv, which contains every HAM10000 image.",
        )
    new_labels = by_id.loc[table["image_id"]].to_numpy()
    changes = pd.crosstab(table["label"], new_labels)
    # HAM's akiec covers two ISIC 2019 classes (AK and SCC): report how each dx was split.
    for dx, row in changes.iterrows():
        targets = {name: int(n) for name, n in row.items() if n}
        if len(targets) > 1:
            notes.append(f"ISIC 2019 labels: {dx} -> " + ", ".join(f"{n} {name}" for name, n in targets.items()))
    table["dx"] = table["label"]
    table["label"] = new_labels
    return classes


def _read_isic2020(root: Path, target: str) -> Dataset:
    if target not in ("target", "diagnosis"):
        raise DataError(f"Unknown ISIC 2020 target {target!r}.", hint="Use 'target' (benign/melanoma) or 'diagnosis'.")
    labels_path = next((root / n for n in ISIC2020_LABEL_FILES if (root / n).is_file()), None)
    if labels_path is None:
        raise DataError(f"No ISIC 2020 labels in {root}.", hint=f"Expected {' or '.join(ISIC2020_LABEL_FILES)}.")
    table = _read_csv(labels_path, required=["image_name", "patient_id", target], id_column="image_name")
    table = table.rename(columns={"image_name": "image_id", "patient_id": "group_id"})
    if target == "target":
        codes = table["target"].astype(str).str.strip()
        bad = codes[~codes.isin(["0", "1"])]
        if len(bad):
            raise DataError(
                f"{labels_path}: column 'target' must be 0 or 1, found {bad.iloc[0]!r} ({len(bad)} rows).",
                hint="Fix those rows, or use --isic2020-target diagnosis.",
            )
        table["label"] = [ISIC2020_TARGET_CLASSES[int(c)] for c in codes]
        classes = list(ISIC2020_TARGET_CLASSES)
    else:
        table["label"] = table["diagnosis"].fillna("unknown")
        classes = sorted(table["label"].unique())
    images, skipped = _index_images([root / ISIC2020_IMAGES], required=True)
    return _finish(Dataset("isic2020", root, classes, table, skipped=skipped), images)


def _read_folder(root: Path) -> Dataset:
    _require_dir(root, "data folder")
    folders = _class_folders(root)
    if not folders:
        raise DataError(
            f"{root} has no sub-folders with images (.jpg, .jpeg, .png).",
            hint="Put the images of each class in a sub-folder named after the class.",
        )
    rows, skipped, several = [], [], []
    for folder in folders:
        if (name := _printable(folder.name)) != folder.name:
            raise DataError(f"The class folder {_printable(str(folder))} has a name that is not valid UTF-8.",
                            hint="Rename the folder: its name becomes the class name.")
        files, unusable = _scan(folder)
        skipped += unusable
        stems = Counter(_stem(path) for path in files)
        for path in sorted(files):
            stem = _stem(path)
            # x.jpg beside x.png: both kept, by their full names, in one group (so in one split).
            if stems[stem] > 1:
                several.append(f"{name}/{path.name}")
            rows.append({"image_id": path.name if stems[stem] > 1 else stem, "label": name, "stem": stem,
                         "group_id": f"{name}/{stem}" if stems[stem] > 1 else pd.NA, "path": str(path)})
    table = pd.DataFrame(rows, columns=["image_id", "label", "stem", "group_id", "path"])
    classes = [f.name for f in folders if f.name in set(table["label"])]
    notes = []
    if len(classes) < len(folders):
        empty = [f.name for f in folders if f.name not in classes]
        notes.append(f"Folder(s) {', '.join(empty)} hold no usable image (see skipped.csv): not taken as classes.")
    if several:
        notes.append(
            f"{len(several)} files share their name, not their extension, with another one in the same class folder "
            f"(e.g. {', '.join(several[:4])}); kept under their full names, each such pair in one split. "
            "Check they are not one image saved twice."
        )
    # The same file name in two class folders: usually a copy filed under two labels.
    duplicated = table.groupby("stem")["label"].transform("nunique") > 1
    if duplicated.any():
        names = sorted(table.loc[duplicated, "stem"].unique())
        notes.append(
            f"{len(names)} file name(s) appear in more than one class folder (e.g. {', '.join(names[:5])}); "
            "kept under ids '<class>/<name>'. Check they are not one image filed under two labels."
        )
        table.loc[duplicated, "image_id"] = table["label"] + "/" + table["image_id"]
    table = table.drop(columns="stem")
    source = "synthetic" if (root / SYNTHETIC_MARKER).is_file() else "folder"
    return _finish(Dataset(source, root, classes, table, notes=notes, skipped=skipped), images=None)


# --------------------------------------------------------------------------- helpers


def _read_csv(path: Path, *, required: list[str], id_column: str) -> pd.DataFrame:
    """Read a labels/metadata CSV as strings, checking the columns and unique ids."""
    if not path.is_file():
        raise DataError(f"{path} does not exist.", hint="Check --data-dir and --source.")
    try:
        # All columns as text, so that ids keep their form; empty cells become NA.
        table = pd.read_csv(path, dtype=object, skipinitialspace=True)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path} cannot be read as CSV: {exc}", hint="Re-download or repair the file.") from None
    table.columns = [str(c).strip() for c in table.columns]
    absent = [c for c in required if c not in table.columns]
    if absent:
        raise DataError(
            f"{path} lacks the column(s) {', '.join(absent)} (it has: {', '.join(table.columns)}).",
            hint="Use the file as distributed, or rename its columns to the expected names.",
        )
    reserved = [c for c in table.columns if c in RESERVED_COLUMNS]
    if reserved:
        raise DataError(f"{path} has a column named {', '.join(map(repr, reserved))}: the manifest names one of its own "
                        "columns so.", hint="Rename or remove that column.")
    _require_values(table, id_column, path)
    duplicates = table.loc[table[id_column].duplicated(), id_column]
    if len(duplicates):
        raise DataError(
            f"{path} lists {len(duplicates)} {id_column}(s) more than once (e.g. {', '.join(duplicates[:3])}).",
            hint="Each image must appear once: remove the duplicate rows.",
        )
    return table


def _one_hot_labels(truth: pd.DataFrame, path: Path) -> tuple[list[str], list[str]]:
    """Labels of an ISIC one-hot ground truth, and its class order (UNK kept only if used)."""
    columns = [c for c in truth.columns if c != "image"]
    try:
        onehot = truth[columns].astype(float)
    except ValueError as exc:
        raise DataError(f"{path}: class columns must hold numbers: {exc}", hint="Use the file as distributed.") from None
    if not columns or ((onehot != 0) & (onehot != 1)).any().any() or (onehot.sum(axis=1) != 1).any():
        raise DataError(
            f"{path} is not a one-hot ground truth (each row needs exactly one 1.0 among {', '.join(columns)}).",
            hint="Use the official ISIC ground truth file.",
        )
    classes = [c for c in columns if c != "UNK" or onehot[c].any()]
    return list(onehot.idxmax(axis=1)), classes


def _require_values(table: pd.DataFrame, column: str, path: Path, id_column: str | None = None) -> None:
    """Refuse empty cells in ``column`` (stripped of spaces), naming a few rows by ``id_column``."""
    table[column] = table[column].str.strip().replace("", pd.NA)
    empty = table[column].isna()
    if empty.any():
        example = f" (e.g. {', '.join(table.loc[empty, id_column].astype(str)[:3])})" if id_column else ""
        raise DataError(f"{path} has {int(empty.sum())} row(s) without a {column}{example}.",
                        hint="Fill in or remove those rows.")


def _reject_unknown_ids(ids: pd.Series, known: pd.Series, path: Path, reference: Path) -> None:
    unknown = ids[~ids.isin(known)]
    if len(unknown):
        raise DataError(
            f"{path} has {len(unknown)} image id(s) that are not in {reference} (e.g. {', '.join(unknown[:3])}).",
            hint=f"Use the {path.name} that belongs to {reference.name}.",
        )


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"The {what} {path} does not exist or is not a folder.", hint="Check --data-dir.")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"The {what} {path} cannot be read (permission denied).", hint="Fix its permissions.")


def _printable(text: str) -> str:
    """A path as it can be written to UTF-8 files and terminals: undecodable bytes as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _stem(path: Path) -> str:
    return os.path.splitext(path.name)[0]


def _scan(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files in ``folder``, and (path, reason) for each entry named like an image
    that cannot be one. Hidden entries and other names are ignored."""
    files, unusable = [], []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                reason = _unusable(entry)
                if reason is None:
                    files.append(Path(entry.path))
                else:
                    unusable.append((_printable(entry.path), reason))
    except OSError as exc:
        raise DataError(f"The image folder {folder} cannot be read: {exc.strerror}.", hint="Fix its permissions.") from None
    return files, unusable


def _unusable(entry: os.DirEntry) -> str | None:
    """Why an entry named like an image cannot be used as one, or None if it can."""
    if _printable(entry.path) != entry.path:
        return "its path is not valid UTF-8 (rename it)"
    try:
        if entry.is_file():
            return None
        if entry.is_dir():
            return "is a folder, not an image file"
        os.stat(entry.path)  # raises for a symbolic link that leads nowhere
        return "not a regular file"
    except FileNotFoundError:
        return f"broken symbolic link (its target {_printable(os.readlink(entry.path))} does not exist)"
    except OSError as exc:  # e.g. a symbolic link that points back at itself
        return f"cannot be read ({exc.strerror or exc})"


def _index_images(folders: list[Path], *, required: bool) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Map image id (file name without extension) -> path, over ``folders``; also the
    unusable entries. Two files for one id are refused: which one is labelled is unclear."""
    present = [f for f in folders if f.is_dir()]
    if required and not present:
        raise DataError(
            f"Image folder {' / '.join(str(f) for f in folders)} not found.",
            hint="Unpack the images of the data set there, as distributed.",
        )
    index: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    clashes = []
    for folder in present:
        files, unusable = _scan(folder)
        skipped += unusable
        for path in sorted(files):
            if _stem(path) in index:
                clashes.append(f"{index[_stem(path)]} and {path.name}")
            index.setdefault(_stem(path), path)
    if clashes:
        raise DataError(f"{len(clashes)} image id(s) have more than one file (e.g. {'; '.join(clashes[:3])}): "
                        "which one the label is for is unclear.", hint="Keep one file per image id.")
    return index, skipped


def _class_folders(root: Path) -> list[Path]:
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"The data folder {root} cannot be read: {exc.strerror}.", hint="Fix its permissions.") from None
    return [d for d in subdirs if any(_scan(d))]  # with images, or entries named like images


def _finish(dataset: Dataset, images: dict[str, Path] | None) -> Dataset:
    """Attach image paths (``images``: id -> path; None when ``path`` is already set),
    list label rows without an image, make groups complete and order the rows."""
    table = dataset.manifest
    if images is not None:
        table["path"] = table["image_id"].map(lambda i: str(images[i]) if i in images else pd.NA)
        missing = table["path"].isna()
        dataset.missing = sorted(table.loc[missing, "image_id"])
        table = table.loc[~missing]
    if "source" not in table.columns:
        table["source"] = dataset.source
    table["source"] = table["source"].fillna(dataset.source)
    # Images without a lesion/patient id are their own group.
    group = table["group_id"].astype("string").str.strip().replace("", pd.NA)
    table = table.assign(group_id=group.fillna(table["image_id"]).astype(str))
    table = table[MANIFEST_COLUMNS + [c for c in table.columns if c not in MANIFEST_COLUMNS]]
    dataset.manifest = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    return dataset


def combine_datasets(datasets: list[Dataset], classes: list[str] | None = None) -> Dataset:
    """One data set from several, in the label space of the first; ``classes`` as in
    :func:`read_dataset`.

    ISIC 2019 labels become HAM10000's where the first data set uses those (AK and SCC both
    become ``akiec``); otherwise every data set must use the first one's class names. An image
    id found in several data sets is kept from the first of them. A label row without an
    image is ``missing`` only where no data set has that image.
    """
    first = datasets[0]
    if len(datasets) > 1:
        first = _joined(datasets)
    if classes is not None:
        _restrict_classes(first, classes)
        if first.manifest.empty:
            raise DataError(f"No images of the classes {', '.join(classes)} were found.", hint="Check the classes setting.")
    return first


def _joined(datasets: list[Dataset]) -> Dataset:
    first = datasets[0]
    tables, notes = [], []
    for dataset in datasets:
        tables.append(_in_label_space(dataset, first))
        notes += [f"{dataset.root}: {note}" for note in dataset.notes]
    table = pd.concat(tables, ignore_index=True)
    repeated = table["image_id"].duplicated()
    if repeated.any():
        notes.append(f"{int(repeated.sum())} image id(s) are in more than one data set "
                     f"(e.g. {', '.join(table.loc[repeated, 'image_id'][:3])}): each is kept from the first data set.")
    table = table.loc[~repeated].sort_values("image_id", kind="stable").reset_index(drop=True)
    classes = list(first.classes) + sorted(set(table["label"]) - set(first.classes))
    missing = sorted({i for dataset in datasets for i in dataset.missing} - set(table["image_id"]))
    skipped = [entry for dataset in datasets for entry in dataset.skipped]
    return Dataset("+".join(d.source for d in datasets), first.root, classes, table, missing, notes, skipped)


def _in_label_space(dataset: Dataset, reference: Dataset) -> pd.DataFrame:
    """``dataset``'s manifest with labels named as ``reference``'s (DataError if impossible)."""
    table = dataset.manifest
    if set(dataset.classes) <= set(reference.classes):
        return table
    if set(dataset.classes) <= set(ISIC2019_TO_HAM) and set(reference.classes) <= set(ISIC2019_TO_HAM.values()):
        return table.assign(label=table["label"].map(ISIC2019_TO_HAM), isic2019_label=table["label"])
    raise DataError(
        f"The classes of {dataset.root} ({', '.join(dataset.classes)}) do not fit those of {reference.root} "
        f"({', '.join(reference.classes)}).",
        hint="Give data sets with the same class names; ISIC 2019 labels fit HAM10000's 7 classes "
             "(list the HAM10000 folder first), or use --isic2019-labels to give HAM10000 the 8 ISIC 2019 classes.",
    )


def _restrict_classes(dataset: Dataset, classes: list[str]) -> None:
    unknown = [c for c in classes if c not in dataset.classes]
    if unknown:
        raise DataError(
            f"Class(es) {', '.join(unknown)} are not in the data set at {dataset.root}.",
            hint=f"Its classes are: {', '.join(dataset.classes)}.",
        )
    keep = dataset.manifest["label"].isin(classes)
    if not keep.all():
        dataset.notes.append(f"Left out {int((~keep).sum())} image(s) of classes not in {', '.join(classes)}.")
    dataset.manifest = dataset.manifest.loc[keep].reset_index(drop=True)
    dataset.classes = list(classes)


def _missing_hint(dataset: Dataset) -> str:
    if dataset.missing:
        return f"{len(dataset.missing)} label rows have no image file (e.g. {dataset.missing[0]}): unpack the images."
    return "Check --data-dir and --source."

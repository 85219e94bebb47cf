"""The ``melanoma`` command: thin Typer commands over the library.

This module and the server's start-up are the only places that read the config file
and the environment. Each command builds the effective :class:`Settings` with
:func:`settings_for` (config file < ``MELANOMA_*`` < flags), then calls library functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from melanoma.config import Settings, load_settings
from melanoma.errors import MelanomaError

app = typer.Typer(
    name="melanoma",
    help="Dermoscopic skin-lesion classification: prepare data, train, evaluate, explain, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _global_options(
    ctx: typer.Context,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", "-c", envvar="MELANOMA_CONFIG", help="TOML file with settings (see `melanoma config show`)."),
    ] = None,
) -> None:
    ctx.obj = {"config": config}


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


def main() -> None:
    """Console-script entry point: user mistakes become one clear message and exit 2."""
    try:
        app()
    except MelanomaError as exc:
        console.print(f"[bold red]Error:[/] {exc}", highlight=False)
        if exc.hint:
            console.print(f"[yellow]Hint:[/] {exc.hint}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        sys.exit(130)

"""The ``melanoma`` command: thin Typer commands over the library.

This package and the server's start-up are the only places that read the config file
and the environment. Each command builds the effective :class:`Settings` with
:func:`~melanoma.cli.base.settings_for` (config file < ``MELANOMA_*`` < flags), then calls
library functions. The commands live in one module per pipeline stage (:mod:`.data`,
:mod:`.training`, :mod:`.inference`, :mod:`.serving`) and register themselves on the shared
``app`` of :mod:`.base` when imported, in the order ``melanoma --help`` lists them.
"""

from __future__ import annotations

import os
import sys

from melanoma.cli import data, inference, serving, training  # noqa: F401  (importing registers the commands)
from melanoma.cli.base import app, console, out
from melanoma.errors import MelanomaError
from melanoma.quiet import quiet_tensorflow

__all__ = ["app", "console", "main", "out"]


def main() -> None:
    """Console-script entry point: user mistakes become one clear message and exit 2."""
    # TensorFlow's C++ start-up chatter hides the output researchers read (MELANOMA_TF_LOGS=1
    # shows it); the backend is chosen by the --backend option, before Keras is imported.
    quiet_tensorflow(os.environ)
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

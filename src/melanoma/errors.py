"""Errors meant for the user: the CLI prints their message, without a traceback."""


class MelanomaError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option).

    The message names the file and the problem; ``hint`` says how to fix it.
    """

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ImageError(MelanomaError):
    """One image cannot be used (undecodable, too large, too small)."""


class DataError(MelanomaError):
    """A data set, CSV or archive is malformed or missing."""


class ModelError(MelanomaError):
    """A model or run directory cannot be built, loaded or used."""

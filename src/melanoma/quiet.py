"""Keep TensorFlow's start-up chatter out of the command's output (and out of the server's
log, whose lines are JSON: the CLI and each worker process of ``serve --workers N`` call it).

TensorFlow's C++ libraries log from their static initialisers, while ``import tensorflow``
loads them, through absl before absl's logging is set up: every such line (``WARNING: All
log messages before absl::InitializeLog() is called are written to STDERR``, then ``I0000
00:00:... port.cc:153] oneDNN custom operations are on ...``, once per library) goes straight
to file descriptor 2, and ``TF_CPP_MIN_LOG_LEVEL`` is read only after them. So the import of
``tensorflow`` runs with file descriptor 2 pointed at a temporary file, and what it wrote is
copied back to the real stderr without absl's informational lines. ``TF_CPP_MIN_LOG_LEVEL=2``
quiets what TensorFlow logs later. oneDNN itself stays on.

``MELANOMA_TF_LOGS=1`` leaves all of it alone (for debugging TensorFlow).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from types import ModuleType

TF_LOGS_VARIABLE = "MELANOMA_TF_LOGS"
# absl's prefix: severity letter, MMDD hh:mm:ss.micros (before absl is set up, "0000 00:00:"
# and seconds since 1970), thread id, file:line]
ABSL_INFO_LINE = re.compile(rb"^I\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
ABSL_PREINIT_LINE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def quiet_tensorflow(environ: MutableMapping[str, str]) -> None:
    """Unless ``MELANOMA_TF_LOGS`` is set (to anything but 0): quiet TensorFlow's own logging
    and filter its import's absl lines. Call before anything imports TensorFlow."""
    if environ.get(TF_LOGS_VARIABLE, "0") not in ("", "0"):
        return
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def without_absl_info(output: bytes) -> bytes:
    """``output`` without absl's informational lines and its pre-initialisation notice."""
    kept = [line for line in output.splitlines(keepends=True)
            if not (ABSL_INFO_LINE.match(line) or line.rstrip(b"\r\n") == ABSL_PREINIT_LINE)]
    return b"".join(kept)


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """File descriptor 2 goes to a temporary file; on the way out, what was written there is
    copied to the real stderr, without absl's informational lines (all of it after an error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            written = capture.read()
            with open(2, "wb", closefd=False) as stderr:
                stderr.write(written if failed else without_absl_info(written))


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the other finders do, and runs its import in :func:`filtered_stderr`."""

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once is enough, and find_spec below must not find this finder
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # its own loader from now on (resources)
        with filtered_stderr():
            self.loader.exec_module(module)

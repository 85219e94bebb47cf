"""Which code made an artefact: the git commit of this package's checkout, and whether
its tree had uncommitted changes.

``run.json``, the archive's ``header.json``, the model card and ``model.onnx`` record it,
so that a result can be traced back to the code that produced it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

GIT_TIMEOUT_SECONDS = 10


def git_state(path: Path | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout that holds ``path`` (default:
    this package's source), or None where there is none: an installed wheel, a Docker
    image, a machine without git.

    The file must be tracked by that checkout: a package installed into a virtual
    environment that happens to sit inside some other repository is not that repository's
    code. Untracked files that git does not ignore count as changes (a new module is code).
    """
    path = Path(path) if path is not None else Path(__file__).with_name("__init__.py")
    folder = path if path.is_dir() else path.parent
    tracked = ["ls-files", "--error-unmatch", path.name] if path.is_file() else ["rev-parse", "--git-dir"]
    if _git(folder, *tracked) is None:
        return None
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain")
    if commit is None or status is None:
        return None
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def _git(folder: Path, *args: str) -> str | None:
    """stdout of ``git -C folder args``, or None if git is absent or the command fails."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None

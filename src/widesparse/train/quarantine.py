"""Moving a damaged file or run folder aside instead of deleting it: nothing a user made is ever lost.

A run whose results fail verification, or a checkpoint that cannot be read, is moved to
``ROOT/quarantine/<name>-<UTC time>/`` with a ``REASON.txt`` beside it, and the caller starts that run again.
Sweeps quarantine into their output folder (``OUT/quarantine/``); ``widesparse train`` into the folder that
holds its run folders.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

__all__ = ["QUARANTINE", "quarantine"]

QUARANTINE = "quarantine"
log = logging.getLogger(__name__)


def quarantine(path: str | os.PathLike[str], root: str | os.PathLike[str], reason: str) -> Path:
    """Move ``path`` (a file or a folder) into a new folder under ``root/quarantine/`` with ``REASON.txt``;
    returns that folder. Logs one warning line naming both paths and the reason."""
    path, root = Path(path), Path(root)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = root / QUARANTINE / f"{path.name}-{stamp}"
    dest = base
    for i in range(1, 10_000):
        try:
            dest.mkdir(parents=True)
            break
        except FileExistsError:
            dest = base.with_name(f"{base.name}-{i}")
    shutil.move(str(path), str(dest / path.name))
    (dest / "REASON.txt").write_text(f"{path}\n{reason}\n")
    log.warning("widesparse: moved %s to %s: %s", path, dest, reason)
    return dest

"""Crash-safe files for the training engine: atomic writes, checkpoints, RNG state capture.

Serves :mod:`widesparse.train.engine`; imports nothing from ``widesparse``.

Atomic write: the bytes go to a temporary file in the target's folder, are flushed and ``fsync``-ed, and the
temporary file is renamed over the target with ``os.replace`` (atomic on POSIX and Windows); the folder is
then ``fsync``-ed so the rename itself survives a power cut. A crash at any point leaves either the old file
or the new one, never a mix; a stray ``.<name>.*.tmp`` may remain and is ignored.

:class:`DeferredInterrupt` turns the first Ctrl-C into a flag that the training loop checks between steps,
so the checkpoint it then writes holds a consistent state (never half a step).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no pickled code is ever executed on load).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "DeferredInterrupt",
    "atomic_write",
    "get_rng_state",
    "load_checkpoint",
    "read_torch_file",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]

CHECKPOINT_FORMAT = "widesparse-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (the message names the file)."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str = "w") -> None:
    """Create or replace ``path`` atomically with what ``write(file)`` writes (``mode`` ``"w"`` or ``"wb"``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (non-JSON values via ``str``)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str) + "\n"))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (``format`` is added); the previous file stays intact on failure."""
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f), mode="wb")


def read_torch_file(path: str | os.PathLike[str], what: str = "file", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error naming the file and what is wrong with it.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for an unreadable one: truncated
    or not a torch file, or holding Python objects that need code to load (widesparse writes only tensors and plain
    data, and never runs pickled code, so such a file is not one of ours). torch's advice to load with
    ``weights_only=False`` is never passed on.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():  # the unpickler warns about foreign pickle protocols before it fails
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        why = "it holds Python objects that need code to load (widesparse files hold tensors and plain data only)"
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).split(". ")[0].strip()
        why = f"it is truncated or not a torch file ({type(e).__name__}: {first})"
    except Exception as e:  # any other way a garbage file fails inside the unpickler
        why = f"it is not a torch file ({type(e).__name__})"
    raise CheckpointError(f"{what} {path} cannot be read: {why}")


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``); clear errors name the file."""
    path = Path(path)
    state = read_torch_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a widesparse checkpoint (format {found!r}, want {CHECKPOINT_FORMAT!r})")
    return state


def get_rng_state() -> dict[str, Any]:
    """torch's global RNG states: CPU, and every CUDA device when CUDA is initialised."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DeferredInterrupt:
    """Context manager: the first SIGINT (Ctrl-C) only sets ``requested``; a second one interrupts at once.

    Outside the main thread (where signal handlers cannot be installed) it does nothing and Ctrl-C raises
    ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._old)

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
